"""ModelHandle over the model object the WebUI has loaded (A1111 1.10).

SD1/SD2: ldm ``LatentDiffusion``; SDXL: sgm ``DiffusionEngine`` as A1111 extends it (``sd_models_xl``).
We receive the object and never import the WebUI (``modules``), ldm or sgm: everything goes through
the object's own methods, so training sees exactly what generation sees:

- conditioning: ``sd_model.get_learned_conditioning(prompts)``; for SDXL A1111 reads the image size
  from attributes of the prompt list (``SdConditioning``) and returns ``{"crossattn", "vector"}``;
- latents: ``get_first_stage_encoding(encode_first_stage(x))``, pixels: ``decode_first_stage(z)``;
- UNet: ``sd_model.model.diffusion_model(x, timesteps=t, context=c[, y=vector])``;
- schedule and prediction: ``sd_model.alphas_cumprod``, ``sd_model.parameterization``.

LoRA keys follow kohya exactly as the diffusers backend writes them: SD1/SD2 UNet modules get their
diffusers names (mapped from the ldm tree with ``naming.unet_ldm_to_diffusers``), SDXL keeps the ldm
names; text encoders get the HF CLIP names with ``text_model_``.

OpenCLIP text encoders (SD2, SDXL's second encoder) compute attention with ``nn.MultiheadAttention``,
whose fused q/k/v projection and ``out_proj`` are used as bare weights inside
``F.multi_head_attention_forward`` — a LoRA hook on them would never run. Their attention LoRAs are
"fused" targets: the network runs the attention with weight + delta swapped in (``network._FusedAttention``),
under the HF names kohya writes (``self_attn_q_proj`` ... ``out_proj``).

A1111's built-in Lora extension merges the LoRAs of the last generation into the weights and
re-merges lazily in each Linear/Conv forward (``network_apply_weights``). While we own the model
(``lock()``) those weights are restored from the extension's own backup and the extension is kept
from re-merging; when we give the model back it re-applies whatever the next generation asks for.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

from trainer.models import naming
from trainer.models.handle import (
    BaseModel, Cond, LoraTarget, ModelError, ModelHandle, TargetOptions, is_linear, text_encoder_path_in_target_set,
    unet_path_in_target_set, weights_fingerprint,
)


class Prompts(list):
    """A prompt list with the attributes A1111's ``get_learned_conditioning`` reads (its ``SdConditioning``)."""

    def __init__(self, texts, width: int, height: int, is_negative_prompt: bool = False):
        super().__init__(texts)
        self.width, self.height, self.is_negative_prompt = width, height, is_negative_prompt


# -- architecture and layout -----------------------------------------------------------------------

def arch_of_model(sd_model) -> str:
    """sd1 | sd2 | sdxl, from A1111's flags when present, else from the module tree."""
    for arch in ("sdxl", "sd2", "sd1"):
        if getattr(sd_model, f"is_{arch}", False):
            return arch
    if hasattr(sd_model, "conditioner"):
        return "sdxl"
    encoder = _unwrap(getattr(sd_model, "cond_stage_model", None))
    if encoder is None:
        raise ModelError("the loaded model has neither cond_stage_model nor conditioner: not an SD1/SD2/SDXL model")
    return "sd2" if _is_open_clip(encoder) else "sd1"


def _is_transformer_block(module: nn.Module) -> bool:
    return "Transformer" in type(module).__name__


def unet_layout_of(unet: nn.Module) -> naming.UNetLayout:
    """The index arithmetic of an ldm/sgm ``UNetModel``, read from its module tree."""
    levels = len(unet.channel_mult)
    per_level, remainder = divmod(len(unet.output_blocks), levels)
    if remainder or len(unet.input_blocks) != levels * per_level:   # conv_in + n res blocks a level + downsamplers
        raise ModelError("UNets with a different number of res blocks per level are not supported")
    n = per_level - 1
    down = tuple(any(_is_transformer_block(m) for m in unet.input_blocks[1 + b * (n + 1)]) for b in range(levels))
    up = tuple(any(_is_transformer_block(m) for m in unet.output_blocks[b * (n + 1)]) for b in range(levels))
    return naming.UNetLayout(n, down, up)


