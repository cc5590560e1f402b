"""Per-job overhead of the queue: what a night of short jobs pays between trainings, in one process.

- jobs: N one-step standard jobs on a micro SD1 model run by the Worker; overhead per job = wall time of
  the whole queue minus the time spent inside ``run_job`` (claiming, recording, freeing, events), / N;
- freeing memory between jobs on a heap the size of a WebUI's (2 million live objects): ours
  (``free_memory``: young-generation collection + malloc_trim) against the reference a full
  ``gc.collect()`` (what the worker did before), in the same process.

    python bench/queue_overhead.py [--jobs 50]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def job_overhead(n: int) -> tuple[float, float]:
    from test_queue import _dataset, _job, micro_pipeline

    from trainer.models.diffusers_model import DiffusersHandle
    from trainer.queue import worker as worker_module
    from trainer.queue.admission import Admission
    from trainer.queue.store import JobQueue
    from trainer.queue.worker import Worker
    from trainer.train.context import JobContext

    tmp = Path(tempfile.mkdtemp())
    handle = DiffusersHandle(micro_pipeline(tmp))
    _dataset(tmp / "data", n=2)
    queue = JobQueue(tmp / "queue.sqlite")
    queue.add_many([_job(tmp, f"j{i}", steps=1) for i in range(n)], tmp, Admission(tmp / "out"))
    inside: list[float] = []
    real_run_job = worker_module.run_job

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real_run_job(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - started)
    worker_module.run_job = timed
    worker = Worker(queue, lambda job: handle,
                    lambda row: JobContext(output_dir=tmp / "out", cache_dir=tmp / "cache", log=lambda m: None))
    started = time.perf_counter()
    worker.run_until_empty()
    wall = time.perf_counter() - started
    worker_module.run_job = real_run_job
    assert len(inside) == n and all(r.state == "done" for r in queue.list(limit=n))
    return (wall - sum(inside)) / n, statistics.median(inside)


def freeing(rounds: int = 5) -> tuple[float, float]:
    from trainer.device import free_memory

    heap = [{"i": i} for i in range(2_000_000)]
    ours, reference = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        free_memory()
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        gc.collect()
        reference.append(time.perf_counter() - t)
    del heap
    return statistics.median(ours), statistics.median(reference)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    overhead, job = job_overhead(args.jobs)
    print(f"{args.jobs} one-step jobs: overhead {overhead * 1000:.1f} ms per job outside run_job "
          f"(a job itself: median {job * 1000:.0f} ms)")
    ours, reference = freeing()
    print(f"freeing memory with 2M live objects: ours {ours * 1000:.1f} ms, full gc.collect {reference * 1000:.0f} ms "
          f"(ratio {ours / reference:.3f})")


if __name__ == "__main__":
    main()
