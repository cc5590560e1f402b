"""LoRA file formats as an open registry of small handlers (A1111 ``network_*.py`` style).

A file is a flat ``{key: tensor}`` map. Keys are grouped by module (``<module>.<suffix>``); each
handler looks at one group and returns the module's weight delta, or None when the group is not
its format. Used by the merge today and meant for the loader later.

The delta is returned in its cheapest exact form:

- :class:`LowRankDelta` ``scale * up @ down`` (LoRA/LoCon, PEFT A/B), flattened to 2-D;
- :class:`DenseDelta` the full ``[out, in*k*k]`` matrix (LoHa, LoKr: a Hadamard or Kronecker
  product has no small factor form, so these are the only formats that build one).

Pure: no file I/O here; tensors come through ``KeyGroup.load``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Union

import torch

from trainer.models.naming import (
    SD1_LAYOUT, SDXL_LAYOUT, TE_PREFIXES, UNET_PREFIX, text_encoder_kohya_key, unet_kohya_key,
)


class LoraFormatError(ValueError):
    """A tensor group that no handler accepts, or one we refuse (DoRA)."""


@dataclass(frozen=True)
class Geometry:
    """Shape of the module's weight: Linear ``[out, in]`` or Conv2d ``[out, in, kh, kw]``.

    ``kernel`` is None for Linear. ``kernel_known`` is False when a format stores only
    ``in*kh*kw`` (LoHa without Tucker): the merge then takes the kernel from another input or
    from the module name.
    """

    out_features: int
    in_features: int
    kernel: tuple[int, int] | None = None
    kernel_known: bool = True

    @property
    def flat_in(self) -> int:
        kh, kw = self.kernel or (1, 1)
        return self.in_features * kh * kw

    @property
    def is_conv(self) -> bool:
        return self.kernel is not None

    @property
    def is_spatial_conv(self) -> bool:
        """A conv with a kernel larger than 1x1 (kohya's ``conv_dim`` applies to these)."""
        return self.kernel is not None and self.kernel != (1, 1)

    def describe(self) -> str:
        if self.kernel is None:
            return f"[{self.out_features}, {self.in_features}]"
        return f"[{self.out_features}, {self.in_features}, {self.kernel[0]}, {self.kernel[1]}]"

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank, 1, 1) if self.is_conv else (self.out_features, rank)

    def down_shape(self, rank: int) -> tuple[int, ...]:
        if self.kernel is None:
            return (rank, self.in_features)
        return (rank, self.in_features, *self.kernel)


@dataclass(frozen=True)
class LowRankDelta:
    """``delta W = scale * up @ down`` with ``up`` [out, r] and ``down`` [r, in*k*k]."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    geometry: Geometry
    format: str

    @property
    def rank(self) -> int:
        return self.up.shape[1]


@dataclass(frozen=True)
class DenseDelta:
    """``delta W`` as a full ``[out, in*k*k]`` matrix, its scale already applied."""

    weight: torch.Tensor
    geometry: Geometry
    format: str

    @property
    def rank(self) -> int:
        return min(self.weight.shape)


ModuleDelta = Union[LowRankDelta, DenseDelta]


@dataclass
class KeyGroup:
    """All tensors of one module in one file: ``suffix -> full key``, loaded on demand."""

    file: str
    module: str
    keys: dict[str, str]
    load: Callable[[str], torch.Tensor] = field(repr=False)

    def has(self, *suffixes: str) -> bool:
        return all(s in self.keys for s in suffixes)

    def tensor(self, suffix: str) -> torch.Tensor:
        return self.load(self.keys[suffix])

    def optional(self, suffix: str) -> torch.Tensor | None:
        return self.tensor(suffix) if suffix in self.keys else None

    def where(self) -> str:
        return f"'{self.file}', module '{self.module}'"


class FormatHandler(Protocol):
    name: str
    suffixes: tuple[str, ...]

    def create(self, group: KeyGroup) -> ModuleDelta | None: ...


def _alpha_over_rank(group: KeyGroup, rank: int) -> float:
    """kohya's scale ``alpha / rank``; a file without ``.alpha`` means alpha = rank (scale 1)."""
    alpha = group.optional("alpha")
    return 1.0 if alpha is None else float(alpha.float().item()) / rank