def unet_lora_targets(unet: nn.Module, arch: str, layout: naming.UNetLayout,
                      options: TargetOptions) -> list[LoraTarget]:
    """LoRA targets on an ldm/sgm UNet, selected and keyed exactly as the diffusers backend does."""
    targets = []
    for ldm_path, module in unet.named_modules():
        if not (is_linear(module) or isinstance(module, nn.Conv2d)):
            continue
        # 1. the same module under its diffusers name decides membership of the target set
        diffusers_path = naming.unet_ldm_to_diffusers(ldm_path, layout)
        if not unet_path_in_target_set(diffusers_path, options.target_set):
            continue
        # 2. block id from the ldm name, as LoRA Block Weight counts
        block = naming.block_id_of_ldm_path(ldm_path)
        if options.blocks and block not in options.blocks:
            continue
        # 3. kohya key: diffusers spelling for SD1/SD2, ldm spelling for SDXL
        targets.append(LoraTarget(naming.unet_kohya_key(diffusers_path, arch, layout), module, block))
    return targets


# -- text encoders ------------------------------------------------------------------------------------

def _unwrap(embedder):
    """A1111 wraps each ldm/sgm text embedder (``FrozenCLIPEmbedderWithCustomWords.wrapped``)."""
    return getattr(embedder, "wrapped", embedder)


def _is_open_clip(embedder) -> bool:
    return hasattr(getattr(embedder, "model", None), "transformer") and not hasattr(embedder, "transformer")


def text_embedders(sd_model, arch: str) -> list[tuple[str, nn.Module]]:
    """[(kohya prefix, ldm/sgm embedder)]: ``lora_te_`` for SD1/SD2, ``lora_te1_``/``lora_te2_`` for SDXL."""
    if arch == "sdxl":
        embedders = [_unwrap(e) for e in sd_model.conditioner.embedders]
        texts = [e for e in embedders if hasattr(e, "transformer") or _is_open_clip(e)]
        if len(texts) != 2:
            raise ModelError(f"expected SDXL's two text encoders in conditioner.embedders, found {len(texts)}")
        return [("lora_te1_", texts[0]), ("lora_te2_", texts[1])]
    return [("lora_te_", _unwrap(sd_model.cond_stage_model))]


def open_clip_path_to_hf(path: str, layers_used: int) -> str | None:
    """``resblocks.3.mlp.c_fc`` -> ``encoder.layers.3.mlp.fc1``, ``resblocks.3.attn`` ->
    ``encoder.layers.3.self_attn`` (HF CLIP names, as kohya keys them).

    None for other modules and for resblocks at or past ``layers_used`` (SD2 stops at the penultimate
    layer, so the last one never affects the conditioning).
    """
    parts = path.split(".")
    if len(parts) < 3 or parts[0] != "resblocks" or int(parts[1]) >= layers_used:
        return None
    if parts[2:] == ["attn"]:
        return f"encoder.layers.{parts[1]}.self_attn"
    name = {"c_fc": "fc1", "c_proj": "fc2"}.get(parts[3]) if len(parts) == 4 and parts[2] == "mlp" else None
    return None if name is None else f"encoder.layers.{parts[1]}.mlp.{name}"


def text_encoder_lora_targets(embedder: nn.Module, prefix: str, target_set: str) -> list[LoraTarget]:
    targets = []
    if not _is_open_clip(embedder):
        for path, module in embedder.transformer.named_modules():   # HF CLIPTextModel
            if is_linear(module) and text_encoder_path_in_target_set(path, target_set):
                targets.append(LoraTarget(naming.text_encoder_kohya_key(path, prefix), module, "BASE"))
        return targets
    transformer = embedder.model.transformer
    layers = len(transformer.resblocks)
    returns_pooled = getattr(embedder, "always_return_pooled", False) or getattr(embedder, "return_pooled", False)
    layers_used = layers if returns_pooled else layers - int(getattr(embedder, "layer_idx", 0))
    for path, module in transformer.named_modules():
        hf_path = open_clip_path_to_hf(path, layers_used)
        if hf_path is None:
            continue
        if isinstance(module, nn.MultiheadAttention):
            # q/k/v live fused in in_proj_weight and out_proj is used as a bare weight: fused targets
            for part in ("q", "k", "v", "out"):
                projection = f"{hf_path}.{part}_proj"
                if text_encoder_path_in_target_set(projection, target_set):
                    targets.append(LoraTarget(naming.text_encoder_kohya_key(projection, prefix), module, "BASE",
                                              fused=part))
        elif is_linear(module) and text_encoder_path_in_target_set(hf_path, target_set):
            targets.append(LoraTarget(naming.text_encoder_kohya_key(hf_path, prefix), module, "BASE"))
    return targets


# -- A1111's built-in Lora extension ----------------------------------------------------------------

