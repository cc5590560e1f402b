"""``python -m trainer queue add JOB.json | list | show ID | cancel ID | stop ID | resume ID | retry ID |
delete ID | run [--until-empty]``: the same store the UI uses (``$LORAQ_HOME/queue.sqlite``)."""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import threading
from pathlib import Path

from trainer import jobs, paths
from trainer.cli.common import ProgressBar, load_job, print_job_error


def _when(t: float | None) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _progress_text(row) -> str:
    if not row.total:
        return "-"
    loss = f" loss {row.smoothed_loss:.4f}" if row.smoothed_loss is not None else ""
    return f"{row.step}/{row.total}{loss}"


def _open(args):
    from trainer.queue.store import JobQueue

    return JobQueue(Path(args.db) if args.db else None)


def cmd_add(args) -> int:
    from trainer.queue.admission import Admission

    queue = _open(args)
    out = Path(args.out) if args.out else paths.default_output_dir()
    many = [load_job(path) for path in args.jobs]
    if args.sweep:
        many = [job for base in many for job in jobs.sweep_jobs(base, jobs.parse_sweep(args.sweep))]
    ids = queue.add_many(many, admission=Admission(out))
    for job_id in ids:
        print(job_id)
        for warning in queue.get(job_id).warnings:
            print(f"warning: job {job_id}: {warning}", file=sys.stderr)
    return 0


