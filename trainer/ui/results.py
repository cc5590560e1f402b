"""Results of a finished job: its checkpoints and the LoRA strength x seed comparison grid.

The grid renders on the job's own model, which the worker may be training at the same moment: the
LoRA is attached and detached under ``handle.lock()`` and is only enabled while one of our images
is sampled (a :class:`_HandleWithNetwork` turns it on inside each ``lock()``), so a training step
in between never sees it.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer import jobs
from trainer.models.handle import ModelHandle
from trainer.lora.network import LoraNetwork, network_for_file
from trainer.sampling.ddim import grid_image, sample

#: The x axis users build by hand with the x/y/z plot: negative strength shows what the LoRA removes.
STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
SEEDS = (1, 2, 3)


def checkpoints(row_outputs: Sequence[str], job: jobs.Job, lora_dir: Path) -> list[str]:
    """The job's LoRA files, final first, then the intermediate ``NAME-000500`` checkpoints by step."""
    folder = Path(job.output_dir) if job.output_dir else Path(lora_dir)
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


class _HandleWithNetwork:
    """``handle`` whose ``lock()`` also enables ``network`` for the time it is held."""

    def __init__(self, handle: ModelHandle, network: LoraNetwork):
        self._handle, self._network = handle, network

    def __getattr__(self, name):
        return getattr(self._handle, name)

    @contextlib.contextmanager
    def lock(self):
        with self._handle.lock():
            self._network.enable()
            try:
                yield
            finally:
                self._network.disable()


def strength_grid(handle: ModelHandle, lora_path: str, prompt: str, strengths: Sequence[float] = STRENGTHS,
                  seeds: Sequence[int] = SEEDS, steps: int = 20, cfg: float = 5.0,
                  size: tuple[int, int] = (512, 512)) -> Image.Image:
    """rows = seeds, columns = LoRA strengths, sampled between training steps if a job runs."""
    network = network_for_file(handle, lora_path)
    network.requires_grad_(False)
    with handle.lock():
        network.attach()
        network.disable()
    view = _HandleWithNetwork(handle, network)
    try:
        columns = []
        for strength in strengths:
            network.multiplier = strength
            columns.append(sample(view, [prompt] * len(seeds), seeds, steps=steps, cfg=cfg, size=size))
    finally:
        with handle.lock():
            network.detach()
    rows = [[columns[c][r] for c in range(len(strengths))] for r in range(len(seeds))]
    return grid_image(rows, [f"{s:g}" for s in strengths], [f"seed {s}" for s in seeds],
                      f"{Path(lora_path).stem}: {prompt}")
