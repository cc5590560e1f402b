"""The morning view: one sheet per finished job with what decides which checkpoint to keep.

For each checkpoint (the ``NAME-000500`` saves, then the final LoRA) a strength x seed grid sampled on the
loaded model with the job's own prompts and sampling (LCM jobs: the LCM sampler at 4 steps, CFG 1.5; others:
the previews' guided DDIM), the loss curves of the run and each checkpoint's held-out loss (fixed noise and
timesteps, :mod:`trainer.train.heldout`) with the best one marked. Saved as ``NAME.morning.png`` beside the LoRA.
A sweep group's sheets are stacked into one picture with the group's best job named.
"""
from __future__ import annotations

import csv
import io
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps

from trainer import jobs
from trainer.lora.files import read_metadata
from trainer.models.handle import ModelHandle
from trainer.paths import write_atomic
from trainer.sampling import sheets
from trainer.sampling.grids import lora_file_grid
from trainer.train.heldout import best_checkpoint, checkpoint_losses
from trainer.train.previews import job_prompts, sampling_for

#: The strengths people plot a LoRA at (negative: what it removes) and the seeds they use.
STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
SEEDS = (1111, 2222, 3333)


@dataclass
class MorningSheet:
    job_name: str
    path: Path
    image: Image.Image
    checkpoints: list[Path]
    steps: list[int]
    losses: list[float]                      # held-out loss of each checkpoint
    best: int | None                         # index into checkpoints
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def best_file(self) -> Path | None:
        return None if self.best is None else self.checkpoints[self.best]

    def summary(self) -> str:
        if self.best is None:
            return f"{self.job_name}: held-out loss not measured (no best checkpoint marked)"
        return (f"{self.job_name}: best checkpoint {self.checkpoints[self.best].name} (held-out loss "
                f"{self.losses[self.best]:.5f}, of {len(self.checkpoints)})")


def job_checkpoints(lora_folder: Path, name: str) -> list[Path]:
    """The job's LoRA files in step order: the ``NAME-000500`` saves, then the final ``NAME.safetensors``."""
    pattern = re.compile(re.escape(name) + r"-(\d+)\.safetensors\Z")
    found = sorted((int(m.group(1)), p) for p in Path(lora_folder).glob(f"{name}-*.safetensors")
                   if (m := pattern.match(p.name)))
    final = Path(lora_folder) / f"{name}.safetensors"
    return [p for _, p in found] + ([final] if final.is_file() else [])


def checkpoint_step(path: Path, name: str) -> int:
    """The step a LoRA file was saved at: from its name, else its ``ss_steps`` metadata (0 if unknown)."""
    m = re.fullmatch(re.escape(name) + r"-(\d+)\.safetensors", Path(path).name)
    if m:
        return int(m.group(1))
    try:
        return int(read_metadata(path).get("ss_steps", 0))
    except (OSError, ValueError):
        return 0


def read_loss_log(path: Path) -> tuple[list[int], list[float], list[float]]:
    """(steps, losses, smoothed losses) of a job's ``NAME.loss.csv``; empty when there is none."""
    steps, losses, smoothed = [], [], []
    if not Path(path).is_file():
        return steps, losses, smoothed
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
                smoothed.append(float(row["smoothed_loss"]))
            except (KeyError, TypeError, ValueError):
                continue
    return steps, losses, smoothed


def _png(image: Image.Image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())


def morning_sheet(job: jobs.Job, handle: ModelHandle, lora_folder: Path, work_folder: Path | None, cache_dir: Path,
                  strengths: Sequence[float] = STRENGTHS, seeds: Sequence[int] = SEEDS,
                  prompts: Sequence[str] | None = None, save: bool = True) -> MorningSheet:
    """The job's morning sheet, sampled on ``handle`` (the model the job trained on), saved beside its LoRA."""
    started = time.perf_counter()
    lora_folder = Path(lora_folder)
    files = job_checkpoints(lora_folder, job.name)
    if not files:
        raise jobs.JobError(f"job '{job.name}' has no LoRA file in {lora_folder} (has it finished?)", field="name")
    steps = [checkpoint_step(p, job.name) for p in files]
    losses = checkpoint_losses(job, handle, files, cache_dir, lora_folder)
    best = best_checkpoint(losses)
    sampling = sampling_for(job)
    prompts = list(prompts) if prompts else job_prompts(job)
    size = (job.resolution, job.resolution)
    grids = []
    for i, path in enumerate(files):
        grid = lora_file_grid(handle, path, prompts, strengths, seeds, sampler=sampling.sampler, steps=sampling.steps,
                              cfg=sampling.cfg, size=size)
        mark = "  <- best" if i == best else ""
        value = f"held-out loss {losses[i]:.5f}" if math.isfinite(losses[i]) else "held-out loss not measured"
        head = sheets.text_block([(f"{path.name} (step {steps[i]}): {value}{mark}",
                                   sheets.BEST_COLOUR if i == best else (0, 0, 0))], grid.width, line_height=16)
        # the best checkpoint's block is framed in green, the others in grey
        grids.append(ImageOps.expand(sheets.stack([head, grid], gap=0), border=4,
                                     fill=sheets.BEST_COLOUR if i == best else (200, 200, 200)))
    curve_steps, curve, smoothed = read_loss_log(Path(work_folder) / f"{job.name}.loss.csv") if work_folder else ([], [], [])
    chart = sheets.loss_chart([("training loss", curve_steps, curve), ("smoothed", curve_steps, smoothed)],
                              list(zip(steps, losses)), steps[best] if best is not None else None,
                              title=f"{job.name}: loss")
    names = [p.name for p in files]
    table = sheets.text_block(sheets.heldout_lines(names, losses, best)
                              + [(f"sampled: {sampling.sampler} {sampling.steps} steps, CFG {sampling.cfg:g}; "
                                  f"rows: seeds {', '.join(map(str, seeds))}", (60, 60, 60))], 420)
    title = f"{job.name} ({job.mode}) - morning sheet: checkpoints x strength x seed"
    image = sheets.morning_sheet(title, grids, chart, table)
    path = lora_folder / f"{job.name}.morning.png"
    if save:
        _png(image, path)
    return MorningSheet(job.name, path, image, files, steps, losses, best, time.perf_counter() - started)


def group_sheet(sheets_of_jobs: Sequence[MorningSheet]) -> tuple[Image.Image, str]:
    """A sweep group's sheets under each other, headed by the job whose best checkpoint has the lowest
    held-out loss (the jobs of a sweep train on the same data, so their losses compare)."""
    scored = [(s.losses[s.best], s) for s in sheets_of_jobs if s.best is not None]
    if scored:
        loss, winner = min(scored, key=lambda pair: pair[0])
        head = f"best of the group: {winner.job_name}, {winner.checkpoints[winner.best].name} (held-out loss {loss:.5f})"
    else:
        head = "no job of the group has a finite held-out loss"
    images = [s.image for s in sheets_of_jobs]
    width = max(i.width for i in images)
    return sheets.stack([sheets.text_block([(head, sheets.BEST_COLOUR)], width, line_height=16), *images], gap=24), head


def save_group_sheet(image: Image.Image, folder: Path, names: Sequence[str]) -> Path:
    """``PREFIX.sweep.morning.png`` in the group's LoRA folder, PREFIX the names' common start (the base job's)."""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("_-") or "sweep"
    return _png(image, Path(folder) / f"{prefix}.sweep.morning.png")
