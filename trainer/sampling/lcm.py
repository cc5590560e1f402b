"""Sampling LCM-LoRAs over any ModelHandle: the LCM sampler and the "LCM alternative".

The loops are the pure functions of ``trainer.diffusion.lcm`` over a ``denoise(z, t) -> denoised``
callable (the consistency function with the LCM paper's boundary scalings); this module builds that
callable from a handle. The WebUI's k-diffusion forms are in ``webui_samplers.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from trainer.jobs.vocabulary import LcmSampler
from trainer.models.handle import Cond, ModelHandle
from trainer.lora.network import LoraNetwork, applied
from trainer.diffusion.lcm import boundary_scalings, consistency_function, guided
from trainer.sampling.guided import pad_cat, to_pil
from trainer.diffusion.ddim import predict_x0_eps
from trainer.diffusion.lcm import Denoise, lcm_alternative_loop, lcm_loop, lcm_timesteps
from trainer.sampling.guided import seeded_noise


# -- over a ModelHandle --------------------------------------------------------------------------

def lcm_denoiser(handle: ModelHandle, cond: Cond, uncond: Cond | None = None, cfg: float = 1.0) -> Denoise:
    """f(z, t) = c_skip z + c_out x0 with the model as it is (LoRA on = the LCM student); ``cfg`` is the WebUI
    scale (1 = no unconditional pass; above 1 guides x0 with w = cfg - 1 in one batched forward)."""
    both = pad_cat(uncond, cond).to(handle.device, handle.dtype) if cfg != 1.0 else cond.to(handle.device, handle.dtype)
    abar = handle.alphas_cumprod.to(handle.device)

    def denoise(z: torch.Tensor, t: int) -> torch.Tensor:
        n = 2 if cfg != 1.0 else 1
        out = handle.predict(torch.cat([z] * n).to(handle.dtype), torch.full((n * len(z),), t, device=handle.device),
                             both).float()
        x0, _ = predict_x0_eps(out, torch.cat([z] * n), abar[t], handle.prediction)
        if n == 2:
            x0_uncond, x0_cond = x0.chunk(2)
            x0 = guided(x0_cond, x0_uncond, cfg - 1.0)
        c_skip, c_out = boundary_scalings(torch.tensor(float(t)))
        return consistency_function(z, x0, c_skip, c_out)
    return denoise


@torch.no_grad()
def lcm_latents(handle: ModelHandle, noise: torch.Tensor, cond: Cond, uncond: Cond | None = None, *,
                steps: int = 4, cfg: float = 1.0, sampler: LcmSampler = "lcm", euler_steps: int = 1, ancestral: float = 0.0,
                seed: int = 0, timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """Latents from starting ``noise`` with the LCM sampler (``sampler="lcm"``) or the LCM alternative."""
    timesteps = list(timesteps) if timesteps is not None else lcm_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    fresh = lambda i: torch.randn(noise.shape, generator=generator).to(noise.device)
    denoise = lcm_denoiser(handle, cond, uncond, cfg)
    abar = handle.alphas_cumprod.to(noise.device)
    if sampler == "lcm":
        return lcm_loop(denoise, noise.float(), timesteps, abar, fresh)
    if sampler == "lcm_alternative":
        return lcm_alternative_loop(denoise, noise.float(), timesteps, abar, fresh, euler_steps, ancestral)
    raise ValueError(f"sampler must be lcm or lcm_alternative, got {sampler!r}")


@torch.no_grad()
def sample_lcm(handle: ModelHandle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 4,
               cfg: float = 1.0, size: tuple[int, int] = (512, 512), sampler: LcmSampler = "lcm", euler_steps: int = 1,
               ancestral: float = 0.0, network: LoraNetwork | None = None) -> list[Image.Image]:
    """Images for ``prompts[i]`` from ``seeds[i]`` (height, width ``size``): previews of an LCM-LoRA.

    ``network``: a LoRA that a training loop keeps disabled between its steps; it is switched on for the
    sampling (under the model lock) and restored afterwards."""
    f = handle.vae_scale
    noise = seeded_noise(seeds, (4, size[0] // f, size[1] // f), handle.device)
    with handle.lock(), applied(network):
        cond = handle.encode_prompts(list(prompts), size)
        uncond = handle.uncond(len(prompts), size) if cfg != 1.0 else None
        latents = lcm_latents(handle, noise, cond, uncond, steps=steps, cfg=cfg, sampler=sampler,
                              euler_steps=euler_steps, ancestral=ancestral, seed=int(seeds[0]) if seeds else 0)
        pixels = handle.decode_latents(latents)
    return [to_pil(p) for p in pixels]


# -- the WebUI's k-diffusion form -----------------------------------------------------------------


