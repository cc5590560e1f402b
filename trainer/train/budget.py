"""How much memory a job needs on its device, computed from the model's shapes and the job's settings.

Pure: no model is loaded, nothing is allocated. The parameter sizes come from our own configs
(:mod:`trainer.models.shapes`); the activations from per-block coefficients measured once on the real
diffusers blocks with our LoRA hooks attached (saved-tensor bytes per element, see below); the total is
checked against measured CPU peaks in ``tests/test_budget.py``. The two phases of a job are counted
apart, because they do not overlap: caching latents (the VAE encoder, no gradients) and training.

Units: bytes everywhere; :func:`gib` for display.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import Iterable

from trainer.data.caches import LATENT_CACHE_MAX_BATCH
from trainer.models.handle import text_encoder_path_in_target_set, unet_path_in_target_set
from trainer.models.shapes import Block, ModelShapes, Shapes, model_shapes

GIB = 1024 ** 3

#: Saved-for-backward elements per (channel x latent pixel), fp32, LoRA hooks on the attention/MLP
#: Linears, base weights frozen: measured with ``torch.autograd.graph.saved_tensors_hooks`` on the
#: diffusers 0.42 blocks (SDPA attention, torch 2.13), parameters excluded.
RESNET_PER_CHANNEL = 3.0          # x (C_in + C_out): norm input, SiLU input and output on each side
TRANSFORMER_OUTER = 3.2           # x C: the Transformer2DModel's GroupNorm, proj_in, proj_out
TRANSFORMER_BLOCK = 30.7          # x C per BasicTransformerBlock: 3 LayerNorms, q/k/v, 2 SDPAs, GEGLU (8C + 2 x 4C)
CONTEXT_PER_BLOCK = 2.0           # x (tokens x C): cross-attention keys and values
SAMPLER = 1.0                     # x C: a down/upsampler's input
UNET_OUTER = 3.0                  # x C0: conv_norm_out and its SiLU
#: Backward's transient buffers (an activation's gradient and the recomputed block's temporaries), in
#: units of the largest single activation (C x pixels at the widest level); fitted to the measured CPU peaks.
WORKING = 12.0
#: With gradient checkpointing (non-reentrant), the recomputed block's tensors are freed one by one as backward
#: uses them: about this fraction of the block's activations is alive at once, and no WORKING term shows
#: (fitted to the measured CPU peaks at 128, 256, 384 px, batch 1 and 2: within 16 %).
RECOMPUTE_HELD = 0.3
#: Text encoder, per layer and (token x width): LayerNorms, q/k/v, attention output, fc1 out, QuickGELU.
TEXT_LAYER = 21.0
#: The VAE encoder under no_grad: live tensors at its peak, in units of (first-level width x pixels).
VAE_ENCODE_PEAK = 5.1
#: Bytes per saved activation element: fp32, autocast over fp32 weights (a mix: norms stay fp32;
#: measured 2.4-2.6 on CPU with bf16 autocast), weights already in half precision.
ACTIVATION_BYTES = {"fp32": 4.0, "autocast": 2.5, "half": 2.0}
#: Optimizer state bytes per trained parameter (fp32 states). Adafactor: factored second moment only
#: (rows + columns per matrix), counted apart.
OPTIMIZER_STATE = {"AdamW": 8.0, "AdamW8bit": 2.0, "Lion": 4.0, "Prodigy": 16.0, "Adafactor": 0.0, "SGD": 4.0}
#: The CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack of a fresh process.
CUDA_CONTEXT = int(0.5 * GIB)
TOKENS = 77


@dataclass(frozen=True)
class Settings:
    """The job settings that move memory (names as the job fields)."""

    resolution: int = 512
    batch_size: int = 1
    gradient_checkpointing: bool = False
    target_set: str = "attn_mlp"
    network_dim: int = 16
    conv_dim: int = 0
    train_text_encoder: bool = False
    optimizer: str = "AdamW"
    mixed_precision: str = "bf16"
    captions: int = 1               # distinct captions the text cache keeps (shuffled captions: its bound)


@dataclass(frozen=True)
class Host:
    """How the place that runs the job holds the model."""

    weight_bytes: int = 2           # UNet and text encoders: 2 (fp16/bf16, the WebUIs on CUDA) or 4 (fp32)
    vae_bytes: int = 2
    vae_upcast: bool = False        # an fp16 VAE that encodes in fp32 (SDXL's): a temporary fp32 copy
    cuda: bool = True               # a CUDA context (0 on CPU)


@dataclass(frozen=True)
class Budget:
    training: dict[str, int]        # part -> bytes while training
    caching: dict[str, int]         # part -> bytes while the latents are cached (VAE encode)

    @property
    def training_peak(self) -> int:
        return sum(self.training.values())

    @property
    def caching_peak(self) -> int:
        return sum(self.caching.values())

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.caching_peak)

    @property
    def peak_phase(self) -> str:
        return "caching latents" if self.caching_peak > self.training_peak else "training"

    def beyond_the_model(self) -> int:
        """What a job adds on a device where the model (and a CUDA context) is already resident: the WebUI."""
        resident = self.training["base weights"] + self.training.get("CUDA context", 0)
        return self.peak - resident


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def settings_for(job, captions: int = 1) -> Settings:
    """:class:`Settings` of a standard/copier/LCM job (a copier's larger pass counts)."""
    parts = list(job.passes()) if getattr(job, "mode", "") == "copier" else [job]
    names = [f.name for f in Settings.__dataclass_fields__.values() if f.name != "captions"]

    def value(name):
        found = [getattr(p, name) for p in parts if hasattr(p, name)] or [getattr(job, name, None)]
        found = [v for v in found if v is not None]
        if not found:
            return getattr(Settings(), name)
        return max(found) if not isinstance(found[0], str) else found[0]

    shuffled = getattr(job, "shuffle_captions", False) or getattr(job, "caption_dropout", 0) > 0
    return Settings(**{n: value(n) for n in names}, captions=2048 if shuffled else max(1, captions))


# -- the parts ---------------------------------------------------------------------------------------------

def _numel(shapes: Iterable[tuple[int, ...]]) -> int:
    return sum(prod(s) for s in shapes)


def lora_parameters(model: ModelShapes, s: Settings) -> int:
    """Elements of the LoRA: rank x (in + out) per Linear / 1x1 conv, conv rank x (9 in + out) per 3x3."""
    total = 0
    for path, w in model.unet.modules().items():
        if unet_path_in_target_set(path, s.target_set):
            total += _lora_size(w, s)
    if s.train_text_encoder:
        for encoder in model.text_encoders:
            for path, w in encoder.modules().items():
                if text_encoder_path_in_target_set(path, s.target_set):
                    total += _lora_size(w, s)
    return total


def _lora_size(weight: tuple[int, ...], s: Settings) -> int:
    out, n_in = weight[0], weight[1]
    if len(weight) == 4 and weight[2] * weight[3] > 1:
        return s.conv_dim * (n_in * weight[2] * weight[3] + out)
    return s.network_dim * (n_in + out)


def _adafactor_state(model: ModelShapes, s: Settings) -> int:
    """Factored second moment: one row and one column vector per LoRA matrix (elements)."""
    rows = 0
    for path, w in model.unet.modules().items():
        if unet_path_in_target_set(path, s.target_set):
            rank = s.conv_dim if len(w) == 4 and w[2] * w[3] > 1 else s.network_dim
            if rank:
                rows += (rank + w[1] * (w[2] * w[3] if len(w) == 4 else 1)) + (w[0] + rank)
    return rows


def _first_trained(unet: Shapes, s: Settings) -> int:
    """Index of the first block holding a LoRA: nothing before it saves anything for backward."""
    targeted = [path for path in unet.modules() if unet_path_in_target_set(path, s.target_set)]
    for i, block in enumerate(unet.blocks):
        if any(p.startswith(block.path + ".") for p in targeted):
            return i
    return len(unet.blocks)


def _block_saved(block: Block, pixels: int, checkpointed: bool) -> float:
    """Elements ``block`` keeps for backward (per image); with checkpointing only its input."""
    if block.kind == "resnet":
        return block.channels_in * pixels if checkpointed else \
            RESNET_PER_CHANNEL * (block.channels_in + block.channels) * pixels
    if block.kind == "transformer":
        inner = (block.depth * block.channels * pixels if checkpointed else
                 block.depth * (TRANSFORMER_BLOCK * block.channels * pixels + CONTEXT_PER_BLOCK * TOKENS * block.channels))
        return TRANSFORMER_OUTER * block.channels * pixels + inner
    if block.kind == "sampler":
        return SAMPLER * block.channels * pixels
    return 0.0


def _recomputed(block: Block, pixels: int) -> float:
    """What one checkpointed unit holds again while its backward runs."""
    if block.kind == "resnet":
        return RESNET_PER_CHANNEL * (block.channels_in + block.channels) * pixels
    if block.kind == "transformer":
        return TRANSFORMER_BLOCK * block.channels * pixels + CONTEXT_PER_BLOCK * TOKENS * block.channels
    return 0.0


def unet_activations(unet: Shapes, s: Settings) -> float:
    """Elements saved for backward over one UNet forward at the job's resolution and batch."""
    latent_pixels = (s.resolution // 8) ** 2
    first = _first_trained(unet, s)
    total, recompute, widest = 0.0, 0.0, 0.0
    for i, block in enumerate(unet.blocks):
        pixels = latent_pixels // block.downscale ** 2
        widest = max(widest, block.channels * pixels)
        if i < first:
            continue
        total += _block_saved(block, pixels, s.gradient_checkpointing)
        if s.gradient_checkpointing:
            recompute = max(recompute, _recomputed(block, pixels))
    total += UNET_OUTER * unet.blocks[0].channels * latent_pixels
    transient = RECOMPUTE_HELD * recompute if s.gradient_checkpointing else WORKING * widest
    return s.batch_size * (total + transient)


def text_activations(model: ModelShapes, s: Settings) -> float:
    if not s.train_text_encoder:
        return 0.0
    return s.batch_size * sum(TEXT_LAYER * TOKENS * w * n for w, n in zip(model.text_widths, model.text_layers))


def vae_encode_peak(model: ModelShapes, s: Settings) -> float:
    """Elements live at the VAE encoder's peak for one cache batch (it encodes at most batch_size images)."""
    first_width = model.vae.blocks[0].channels_in if model.vae.blocks else 128
    return min(LATENT_CACHE_MAX_BATCH, s.batch_size) * VAE_ENCODE_PEAK * first_width * s.resolution ** 2


def estimate(arch: str | ModelShapes, s: Settings, host: Host = Host()) -> Budget:
    """The memory of a job on ``arch`` (``sd1``, ``sdxl``, or shapes of any config) on ``host``."""
    model = model_shapes(arch) if isinstance(arch, str) else arch
    half_weights = host.weight_bytes < 4
    act_bytes = ACTIVATION_BYTES["half" if half_weights else ("autocast" if host.cuda and s.mixed_precision != "no"
                                                              else "fp32")]
    weights = (model.unet.count() + sum(t.count() for t in model.text_encoders)) * host.weight_bytes \
        + model.vae.count() * host.vae_bytes
    lora = lora_parameters(model, s)
    state = OPTIMIZER_STATE[s.optimizer] * lora if s.optimizer != "Adafactor" else 4 * _adafactor_state(model, s)
    width = sum(model.text_widths) if len(model.text_widths) > 1 else model.text_widths[0]
    text_cache = 0 if s.train_text_encoder else min(s.captions, 2048) * TOKENS * width * host.weight_bytes
    context = CUDA_CONTEXT if host.cuda else 0
    training = {
        "base weights": int(weights),
        "LoRA parameters": 4 * lora,                   # fp32 whatever the host's dtype
        "gradients": 4 * lora,
        "optimizer state": int(state),
        "UNet activations": int(unet_activations(model.unet, s) * act_bytes),
        "text-encoder activations": int(text_activations(model, s) * act_bytes),
        "text cache": int(text_cache),
        "CUDA context": context,
    }
    vae_work = vae_encode_peak(model, s) * (4 if host.vae_upcast or host.vae_bytes == 4 else 2)
    caching = {
        "base weights": int(weights),
        "fp32 VAE copy": model.vae.count() * 4 if host.vae_upcast else 0,
        "VAE encode": int(vae_work),
        "CUDA context": context,
    }
    return Budget(training, caching)


# -- what would make it fit --------------------------------------------------------------------------------

def _changes(s: Settings) -> Iterable[tuple[str, Settings]]:
    """Single changes a user can make, cheapest in quality first."""
    if not s.gradient_checkpointing:
        yield "gradient_checkpointing on", replace(s, gradient_checkpointing=True)
    if s.optimizer in ("AdamW", "Prodigy"):
        yield "optimizer AdamW8bit", replace(s, optimizer="AdamW8bit")
    if s.train_text_encoder:
        yield "train_text_encoder off", replace(s, train_text_encoder=False)
    batch = s.batch_size
    while batch > 1:
        batch //= 2
        yield f"batch_size {batch} (gradient_accumulation {s.batch_size // batch} keeps the effective batch)", \
            replace(s, batch_size=batch)
    for resolution in (1024, 768, 640, 512, 384, 256):
        if resolution < s.resolution:
            yield f"resolution {resolution}", replace(s, resolution=resolution)


def fitting_change(arch: str | ModelShapes, s: Settings, host: Host, free: int,
                   model_resident: bool = True) -> tuple[str, Budget] | None:
    """The first single change after which the job fits in ``free`` bytes, with its budget; None if none does.

    Checkpointing goes together with the later changes (it costs only time), so "resolution 768" means
    with checkpointing on when it was off."""
    for name, changed in _changes(s):
        if name.startswith("gradient_checkpointing"):
            candidate = changed
        else:
            candidate = replace(changed, gradient_checkpointing=True) if not s.gradient_checkpointing else changed
            if not s.gradient_checkpointing:
                name = f"gradient_checkpointing on and {name}"
        budget = estimate(arch, candidate, host)
        if _needed(budget, model_resident) <= free:
            return name, budget
    return None


def _needed(budget: Budget, model_resident: bool) -> int:
    return budget.beyond_the_model() if model_resident else budget.peak


def fit_warning(arch: str | ModelShapes, s: Settings, host: Host, free: int, model_resident: bool = True) -> str | None:
    """A warning for a job that will not fit ``free`` bytes of device memory, naming what would fit; None if it fits."""
    budget = estimate(arch, s, host)
    needed = _needed(budget, model_resident)
    if needed <= free:
        return None
    largest = max(budget.training if budget.peak_phase == "training" else budget.caching, key=lambda k:
                  (budget.training if budget.peak_phase == "training" else budget.caching)[k])
    head = (f"this job needs about {gib(needed)} of GPU memory {'beyond the loaded model ' if model_resident else ''}"
            f"and {gib(free)} is free; its peak is while {budget.peak_phase} (largest part: {largest})")
    fix = fitting_change(arch, s, host, free, model_resident)
    if fix is None:
        return head + "; no single setting makes it fit: use a smaller resolution and batch, or free GPU memory"
    name, fixed = fix
    return head + f"; with {name} it needs about {gib(_needed(fixed, model_resident))}"
