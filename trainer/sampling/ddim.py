"""Preview sampling over any ModelHandle, and the LoRA strength x seed comparison grid.

Our own small DDIM sampler (not a diffusers scheduler) so previews work the same on every backend,
including inside the WebUI where the installed diffusers may be old or absent.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from trainer.models.handle import Cond, ModelHandle
from trainer.lora.network import LoraNetwork
from trainer.diffusion.ddim import ddim_step, ddim_timesteps, predict_x0_eps


@torch.no_grad()
def sample(handle: ModelHandle, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 30,
           cfg: float = 5.0, size: tuple[int, int] = (512, 512), negative: str = "") -> list[Image.Image]:
    """Images for ``prompts[i]`` with ``seeds[i]`` (height, width ``size``), classifier-free guided."""
    h, w = size
    device = handle.device
    f = handle.vae_scale
    noise = torch.stack([torch.randn((4, h // f, w // f), generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(device)
    with handle.lock():
        cond = handle.encode_prompts(list(prompts), size)
        uncond = handle.encode_prompts([negative] * len(prompts), size) if negative else handle.uncond(len(prompts), size)
        both = _pad_cat(uncond, cond).to(device, handle.dtype)
        abar = handle.alphas_cumprod.to(device)
        x = noise
        ts = ddim_timesteps(steps)
        for i, t in enumerate(ts):
            out = handle.predict(torch.cat([x, x]).to(handle.dtype), torch.full((2 * len(x),), t, device=device),
                                 both).float()
            out_u, out_c = out.chunk(2)
            guided = out_u + cfg * (out_c - out_u)
            x0, eps = predict_x0_eps(guided, x, abar[t], handle.prediction)
            prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=device)
            x = ddim_step(x0, eps, prev)
        pixels = handle.decode_latents(x)
    return [to_pil(p) for p in pixels]


def _pad_cat(a: Cond, b: Cond) -> Cond:
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


@torch.no_grad()
def strength_grid_images(handle: ModelHandle, network: LoraNetwork, prompt: str, strengths: Sequence[float],
                         seeds: Sequence[int], **kwargs) -> list[list[Image.Image]]:
    """rows = seeds, columns = strengths; the network's multiplier is restored afterwards."""
    was_attached, old = network.attached, network.multiplier
    network.attach()
    columns = []
    try:
        for strength in strengths:
            network.multiplier = strength
            columns.append(sample(handle, [prompt] * len(seeds), seeds, **kwargs))
    finally:
        network.multiplier = old
        if not was_attached:
            network.detach()
    return [[columns[c][r] for c in range(len(strengths))] for r in range(len(seeds))]


def grid_image(rows: list[list[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str],
               title: str = "") -> Image.Image:
    """An x/y plot: labelled columns (LoRA strength) and rows (seed)."""
    cell_w, cell_h = rows[0][0].size
    scale = max(1, 128 // cell_w)
    cell_w, cell_h = cell_w * scale, cell_h * scale
    left, top = 70, 24 + (16 if title else 0)
    grid = Image.new("RGB", (left + cell_w * len(column_labels), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black")
    for c, label in enumerate(column_labels):
        draw.text((left + c * cell_w + 4, top - 16), label, fill="black")
    for r, row in enumerate(rows):
        draw.text((4, top + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black")
        for c, img in enumerate(row):
            grid.paste(img.resize((cell_w, cell_h), Image.NEAREST), (left + c * cell_w, top + r * cell_h))
    return grid


def comparison_grid(handle: ModelHandle, network: LoraNetwork, prompt: str, strengths: Sequence[float] = (0, 0.5, 1),
                    seeds: Sequence[int] = (1, 2, 3), **kwargs) -> Image.Image:
    rows = strength_grid_images(handle, network, prompt, strengths, seeds, **kwargs)
    return grid_image(rows, [f"strength {s:g}" for s in strengths], [f"seed {s}" for s in seeds], prompt)
