"""ModelHandle over Forge's loaded model (the gradio-4 Forge with its ``backend`` package).

Forge keeps A1111's ``sd_model`` face (``get_learned_conditioning``, ``encode_first_stage``,
``decode_first_stage``, ``is_sd1``/``is_sd2``/``is_sdxl``) on top of its own objects, so the WebUI
handle's logic applies. What differs, as read in Forge's ``backend/``:

- parts: the UNet is ``forge_objects.unet.model.diffusion_model`` (an ldm-layout UNet, so the ldm key
  mapping holds); the VAE ``forge_objects.vae.first_stage_model``; the text encoders are HF
  ``CLIPTextModel``s wrapped as ``forge_objects.clip.cond_stage_model.clip_l`` / ``clip_h`` (SD2) /
  ``clip_g`` (SDXL). Unlike A1111's OpenCLIP, ``clip_g`` has separate q/k/v projections, so every
  text-encoder layer can take a LoRA.
- schedule: ``forge_objects.unet.model.predictor`` holds ``alphas_cumprod`` and ``prediction_type``;
  the UNet computes in ``diffusion_model.computation_dtype`` whatever its storage dtype (fp8 too).
- inference mode: Forge loads, moves and runs its models under ``torch.inference_mode()``, so weights
  and results are *inference tensors*, which autograd refuses to save for backward. We run every host
  call with inference mode off, clone what comes out, and turn inference-tensor weights into ordinary
  tensors (one at a time) whenever Forge has made new ones.
- conditioning with gradients: ``get_learned_conditioning`` is decorated with
  ``@torch.inference_mode()``; a text-encoder LoRA needs the graph, so while gradients are on we call
  the undecorated function (``__wrapped__``), i.e. exactly Forge's code.
- LoRAs of the last generation: Forge merges them into the weights (``LoraLoader.refresh`` on the
  model, with a backup of the originals) when a UNet/CLIP patcher is loaded. Before we train we let
  that loader restore the originals, and we reset Forge's record of applied LoRAs
  (``current_lora_hash``, ``forge_objects*``) to its "no LoRA" state, so the next generation builds and
  loads fresh patchers and merges what its prompt asks for — the path Forge takes whenever the LoRA
  set changes.
- memory: Forge may have moved the UNet off the GPU (low-VRAM swapping, loading the text encoder);
  the glue passes ``memory_management.load_model_gpu`` so a step loads it first, as sampling does.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from trainer.models.handle import Cond, ModelError
from trainer.models.webui_model import WebUIHandle

#: Forge's predictor names -> ours.
_PREDICTIONS = {"epsilon": "eps", "eps": "eps", "v_prediction": "v", "v": "v"}
#: Forge's text encoder names per architecture -> kohya prefixes.
_TEXT_ENCODERS = {"sd1": [("lora_te_", "clip_l")], "sd2": [("lora_te_", "clip_h")],
                  "sdxl": [("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")]}
_NO_LORA = str([])


def ordinary_weights_in_place(module: nn.Module) -> int:
    """Replace inference-tensor parameters and buffers by ordinary copies; returns how many were replaced.

    A tensor shared under several names (Forge ties CLIP's token embedding) is copied once and stays shared."""
    replaced = 0
    copies: dict[int, nn.Parameter] = {}
    with outside_inference_mode():
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if p is not None and p.is_inference():
                    if id(p) not in copies:
                        copies[id(p)] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                        replaced += 1
                    owner._parameters[name] = copies[id(p)]
            for name, b in list(owner._buffers.items()):
                if b is not None and b.is_inference():
                    owner._buffers[name] = b.clone()
                    replaced += 1
    return replaced


@contextlib.contextmanager
def outside_inference_mode() -> Iterator[None]:
    """Inference mode off, gradient mode as the caller had it (``inference_mode(False)`` alone turns
    gradients on, which would build graphs inside the caller's ``no_grad``)."""
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        yield


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


def unmerge_forge_loras(sd_model) -> bool:
    """Give the UNet and text encoders their original weights back; True if a LoRA was merged.

    Uses each model's own ``LoraLoader`` (its backup of the originals), then puts Forge's bookkeeping
    in the state it has after a generation without LoRAs, so its next generation re-applies LoRAs.
    """
    objects = sd_model.forge_objects
    patchers = [objects.unet, getattr(objects.clip, "patcher", None)]
    restored = False
    for patcher in patchers:
        loader = getattr(getattr(patcher, "model", None), "lora_loader", None)
        if loader is None or getattr(loader, "loaded_hash", _NO_LORA) == _NO_LORA:
            continue
        loader.refresh(lora_patches={}, offload_device=getattr(patcher, "offload_device", torch.device("cpu")))
        restored = True
    if restored:
        original = getattr(sd_model, "forge_objects_original", None)
        if original is not None:
            objects.unet, objects.clip = original.unet, original.clip
            sd_model.forge_objects_after_applying_lora = objects.shallow_copy()
        sd_model.current_lora_hash = _NO_LORA
    return restored


class ForgeHandle(WebUIHandle):
    """Forge's ``sd_model``; training happens on its modules in place.

    ``load_model_gpu``: Forge's ``backend.memory_management.load_model_gpu`` (given by the glue; None
    leaves placement alone, as in tests).
    """

    def __init__(self, sd_model, lock=None, load_model_gpu: Callable[[object], None] | None = None):
        if not hasattr(sd_model, "forge_objects"):
            raise ModelError("this model has no forge_objects: it is not a Forge model (use WebUIHandle)")
        self._load_model_gpu = load_model_gpu
        super().__init__(sd_model, lock)
        self._ordinary_weights()

    # -- parts ---------------------------------------------------------------------------------------

    @property
    def unet(self) -> nn.Module:
        return self.sd_model.forge_objects.unet.model.diffusion_model

    @property
    def _first_stage(self) -> nn.Module:
        return self.sd_model.forge_objects.vae.first_stage_model

    def _schedule(self) -> tuple[str, torch.Tensor]:
        predictor = getattr(self.sd_model.forge_objects.unet.model, "predictor", None)
        if predictor is None or not hasattr(predictor, "alphas_cumprod"):
            return super()._schedule()          # older Forge: A1111's attributes
        kind = getattr(predictor, "prediction_type", "epsilon")
        return _PREDICTIONS.get(kind, kind), predictor.alphas_cumprod

    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        device, storage = super()._device_and_dtype()
        return device, getattr(self.unet, "computation_dtype", storage)

    def _text_embedders(self) -> list[tuple[str, nn.Module]]:
        encoders = self.sd_model.forge_objects.clip.cond_stage_model
        found = []
        for prefix, name in _TEXT_ENCODERS[self.arch]:
            embedder = getattr(encoders, name, None)
            if embedder is None or not hasattr(embedder, "transformer"):
                raise ModelError(f"Forge's {self.arch} model has no text encoder {name!r} in forge_objects.clip")
            found.append((prefix, embedder))
        return found

    def base_modules(self) -> list[nn.Module]:
        return [self.unet, self._first_stage] + [e for _, e in self._text_embedders()]

    def _host_modules(self) -> list[nn.Module]:
        return [self.unet] + [e for _, e in self._text_embedders()]

    def _ordinary_weights(self) -> None:
        for module in self._host_modules():
            if any(p.is_inference() for p in module.parameters()):
                ordinary_weights_in_place(module)

    # -- ownership -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def host_networks_suspended(self) -> Iterator[None]:
        """Forge's merged LoRAs undone (for good: Forge re-merges on its next generation)."""
        with outside_inference_mode():
            if unmerge_forge_loras(self.sd_model):
                self._ordinary_weights()       # the loader restored weights under inference mode
            yield

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with self._host_lock, outside_inference_mode(), self.host_networks_suspended(), self._layer_norms_copy_input():
            self._ordinary_weights()          # Forge moved or reloaded weights since our last step
            yield

    @contextlib.contextmanager
    def _layer_norms_copy_input(self) -> Iterator[None]:
        """Forge's transformer blocks add in place (``x += n``, backend/nn/unet.py) to a tensor a LayerNorm saved
        for the backward pass, which autograd refuses once a LoRA needs gradients. While we hold the model,
        the UNet's LayerNorms work on a copy of their input when gradients are on; generation never sees it."""
        def own_copy(module, inputs):
            if torch.is_grad_enabled() and inputs and isinstance(inputs[0], torch.Tensor):
                return (inputs[0].clone(), *inputs[1:])
            return None
        hooks = [m.register_forward_pre_hook(own_copy) for m in self.unet.modules() if isinstance(m, nn.LayerNorm)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    # -- host calls ------------------------------------------------------------------------------------

    def _conditioning(self, prompts) -> Cond:
        method = type(self.sd_model).get_learned_conditioning
        undecorated = getattr(method, "__wrapped__", None)
        with outside_inference_mode(), self.host_networks_suspended():
            if torch.is_grad_enabled() and undecorated is not None:
                c = undecorated(self.sd_model, prompts)      # Forge's own code, with the graph kept
            else:
                c = self.sd_model.get_learned_conditioning(prompts)
        if isinstance(c, dict):
            return Cond(_ordinary(c["crossattn"]), vector=_ordinary(c["vector"]))
        return Cond(_ordinary(c))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with outside_inference_mode():
            return _ordinary(super().encode_images(pixels))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with outside_inference_mode():
            return _ordinary(super().decode_latents(latents))

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with outside_inference_mode():
            if self._load_model_gpu is not None:
                self._load_model_gpu(self.sd_model.forge_objects.unet)
                self._ordinary_weights()
            return super().predict(_ordinary(latents), _ordinary(t), cond._map(_ordinary))

    def _unet_kwargs(self) -> dict:
        # Forge's UNet writes into its transformer_options; its default is a shared mutable dict.
        return {"transformer_options": {}}
