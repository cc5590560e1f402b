"""Sheets made of grids: pure layout over PIL images (no model, no sampling).

``stack`` puts grids under each other (one block per checkpoint); ``loss_chart`` draws a job's loss curves
with its checkpoints' held-out losses; ``morning_sheet`` lays out one job's morning view.
"""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw

BEST_COLOUR = (0, 140, 60)


def stack(images: Sequence[Image.Image], gap: int = 8, background: str = "white") -> Image.Image:
    """``images`` under each other, left-aligned, ``gap`` pixels apart."""
    if not images:
        raise ValueError("nothing to stack")
    width = max(i.width for i in images)
    height = sum(i.height for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, height), background)
    y = 0
    for image in images:
        out.paste(image.convert("RGB"), (0, y))
        y += image.height + gap
    return out


def side_by_side(images: Sequence[Image.Image], gap: int = 12, background: str = "white") -> Image.Image:
    """``images`` next to each other, top-aligned."""
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(i.height for i in images)), background)
    x = 0
    for image in images:
        out.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return out


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def loss_chart(curves: Sequence[tuple[str, Sequence[int], Sequence[float | None]]],
               checkpoints: Sequence[tuple[int, float]] = (), best_step: int | None = None,
               size: tuple[int, int] = (480, 260), title: str = "") -> Image.Image:
    """Training loss curves (label, steps, values) on one axis, the checkpoints' held-out losses as dots on a
    second scale (right), the best checkpoint ringed and labelled."""
    width, height = size
    left, right, top, bottom = 52, 52, 22, 26
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((left, 4), title, fill="black")
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    all_steps = [s for _, steps, _ in curves for s in steps] + [s for s, _ in checkpoints]
    if not all_steps:
        draw.text((x0 + 10, (y0 + y1) // 2), "no steps recorded", fill="black")
        return image
    s_min, s_max = min(all_steps), max(all_steps)
    span = max(1, s_max - s_min)
    to_x = lambda s: x0 + (s - s_min) / span * (x1 - x0)

    def scale(values: list[float]):
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
        return lo, hi, (lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0))

    train_values = [v for _, _, values in curves for v in _finite(values)]
    lo, hi, to_y = scale(train_values)
    colours = [(120, 150, 220), (20, 60, 200), (230, 120, 40), (150, 60, 20)]
    legend_y = y0 + 4
    for i, (label, steps, values) in enumerate(curves):
        points = [(to_x(s), to_y(v)) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
        colour = colours[i % len(colours)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2 if i % 2 else 1)
        draw.text((x0 + 6, legend_y), label, fill=colour)
        legend_y += 12
    draw.text((4, y0), f"{hi:.3g}", fill=(80, 80, 80))
    draw.text((4, y1 - 10), f"{lo:.3g}", fill=(80, 80, 80))
    draw.text((x0, y1 + 6), f"step {s_min}", fill=(80, 80, 80))
    draw.text((x1 - 60, y1 + 6), f"step {s_max}", fill=(80, 80, 80))
    if checkpoints:
        h_lo, h_hi, to_hy = scale(_finite([v for _, v in checkpoints]))
        draw.text((x1 + 4, y0), f"{h_hi:.4g}", fill=(180, 0, 0))
        draw.text((x1 + 4, y1 - 10), f"{h_lo:.4g}", fill=(180, 0, 0))
        draw.text((x0 + 6, legend_y), "held-out loss (right)", fill=(180, 0, 0))
        for step, value in checkpoints:
            if not math.isfinite(value):
                continue
            x, y = to_x(step), to_hy(value)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(180, 0, 0))
            if step == best_step:
                draw.ellipse((x - 7, y - 7, x + 7, y + 7), outline=BEST_COLOUR, width=2)
                draw.text((min(x + 8, x1 - 40), max(y0, y - 16)), "best", fill=BEST_COLOUR)
    return image


def text_block(lines: Sequence[tuple[str, tuple[int, int, int]]], width: int, line_height: int = 14) -> Image.Image:
    """Lines of (text, colour) on white."""
    image = Image.new("RGB", (width, 8 + line_height * max(1, len(lines))), "white")
    draw = ImageDraw.Draw(image)
    for i, (text, colour) in enumerate(lines):
        draw.text((6, 4 + i * line_height), text, fill=colour)
    return image


def heldout_lines(names: Sequence[str], losses: Sequence[float], best: int | None) -> list[tuple[str, tuple]]:
    """The held-out loss table, the best checkpoint marked."""
    lines: list[tuple[str, tuple]] = [("held-out loss (fixed noise, fixed timesteps)", (0, 0, 0))]
    for i, (name, loss) in enumerate(zip(names, losses)):
        mark = "  <- best" if i == best else ""
        value = f"{loss:.5f}" if math.isfinite(loss) else "not measured for this mode"
        lines.append((f"{name}: {value}{mark}", BEST_COLOUR if i == best else (60, 60, 60)))
    return lines


def morning_sheet(title: str, grids: Sequence[Image.Image], chart: Image.Image, table: Image.Image) -> Image.Image:
    """One job's morning view: the title, the loss chart and the held-out table side by side on top, then the
    checkpoints' grids (checkpoint x strength x seed) under each other."""
    head = side_by_side([chart, table])
    title_bar = text_block([(title, (0, 0, 0))], max(head.width, max(g.width for g in grids)), line_height=16)
    return stack([title_bar, head, *grids], gap=10)
