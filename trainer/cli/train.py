"""``python -m trainer train JOB.json [--model demo|PATH]`` and ``python -m trainer demo [--out DIR]``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer import paths
from trainer import jobs


class _Bar:
    """tqdm progress bar fed by the loop's progress events (one bar per pass)."""

    def __init__(self):
        self.bar, self.phase = None, None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if self.bar is None or p.phase != self.phase:
            self.close()
            self.bar, self.phase = tqdm(total=p.total, desc=p.phase or "training", unit="step", file=sys.stderr), p.phase
        self.bar.update(p.step - self.bar.n)
        self.bar.set_postfix(loss=f"{p.smoothed_loss:.4f}", lr=f"{p.lr:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_job_error(e: jobs.JobError) -> None:
    if e.errors:
        print("error: the job has problems:", file=sys.stderr)
        for field, message in e.errors.items():
            print(f"  {field}: {message}", file=sys.stderr)
    else:
        print(f"error: {e}", file=sys.stderr)


def load_job(path: str) -> jobs.Job:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise jobs.JobError(f"cannot read job file {path}: {e.strerror}") from None
    return jobs.job_from_json(text)


def run_train(args: argparse.Namespace) -> int:
    from trainer.models.diffusers_model import load_handle
    from trainer.train.modes.standard import JobContext
    from trainer.train.runner import check_job, run_job

    bar = _Bar()
    try:
        job = load_job(args.job)
        check_job(job, model_given=bool(args.model))
        model = args.model or job.model
        if not model:
            raise jobs.JobError("no model: set \"model\" in the job or pass --model demo|PATH", field="model")
        handle = load_handle(model)
        out = Path(args.out) if args.out else paths.default_output_dir()
        ctx = JobContext(output_dir=out, cache_dir=paths.cache_dir(), events=bar, resume=args.resume)
        result = run_job(job, handle, ctx)
    except jobs.JobError as e:
        bar.close()
        _print_job_error(e)
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


def run_demo(args: argparse.Namespace) -> int:
    from trainer.cli.demo import run_demo as demo

    started = time.perf_counter()
    written = demo(Path(args.out), steps=args.steps)
    for path in written:
        print(path)
    print(f"demo finished in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="run one job file now, with a progress bar")
    train.add_argument("job", help="job JSON (see `python -m trainer template MODE`)")
    train.add_argument("--model", help="'demo', a diffusers folder or a .safetensors checkpoint (overrides the job)")
    train.add_argument("--out", help=f"output folder when the job has none (default {paths.default_output_dir()})")
    train.add_argument("--resume", action="store_true", help="continue from the state saved beside the output")
    train.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    train.set_defaults(func=run_train)
    demo = subparsers.add_parser("demo", help="train a small LoRA on the built-in demo model, write LoRA + grid")
    demo.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.set_defaults(func=run_demo)
