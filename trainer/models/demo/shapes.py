"""Procedural training pictures for the built-in demo model.

Every picture is one flat-coloured shape (circle, square or triangle) roughly
centred on a flat background.  Pure Python + Pillow, no randomness unless a
``random.Random``-like ``jitter`` generator is passed.
"""
from __future__ import annotations

import itertools
import random
from typing import Iterator, Optional

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

# Shape side as a fraction of the picture side (mean; jitter adds +-0.06).
BASE_SIDE = 0.44
_SUPERSAMPLE = 4


def caption(colour: str, shape: str, background: str) -> str:
    """``caption("red", "circle", "white") -> "a red circle on a white background"``."""
    return f"a {colour} {shape} on a {background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) triple, in a stable order."""
    return list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))


def draw(colour: str, shape: str, background: str, size: int = 64,
         jitter: Optional[random.Random] = None) -> Image.Image:
    """Draw one picture (RGB, ``size`` x ``size``).

    Deterministic when ``jitter`` is None (centred shape, side 44 % of the
    picture); with a ``random.Random`` the side varies in [38 %, 50 %] and
    the centre moves by up to 8 % of the picture side.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}")

    big = size * _SUPERSAMPLE
    side = BASE_SIDE
    cx = cy = 0.5
    if jitter is not None:
        side += jitter.uniform(-0.06, 0.06)
        cx += jitter.uniform(-0.08, 0.08)
        cy += jitter.uniform(-0.08, 0.08)
    half = side * big / 2
    x0, y0 = cx * big - half, cy * big - half
    x1, y1 = cx * big + half, cy * big + half

    img = Image.new("RGB", (big, big), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    else:  # triangle, apex up
        d.polygon([(cx * big, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((size, size), Image.BOX)


def iter_training_images(n_per_combination: int, seed: int = 0, size: int = 64
                         ) -> Iterator[tuple[Image.Image, str]]:
    """Yield ``(image, caption)`` pairs with jitter, deterministic for a seed."""
    rng = random.Random(seed)
    for _ in range(n_per_combination):
        for c, s, b in all_combinations():
            yield draw(c, s, b, size=size, jitter=rng), caption(c, s, b)