def _geometry_of_factors(up: torch.Tensor, down: torch.Tensor, group: KeyGroup) -> Geometry:
    if down.dim() == 4:
        if up.dim() != 4 or tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"{group.where()}: conv down {tuple(down.shape)} needs a 1x1 conv up, "
                                  f"got {tuple(up.shape)}")
        return Geometry(up.shape[0], down.shape[1], (down.shape[2], down.shape[3]))
    if down.dim() != 2 or up.dim() != 2:
        raise LoraFormatError(f"{group.where()}: unexpected factor shapes up {tuple(up.shape)}, "
                              f"down {tuple(down.shape)}")
    return Geometry(up.shape[0], down.shape[1], None)


class KohyaLoRA:
    """kohya LoRA / LoCon: ``lora_down``, ``lora_up``, ``alpha``, optional Tucker ``lora_mid``."""

    name = "LoRA"
    suffixes = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")

    def create(self, group: KeyGroup) -> ModuleDelta | None:
        if not group.has("lora_down.weight", "lora_up.weight"):
            return None
        up, down = group.tensor("lora_up.weight"), group.tensor("lora_down.weight")
        mid = group.optional("lora_mid.weight")
        if mid is not None and up.shape[1] == down.shape[0]:
            # LyCORIS Tucker LoCon: down is 1x1 [r, in, 1, 1], mid [r, r, k, k]; fold mid into down,
            # which keeps it a rank-r factor of size r x in*k*k.
            down = torch.einsum("ijkl,jc->ickl", mid.float(), down.float().flatten(1))
        return _low_rank_delta(up, down, group, self.name, "lora_up", "lora_down")


class PeftLoRA:
    """PEFT / diffusers ``lora_A`` (down) and ``lora_B`` (up); optional ``.alpha`` as kohya."""

    name = "PEFT LoRA"
    suffixes = ("lora_A.weight", "lora_B.weight", "alpha")

    def create(self, group: KeyGroup) -> ModuleDelta | None:
        if not group.has("lora_A.weight", "lora_B.weight"):
            return None
        return _low_rank_delta(group.tensor("lora_B.weight"), group.tensor("lora_A.weight"), group, self.name,
                               "lora_B", "lora_A")


def _low_rank_delta(up: torch.Tensor, down: torch.Tensor, group: KeyGroup, kind: str, up_name: str,
                    down_name: str) -> LowRankDelta:
    """A checked rank-r factor pair (the shared part of every up/down format)."""
    rank = down.shape[0]
    if rank == 0 or up.dim() < 2 or up.shape[1] == 0:
        raise LoraFormatError(f"{group.where()}: {down_name} has rank 0 (an empty factor): the file is damaged "
                              "or was cut to nothing; use another LoRA")
    if up.shape[1] != rank:
        raise LoraFormatError(f"{group.where()}: {up_name} has rank {up.shape[1]}, {down_name} {rank}")
    geometry = _geometry_of_factors(up, down, group)
    return LowRankDelta(up.flatten(1), down.flatten(1), _alpha_over_rank(group, rank), geometry, kind)


def _cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS Tucker rebuild: ``t`` [r, r, k, k], ``wa`` [r, out], ``wb`` [r, in] -> [out, in, k, k]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


