"""Morning sheets of queued jobs: a finished job, or every finished job of its sweep group.

The one place the tab's button and ``python -m trainer morning`` share: it finds each job's LoRA folder, work
folder (its loss log) and model, and hands them to :func:`trainer.train.morning.morning_sheet`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from trainer import jobs, paths
from trainer.models.handle import ModelHandle
from trainer.queue.store import JobQueue, QueueError
from trainer.queue.worker import work_folder
from trainer.train.morning import SEEDS, STRENGTHS, MorningSheet, group_sheet, morning_sheet, save_group_sheet

#: States whose LoRA files exist (a stopped job saved its LoRA too).
FINISHED = ("done", "stopped")


@dataclass
class MorningResult:
    sheets: list[MorningSheet]
    image: Image.Image             # the one sheet, or the group's sheets stacked
    path: Path                     # where ``image`` was saved
    skipped: list[str]             # jobs of the group that have no LoRA yet, with their state
    head: str = ""                 # a group's best job

    def summary(self) -> str:
        lines = ([self.head] if self.head else []) + [s.summary() for s in self.sheets]
        return "\n".join(lines + [f"skipped {s}" for s in self.skipped])


def morning(queue: JobQueue, job_ids: Sequence[int], handle_for: Callable[[jobs.Job], ModelHandle],
            output_root: Path, cache_dir: Path, strengths: Sequence[float] = STRENGTHS,
            seeds: Sequence[int] = SEEDS, prompts: Sequence[str] | None = None) -> MorningResult:
    """One sheet per finished job of ``job_ids`` (saved beside its LoRA); several jobs are also stacked into
    ``PREFIX.sweep.morning.png``. Jobs not finished are skipped and named; none finished is an error."""
    sheets, skipped, folders = [], [], []
    for job_id in job_ids:
        row = queue.get(job_id)
        if row.state not in FINISHED:
            skipped.append(f"job {row.id} '{row.name}' ({row.state})")
            continue
        job = row.job
        lora_folder = paths.output_folder(output_root, job.output_dir)
        sheets.append(morning_sheet(job, handle_for(job), lora_folder, work_folder(queue, row.id), cache_dir,
                                    strengths, seeds, prompts))
        folders.append(lora_folder)
    if not sheets:
        raise QueueError("no finished job to make a morning sheet of: " + ", ".join(skipped)
                         + " (a sheet needs the job's LoRA files)")
    if len(sheets) == 1:
        return MorningResult(sheets, sheets[0].image, sheets[0].path, skipped)
    image, head = group_sheet(sheets)
    path = save_group_sheet(image, folders[0], [s.job_name for s in sheets])
    return MorningResult(sheets, image, path, skipped, head)
