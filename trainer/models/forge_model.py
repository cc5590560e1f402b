"""ModelHandle over Forge's loaded model: ``sd_model.forge_objects`` (unet / clip / vae patchers).

Forge keeps A1111's ``sd_model`` API (``get_learned_conditioning``, ``encode_first_stage``,
``decode_first_stage``, ``alphas_cumprod``, ``parameterization``) on top of its own patchers, so the
WebUI handle's logic applies; what differs:

- the UNet is ``forge_objects.unet.model.diffusion_model`` and the VAE ``forge_objects.vae.first_stage_model``;
- Forge creates and runs its models under ``torch.inference_mode()``: tensors made there (weights
  loaded in it, conditioning computed in it) are *inference tensors*, which autograd refuses to save
  for backward. We run every host call with inference mode off, clone what comes out, and turn the
  UNet's inference-tensor weights into ordinary tensors once, in place (one tensor at a time).

Not done (cannot be checked without Forge here): the text-encoder LoRA through ``forge_objects.clip``,
and undoing LoRAs that Forge's patcher has merged into the UNet weights. A job that asks for the
text encoder is refused with a message.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .handle import Cond, LoraTarget, ModelError, TargetOptions
from .webui_model import WebUIHandle, weights_fingerprint


def ordinary_weights_in_place(module: nn.Module) -> int:
    """Replace inference-tensor parameters and buffers by ordinary copies; returns how many were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if p is not None and p.is_inference():
                    owner._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
                    replaced += 1
            for name, b in list(owner._buffers.items()):
                if b is not None and b.is_inference():
                    owner._buffers[name] = b.clone()
                    replaced += 1
    return replaced


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


class ForgeHandle(WebUIHandle):
    """Forge's ``sd_model``; training happens on its modules in place."""

    def __init__(self, sd_model, lock=None):
        if not hasattr(sd_model, "forge_objects"):
            raise ModelError("this model has no forge_objects: it is not a Forge model (use WebUIHandle)")
        super().__init__(sd_model, lock)
        ordinary_weights_in_place(self.unet)

    @property
    def unet(self) -> nn.Module:
        return self.sd_model.forge_objects.unet.model.diffusion_model

    @property
    def _first_stage(self) -> nn.Module:
        return self.sd_model.forge_objects.vae.first_stage_model

    def _host_modules(self) -> list[nn.Module]:
        return list(self.unet.modules())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with super().lock(), torch.inference_mode(False):
            yield

    def _conditioning(self, prompts) -> Cond:
        with torch.inference_mode(False):
            return super()._conditioning(prompts)._map(_ordinary)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            return _ordinary(super().encode_images(pixels))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            return _ordinary(super().decode_latents(latents))

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with torch.inference_mode(False):
            return super().predict(_ordinary(latents), _ordinary(t), cond._map(_ordinary))

    @property
    def identity(self) -> str:
        if self._identity is None:
            clip = getattr(self.sd_model.forge_objects.clip, "cond_stage_model", None)
            modules = [self._first_stage] + ([clip] if isinstance(clip, nn.Module) else [])
            self._identity = weights_fingerprint(self.arch, modules)
        return self._identity

    def lora_targets(self, options: TargetOptions) -> list[LoraTarget]:
        if options.text_encoder:
            raise ModelError("training the text encoder is not available on Forge yet: untick 'train text encoder'")
        return super().lora_targets(options)
