"""Results of a finished job: its checkpoints and the LoRA strength x seed comparison grid.

The grid renders on the job's own model, which the worker may be training at the same moment
(``sampling.grids`` keeps the LoRA off outside the model lock, so a training step never sees it).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer import jobs
from trainer.models.handle import ModelHandle
from trainer.sampling.grids import lora_file_grid

#: The x axis users build by hand with the x/y/z plot: negative strength shows what the LoRA removes.
STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
SEEDS = (1, 2, 3)


def checkpoints(row_outputs: Sequence[str], job: jobs.Job, lora_dir: Path) -> list[str]:
    """The job's LoRA files, final first, then the intermediate ``NAME-000500`` checkpoints by step."""
    folder = Path(lora_dir) / job.output_dir
    final = [p for p in row_outputs if Path(p).name == f"{job.name}.safetensors" and Path(p).is_file()]
    pattern = re.compile(re.escape(job.name) + r"-(\d+)\.safetensors\Z")
    found = sorted((int(m.group(1)), str(p)) for p in folder.glob(f"{job.name}-*.safetensors")
                   if (m := pattern.match(p.name)))
    rest = [p for p in row_outputs if p not in final and Path(p).is_file() and p.endswith(".safetensors")]
    return list(dict.fromkeys(final + [p for _, p in found] + rest))


def default_prompt(job: jobs.Job) -> str:
    """The prompt a user would try first: the copier's prompt, the first preview prompt, or the trigger word."""
    if getattr(job, "prompt", ""):
        return job.prompt
    if job.sample_prompts:
        return job.sample_prompts[0]
    return getattr(job, "trigger_word", "") or ""


def parse_seeds(text: str) -> list[int]:
    """``"1, 2 3"`` -> ``[1, 2, 3]``; ValueError naming the bad entry."""
    seeds = []
    for token in re.split(r"[,\s]+", text.strip()):
        if not token:
            continue
        if not token.isdigit():
            raise ValueError(f"seeds must be whole numbers separated by commas (got {token!r})")
        seeds.append(int(token))
    if not seeds:
        raise ValueError("give at least one seed, e.g. 1, 2, 3")
    return seeds


def strength_grid(handle: ModelHandle, lora_path: str, prompt: str, strengths: Sequence[float] = STRENGTHS,
                  seeds: Sequence[int] = SEEDS, steps: int = 20, cfg: float = 5.0,
                  size: tuple[int, int] = (512, 512)) -> Image.Image:
    """rows = seeds, columns = LoRA strengths, sampled between training steps if a job runs."""
    return lora_file_grid(handle, lora_path, prompt, strengths, seeds, steps=steps, cfg=cfg, size=size)