def cmd_list(args) -> int:
    queue = _open(args)
    states = args.state or None
    rows = queue.list(limit=args.limit, states=states, newest_first=args.newest_first)
    print(f"{'id':>5}  {'state':<11} {'mode':<8} {'name':<24} {'progress':<22} {'finished':<19}  error")
    for r in rows:
        error = (r.error or "").splitlines()[0][:60] if r.error else ""
        print(f"{r.id:>5}  {r.state:<11} {r.mode:<8} {r.name[:24]:<24} {_progress_text(r):<22} "
              f"{_when(r.finished):<19}  {error}")
    if queue.paused():
        print("(paused: no next job is taken; `queue continue` goes on)", file=sys.stderr)
    shown, total = len(rows), queue.count(states)
    if shown < total:
        print(f"({shown} of {total} shown; --limit N for more)", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    queue = _open(args)
    r = queue.get(args.id)
    print(f"job {r.id}: {r.name} ({r.mode}) {r.state}")
    print(f"  created {_when(r.created)}  started {_when(r.started)}  finished {_when(r.finished)}")
    print(f"  progress {_progress_text(r)}" + (f"  lr {r.lr:.3g}" if r.lr is not None else "")
          + (f"  {r.it_per_s:.2f} it/s" if r.it_per_s else ""))
    if r.error:
        print(f"  error: {r.error}")
    for warning in r.warnings:
        print(f"  warning: {warning}")
    for path in r.outputs:
        print(f"  output: {path}")
    if args.history:
        for p in queue.progress(r.id):
            print(f"  {p.phase or 'step'} {p.step}: loss {p.loss} smoothed {p.smoothed_loss} lr {p.lr}")
    if args.spec:
        print(jobs.job_to_json(r.job))
    if args.traceback and r.error_detail:
        print(r.error_detail)
    return 0


DONE = {"resume": "queued to resume", "retry": "queued again", "delete": "deleted"}


def _operation(name: str):
    def run(args) -> int:
        queue = _open(args)
        result = getattr(queue, name)(args.id)
        print(f"job {args.id}: {result if isinstance(result, str) else DONE[name]}")
        return 0
    return run


def _whole_queue(name: str):
    def run(args) -> int:
        queue = _open(args)
        if name == "clear":
            print(f"removed {queue.clear_finished()} finished job(s)")
        else:
            queue.set_paused(name == "pause")
            print("paused: no next job is taken" if name == "pause" else "the queue goes on")
        return 0
    return run


def cmd_run(args) -> int:
    from trainer.train.context import JobContext
    from trainer.models.loading import ModelCache
    from trainer.queue.store import QueueError
    from trainer.queue.worker import Worker

    queue = _open(args)
    out = Path(args.out) if args.out else paths.default_output_dir()
    bars: dict[int, ProgressBar] = {}
    failed = []

    def report(event) -> None:
        if event.kind == "progress":
            bars.setdefault(event.job_id, ProgressBar())(event.progress)
        elif event.state != "running":
            bar = bars.pop(event.job_id, None)
            if bar:
                bar.close()
            if event.state == "failed":
                failed.append(event.job_id)
            print(f"job {event.job_id}: {event.state}" + (f": {event.error}" if event.error else ""), file=sys.stderr)

    if args.resume_interrupted:
        resumed = queue.resume_interrupted()
        if resumed:
            print(f"resuming interrupted job(s) {', '.join(map(str, resumed))}", file=sys.stderr)
    worker = Worker(queue, ModelCache(args.model),
                    lambda row: JobContext(output_dir=out, cache_dir=paths.cache_dir()), poll_s=args.poll)
    worker.subscribe(report)
    # The worker trains in a thread; this (main) thread only waits, so Ctrl+C never lands inside torch.
    refused = []

    def until_empty() -> None:
        try:
            worker.run_until_empty()
        except QueueError as e:             # e.g. another worker runs: reported by run() like the others
            refused.append(e)

    if args.until_empty:
        thread = threading.Thread(target=until_empty, name="lora-queue-run", daemon=True)
        thread.start()
    else:
        worker.start()
        thread = worker._thread
    interrupted = []

    def on_ctrl_c(signum, frame) -> None:
        if interrupted:                       # the second press: leave at once (the job stays resumable)
            print("leaving now; the job continues from its last save with `queue resume`", file=sys.stderr)
            os._exit(130)
        interrupted.append(True)
        print("Ctrl+C: the running job stops after its current step and is saved "
              "(`queue resume ID` continues it); Ctrl+C again to leave at once", file=sys.stderr)
        worker.request_stop()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        while thread.is_alive():
            thread.join(0.5)
    finally:
        signal.signal(signal.SIGINT, previous)
    if refused:
        raise refused[0]
    return 0 if interrupted else (1 if failed else 0)


def run(args: argparse.Namespace) -> int:
    from trainer.queue.store import QueueError

    try:
        return args.queue_func(args)
    except jobs.JobError as e:
        print_job_error(e)
        return 2
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_parser(subparsers) -> None:
    queue = subparsers.add_parser("queue", help="the persistent job queue: add, list, show, cancel, resume, run")
    queue.add_argument("--db", help=f"queue database (default {paths.data_dir() / 'queue.sqlite'})")
    sub = queue.add_subparsers(dest="queue_command", required=True)

    add = sub.add_parser("add", help="validate job files and queue them (prints their ids)")
    add.add_argument("jobs", nargs="+", metavar="JOB.json")
    add.add_argument("--sweep", metavar="FIELD=V1,V2;...", help="queue one job per combination, e.g. "
                     "'lr=5e-5,1e-4,2e-4; network_alpha=2,4,8' (9 jobs named after their values)")
    add.add_argument("--out", help="the output root `queue run --out` will use, to check names against "
                                   f"(default {paths.default_output_dir()})")
    add.set_defaults(queue_func=cmd_add)

    listing = sub.add_parser("list", help="jobs in queue order with their state and progress")
    listing.add_argument("--state", action="append", help="only jobs in this state (repeatable)")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--newest-first", action="store_true")
    listing.set_defaults(queue_func=cmd_list)

    show = sub.add_parser("show", help="one job: times, progress, error, outputs")
    show.add_argument("id", type=int)
    show.add_argument("--spec", action="store_true", help="print the job's JSON")
    show.add_argument("--history", action="store_true", help="print the recorded progress steps")
    show.add_argument("--traceback", action="store_true", help="print the traceback of a failure")
    show.set_defaults(queue_func=cmd_show)

    for name, method, text in (("cancel", "cancel", "cancel a queued job, or a running one after its current step"),
                               ("stop", "stop_and_save", "running job: save after the current step, end as done"),
                               ("resume", "resume", "continue an interrupted/cancelled/failed job from its last save"),
                               ("retry", "retry", "queue a failed/cancelled/interrupted job again from the start"),
                               ("delete", "delete", "remove a job that is not running (its files stay)")):
        op = sub.add_parser(name, help=text)
        op.add_argument("id", type=int)
        op.set_defaults(queue_func=_operation(method))
    for name, help_text in (("pause", "take no next job (the running one finishes); `queue continue` goes on"),
                            ("continue", "undo `queue pause`"),
                            ("clear", "delete the jobs that are over (done, failed, cancelled); stopped and "
                                      "interrupted ones stay")):
        sub.add_parser(name, help=help_text).set_defaults(queue_func=_whole_queue(name))

    runner = sub.add_parser("run", help="run the worker: train queued jobs one after another")
    runner.add_argument("--until-empty", action="store_true", help="exit when no job is queued")
    runner.add_argument("--model", help="'demo', a diffusers folder or a checkpoint (overrides the jobs' model)")
    runner.add_argument("--out", help=f"output root; a job's output_dir is a folder inside it (default {paths.default_output_dir()})")
    runner.add_argument("--poll", type=float, default=2.0, help="seconds between looks at an empty queue")
    runner.add_argument("--resume-interrupted", action="store_true",
                        help="first resume the jobs a crash or kill interrupted, from their last saved state")
    runner.set_defaults(queue_func=cmd_run)
    queue.set_defaults(func=run)
