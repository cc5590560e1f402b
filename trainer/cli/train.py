"""``python -m trainer train JOB.json [--model demo|PATH] [--resume]``: run one job now, with a progress bar."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import jobs, paths
from trainer.cli.common import ProgressBar, load_job, print_job_error
from trainer.queue.admission import Admission, admit


def run_train(args: argparse.Namespace) -> int:
    from trainer.models.diffusers_model import load_handle
    from trainer.train.context import JobContext
    from trainer.train.runner import run_job

    bar = ProgressBar()
    try:
        job = load_job(args.job)
        out = Path(args.out) if args.out else paths.default_output_dir()
        errors, warnings = admit(job, None, Admission(out, model_given=bool(args.model), resume=args.resume))
        if errors:
            raise jobs.JobError(errors=errors)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        model = args.model or job.model
        if not model:
            raise jobs.JobError("no model: set \"model\" in the job or pass --model demo|PATH", field="model")
        handle = load_handle(model)
        ctx = JobContext(output_dir=out, cache_dir=paths.cache_dir(), events=bar, resume=args.resume)
        result = run_job(job, handle, ctx)
    except jobs.JobError as e:
        bar.close()
        print_job_error(e)
        return 2
    except Exception as e:  # every failure reaches the user as one readable line
        bar.close()
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    bar.close()
    for path in result.saved:
        print(path)
    return 0


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="run one job file now, with a progress bar")
    train.add_argument("job", help="job JSON (see `python -m trainer template MODE`)")
    train.add_argument("--model", help="'demo', a diffusers folder or a .safetensors checkpoint (overrides the job)")
    train.add_argument("--out", help=f"output root; a job's output_dir is a folder inside it (default {paths.default_output_dir()})")
    train.add_argument("--resume", action="store_true", help="continue from the state saved beside the output")
    train.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    train.set_defaults(func=run_train)
