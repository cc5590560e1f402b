"""The one LoRA reader: a ``.safetensors`` file -> its modules under kohya names, through the format registry.

Every caller reads LoRAs here — a job's ``init_lora``, a saved copier, the results grid, the merge —
so a file is refused for the same reasons with the same message everywhere: the header is checked
before anything is read (pickles and truncated files are refused unread), the architecture comes from
the metadata or the key spellings, and each module's tensors go through the registry of
``formats.py`` (kohya LoRA/LoCon, PEFT, LoHa, LoKr).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.lora.files import LoraFileError, read_header
from trainer.lora.formats import (
    KeyGroup, LoraFormatError, LowRankDelta, ModuleDelta, arch_from_keys, arch_from_metadata, group_keys,
    kohya_module_name, module_delta,
)


@dataclass
class LoraFile:
    """An opened LoRA file: architecture, metadata and its modules' tensor groups (read on demand)."""

    path: Path
    arch: str                         # sd1 | sd2 | sdxl (sd1 stands for the SD1/SD2 family when unsure)
    arch_certain: bool                # the metadata names it (keys only tell SDXL from SD1/SD2)
    metadata: dict[str, str]
    groups: dict[str, KeyGroup] = field(repr=False)

    def delta(self, module: str) -> ModuleDelta:
        try:
            delta = module_delta(self.groups[module])
        except LoraFormatError as e:
            raise LoraFileError(str(e)) from None
        # NaN or inf would surface much later as an SVD failure, a NaN loss blamed on the learning rate or
        # black images; every reader (start, copier, grid, merge) refuses it here, naming the module.
        tensors = (delta.up, delta.down) if isinstance(delta, LowRankDelta) else (delta.weight,)
        if not all(bool(torch.isfinite(t).all()) for t in tensors) or not math.isfinite(getattr(delta, "scale", 1.0)):
            raise LoraFileError(f"{self.path.name}: module {module} holds NaN or infinite values: the file is "
                                "damaged (often a training run that diverged); use another LoRA or an earlier save")
        return delta

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """{kohya key: (down, up, alpha)} in float32, in the module's own shapes (LoRA/LoCon/PEFT only)."""
        out = {}
        for name in sorted(self.groups):
            delta = self.delta(name)
            if not isinstance(delta, LowRankDelta):
                raise LoraFileError(f"{self.path.name}: module {name} is {delta.format}, which has no low-rank "
                                    "factors: LoHa and LoKr files can be merged but not used as a starting point")
            rank = delta.rank
            down = delta.down.float().reshape(delta.geometry.down_shape(rank))
            up = delta.up.float().reshape(delta.geometry.up_shape(rank))
            out[name] = (down, up, delta.scale * rank)
        if not out:
            raise LoraFileError(f"{self.path.name}: holds no LoRA tensors")
        return out


def family(arch: str) -> str:
    return "sdxl" if arch == "sdxl" else "sd"


def open_lora(path: str | Path, expected_arch: str | None = None) -> LoraFile:
    """Open ``path`` lazily (tensors are read module by module); refuses what is not a usable LoRA."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    read_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"{path.name}: not a readable safetensors file ({e})") from None
    metadata = dict(handle.metadata() or {})
    keys = list(handle.keys())
    if not keys:
        raise LoraFileError(f"{path.name}: holds no tensors")
    try:
        meta_arch = arch_from_metadata(metadata)
    except LoraFormatError as e:
        raise LoraFileError(f"{path.name}: {e}") from None
    key_arch = arch_from_keys(keys)
    if meta_arch and key_arch and family(meta_arch) != family(key_arch):
        raise LoraFileError(f"{path.name}: metadata says {meta_arch.upper()} but its keys are "
                            f"{key_arch.upper()}-style")
    arch = meta_arch or key_arch
    if arch is None:
        raise LoraFileError(f"{path.name}: cannot tell SD1/SD2 from SDXL (no ss_base_model_version, no "
                            f"lora_unet_/lora_te keys; first key '{keys[0]}')")
    if expected_arch is not None and family(arch) != family(expected_arch):
        raise LoraFileError(f"{path.name}: this LoRA is for {'SDXL' if arch == 'sdxl' else 'SD1/SD2'}, "
                            f"the model is {expected_arch.upper()}")

    def load(key: str) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for damaged data
            raise LoraFileError(f"{path.name}: tensor '{key}' cannot be read: {e}") from None

    try:
        groups = {kohya_module_name(m, arch): g for m, g in group_keys(keys, path.name, load).items()}
    except LoraFormatError as e:
        raise LoraFileError(str(e)) from None
    return LoraFile(path, arch, meta_arch is not None, metadata, groups)


def read_lora_factors(path: str | Path, expected_arch: str | None = None
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{kohya key: (down, up, alpha)} in float32 from a LoRA/LoCon (or PEFT) file."""
    return open_lora(path, expected_arch).factors()


def check_starting_point(path: str | Path, expected_arch: str | None = None, context_dim: int | None = None) -> int:
    """Refuse ``path`` as a job's ``init_lora`` for everything knowable without the model; returns its module count.

    Checks what :meth:`LoraNetwork.load_weights` would meet hours later: not a safetensors LoRA, damaged,
    LoHa/LoKr, NaN, mismatched ranks, another architecture (by family and, given the model's
    cross-attention width ``context_dim``, SD1 against SD2)."""
    factors = open_lora(path, expected_arch).factors()
    if context_dim:
        for key, (down, _up, _alpha) in factors.items():
            if key.endswith(("attn2_to_k", "attn2_to_v")) and down.shape[1] != context_dim:
                raise LoraFileError(
                    f"{Path(path).name}: its cross-attention ({key}) reads {down.shape[1]} text features, the model's "
                    f"text encoder gives {context_dim}: the LoRA is for another architecture "
                    "(SD1 768, SD2 1024, SDXL 2048)")
    return len(factors)
