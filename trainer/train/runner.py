"""Run one job of any mode on a ModelHandle: the single entry the CLI, the queue and the WebUI use."""
from __future__ import annotations

from typing import Callable

from trainer import jobs
from trainer.device import free_memory
from trainer.models.handle import ModelHandle
from trainer.train.modes.copier import train_copier
from trainer.train.loop import LoopResult
from trainer.train.modes.lcm import train_lcm
from trainer.train.modes.standard import JobContext, train_standard

RUNNERS: dict[str, Callable[..., LoopResult]] = {"standard": train_standard, "copier": train_copier, "lcm": train_lcm}


def check_job(job: jobs.Job, model_given: bool = False) -> None:
    """Everything that can be checked before a model is touched; raises JobError with field messages.

    ``model_given``: the caller supplies the model (WebUI, ``--model``), so the job's own is not needed.
    """
    problems = jobs.validate_paths(job)
    if model_given:
        problems.pop("model", None)
    if problems:
        raise jobs.JobError(errors=problems)
    if job.mode not in RUNNERS:
        raise jobs.JobError(f"{job.mode} jobs cannot run in this version (available: {', '.join(RUNNERS)})",
                            field="mode")


def run_job(job: jobs.Job, handle: ModelHandle, ctx: JobContext) -> LoopResult:
    check_job(job, model_given=True)
    try:
        return RUNNERS[job.mode](job, handle, ctx)
    finally:
        free_memory()
