"""The one guided DDIM loop over any ModelHandle: previews, grids and the LCM teacher all sample through it.

Our own small sampler (not a diffusers scheduler) so sampling works the same on every backend,
including inside the WebUI where the installed diffusers may be old or absent. Noise is drawn per
seed on the CPU, so a seed gives the same image on every device.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch
from PIL import Image

from trainer.models.handle import Cond, ModelHandle
from trainer.lora.network import LoraNetwork, applied
from trainer.diffusion.ddim import ddim_step, ddim_timesteps, predict_x0_eps


@torch.no_grad()
def sample(handle: ModelHandle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30,
           cfg: float = 5.0, size: tuple[int, int] = (512, 512), negative: str = "",
           network: LoraNetwork | None = None) -> list[Image.Image]:
    """Images for ``prompts[i]`` with ``seeds[i]`` (height, width ``size``), classifier-free guided DDIM.

    ``network``: a LoRA kept disabled outside the model lock (a training loop's, or a grid's); it is
    switched on under the lock for the sampling and off again afterwards."""
    f = handle.vae_scale
    noise = seeded_noise(seeds, (4, size[0] // f, size[1] // f), handle.device)
    with handle.lock(), applied(network):
        cond = handle.encode_prompts(list(prompts), size)
        uncond = handle.encode_prompts([negative] * len(prompts), size) if negative else handle.uncond(len(prompts), size)
        pixels = handle.decode_latents(ddim_latents(handle, noise, cond, uncond, steps=steps, cfg=cfg))
    return [to_pil(p) for p in pixels]


def pad_cat(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings whose token lengths may differ (long prompts): pad by repeating chunks."""
    la, lb = a.crossattn.shape[1], b.crossattn.shape[1]
    if la != lb:
        n = max(la, lb)
        pad = lambda c: c.crossattn if c.crossattn.shape[1] == n else c.crossattn.repeat(1, n // c.crossattn.shape[1], 1)
        a, b = replace(a, crossattn=pad(a)), replace(b, crossattn=pad(b))
    return Cond.cat([a, b])


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3,H,W] in [-1,1] -> RGB image."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """One [C, h, w] normal draw per seed, on the CPU (the same on every device)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def ddim_latents(handle: ModelHandle, noise: torch.Tensor, cond: Cond, uncond: Cond, *, steps: int = 50,
                 cfg: float = 8.5, trajectory: dict[int, torch.Tensor] | None = None,
                 check_stop: Callable[[], None] = lambda: None) -> torch.Tensor:
    """The teacher's guided DDIM sample (trailing timesteps, WebUI scale ``cfg``) from ``noise``: its final x0.

    ``trajectory``, if given, receives z_t before each step, keyed by t; ``check_stop`` runs before each step
    and raises to stop."""
    device = noise.device
    both = pad_cat(uncond, cond).to(device, handle.dtype)
    abar = handle.alphas_cumprod.to(device)
    ts = ddim_timesteps(steps)
    z = noise.float()
    for i, t in enumerate(ts):
        check_stop()
        if trajectory is not None:
            trajectory[t] = z.clone()
        out = handle.predict(torch.cat([z, z]).to(handle.dtype), torch.full((2 * len(z),), t, device=device), both).float()
        out_uncond, out_cond = out.chunk(2)
        x0, eps = predict_x0_eps(out_uncond + cfg * (out_cond - out_uncond), z, abar[t], handle.prediction)
        if i + 1 == len(ts):
            return x0
        z = ddim_step(x0, eps, abar[ts[i + 1]])
    return z
