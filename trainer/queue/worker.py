"""The worker: runs the queue's jobs one after another on a ModelHandle, in a thread or the caller's.

It takes the next queued job, runs it through :func:`trainer.train.runner.run_job` (which holds
``handle.lock()`` only around each step), records progress, tells subscribers (the UI) and frees
memory between jobs.
"""
from __future__ import annotations

import sys
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

from trainer import jobs, paths
from trainer.data.dataset import DatasetError
from trainer.lora.files import LoraFileError
from trainer.lora.network import NetworkError
from trainer.models.handle import ModelError, ModelHandle
from trainer.train.optim import OptimizerError
from trainer.train.state import StateError
from trainer.queue.store import HEARTBEAT_S, JobQueue, JobRow, QueueError, QueueEvent, WorkerLock
from trainer.train.context import JobContext
from trainer.train.loop import Control, Progress, Stopped, TrainingError
from trainer.train.previews import preview_files
from trainer.train.runner import run_job


#: Failures whose message tells the user what to fix (an emptied dataset, a damaged LoRA, a full disk...):
#: shown as they are, without a Python traceback.
USER_ERRORS = (DatasetError, LoraFileError, NetworkError, OptimizerError, ModelError, TrainingError, StateError)

#: How often a running job's requests are read while no step reports (cancel must act within 2 s).
REQUEST_POLL_S = 0.5


HandleProvider = Callable[[jobs.Job], ModelHandle]


ContextFactory = Callable[[JobRow], JobContext]


def work_folder(queue: JobQueue, job_id: int) -> Path:
    """The folder a queued job works in (state, loss log, step previews) unless its context names another."""
    return queue.db_path.parent / "jobs" / str(job_id)


def default_context(row: JobRow) -> JobContext:
    return JobContext(output_dir=paths.default_output_dir(), cache_dir=paths.cache_dir())