def _restore_from_backup(module: nn.Module) -> None:
    """What A1111 1.10's ``network_restore_weights_from_backup`` does, for one module."""
    weights, bias = getattr(module, "network_weights_backup", None), getattr(module, "network_bias_backup", None)
    if weights is None and bias is None:
        return
    fused = isinstance(module, nn.MultiheadAttention)
    owner = module.out_proj if fused else module
    with torch.no_grad():
        if weights is not None:
            if fused:
                module.in_proj_weight.copy_(weights[0])
                module.out_proj.weight.copy_(weights[1])
            else:
                module.weight.copy_(weights)
        if bias is None:
            owner.bias = None        # the LoRA added a bias the module did not have
        else:
            owner.bias.copy_(bias)


def suspend_host_networks(modules) -> list[tuple[nn.Module, str]]:
    """Undo the merged LoRAs of the last generation and keep A1111 from re-merging them.

    Returns what :func:`resume_host_networks` needs to hand the modules back.
    """
    hidden = []
    for module in modules:
        # 1. weights that hold a merged LoRA go back to the extension's own backup of the originals
        if getattr(module, "network_current_names", ()):
            _restore_from_backup(module)
            module.network_current_names = ()
        # 2. without a layer name, network_apply_weights / network_forward leave the module alone
        name = getattr(module, "network_layer_name", None)
        if name is not None:
            module.network_layer_name = None
            hidden.append((module, name))
    return hidden


def resume_host_networks(hidden: list[tuple[nn.Module, str]]) -> None:
    """Give the layer names back: the next generation merges whatever LoRAs its prompt asks for."""
    for module, name in hidden:
        module.network_layer_name = name


# -- the handle ----------------------------------------------------------------------------------------

