"""Aspect-ratio buckets as kohya makes them, and each image's bucket (pure maths)."""
from __future__ import annotations

import math
from typing import Sequence

from trainer.data.dataset import Dataset
from trainer.data.options import DatasetOptions


def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64
                 ) -> list[tuple[int, int]]:
    """kohya's bucket list: (w, h) with sides multiples of ``step`` in [min, max], area <= resolution²."""
    max_area = resolution * resolution
    buckets = set()
    side = int(math.sqrt(max_area) // step) * step
    if min_reso <= side <= max_reso:
        buckets.add((side, side))
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    if not buckets:
        # The range admits nothing at this area (e.g. min side above the resolution): fall back to
        # the largest square that fits, rather than fail mid-job.
        side = max(step, min(side, max_reso // step * step))
        buckets.add((side, side))
    return sorted(buckets)


def bucket_for(width: int, height: int, buckets: Sequence[tuple[int, int]], no_upscale: bool = False,
               resolution: int = 512, step: int = 64) -> tuple[int, int]:
    """The bucket an image of ``width`` x ``height`` trains at: the nearest aspect ratio.

    With ``no_upscale`` an image is never enlarged: when it cannot cover its bucket it gets a bucket
    of its own, its size (scaled down to the max area if larger) rounded down to ``step``.
    """
    log_ratio = math.log(width / height)
    # Distance in log space treats 2:1 and 1:2 alike; ties go to the larger bucket (more pixels kept).
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))
    if not no_upscale or (width >= best[0] and height >= best[1]):
        return best
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    w, h = width * scale, height * scale
    return max(step, int(w // step) * step), max(step, int(h // step) * step)


def assign_buckets(dataset: Dataset, options: DatasetOptions | None = None) -> list[tuple[int, int]]:
    """The (w, h) bucket of every item, in ``dataset.items`` order."""
    options = options or dataset.options
    if not options.enable_buckets:
        return [(options.resolution, options.resolution)] * len(dataset.items)
    buckets = make_buckets(options.resolution, options.min_bucket_reso, options.max_bucket_reso,
                           options.bucket_step)
    return [bucket_for(item.width, item.height, buckets, options.bucket_no_upscale, options.resolution,
                       options.bucket_step) for item in dataset.items]
