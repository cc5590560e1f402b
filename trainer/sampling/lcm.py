"""Sampling for LCM-LoRAs over any ModelHandle: the LCM sampler, the "LCM alternative", and the teacher's DDIM.

Pure loops over a ``denoise(z, t) -> denoised`` callable (the consistency function with the boundary
scalings of the LCM paper), with thin wrappers that build it from a handle, as ``trainer/sampling.py``
does for DDIM. The WebUI glue registers the LCM alternative through ``register_webui_samplers`` (its
k-diffusion form works in sigma space: x = x0 + sigma eps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from trainer.models.handle import Cond, ModelHandle
from trainer.lora.network import LoraNetwork, applied
from trainer.diffusion.lcm import boundary_scalings, consistency_function, guided
from trainer.sampling.ddim import _pad_cat, to_pil
from trainer.diffusion.ddim import ddim_step, ddim_timesteps, predict_x0_eps
from trainer.diffusion.lcm import Denoise, lcm_alternative_loop, lcm_loop, lcm_timesteps, renoise_with


# -- over a ModelHandle --------------------------------------------------------------------------

def lcm_denoiser(handle: ModelHandle, cond: Cond, uncond: Cond | None = None, cfg: float = 1.0) -> Denoise:
    """f(z, t) = c_skip z + c_out x0 with the model as it is (LoRA on = the LCM student); ``cfg`` is the WebUI
    scale (1 = no unconditional pass; above 1 guides x0 with w = cfg - 1 in one batched forward)."""
    both = _pad_cat(uncond, cond).to(handle.device, handle.dtype) if cfg != 1.0 else cond.to(handle.device, handle.dtype)
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


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """One [C, h, w] normal draw per seed, on the CPU (the same on every device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def lcm_latents(handle: ModelHandle, noise: torch.Tensor, cond: Cond, uncond: Cond | None = None, *,
                steps: int = 4, cfg: float = 1.0, sampler: str = "lcm", euler_steps: int = 1, ancestral: float = 0.0,
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
               cfg: float = 1.0, size: tuple[int, int] = (512, 512), sampler: str = "lcm", euler_steps: int = 1,
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


@torch.no_grad()
def ddim_latents(handle: ModelHandle, noise: torch.Tensor, cond: Cond, uncond: Cond, *, steps: int = 50,
                 cfg: float = 8.5, trajectory: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The teacher's guided DDIM sample (trailing timesteps, WebUI scale ``cfg``) from ``noise``: its final x0.

    ``trajectory``, if given, receives z_t before each step, keyed by t."""
    device = noise.device
    both = _pad_cat(uncond, cond).to(device, handle.dtype)
    abar = handle.alphas_cumprod.to(device)
    ts = ddim_timesteps(steps)
    z = noise.float()
    for i, t in enumerate(ts):
        if trajectory is not None:
            trajectory[t] = z.clone()
        out = handle.predict(torch.cat([z, z]).to(handle.dtype), torch.full((2 * len(z),), t, device=device), both).float()
        out_uncond, out_cond = out.chunk(2)
        x0, eps = predict_x0_eps(out_uncond + cfg * (out_cond - out_uncond), z, abar[t], handle.prediction)
        if i + 1 == len(ts):
            return x0
        z = ddim_step(x0, eps, abar[ts[i + 1]])
    return z


# -- the WebUI's k-diffusion form -----------------------------------------------------------------

def make_lcm_alternative_k(euler_steps: int = 1, ancestral: float = 0.0) -> Callable[..., torch.Tensor]:
    """A k-diffusion sampler function (``model(x, sigma) -> denoised``, x = x0 + sigma eps) of the LCM alternative."""

    @torch.no_grad()
    def sample_lcm_alternative(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        extra_args = {} if extra_args is None else extra_args
        fresh = noise_sampler or (lambda sigma, sigma_next: torch.randn_like(x))
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            if sigmas[i + 1] == 0:
                x = denoised
                continue
            if i < euler_steps:
                removed = (x - denoised) / sigmas[i]
                noise = renoise_with(removed, fresh(sigmas[i], sigmas[i + 1]), ancestral) if ancestral > 0 else removed
            else:
                noise = fresh(sigmas[i], sigmas[i + 1])
            x = denoised + sigmas[i + 1] * noise
        return x

    return sample_lcm_alternative


@dataclass(frozen=True)
class WebuiSampler:
    label: str
    function: Callable[..., torch.Tensor]
    aliases: tuple[str, ...]
    options: dict


def webui_samplers() -> list[WebuiSampler]:
    """The samplers this extension adds to the WebUI's list."""
    return [WebuiSampler("LCM alternative", make_lcm_alternative_k(euler_steps=1, ancestral=0.0), ("lcm_alternative",), {}),
            WebuiSampler("LCM alternative ancestral", make_lcm_alternative_k(euler_steps=1, ancestral=0.5),
                         ("lcm_alternative_ancestral",), {})]


def register_webui_samplers(sd_samplers: Any, sd_samplers_common: Any, sd_samplers_kdiffusion: Any) -> list[str]:
    """Add ``webui_samplers()`` to A1111/Forge's sampler list; the caller passes the WebUI's modules
    (``modules.sd_samplers``, ``modules.sd_samplers_common``, ``modules.sd_samplers_kdiffusion``).
    Registering twice is harmless. Returns the labels added."""
    added = []
    for entry in webui_samplers():
        if entry.label in sd_samplers.all_samplers_map:
            continue
        data = sd_samplers_common.SamplerData(
            entry.label, lambda model, fn=entry.function: sd_samplers_kdiffusion.KDiffusionSampler(fn, model),
            list(entry.aliases), dict(entry.options))
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map[entry.label] = data
        added.append(entry.label)
    if added:
        sd_samplers.set_samplers()
    return added