class LoHa:
    """LyCORIS LoHa: ``(w1a @ w1b) * (w2a @ w2b) * alpha / r`` (Hadamard product: built dense)."""

    name = "LoHa"
    suffixes = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")

    def create(self, group: KeyGroup) -> ModuleDelta | None:
        if not group.has("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            return None
        w1a, w1b = group.tensor("hada_w1_a").double(), group.tensor("hada_w1_b").double()
        w2a, w2b = group.tensor("hada_w2_a").double(), group.tensor("hada_w2_b").double()
        rank = w1b.shape[0]
        t1, t2 = group.optional("hada_t1"), group.optional("hada_t2")
        if t1 is not None and t2 is not None:
            w1 = _cp_weight(t1.double(), w1a, w1b)
            w2 = _cp_weight(t2.double(), w2a, w2b)
            geometry = Geometry(w1.shape[0], w1.shape[1], (w1.shape[2], w1.shape[3]))
        else:
            w1 = w1a.flatten(1) @ w1b.flatten(1)
            w2 = w2a.flatten(1) @ w2b.flatten(1)
            if w1b.dim() == 4:
                geometry = Geometry(w1.shape[0], w1b.shape[1], (w1b.shape[2], w1b.shape[3]))
            else:
                # in*k*k only: the kernel is resolved by the caller (another input or the name)
                geometry = Geometry(w1.shape[0], w1.shape[1], None, kernel_known=False)
        dense = (w1 * w2).reshape(geometry.out_features, -1) * _alpha_over_rank(group, rank)
        return DenseDelta(dense, geometry, self.name)


class LoKr:
    """LyCORIS LoKr: ``kron(w1, w2)``, each full or ``a @ b`` (Kronecker product: built dense)."""

    name = "LoKr"
    suffixes = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")

    def create(self, group: KeyGroup) -> ModuleDelta | None:
        has_1 = group.has("lokr_w1") or group.has("lokr_w1_a", "lokr_w1_b")
        has_2 = group.has("lokr_w2") or group.has("lokr_w2_a", "lokr_w2_b")
        if not (has_1 and has_2):
            return None
        rank = None
        if group.has("lokr_w1"):
            w1 = group.tensor("lokr_w1").double()
        else:
            w1b = group.tensor("lokr_w1_b").double()
            rank = w1b.shape[0]
            w1 = group.tensor("lokr_w1_a").double() @ w1b
        if group.has("lokr_w2"):
            w2 = group.tensor("lokr_w2").double()
        else:
            w2a, w2b = group.tensor("lokr_w2_a").double(), group.tensor("lokr_w2_b").double()
            rank = w2b.shape[0]
            t2 = group.optional("lokr_t2")
            if t2 is not None:
                w2 = _cp_weight(t2.double(), w2a, w2b)
            else:
                w2 = (w2a @ w2b.flatten(1)).reshape(w2a.shape[0], *w2b.shape[1:])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        dense = torch.kron(w1, w2)
        if dense.dim() == 4:
            geometry = Geometry(dense.shape[0], dense.shape[1], (dense.shape[2], dense.shape[3]))
        else:
            geometry = Geometry(dense.shape[0], dense.shape[1], None)
        # A1111: alpha / dim only when a factor is decomposed (dim known), else scale 1
        scale = _alpha_over_rank(group, rank) if rank is not None else 1.0
        return DenseDelta(dense.reshape(geometry.out_features, -1) * scale, geometry, self.name)


#: The registry, tried in order. Append a handler to support a new format.
FORMATS: list[FormatHandler] = [KohyaLoRA(), PeftLoRA(), LoHa(), LoKr()]

#: Suffixes we recognise but refuse, with the reason shown to the user.
REFUSED_SUFFIXES: dict[str, str] = {
    "dora_scale": "DoRA (weight-decomposed LoRA) cannot be merged as a plain low-rank delta",
    "lora_magnitude_vector": "DoRA (weight-decomposed LoRA) cannot be merged as a plain low-rank delta",
    "lora_magnitude_vector.weight": "DoRA (weight-decomposed LoRA) cannot be merged as a plain low-rank delta",
}


def known_suffixes() -> tuple[str, ...]:
    """Every suffix any handler (or refusal) knows, longest first so ``lora_A.weight`` wins over ``weight``."""
    found = {s for h in FORMATS for s in h.suffixes} | set(REFUSED_SUFFIXES)
    return tuple(sorted(found, key=len, reverse=True))


def group_keys(keys: list[str], file: str, load: Callable[[str], torch.Tensor]) -> dict[str, KeyGroup]:
    """Split ``<module>.<suffix>`` keys into per-module groups; unknown keys raise."""
    suffixes = known_suffixes()
    groups: dict[str, KeyGroup] = {}
    for key in keys:
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise LoraFormatError(
                f"'{file}': key '{key}' is not a LoRA/LoCon, PEFT, LoHa or LoKr tensor (unknown LoRA type)")
        module = key[: -len(suffix) - 1]
        groups.setdefault(module, KeyGroup(file, module, {}, load)).keys[suffix] = key
    return groups


def module_delta(group: KeyGroup) -> ModuleDelta:
    """The first handler's answer for this group; DoRA and unmatched groups raise."""
    for suffix, reason in REFUSED_SUFFIXES.items():
        if suffix in group.keys:
            raise LoraFormatError(f"{group.where()}: key '{group.keys[suffix]}': {reason}")
    for handler in FORMATS:
        delta = handler.create(group)
        if delta is not None:
            return delta
    raise LoraFormatError(f"{group.where()}: tensors {sorted(group.keys)} form no known LoRA type "
                          "(LoRA/LoCon, PEFT lora_A/lora_B, LoHa, LoKr)")


# --- naming: every module is reported under its kohya name -------------------------------------

_SDXL_KEY_MARKERS = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                     "lora_unet_output_blocks_", "text_encoder_2.")


