"""The LoRA strength x seed grid people judge a LoRA by, and the labelled image grid every sheet uses."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from trainer.lora.network import LoraNetwork, network_for_file
from trainer.models.handle import ModelHandle
from trainer.sampling.guided import sample
from trainer.sampling.lcm import sample_lcm

#: The samplers a grid draws with: guided DDIM (standard and copier LoRAs) or LCM (LCM-LoRAs, at 4 steps, CFG 1-2).
SAMPLERS = {"ddim": sample, "lcm": sample_lcm}


def grid_rows(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """The (prompt, seed) of each row: every seed of the first prompt, then of the next."""
    return [(p, int(s)) for p in prompts for s in seeds]


def row_labels(prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """``seed 1`` with one prompt; ``#2 seed 1`` (the prompt's number in the title) with several."""
    return [f"seed {s}" if len(prompts) == 1 else f"#{i + 1} seed {s}" for i in range(len(prompts)) for s in seeds]


@torch.no_grad()
def strength_grid_images(handle: ModelHandle, network: LoraNetwork, prompt: str | Sequence[str],
                         strengths: Sequence[float], seeds: Sequence[int], sampler: str = "ddim",
                         **kwargs) -> list[list[Image.Image]]:
    """rows = (prompt, seed) (see :func:`grid_rows`), columns = strengths, drawn with ``SAMPLERS[sampler]``.

    The handle may be training meanwhile: the network is attached disabled under the lock and is on only while
    our images sample; its state is restored afterwards."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    rows = grid_rows(prompts, seeds)
    draw = SAMPLERS[sampler]
    was_attached, was_enabled, old = network.attached, network.enabled, network.multiplier
    with handle.lock():
        network.attach()
        network.disable()
    columns = []
    try:
        for strength in strengths:
            network.multiplier = strength
            columns.append(draw(handle, [p for p, _ in rows], [s for _, s in rows], network=network, **kwargs))
    finally:
        with handle.lock():
            network.multiplier = old
            if not was_attached:
                network.detach()
            elif was_enabled:
                network.enable()
    return [[columns[c][r] for c in range(len(strengths))] for r in range(len(rows))]


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels: broken at spaces, and a word too long for a line cut
    with an ellipsis (a label must never run into its neighbour's column)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while draw.textlength(word) > width and len(word) > 1:
            word = word[:-2] + "…" if word.endswith("…") else word[:-1] + "…"
        lines.append(word)
    return lines or [""]


_LINE = 12   # the default font's line height, pixels


def grid_image(rows: list[list[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str],
               title: str = "") -> Image.Image:
    """An x/y plot: labelled columns (LoRA strength) and rows (seed). Column labels wrap within their column,
    row labels set the left margin, the title wraps within the grid's width: at 64 px cells nothing overlaps."""
    cell_w, cell_h = rows[0][0].size
    scale = max(1, 128 // cell_w)
    cell_w, cell_h = cell_w * scale, cell_h * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max([70] + [int(measure.textlength(label)) + 10 for label in row_labels])
    width = left + cell_w * len(column_labels)
    title_lines = _wrap(measure, title, width - 8) if title else []
    header = [_wrap(measure, label, cell_w - 6) for label in column_labels]
    # 24 px for a line of labels (+16 for a title line) as before; more when they wrap
    top = max(24 + (16 if title else 0),
              8 + _LINE * (len(title_lines) + max(len(lines) for lines in header)) + (4 if title else 0))
    grid = Image.new("RGB", (width, top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((4, 2 + i * _LINE), line, fill="black")
    for c, lines in enumerate(header):
        for i, line in enumerate(lines):
            draw.text((left + c * cell_w + 3, top - 4 - _LINE * (len(lines) - i)), line, fill="black")
    for r, row in enumerate(rows):
        draw.text((4, top + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black")
        for c, img in enumerate(row):
            grid.paste(img.resize((cell_w, cell_h), Image.NEAREST), (left + c * cell_w, top + r * cell_h))
    return grid


def comparison_grid(handle: ModelHandle, network: LoraNetwork, prompt: str, strengths: Sequence[float] = (0, 0.5, 1),
                    seeds: Sequence[int] = (1, 2, 3), **kwargs) -> Image.Image:
    rows = strength_grid_images(handle, network, prompt, strengths, seeds, **kwargs)
    return grid_image(rows, [f"strength {s:g}" for s in strengths], [f"seed {s}" for s in seeds], prompt)


def lora_file_grid(handle: ModelHandle, lora_path: str | Path, prompt: str | Sequence[str],
                   strengths: Sequence[float], seeds: Sequence[int], **kwargs) -> Image.Image:
    """The strength x seed grid of a LoRA file (any format the reader takes), titled with its name and prompts;
    several prompts give one row block each."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    network = network_for_file(handle, lora_path)
    network.requires_grad_(False)
    rows = strength_grid_images(handle, network, prompts, strengths, seeds, **kwargs)
    title = prompts[0] if len(prompts) == 1 else "  ".join(f"#{i + 1} {p}" for i, p in enumerate(prompts))
    return grid_image(rows, [f"{s:g}" for s in strengths], row_labels(prompts, seeds),
                      f"{Path(lora_path).stem}: {title}")
