"""Merge preview: before a merge is saved, the inputs applied together next to the merge at a few ranks,
rendered on the loaded model with the same seeds, and the rank to choose.

"Applied together" is the lossless merge (``concat``: rank = the sum of the inputs' ranks, fp32), which equals
the inputs applied at their ratios and block weights (tests/test_merge.py: within 1e-6 of the sum). Each
rank r is the merge as it would be saved (the same precision), so its images show what truncation and
rounding do. The suggested rank is the smallest of the tried ranks (powers of two, then the lossless rank)
whose images differ from "applied together" by less than the threshold: a mean absolute pixel difference
below 2 of 255 levels by default, about what re-saving a JPEG changes and far less than a visible edit.
Lives in ``sampling`` (it renders); the merge itself is ``trainer.merge``'s.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from trainer.lora.network import attached_file
from trainer.merge.svd_merge import (
    MergeError, MergeInput, MergeResult, RankPolicy, format_report, merge_loras, save_merged,
)
from trainer.models.handle import ModelHandle
from trainer.sampling.grids import grid_image
from trainer.sampling.guided import sample

#: Mean absolute difference, in 0-255 pixel levels, under which a merged render counts as the same picture.
DEFAULT_THRESHOLD = 2.0


@dataclass(frozen=True)
class RankRender:
    rank: int
    difference: float                 # mean |merged - together| over pixels, channels and seeds, 0-255 levels
    result: MergeResult = field(repr=False)   # the merge at this rank: its per-module error report
    images: tuple[Image.Image, ...] = field(repr=False, default=())


@dataclass(frozen=True)
class MergePreview:
    together: tuple[Image.Image, ...]
    renders: tuple[RankRender, ...]    # ascending rank
    suggested: int | None              # None: no tried rank is under the threshold
    threshold: float
    seeds: tuple[int, ...]
    asked: int | None
    grid: Image.Image = field(repr=False, default=None)

    def summary(self) -> str:
        lines = [f"{'rank':>5} {'mean pixel difference':>22} {'relative error':>14} {'energy kept':>11}"]
        for r in self.renders:
            t = r.result.totals
            lines.append(f"{r.rank:>5} {r.difference:>16.2f} / 255 {t['relative_error']:>14.3e} "
                         f"{t['retained_energy']:>11.6f}")
        seeds = ", ".join(str(s) for s in self.seeds)
        if self.suggested is None:
            lines.append(f"no tried rank stays under {self.threshold:g}/255 of the inputs applied together "
                         f"(seeds {seeds}); keep the lossless rank ({self.renders[-1].rank}) or accept the difference")
        else:
            lines.append(f"suggested rank: {self.suggested} — the smallest tried rank whose images differ from the "
                         f"inputs applied together by less than {self.threshold:g}/255 (mean over pixels, seeds {seeds})")
        shown = next((r for r in self.renders if r.rank == self.asked), None)
        if shown is not None:
            lines.append(f"\nper module at rank {shown.rank}:")
            lines.append(format_report(shown.result, more="(the 10 worst modules are shown)"))
        return "\n".join(lines)


def candidate_ranks(lossless: int, asked: int | None = None) -> list[int]:
    """Powers of two below the lossless rank, the lossless rank, and the asked rank (capped), ascending."""
    ranks = {1 << i for i in range(max(lossless, 1).bit_length()) if (1 << i) < lossless} | {lossless}
    if asked is not None:
        ranks.add(min(asked, lossless))
    return sorted(ranks)


def mean_pixel_difference(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> float:
    """Mean |a - b| in 0-255 levels over every pixel, channel and image."""
    return float(np.mean([np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)).mean()
                          for x, y in zip(a, b)]))


@torch.no_grad()
def render_lora_file(handle: ModelHandle, path: Path, prompt: str, seeds: Sequence[int], **kwargs) -> list[Image.Image]:
    """Images of ``prompt`` with the LoRA file at strength 1; it is on only while our images sample (a job
    may be training on the handle meanwhile) and detached afterwards."""
    with attached_file(handle, path) as network:
        return sample(handle, [prompt] * len(seeds), list(seeds), network=network, **kwargs)


def preview_merge(handle: ModelHandle, inputs: Sequence[MergeInput], prompt: str, seeds: Sequence[int] = (1, 2, 3), *,
                  rank: int | None = None, conv_rank: int | None = None, threshold: float = DEFAULT_THRESHOLD,
                  dtype: str = "fp16", presets_text: str | None = None, stop_at_suggestion: bool = True,
                  **sample_kwargs) -> MergePreview:
    """Render "applied together" and the merge at the candidate ranks; nothing is saved.

    With ``stop_at_suggestion`` the ranks above the first one under the threshold are not rendered (the asked
    rank always is). ``sample_kwargs``: steps, cfg, size, negative, as for :func:`trainer.sampling.guided.sample`.
    """
    if not threshold > 0:
        raise MergeError(f"preview threshold must be > 0 (pixel levels of 255), got {threshold!r}")
    with tempfile.TemporaryDirectory(prefix="loraq-preview-") as folder:
        lossless = merge_loras(inputs, RankPolicy(rank=None, conv_rank=None, concat=True), dtype="fp32",
                               presets_text=presets_text, title="applied together")
        together_path = save_merged(lossless, Path(folder) / "together.safetensors")
        together = render_lora_file(handle, together_path, prompt, seeds, **sample_kwargs)
        full = max(m.rank for m in lossless.modules)
        renders: list[RankRender] = []
        suggested = None
        for r in candidate_ranks(full, rank):
            if suggested is not None and stop_at_suggestion and r != rank:
                continue
            result = merge_loras(inputs, RankPolicy(rank=r, conv_rank=conv_rank), dtype=dtype,
                                 presets_text=presets_text, title=f"rank {r}")
            path = save_merged(result, Path(folder) / f"rank{r}.safetensors")
            images = render_lora_file(handle, path, prompt, seeds, **sample_kwargs)
            difference = mean_pixel_difference(images, together)
            renders.append(RankRender(r, difference, result, tuple(images)))
            if suggested is None and difference < threshold:
                suggested = r
    columns = ["applied together"] + [f"rank {r.rank}: {r.difference:.1f}" for r in renders]
    rows = [[together[i]] + [r.images[i] for r in renders] for i in range(len(seeds))]
    grid = grid_image(rows, columns, [f"seed {s}" for s in seeds],
                      f"{prompt} (mean pixel difference to 'applied together', of 255)")
    return MergePreview(tuple(together), tuple(renders), suggested, threshold, tuple(seeds), rank, grid)
