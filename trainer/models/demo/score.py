"""Scoring helpers for demo-model tests: what colour / shape / background
does a (possibly slightly blurry) picture show?"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from trainer.models.demo.shapes import BACKGROUNDS, COLOURS

# Fill ratio of the foreground's bounding box: circle pi/4, square 1, triangle 1/2.
_CIRCLE_SQUARE_SPLIT = 0.89
_TRIANGLE_CIRCLE_SPLIT = 0.64


def _arr(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32)[..., :3]


def _border(a: np.ndarray, width: int = 2) -> np.ndarray:
    return np.concatenate([
        a[:width].reshape(-1, 3), a[-width:].reshape(-1, 3),
        a[:, :width].reshape(-1, 3), a[:, -width:].reshape(-1, 3)])


def _border_rgb(a: np.ndarray) -> np.ndarray:
    return np.median(_border(a), axis=0)


def _nearest(rgb: Sequence[float], table: dict) -> str:
    rgb = np.asarray(rgb, dtype=np.float32)
    return min(table, key=lambda k: float(np.sum((rgb - np.asarray(table[k], np.float32)) ** 2)))


def foreground_mask(img) -> np.ndarray:
    """Boolean HxW mask of pixels that differ clearly from the border colour.

    Two passes: a coarse mask (distance > 60 of 441) gives the foreground
    colour; the final mask keeps pixels nearer the foreground colour than the
    background colour (the mid-point threshold), which is robust to blur.
    """
    a = _arr(img)
    bg = _border_rgb(a)
    dist_bg = np.linalg.norm(a - bg, axis=-1)
    coarse = dist_bg > 60.0
    if coarse.sum() < 4:
        return coarse
    fg = np.median(a[coarse], axis=0)
    dist_fg = np.linalg.norm(a - fg, axis=-1)
    return (dist_fg < dist_bg) & (dist_bg > 30.0)


def _foreground_rgb(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if mask.sum() == 0:
        return _border_rgb(a)
    return np.median(a[mask], axis=0)


def dominant_colour(img) -> str:
    """Name (key of COLOURS) nearest to the median foreground pixel."""
    a = _arr(img)
    return _nearest(_foreground_rgb(a, foreground_mask(img)), COLOURS)


def background_colour(img) -> str:
    """Name (key of BACKGROUNDS) nearest to the median border pixel."""
    return _nearest(_border_rgb(_arr(img)), BACKGROUNDS)


def fill_ratio(img) -> float:
    """Foreground pixels / area of their bounding box (0 if no foreground).

    Rows and columns with fewer than 2 foreground pixels are ignored when
    finding the box, so isolated stray pixels do not inflate it.
    """
    m = foreground_mask(img)
    if m.sum() < 4:
        return 0.0
    rows = np.where(m.sum(axis=1) >= 2)[0]
    cols = np.where(m.sum(axis=0) >= 2)[0]
    if len(rows) == 0 or len(cols) == 0:
        return 0.0
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    box = m[r0:r1 + 1, c0:c1 + 1]
    return float(box.sum()) / float(box.size)


def shape_of(img) -> str:
    """"circle", "square" or "triangle" from the bounding-box fill ratio."""
    r = fill_ratio(img)
    if r >= _CIRCLE_SQUARE_SPLIT:
        return "square"
    if r >= _TRIANGLE_CIRCLE_SPLIT:
        return "circle"
    return "triangle"


def colour_distance(img, rgb: Sequence[float]) -> float:
    """Mean Euclidean distance of foreground pixels to ``rgb``, scaled to 0..1
    (1 = distance from black to white).  1.0 if there is no foreground."""
    a = _arr(img)
    m = foreground_mask(img)
    if m.sum() == 0:
        return 1.0
    d = np.linalg.norm(a[m] - np.asarray(rgb, np.float32), axis=-1)
    return float(d.mean() / (255.0 * np.sqrt(3.0)))


def background_distance(img, rgb: Sequence[float]) -> float:
    """Mean distance of border pixels to ``rgb``, 0..1 scale."""
    b = _border(_arr(img))
    d = np.linalg.norm(b - np.asarray(rgb, np.float32), axis=-1)
    return float(d.mean() / (255.0 * np.sqrt(3.0)))


def blue_minus_red(img) -> float:
    """Mean (blue - red) of the foreground pixels, -1..1 (pure red -1, pure blue +1); 0 without foreground.

    One number for a red -> blue slider: it rises as the shape turns blue, whatever the shade in between."""
    a = _arr(img)
    m = foreground_mask(img)
    if m.sum() == 0:
        return 0.0
    return float((a[m][:, 2] - a[m][:, 0]).mean() / 255.0)