class WebUIHandle(ModelHandle):
    """The WebUI's loaded ``sd_model``; training happens on its modules in place (no copy).

    ``lock``: the WebUI's generation lock (``modules.call_queue.queue_lock``), non-reentrant;
    default: a lock of our own.
    """

    def __init__(self, sd_model, lock=None):
        super().__init__()
        self.sd_model = sd_model
        self._host_lock = lock if lock is not None else threading.Lock()
        self.arch = arch_of_model(sd_model)
        self.prediction, alphas_cumprod = self._schedule()
        if self.prediction not in ("eps", "v"):
            raise ModelError(f"the loaded model predicts {self.prediction!r}; training supports eps and v models")
        self.alphas_cumprod = alphas_cumprod.detach().float().cpu()
        self.device, self.dtype = self._device_and_dtype()
        self._layout = unet_layout_of(self.unet)
        encoder = getattr(self._first_stage, "encoder", None)
        self.vae_scale = 2 ** (encoder.num_resolutions - 1) if encoder is not None else 8
        self._identity: str | None = None
        self._identity_stamp = 0
        self._suspended = False

    def _schedule(self) -> tuple[str, torch.Tensor]:
        """(prediction type, alphas_cumprod) as the host samples with them."""
        alphas_cumprod = getattr(self.sd_model, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ModelError("the loaded model has no alphas_cumprod (A1111 sets it for every SD model)")
        return getattr(self.sd_model, "parameterization", "eps"), alphas_cumprod

    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = next(self.unet.parameters())
        return weight.device, weight.dtype

    # -- parts -------------------------------------------------------------------------------------

    @property
    def unet(self) -> nn.Module:
        return self.sd_model.model.diffusion_model

    @property
    def _first_stage(self) -> nn.Module:
        return self.sd_model.first_stage_model

    @property
    def unet_layout(self) -> naming.UNetLayout:
        return self._layout

    def text_encoders(self) -> list[tuple[str, nn.Module]]:
        return [(prefix, e.transformer if not _is_open_clip(e) else e.model.transformer)
                for prefix, e in self._text_embedders()]

    def _text_embedders(self) -> list[tuple[str, nn.Module]]:
        return text_embedders(self.sd_model, self.arch)

    def base_model(self) -> BaseModel:
        """The loaded checkpoint as A1111 names and hashes it (``sd_checkpoint_info``)."""
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        if info is None:
            return BaseModel()
        return BaseModel(getattr(info, "model_name", "") or getattr(info, "name", "") or "",
                         getattr(info, "hash", "") or "", getattr(info, "sha256", "") or "")

    def base_modules(self) -> list[nn.Module]:
        return [self.sd_model]        # UNet, VAE and text encoders: A1111 leaves many with requires_grad on

    def _host_modules(self) -> list[nn.Module]:
        conditioner = self.sd_model.conditioner if self.arch == "sdxl" else self.sd_model.cond_stage_model
        return list(self.sd_model.model.modules()) + list(conditioner.modules())

    # -- ownership ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def host_networks_suspended(self) -> Iterator[None]:
        """The model without the WebUI's LoRAs (reentrant; ``lock()`` enters it)."""
        if self._suspended:
            yield
            return
        hidden = suspend_host_networks(self._host_modules())
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False
            resume_host_networks(hidden)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._host_lock, self.host_networks_suspended():
            yield

    # -- conditioning --------------------------------------------------------------------------------

    def _conditioning(self, prompts: Prompts) -> Cond:
        with self.host_networks_suspended(), self._text_encoders_trainable():
            c = self.sd_model.get_learned_conditioning(prompts)
        if isinstance(c, dict):
            return Cond(c["crossattn"], vector=c["vector"])
        return Cond(c)

    @contextlib.contextmanager
    def _text_encoders_trainable(self) -> Iterator[None]:
        """sgm's conditioner runs frozen embedders under no_grad; a text-encoder LoRA needs the graph."""
        embedders = list(getattr(getattr(self.sd_model, "conditioner", None), "embedders", []))
        if not torch.is_grad_enabled() or not embedders:
            yield
            return
        saved = [(e, e.is_trainable) for e in embedders if hasattr(e, "is_trainable")]
        for e, _ in saved:
            e.is_trainable = True
        try:
            yield
        finally:
            for e, flag in saved:
                e.is_trainable = flag

    def encode_prompts(self, texts: list[str], size: tuple[int, int]) -> Cond:
        h, w = size
        return self._conditioning(Prompts(texts, width=w, height=h))

    def uncond(self, batch: int, size: tuple[int, int]) -> Cond:
        """As A1111 builds the negative prompt: SDXL's empty negative prompt gets zeroed text embeddings."""
        h, w = size
        return self._conditioning(Prompts([""] * batch, width=w, height=h, is_negative_prompt=True))

    # -- latents -----------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self._first_stage.parameters()).dtype
        with self.host_networks_suspended():
            posterior = self.sd_model.encode_first_stage(pixels.to(self.device, dtype))
            # The posterior mean (ldm returns the distribution), so that cached latents are deterministic. Forge's
            # VAE returns the latent tensor itself (whose .mode() would be the statistical mode).
            if not isinstance(posterior, torch.Tensor) and hasattr(posterior, "mode"):
                posterior = posterior.mode()
            return self.sd_model.get_first_stage_encoding(posterior).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self._first_stage.parameters()).dtype
        with self.host_networks_suspended(), torch.no_grad():
            return self.sd_model.decode_first_stage(latents.to(self.device, dtype)).float()

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        context = cond.crossattn.to(self.device, self.dtype)
        kwargs = self._unet_kwargs()
        if self.arch == "sdxl":
            if cond.vector is None:
                raise ModelError("SDXL conditioning without its vector: encode prompts with this handle")
            kwargs["y"] = cond.vector.to(self.device, self.dtype)
        with self.host_networks_suspended():
            return self.unet(latents.to(self.device, self.dtype), timesteps=t.to(self.device), context=context,
                             **kwargs)

    def _unet_kwargs(self) -> dict:
        return {}

    # -- LoRA targets ------------------------------------------------------------------------------------

    def lora_targets(self, options: TargetOptions) -> list[LoraTarget]:
        targets = unet_lora_targets(self.unet, self.arch, self._layout, options)
        if options.text_encoder:
            for prefix, embedder in self._text_embedders():
                targets += text_encoder_lora_targets(embedder, prefix, options.target_set)
        return targets

    @property
    def identity(self) -> str:
        """Changes with the VAE and text-encoder weights. A1111 swaps a VAE in place (``sd_vae`` loads the new
        weights into the same module), so the fingerprint is recomputed whenever a weight was replaced or
        written to since the last time (torch's per-tensor version counter: a cheap check per call)."""
        modules = [self._first_stage] + [m for _, m in self.text_encoders()]
        # (inference tensors, as Forge makes them, keep no version counter: their storage address stands in)
        stamp = hash(tuple((id(p), p.data_ptr(), -1 if p.is_inference() else p._version)
                           for m in modules for p in m.parameters()))
        if self._identity is None or stamp != self._identity_stamp:
            self._identity, self._identity_stamp = weights_fingerprint(self.arch, modules), stamp
        return self._identity