class Worker:
    """Runs queued jobs one at a time on the handle ``handle_provider(job)`` returns.

    ``start()`` runs a background thread that waits for jobs; ``run_until_empty()`` runs them in the
    calling thread and returns when none is queued. Only one worker per store at a time (OS lock).
    """

    def __init__(self, queue: JobQueue, handle_provider: HandleProvider, ctx_factory: ContextFactory | None = None,
                 poll_s: float = 1.0):
        self.queue, self.handle_provider = queue, handle_provider
        self.ctx_factory = ctx_factory or default_context
        self.poll_s = poll_s
        self._subscribers: list[Callable[[QueueEvent], None]] = []
        self._lock = WorkerLock(queue.worker_lock_path)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._beating = threading.Event()     # set: the heartbeat thread ends
        self._beater: threading.Thread | None = None
        self.current: int | None = None

    # -- events ------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[QueueEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every progress step and state change; returns the unsubscribe function.

        Callbacks run on the worker thread between steps: keep them short (a UI should hand off)."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _publish(self, event: QueueEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception as e:  # a broken subscriber must not stop training
                print(f"lora-queue: a progress subscriber failed: {type(e).__name__}: {e}", file=sys.stderr)

    # -- running -----------------------------------------------------------------------------------

    def _acquire(self) -> None:
        # A moment's wait: a process that merely opens the store holds the lock for a few milliseconds.
        if not self._lock.acquire(timeout=2.0):
            raise QueueError(f"another worker is already running on {self.queue.db_path}")
        other = self.queue.live_worker()
        if other:                        # its lock file was deleted, or it is on another machine's share
            self._lock.release()
            raise QueueError(f"another worker is already running on {self.queue.db_path}: {other}")
        self.queue._mark_interrupted()   # we hold the lock: any 'running' job belongs to a dead worker
        for tmp in paths.remove_stale_temporaries(self.queue.db_path.parent / "jobs"):
            print(f"lora-queue: removed {tmp}, left by a process killed while writing it", file=sys.stderr)
        self.queue.beat()
        self._beating.clear()
        self._beater = threading.Thread(target=self._beat, name="lora-queue-heartbeat", daemon=True)
        self._beater.start()

    def _beat(self) -> None:
        while not self._beating.wait(HEARTBEAT_S):
            try:
                self.queue.beat()
            except Exception as e:  # a store gone read-only: the next job write reports it
                print(f"lora-queue: cannot write the worker's heartbeat: {e}", file=sys.stderr)

    def _release(self) -> None:
        self._beating.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None
        try:
            self.queue.end_beat()
        finally:
            self._lock.release()

    def run_until_empty(self) -> list[int]:
        """Run queued jobs in this thread until none is left; returns the ids that ran."""
        self._acquire()
        try:
            ran = []
            while not self._stopping.is_set():
                row = self.queue.claim_next()
                if row is None:
                    break
                self.run_job_row(row)
                ran.append(row.id)
            return ran
        finally:
            self._release()

    def start(self) -> None:
        """Start the background thread (it polls the store every ``poll_s`` seconds when idle)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._acquire()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="lora-queue-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for a queued job now rather than at the next poll."""
        self._wake.set()

    def request_stop(self) -> None:
        """Take no further job, and stop-and-save the running one after its current step (without waiting)."""
        self._stopping.set()
        if self.current is not None:
            self.queue.stop_and_save(self.current)
        self._wake.set()

    def stop(self, cancel_running: bool = False, timeout: float | None = None) -> None:
        """Stop taking jobs; the running job finishes first unless ``cancel_running``."""
        self._stopping.set()
        if cancel_running and self.current is not None:
            self.queue.cancel(self.current)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                row = self.queue.claim_next()
                if row is None:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
                    continue
                self.run_job_row(row)
        finally:
            self._release()

    def run_job_row(self, row: JobRow) -> str:
        """Run one claimed (running) job to its end state; every failure becomes the row's error."""

        self.current = row.id
        control = Control()
        self._publish(QueueEvent(row.id, "state", state="running"))

        def on_progress(p: Progress) -> None:
            request = self.queue.record_progress(row.id, p)
            control.cancel = request == "cancel"
            control.save_and_stop = request == "save_and_stop"
            self._publish(QueueEvent(row.id, "progress", progress=p))

        # Between steps the request comes with each progress record; before the first step (scanning,
        # caching latents, the LCM teacher's images) no step reports, so a watcher reads it.
        finished = threading.Event()

        def watch_requests() -> None:
            while not finished.wait(REQUEST_POLL_S):
                try:
                    request = self.queue.request_of(row.id)
                except Exception:   # a store gone away is reported by the job's own writes
                    return
                control.cancel = control.cancel or request == "cancel"
                control.save_and_stop = control.save_and_stop or request == "save_and_stop"

        watcher = threading.Thread(target=watch_requests, name=f"lora-queue-requests-{row.id}", daemon=True)
        watcher.start()

        state, error, detail, outputs = "failed", None, None, []
        try:
            job = row.job
            handle = self.handle_provider(job)
            ctx = replace(self.ctx_factory(row), events=on_progress, control=control, resume=row.resume,
                          on_warning=lambda message: self.queue.add_warning(row.id, message))
            if ctx.work_dir is None:       # each queued job works in its own folder beside the store
                ctx = replace(ctx, work_dir=work_folder(self.queue, row.id))
            lora_folder = paths.output_folder(ctx.output_dir, job.output_dir)
            _remove_stale_temporaries(lora_folder, ctx.work_dir, job.name)
            result = run_job(job, handle, ctx)
            # the previews and sheets are outputs too (every mode renders previews; LCM a comparison sheet), in
            # step order before the LoRA files, so the final LoRA stays the last output
            previews = preview_files(lora_folder, ctx.work_dir, job.name)
            saved = sorted(map(str, result.saved), key=lambda p: p.endswith(".safetensors"))   # stable: order kept
            state, outputs = "done", [str(p) for p in previews] + saved
            if result.stopped_early:
                state, error = "stopped", f"stopped and saved at step {result.steps_done}; resume continues it"
        except Stopped as e:
            state, error = "cancelled", str(e)
        except jobs.JobError as e:
            error = e.message
        except USER_ERRORS as e:        # the message says what to do: no traceback for an ordinary mistake
            error = str(e)
        except Exception as e:
            error, detail = f"{type(e).__name__}: {e}", traceback.format_exc()
        finally:
            finished.set()
            self.current = None   # run_job freed the job's memory (and emptied the CUDA cache)
        self.queue.finish(row.id, state, error, detail, outputs)
        self._publish(QueueEvent(row.id, "state", state=state, error=error))
        return state


def _remove_stale_temporaries(lora_folder: Path, work_folder: Path, name: str) -> None:
    """Delete the temporary files a killed process left while writing ``name``'s outputs."""
    found = list(lora_folder.glob(f".{name}*.safetensors.*.tmp")) if lora_folder.is_dir() else []
    found += list(work_folder.glob(".*.tmp")) if work_folder.is_dir() else []
    for tmp in found:
        tmp.unlink(missing_ok=True)
