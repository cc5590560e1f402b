"""Run one job of any mode on a ModelHandle: the single entry the CLI, the queue and the WebUI use."""
from __future__ import annotations

from typing import Callable

from trainer import jobs
from trainer.device import free_memory
from trainer.models.handle import ModelHandle
from trainer.train.modes.addift import train_addift
from trainer.train.modes.copier import train_copier
from trainer.train.loop import LoopResult
from trainer.train.modes.ileco import train_ileco
from trainer.train.modes.lcm import train_lcm
from trainer.train.modes.standard import train_standard
from trainer.train.context import JobContext

RUNNERS: dict[str, Callable[..., LoopResult]] = {"standard": train_standard, "copier": train_copier, "lcm": train_lcm,
                                                 "addift": train_addift, "ileco": train_ileco}


def run_job(job: jobs.Job, handle: ModelHandle, ctx: JobContext) -> LoopResult:
    jobs.check_job(job, model_given=True)
    try:
        with handle.frozen(), handle.predicting(job.prediction):
            return RUNNERS[job.mode](job, handle, ctx)
    finally:
        free_memory()