def arch_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` from ``ss_base_model_version`` / ``ss_v2`` / modelspec; None if silent."""
    version = (metadata.get("ss_base_model_version") or "").lower()
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v1"):
        return "sd1"
    if version.startswith("sd_v2"):
        return "sd2"
    if version:
        raise LoraFormatError(f"ss_base_model_version '{version}' is not SD1, SD2 or SDXL")
    spec = (metadata.get("modelspec.architecture") or "").lower()
    if spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if spec.startswith("stable-diffusion-v2"):
        return "sd2"
    if spec.startswith("stable-diffusion-v1"):
        return "sd1"
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None


def arch_from_keys(keys: list[str]) -> str | None:
    """``sdxl`` if any key is SDXL-only, ``sd1`` (SD1/SD2 family) if any is SD1/SD2-style, else None."""
    if any(m in k for k in keys for m in _SDXL_KEY_MARKERS):
        return "sdxl"
    if any(k.startswith(("lora_te_", "lora_unet_", "unet.", "text_encoder.")) for k in keys):
        return "sd1"
    return None


def kohya_module_name(module: str, arch: str) -> str:
    """The kohya name (DESIGN.md's table) of a module named either way in a file."""
    if module.startswith((UNET_PREFIX,) + TE_PREFIXES):
        return module
    path = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
    te_prefix = "lora_te1_" if arch == "sdxl" else "lora_te_"
    if path.startswith("text_encoder_2."):
        return text_encoder_kohya_key(path[len("text_encoder_2."):], "lora_te2_")
    if path.startswith("text_encoder."):
        return text_encoder_kohya_key(path[len("text_encoder."):], te_prefix)
    if path.startswith(("text_model.", "encoder.layers.")):
        return text_encoder_kohya_key(path, te_prefix)
    if path.startswith("unet."):
        path = path[len("unet."):]
    if path.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out",
                        "time_embedding.", "add_embedding.")):
        return unet_kohya_key(path, arch, SDXL_LAYOUT if arch == "sdxl" else SD1_LAYOUT)
    raise LoraFormatError(f"module '{module}' is neither a UNet nor a CLIP text-encoder module")


# --- kernel of a LoHa module whose file stores only in*k*k ------------------------------------

_SPATIAL_CONV_NAMES = ("_conv1", "_conv2", "_in_layers_2", "_out_layers_3", "_downsamplers_0_conv",
                       "_upsamplers_0_conv", "_0_op", "_conv", "lora_unet_conv_in", "lora_unet_conv_out")
_POINTWISE_CONV_NAMES = ("_conv_shortcut", "_skip_connection")


def kernel_from_name(kohya_name: str, arch: str) -> tuple[int, int] | None:
    """The SD UNet's kernel for a module name: (3, 3), (1, 1) or None (Linear).

    Only for formats that do not record it; SD1's attention ``proj_in``/``proj_out`` are 1x1 convs,
    SD2/SDXL's are Linear.
    """
    if kohya_name.endswith(_POINTWISE_CONV_NAMES):
        return (1, 1)
    if kohya_name.endswith(_SPATIAL_CONV_NAMES):
        return (3, 3)
    if arch == "sd1" and kohya_name.endswith(("_proj_in", "_proj_out")) and kohya_name.startswith(UNET_PREFIX):
        return (1, 1)
    return None
