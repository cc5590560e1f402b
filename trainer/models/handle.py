"""ModelHandle: the one interface every training mode uses to talk to a loaded model.

Backends (diffusers, A1111 ldm/sgm, Forge) implement it; training modes never import a backend.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch

from trainer.jobs.vocabulary import TARGET_SETS, Arch, KeyPrefix, Prediction, TargetSet
from trainer.models import naming

PREDICTIONS = ("eps", "v")


class ModelError(Exception):
    """A model cannot be loaded or used; the message says what to do."""


@dataclass
class Cond:
    """Conditioning exactly as the host feeds its UNet.

    ``crossattn`` [B, T, D] for every architecture; SDXL adds ``pooled`` [B, 1280] and
    ``time_ids`` [B, 6] (original size, crop top-left, target size, in pixels). Backends that feed
    sgm's UNet directly (A1111, Forge) give SDXL's ``vector`` [B, 2816] instead: pooled OpenCLIP-G
    followed by the Fourier embeddings of the size ids, exactly as the host's conditioner made it.
    """

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    vector: torch.Tensor | None = None

    def _map(self, fn) -> "Cond":
        return replace(self, **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
                                for f in fields(self)})

    def to(self, device=None, dtype=None) -> "Cond":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def __getitem__(self, index) -> "Cond":
        return self._map(lambda t: t[index])

    def detach(self) -> "Cond":
        return self._map(lambda t: t.detach())

    def repeat(self, n: int) -> "Cond":
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def __len__(self) -> int:
        return self.crossattn.shape[0]

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        first = conds[0]
        return Cond(**{f.name: (None if getattr(first, f.name) is None
                                else torch.cat([getattr(c, f.name) for c in conds]))
                       for f in fields(Cond)})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


#: Named target sets (kohya's conventions). "attn": attention projections only;
#: "attn_mlp": every Linear / 1x1 conv inside the transformer blocks (kohya's default LoRA);
#: "all": that plus the resnets and down/up-samplers (LoCon).



@dataclass(frozen=True)
class TargetOptions:
    target_set: TargetSet = "attn_mlp"
    text_encoder: bool = False
    #: Block ids to train; empty = every block.
    blocks: tuple[str, ...] = ()

    def __post_init__(self):
        if self.target_set not in TARGET_SETS:
            raise ValueError(f"target set must be one of {', '.join(TARGET_SETS)}, got {self.target_set!r}")
        unknown = [b for b in self.blocks if b not in naming.BLOCK_IDS]
        if unknown:
            raise ValueError(f"unknown block id(s) {', '.join(unknown)}; valid: {', '.join(naming.BLOCK_IDS)}")


@dataclass(frozen=True)
class LoraTarget:
    key: str                   # kohya key, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    module: torch.nn.Module    # nn.Linear or nn.Conv2d; nn.MultiheadAttention when ``fused`` is set
    block_id: str | None       # BASE, IN00..OUT11, None outside the blocks
    fused: str | None = None   # "q" / "k" / "v" / "out": a projection nn.MultiheadAttention uses as a bare weight


_ATTN_RE = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_MLP_RE = r"(transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out))$"
_RESNET_RE = r"resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)$|(down|up)samplers\.0\.conv$"
_TE_ATTN_RE = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
_TE_MLP_RE = r"mlp\.(fc1|fc2)$"


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer: ``nn.Linear``, or a host's own module of that form (Forge's ``backend.operations.Linear``
    is a plain ``nn.Module`` with ``in_features``, ``out_features`` and a 2-D ``weight``)."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def unet_path_in_target_set(diffusers_path: str, target_set: TargetSet) -> bool:
    """Whether a UNet module (diffusers spelling) belongs to a target set."""
    if re.search(_ATTN_RE, diffusers_path):
        return True
    if target_set in ("attn_mlp", "all") and re.search(_MLP_RE, diffusers_path):
        return True
    return target_set == "all" and re.search(_RESNET_RE, diffusers_path) is not None


def text_encoder_path_in_target_set(path: str, target_set: TargetSet) -> bool:
    if re.search(_TE_ATTN_RE, path):
        return True
    return target_set != "attn" and re.search(_TE_MLP_RE, path) is not None


def weights_fingerprint(arch: str, modules: list[torch.nn.Module]) -> str:
    """A cheap fingerprint of some modules' weights (a strided sample of every tensor)."""
    h = hashlib.sha256(arch.encode())
    for module in modules:
        for name, t in module.state_dict().items():
            flat = t.detach().flatten()
            h.update(name.encode() + str(tuple(t.shape)).encode())
            h.update(flat[:: max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BaseModel:
    """The checkpoint a LoRA was trained on: kohya's ``ss_sd_model_name``, ``ss_sd_model_hash`` (the 8-hex
    legacy hash of 64 KiB at 1 MiB, as A1111's ``model_hash``) and ``ss_new_sd_model_hash`` (sha256 of the file)."""

    name: str = ""
    legacy_hash: str = ""
    sha256: str = ""


def checkpoint_hashes(path: str) -> tuple[str, str]:
    """(legacy 8-hex hash, full sha256) of a checkpoint file, as A1111 and kohya compute them."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
        f.seek(0)
        full = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            full.update(block)
    return legacy, full.hexdigest()


class ModelHandle(ABC):
    """What a training mode may ask of a loaded model."""

    arch: Arch
    prediction: Prediction
    alphas_cumprod: torch.Tensor   # [1000] float32 on CPU
    device: torch.device
    dtype: torch.dtype             # dtype of the frozen weights
    vae_scale: int = 8             # pixels per latent cell (8 for every SD model; the demo model uses 4)

    def __init__(self) -> None:
        self._own_lock = threading.Lock()

    @property
    @abstractmethod
    def unet(self) -> torch.nn.Module: ...

    @abstractmethod
    def text_encoders(self) -> list[tuple[KeyPrefix, torch.nn.Module]]:
        """[(kohya prefix, module)] — ``lora_te_`` for SD1/SD2, ``lora_te1_``/``lora_te2_`` for SDXL."""

    @abstractmethod
    def encode_prompts(self, texts: list[str], size: tuple[int, int]) -> Cond:
        """Conditioning for ``texts`` at image ``size`` (height, width) in pixels, as inference sees it."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] -> scaled latents [B,4,H/f,W/f], f = ``vae_scale``."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""

    @abstractmethod
    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """UNet forward: the model output (eps or v, see ``prediction``)."""

    @abstractmethod
    def lora_targets(self, options: TargetOptions) -> list[LoraTarget]:
        """Modules a LoRA attaches to, with their kohya keys and block ids."""

    @property
    def identity(self) -> str:
        """A string that changes when the VAE / text encoders change (cache keys)."""
        return f"{type(self).__name__}:{self.arch}"

    @property
    def unet_layout(self) -> naming.UNetLayout:
        return naming.SDXL_LAYOUT if self.arch == "sdxl" else naming.SD1_LAYOUT

    #: Whether ``set_gradient_checkpointing`` works on this backend.
    supports_gradient_checkpointing: bool = False

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass (less memory, ~30 % more time)."""
        raise ModelError(f"{type(self).__name__} cannot use gradient checkpointing")

    def base_model(self) -> BaseModel:
        """Which checkpoint this is (name and hashes as the WebUIs and kohya write them); empty when unknown."""
        return BaseModel()

    def base_modules(self) -> list[torch.nn.Module]:
        """Every module of the host's model; a job trains only its own LoRA, never these."""
        return [self.unet] + [m for _, m in self.text_encoders()]

    @contextlib.contextmanager
    def predicting(self, prediction: str) -> Iterator[None]:
        """The model read as predicting ``prediction`` (a job's override; "auto" keeps what the model says)
        for the duration: the loss, the teacher, previews, grids and the copier's checks all ask ``prediction``."""
        if prediction in ("", "auto") or prediction == self.prediction:
            yield
            return
        detected, self.prediction = self.prediction, prediction
        try:
            yield
        finally:
            self.prediction = detected

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The host's weights frozen while a job holds the model: ``requires_grad`` off (a host such as A1111
        leaves it on, and every step would then compute and keep a second UNet of gradients), and afterwards
        the flags as they were and no ``.grad`` left on any base weight."""
        params = list({id(p): p for m in self.base_modules() for p in m.parameters()}.values())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.grad = None
                if flag and (p.is_leaf and not p.is_inference()):
                    p.requires_grad_(True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held around each training step so generation and training never share the model."""
        with self._own_lock:
            yield

    @property
    def empty_cond_is_zeros(self) -> bool:
        """SDXL's unconditional input is zeros (crossattn and pooled), SD1/SD2 use the empty prompt."""
        return self.arch == "sdxl"

    def uncond(self, batch: int, size: tuple[int, int]) -> Cond:
        """The unconditional conditioning classifier-free guidance uses for this architecture."""
        cond = self.encode_prompts([""] * batch, size)
        if self.empty_cond_is_zeros:
            cond = replace(cond, crossattn=torch.zeros_like(cond.crossattn),
                           pooled=None if cond.pooled is None else torch.zeros_like(cond.pooled))
        return cond
