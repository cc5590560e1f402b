"""What the caller (CLI, queue, WebUI) provides around a job, where its files go, and how a mode runs its loop."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainer import jobs, paths
from trainer.train.loop import Control, EventSink, LoopResult, Outputs, TrainingLoop


@dataclass
class JobContext:
    """What the caller (CLI, queue, WebUI) provides around a job."""

    output_dir: Path                 # the output root: a job's output_dir is a folder below it
    cache_dir: Path                  # latent cache, shared across jobs
    events: EventSink | None = None
    control: Control = field(default_factory=Control)
    resume: bool = False             # continue from the job's saved state
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))
    #: The job's own folder (state, loss log, previews, temporary files); None = ``work/NAME`` beside the cache.
    work_dir: Path | None = None
    #: Where warnings are kept beyond the log (the queue stores them with the job); None: the log only.
    on_warning: Callable[[str], None] | None = None

    def warn(self, message: str) -> None:
        """Something the user should know about the job's result: logged, and kept with the job."""
        self.log(f"warning: {message}")
        if self.on_warning is not None:
            self.on_warning(message)

    def job_folder(self, name: str) -> Path:
        return Path(self.work_dir) if self.work_dir is not None else Path(self.cache_dir).parent / "work" / name


def job_outputs(job, ctx: JobContext) -> Outputs:
    """The output paths of a job; refuses to overwrite a finished LoRA unless asked."""
    try:
        folder = paths.output_folder(ctx.output_dir, job.output_dir)
    except ValueError as e:
        raise jobs.JobError(str(e), field="output_dir") from None
    outputs = Outputs(folder, job.name, ctx.job_folder(job.name))
    if outputs.final.exists() and not job.overwrite and not ctx.resume:
        raise jobs.JobError(f"{outputs.final} already exists: choose another name or tick overwrite", field="name")
    return outputs


def run_loop(loop: TrainingLoop, compute_loss, ctx: JobContext, restore_extra=None) -> LoopResult:
    """Resume from the saved state when asked, then run; the network is detached whatever happens."""
    if ctx.resume and loop.outputs.state.is_file():
        extra = loop.load_state_dict(TrainingLoop.read_state(loop.outputs.state))
        if restore_extra:
            restore_extra(extra)
    try:
        result = loop.run(compute_loss)
    finally:
        loop.network.detach()
        loop.network.enable()   # the loop leaves it disabled (see TrainingLoop.run)
    for warning in result.warnings:
        ctx.warn(warning)
    if not result.stopped_early:   # stop-and-save keeps the state so that resume can finish the job
        loop.outputs.state.unlink(missing_ok=True)
    return result
