"""The persistent job queue (SQLite) and the worker thread that trains its jobs one after another.

Store: one SQLite file (WAL) in the data folder. A row per job holds its spec JSON, state, times,
error, output files and a summary of its latest progress (what a listing shows); the per-step
progress lives in its own table, bounded (see :func:`thinning_stride`). States::

    queued -> running -> done | stopped | failed | cancelled | interrupted
    interrupted | stopped | cancelled | failed --resume--> queued (continues from the last saved state)
    failed | cancelled | interrupted --retry--> queued (starts again)

Every process may open the store (WebUI, CLI); requests to a running job (cancel, stop-and-save)
are written to its row and the worker reads them after each step, whatever process it lives in.
A worker holds an OS file lock beside the database while it runs, so a job found ``running`` with
no worker holding that lock was interrupted (crash, kill, restart): opening the store marks it so.

Worker: takes the next queued job, runs it on the host's :class:`ModelHandle` through
:func:`trainer.train.runner.run_job` (which holds ``handle.lock()`` only around each step), records
progress and tells subscribers (the UI), and frees memory between jobs.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from trainer import paths
from trainer import jobs
from trainer.queue.admission import Admission, admit, output_key
if TYPE_CHECKING:
    from trainer.train.loop import Progress

STATES = ("queued", "running", "done", "stopped", "failed", "cancelled", "interrupted")
FINISHED = ("done", "stopped", "failed", "cancelled", "interrupted")
#: "stopped": stop-and-save (the tab's button, Ctrl+C on ``queue run``) saved the LoRA so far and the state.
RESUMABLE = ("interrupted", "stopped", "cancelled", "failed")
RETRYABLE = ("failed", "stopped", "cancelled", "interrupted")

#: Per-step progress kept in full for the latest RECENT_STEPS steps of a running job; older steps,
#: and every step of a finished job, are thinned to at most HISTORY_ROWS rows per phase.
RECENT_STEPS = 1000
HISTORY_ROWS = 250

SCHEMA_VERSION = 2
#: A worker writes its heartbeat at least this often, and one silent for HEARTBEAT_STALE_S is dead.
HEARTBEAT_S = 2.0
HEARTBEAT_STALE_S = 15.0
#: Warnings kept per job (a dataset of 10,000 broken files gives one summary line, not 10,000).
MAX_WARNINGS = 50
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    error_detail TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    resume INTEGER NOT NULL DEFAULT 0,
    request TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    smoothed_loss REAL,
    lr REAL,
    it_per_s REAL,
    eta_s REAL,
    phase TEXT NOT NULL DEFAULT '',
    warnings TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, position);
CREATE INDEX IF NOT EXISTS jobs_by_position ON jobs(position);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs(name);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS worker (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS progress (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    phase TEXT NOT NULL,
    step INTEGER NOT NULL,
    loss REAL,
    smoothed_loss REAL,
    lr REAL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, phase, step)
) WITHOUT ROWID;
"""

#: Columns a listing reads (not the spec, not the traceback).
_LIST_COLUMNS = ("id", "position", "name", "mode", "state", "created", "started", "finished", "error", "outputs",
                 "resume", "request", "step", "total", "loss", "smoothed_loss", "lr", "it_per_s", "eta_s", "phase", "warnings")


class QueueError(Exception):
    """An operation the queue refuses; the message says why (shown to the user as is)."""


@dataclass(frozen=True)
class JobRow:
    """One job as the store holds it. ``spec`` and ``error_detail`` are filled by :meth:`JobQueue.get` only."""

    id: int
    position: int
    name: str
    mode: str
    state: str
    created: float
    started: float | None
    finished: float | None
    error: str | None
    outputs: list[str]
    resume: bool
    request: str | None
    step: int
    total: int
    loss: float | None
    smoothed_loss: float | None
    lr: float | None
    it_per_s: float | None
    eta_s: float | None
    phase: str
    warnings: list[str] = field(default_factory=list)    # what the user should know (dataset, divergence...)
    spec: str | None = None
    error_detail: str | None = None

    @property
    def job(self) -> jobs.Job:
        if self.spec is None:
            raise QueueError("this row came from a listing; get(id) returns the spec")
        return jobs.job_from_json(self.spec)


@dataclass(frozen=True)
class ProgressRow:
    phase: str
    step: int
    loss: float | None
    smoothed_loss: float | None
    lr: float | None
    time: float


@dataclass(frozen=True)
class QueueEvent:
    """What subscribers receive: ``kind`` is ``progress`` (with ``progress``) or ``state`` (with ``state``)."""

    job_id: int
    kind: str
    state: str | None = None
    progress: Progress | None = None
    error: str | None = None


# -- progress thinning (pure) ---------------------------------------------------------------------

def thinning_stride(oldest_span: int, history_rows: int) -> int:
    """Smallest power of two ``stride`` with ``oldest_span // stride <= history_rows``: the steps
    1..oldest_span keep only the multiples of ``stride``."""
    stride = 1
    while oldest_span // stride > history_rows:
        stride *= 2
    return stride


def thinning_plan(latest: int, recent: int, history_rows: int) -> tuple[int, int]:
    """(cutoff, stride): the store keeps every step after ``cutoff = latest - recent``, ``latest`` itself,
    and of the older steps only the multiples of ``stride`` (at most ``history_rows`` of them)."""
    cutoff = latest - recent
    return cutoff, thinning_stride(max(cutoff, 0), history_rows)


# -- the worker's file lock (released by the OS when the process dies) ------------------------------

class WorkerLock:
    """The OS lock a worker holds beside the database (``filelock``; released by the OS when the process dies).

    ``acquire(timeout)`` waits that long: a process that only opens the store takes the lock for a moment
    to see whether a worker lives (see :meth:`JobQueue.recover_interrupted`), and a worker starting in
    that moment must not be refused. A deleted lock file cannot let a second worker in either: the store's
    heartbeat (:meth:`JobQueue.live_worker`) is checked once the lock is held."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None

    def acquire(self, timeout: float = 0.0) -> bool:
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock = FileLock(str(self.path), thread_local=False)   # taken by one thread, released by another
        except TypeError:                                          # filelock < 3.10: no thread-local locks yet
            lock = FileLock(str(self.path))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            return False
        self._lock = lock
        return True

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def default_db_path() -> Path:
    return paths.data_dir() / "queue.sqlite"


# -- the store -------------------------------------------------------------------------------------

class JobQueue:
    """The job store. Safe to use from several threads and processes at once."""

    def __init__(self, db_path: str | os.PathLike | None = None, recent_steps: int = RECENT_STEPS,
                 history_rows: int = HISTORY_ROWS):
        self.db_path = Path(db_path) if db_path is not None else default_db_path()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.recent_steps, self.history_rows = recent_steps, history_rows
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._generation = 0               # bumped when the file was deleted or replaced: threads reconnect
        self._identity: tuple[int, int] | None = None
        self.replaced = 0                  # how often that happened (the worker logs it)
        try:
            self._open()
            self.recover_interrupted()
        except sqlite3.Error as e:
            raise QueueError(_store_problem(self.db_path, e)) from None

    def _open(self) -> None:
        """Connect and create or upgrade the schema (also after the file was replaced)."""
        db = self._db()
        if db.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
            raise QueueError(f"{self.db_path} was written by a newer LoRA Queue; update it to open this queue")
        db.executescript(_SCHEMA)
        if "warnings" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:   # a version 1 store
            db.execute("ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._identity = _file_identity(self.db_path)

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def worker_lock_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + ".worker.lock")

    def _db(self) -> sqlite3.Connection:
        if self._identity is not None and _file_identity(self.db_path) != self._identity:
            self._reopen()
        db = getattr(self._local, "db", None)
        if db is not None and getattr(self._local, "generation", 0) != self._generation:
            db = None                      # this thread's connection still points at the old file
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA journal_size_limit=1048576")   # the WAL shrinks back to 1 MB after a checkpoint
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            self._local.generation = self._generation
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _reopen(self) -> None:
        """The database file was deleted or replaced while open (by hand, a sync tool, a restore): every
        connection still reads the old file, so new jobs would never be seen. Connect to what is there now
        (an empty queue if it was deleted) and say so once."""
        with self._connections_lock:
            if _file_identity(self.db_path) == self._identity:
                return                     # another thread reconnected meanwhile
            for db in self._connections:
                db.close()
            self._connections.clear()
            self._generation += 1
            self._identity = None
            self.replaced += 1
        print(f"lora-queue: the queue database {self.db_path} was deleted or replaced while open; "
              "using the file there now", file=sys.stderr)
        self._open()

    class _Write:
        """``with self._write() as db:`` one IMMEDIATE transaction (one writer at a time, across processes)."""

        def __init__(self, db: sqlite3.Connection, path: Path):
            self.db, self.path = db, path

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, value, tb) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
            if isinstance(value, sqlite3.OperationalError) and "readonly" in str(value):
                raise QueueError(_store_problem(self.path, value)) from None

    def _write(self) -> "_Write":
        return JobQueue._Write(self._db(), self.db_path)

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    @staticmethod
    def _row(values: Sequence, columns: Sequence[str]) -> JobRow:
        data = dict(zip(columns, values))
        data["outputs"] = json.loads(data["outputs"])
        data["resume"] = bool(data["resume"])
        data["warnings"] = json.loads(data["warnings"])
        return JobRow(**data)

    def _require(self, db: sqlite3.Connection, job_id: int) -> tuple[str, str]:
        found = db.execute("SELECT state, name FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if found is None:
            raise QueueError(f"there is no job {job_id} in the queue")
        return found

    def _next_position(self, db: sqlite3.Connection) -> int:
        return db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]

    # -- adding ------------------------------------------------------------------------------------

    def add(self, job: jobs.Job, root: str | os.PathLike | None = None, admission: Admission | None = None) -> int:
        """Check ``job`` (see :mod:`trainer.queue.admission`; relative inputs from ``root`` or the current
        folder) and queue it."""
        return self.add_many([job], root, admission)[0]

    def add_many(self, many: Sequence[jobs.Job], root: str | os.PathLike | None = None,
                 admission: Admission | None = None) -> list[int]:
        """Queue several jobs in one transaction (a sweep); nothing is queued if one is refused.

        ``admission``: what the caller knows (output root, allowed input folders, the model); default:
        the standalone output folder, inputs anywhere."""
        admission = admission or Admission(paths.default_output_dir())
        base = Path(root or Path.cwd())
        taken = self._output_keys()
        specs = []
        for job in many:
            errors, warnings = admit(job, base, admission, taken)
            if errors:
                raise jobs.JobError(f"job '{job.name}' not queued: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
                                    if len(errors) > 1 else f"job '{job.name}' not queued: {next(iter(errors.values()))}",
                                    field=next(iter(errors)), errors=errors)
            taken[output_key(job)] = f"job '{job.name}' (queued with it)"
            warnings = [f"{k}: {v}" for k, v in job.warnings.items()] + warnings
            specs.append((job.name, job.mode, _spec_with_absolute_paths(job, base, admission.model_given),
                          json.dumps(warnings)))
        now = time.time()
        with self._write() as db:
            position = self._next_position(db)
            # Ids are never reused, even after the newest job is deleted (a log or note naming "job 12" must
            # keep meaning that job): the highest id ever given is kept beside the jobs.
            given = db.execute("SELECT MAX(COALESCE((SELECT MAX(id) FROM jobs), 0), "
                               "COALESCE((SELECT value FROM meta WHERE key = 'last_id'), 0))").fetchone()[0]
            ids = []
            for i, (name, mode, spec, warnings) in enumerate(specs):
                db.execute("INSERT INTO jobs (id, position, name, mode, spec, state, created, warnings) "
                           "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                           (given + 1 + i, position + i, name, mode, spec, now, warnings))
                ids.append(given + 1 + i)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_id', ?)", (given + len(specs),))
        return ids

    def update(self, job_id: int, job: jobs.Job, root: str | os.PathLike | None = None,
               admission: Admission | None = None) -> None:
        """Replace a queued job's settings with ``job``, checked as :meth:`add` checks a new one; it keeps its id
        and its place. Refused (QueueError) once the job has started: what ran is the job's record."""
        admission = admission or Admission(paths.default_output_dir())
        base = Path(root or Path.cwd())
        state, name = self._require(self._db(), job_id)
        if state != "queued":
            raise QueueError(f"job {job_id} ({name}) is {state}: only a queued job can be changed; "
                             "Add to queue queues the form as a new job")
        errors, warnings = admit(job, base, admission, self._output_keys(except_id=job_id))
        if errors:
            raise jobs.JobError(f"job {job_id} not changed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()),
                                field=next(iter(errors)), errors=errors)
        warnings = [f"{k}: {v}" for k, v in job.warnings.items()] + warnings
        spec = _spec_with_absolute_paths(job, base, admission.model_given)
        with self._write() as db:
            # the worker may have claimed it while it was checked: only a job still queued is changed
            changed = db.execute("UPDATE jobs SET name = ?, mode = ?, spec = ?, warnings = ? "
                                 "WHERE id = ? AND state = 'queued'",
                                 (job.name, job.mode, spec, json.dumps(warnings), job_id)).rowcount
        if not changed:
            state, name = self._require(self._db(), job_id)
            raise QueueError(f"job {job_id} ({name}) started while it was being changed: it runs as it was queued")

    def _output_keys(self, except_id: int | None = None) -> dict[str, str]:
        """output key -> "job N 'name'" for every job that will still write (queued, running, resumable stops)."""
        rows = self._db().execute("SELECT id, name, spec FROM jobs WHERE state IN "
                                  "('queued', 'running', 'stopped', 'interrupted') AND id IS NOT ?",
                                  (except_id,)).fetchall()
        return {output_key(jobs.job_from_json(spec)): f"job {job_id} '{name}'" for job_id, name, spec in rows}

    def add_warning(self, job_id: int, message: str) -> None:
        """Keep a warning with the job (shown by ``queue show`` and the tab); the same text is kept once."""
        with self._write() as db:
            found = db.execute("SELECT warnings FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if found is None:
                return
            kept = json.loads(found[0])
            if message not in kept and len(kept) < MAX_WARNINGS:
                kept.append(message)
                db.execute("UPDATE jobs SET warnings = ? WHERE id = ?", (json.dumps(kept), job_id))

    # -- reading -----------------------------------------------------------------------------------

    def list(self, limit: int = 100, offset: int = 0, states: Sequence[str] | None = None,
             newest_first: bool = False) -> list[JobRow]:
        """Jobs in queue order (the order they run in), with their latest progress; no spec, no history."""
        where, args = "", []
        if states:
            unknown = [s for s in states if s not in STATES]
            if unknown:
                raise QueueError(f"unknown state(s) {', '.join(unknown)}; states are {', '.join(STATES)}")
            where = f"WHERE state IN ({', '.join('?' * len(states))})"
            args = list(states)
        order = "DESC" if newest_first else "ASC"
        rows = self._db().execute(f"SELECT {', '.join(_LIST_COLUMNS)} FROM jobs {where} "
                                  f"ORDER BY position {order} LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        return [self._row(r, _LIST_COLUMNS) for r in rows]

    def count(self, states: Sequence[str] | None = None) -> int:
        if not states:
            return self._db().execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return self._db().execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({', '.join('?' * len(states))})",
                                  tuple(states)).fetchone()[0]

    def get(self, job_id: int) -> JobRow:
        columns = _LIST_COLUMNS + ("spec", "error_detail")
        row = self._db().execute(f"SELECT {', '.join(columns)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise QueueError(f"there is no job {job_id} in the queue")
        return self._row(row, columns)

    def group_of(self, job_id: int) -> list[int]:
        """The ids of the jobs queued in the same transaction as ``job_id`` (a sweep), in id order; a job queued
        alone is its own group. Duplicates and retries are new jobs, so they are not in it."""
        self.get(job_id)
        rows = self._db().execute("SELECT id FROM jobs WHERE created = (SELECT created FROM jobs WHERE id = ?) "
                                  "ORDER BY id", (job_id,)).fetchall()
        return [r[0] for r in rows]

    def progress(self, job_id: int) -> list[ProgressRow]:
        """The job's recorded steps (every step of the latest RECENT_STEPS, thinned before), oldest first."""
        rows = self._db().execute("SELECT phase, step, loss, smoothed_loss, lr, time FROM progress "
                                  "WHERE job_id = ? ORDER BY time, step", (job_id,)).fetchall()
        return [ProgressRow(*r) for r in rows]

    # -- operations --------------------------------------------------------------------------------

    def move(self, job_id: int, delta: int) -> None:
        """Move a queued job ``delta`` places among the queued jobs (negative = earlier)."""
        with self._write() as db:
            state, name = self._require(db, job_id)
            if state != "queued":
                raise QueueError(f"job {job_id} ({name}) is {state}; only queued jobs can be moved")
            queued = db.execute("SELECT id, position FROM jobs WHERE state = 'queued' ORDER BY position").fetchall()
            ids = [i for i, _ in queued]
            old = ids.index(job_id)
            new = min(max(old + delta, 0), len(ids) - 1)
            ids.insert(new, ids.pop(old))
            for job, (_, position) in zip(ids, queued):
                db.execute("UPDATE jobs SET position = ? WHERE id = ?", (position, job))

    def delete(self, job_id: int) -> None:
        """Remove a job and its progress (its output files stay). Not while it runs: cancel it first."""
        with self._write() as db:
            state, name = self._require(db, job_id)
            if state == "running":
                raise QueueError(f"job {job_id} ({name}) is running: cancel it first, then delete it")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def duplicate(self, job_id: int, changes: dict | None = None) -> int:
        """Queue a copy of a job (with ``changes`` to its fields), under a new name unless ``changes`` names it."""
        source = self.get(job_id)
        data = json.loads(source.spec)
        data.update(changes or {})
        if "name" not in (changes or {}):
            data["name"] = self.free_name(source.name)
        return self.add(jobs.job_from_dict(data))

    def free_name(self, name: str) -> str:
        """``name_2`` (or the next number) that no job in the queue has."""
        db = self._db()
        n = 2
        while db.execute("SELECT 1 FROM jobs WHERE name = ?", (f"{name}_{n}",)).fetchone():
            n += 1
        return f"{name}_{n}"

    def retry(self, job_id: int) -> None:
        """Queue a failed, cancelled or interrupted job again, from the start, at the end of the queue."""
        self._requeue(job_id, RETRYABLE, resume=False, front=False, verb="retried")

    def resume(self, job_id: int) -> None:
        """Queue an interrupted, cancelled, failed or stopped-early job at the front, to continue from
        its last saved state (the worker starts it from scratch if no state was saved)."""
        self._requeue(job_id, RESUMABLE, resume=True, front=True, verb="resumed")

    def resume_interrupted(self) -> list[int]:
        """Resume every interrupted job (a crash or kill ended it), keeping their order at the front of the
        queue; for a worker that starts after a crash. Returns their ids, in the order they will run."""
        ids = [r[0] for r in self._db().execute(
            "SELECT id FROM jobs WHERE state = 'interrupted' ORDER BY position, id").fetchall()]
        for job_id in reversed(ids):       # each resume goes to the front
            self.resume(job_id)
        return ids

    def _requeue(self, job_id: int, allowed: Sequence[str], resume: bool, front: bool, verb: str) -> None:
        with self._write() as db:
            state, name = self._require(db, job_id)
            if state not in allowed:
                raise QueueError(f"job {job_id} ({name}) is {state}; only {', '.join(allowed)} jobs can be {verb}")
            first = db.execute("SELECT MIN(position) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if front and first is not None:
                # next in line, yet below the jobs that are over in the table (which lists by position):
                # the queued jobs move down one place
                db.execute("UPDATE jobs SET position = position + 1 WHERE position >= ?", (first,))
                position = first
            else:
                position = self._next_position(db)
            db.execute("UPDATE jobs SET state = 'queued', position = ?, resume = ?, request = NULL, error = NULL, "
                       "error_detail = NULL, started = NULL, finished = NULL WHERE id = ?",
                       (position, int(resume), job_id))
            if not resume:
                db.execute("UPDATE jobs SET step = 0, total = 0, loss = NULL, smoothed_loss = NULL, lr = NULL, "
                           "it_per_s = NULL, eta_s = NULL, phase = '', outputs = '[]' WHERE id = ?", (job_id,))
                db.execute("DELETE FROM progress WHERE job_id = ?", (job_id,))

    def cancel(self, job_id: int) -> str:
        """A queued job is cancelled now; a running one after its current step. Returns the new state."""
        return self._request(job_id, "cancel")

    def stop_and_save(self, job_id: int) -> str:
        """A running job saves its LoRA after the current step and ends as done (resume can finish it)."""
        return self._request(job_id, "save_and_stop")

    def _request(self, job_id: int, request: str) -> str:
        with self._write() as db:
            state, name = self._require(db, job_id)
            if state == "queued" and request == "cancel":
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
                return "cancelled"
            if state != "running":
                what = "queued or running" if request == "cancel" else "running"
                raise QueueError(f"job {job_id} ({name}) is {state}; only {what} jobs can be "
                                 f"{'cancelled' if request == 'cancel' else 'stopped and saved'}")
            db.execute("UPDATE jobs SET request = ? WHERE id = ?", (request, job_id))
            return "running"

    # -- what the worker calls -----------------------------------------------------------------------

    def request_of(self, job_id: int) -> str | None:
        """The request (cancel, save_and_stop) waiting for a running job, or None."""
        found = self._db().execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return found[0] if found else None

    # -- the queue as a whole ------------------------------------------------------------------------

    def set_paused(self, paused: bool) -> None:
        """Pause after the current job (the worker takes no next job) or go on."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', ?)", (int(paused),))

    def paused(self) -> bool:
        found = self._db().execute("SELECT value FROM meta WHERE key = 'paused'").fetchone()
        return bool(found and found[0])

    def clear_finished(self) -> int:
        """Delete the jobs that are over and cannot continue (done, failed, cancelled); stopped and interrupted
        jobs stay, they can still be resumed. Returns how many went."""
        with self._write() as db:
            return db.execute("DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled')").rowcount

    def estimated_seconds_left(self) -> float | None:
        """The queued work's time at the speed jobs ran lately: the running job's ETA plus, per queued job,
        its steps over the latest measured rate (it/s) of its mode. None when nothing tells the speed."""
        db = self._db()
        rates = dict(db.execute("SELECT mode, it_per_s FROM jobs WHERE it_per_s > 0 ORDER BY COALESCE(finished, "
                                "started) ASC").fetchall())    # the latest rate of each mode wins
        if not rates:
            return None
        fallback = sum(rates.values()) / len(rates)
        total = sum(eta for (eta,) in db.execute("SELECT eta_s FROM jobs WHERE state = 'running' AND eta_s > 0"))
        for mode, spec in db.execute("SELECT mode, spec FROM jobs WHERE state = 'queued'"):
            total += _job_steps(spec) / rates.get(mode, fallback)
        return total

    def claim_next(self) -> JobRow | None:
        """Mark the first queued job running and return it (None when nothing is queued or the queue is paused)."""
        if self.paused():
            return None
        with self._write() as db:
            found = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY position LIMIT 1").fetchone()
            if found is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, finished = NULL, request = NULL "
                       "WHERE id = ?", (time.time(), found[0]))
        return self.get(found[0])

    def record_progress(self, job_id: int, p: Progress) -> str | None:
        """Store one step's progress; returns a pending request (``cancel`` / ``save_and_stop``) or None."""
        def number(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        with self._write() as db:
            if number(p.loss) is not None:   # a report without a loss (a message, the LCM sheet) is no point to plot
                db.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (job_id, p.phase, p.step, number(p.loss), number(p.smoothed_loss), number(p.lr),
                            time.time()))
            # a report without a loss (a preview renders) keeps the last loss on show
            db.execute("UPDATE jobs SET step = ?, total = ?, loss = COALESCE(?, loss), "
                       "smoothed_loss = COALESCE(?, smoothed_loss), lr = ?, it_per_s = ?, eta_s = ?, phase = ? "
                       "WHERE id = ?",
                       (p.step, p.total, number(p.loss), number(p.smoothed_loss), number(p.lr), number(p.it_per_s),
                        number(p.eta_s), p.phase, job_id))
            if p.step % self.recent_steps == 0:
                self._thin(db, job_id, p.phase, p.step, self.recent_steps)
            found = db.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return found[0] if found else None

    def _thin(self, db: sqlite3.Connection, job_id: int, phase: str, latest: int, recent: int) -> None:
        cutoff, stride = thinning_plan(latest, recent, self.history_rows)
        db.execute("DELETE FROM progress WHERE job_id = ? AND phase = ? AND step <= ? AND step % ? != 0 "
                   "AND step != ?", (job_id, phase, cutoff, stride, latest))

    def finish(self, job_id: int, state: str, error: str | None = None, error_detail: str | None = None,
               outputs: Sequence[str | os.PathLike] = ()) -> None:
        """End a running job; its progress history is thinned to HISTORY_ROWS per phase."""
        if state not in FINISHED:
            raise ValueError(f"a job ends as one of {', '.join(FINISHED)}, not {state}")
        with self._write() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, error = ?, error_detail = ?, outputs = ?, "
                       "request = NULL, resume = 0, eta_s = NULL WHERE id = ?",
                       (state, time.time(), error, error_detail, json.dumps([str(o) for o in outputs]), job_id))
            for phase, latest in db.execute("SELECT phase, MAX(step) FROM progress WHERE job_id = ? GROUP BY phase",
                                            (job_id,)).fetchall():
                self._thin(db, job_id, phase, latest, 0)

    def recover_interrupted(self) -> list[int]:
        """Mark ``running`` jobs ``interrupted`` when no worker is alive (none holds the worker lock and
        none beats: see :meth:`live_worker`)."""
        if self._db().execute("SELECT 1 FROM jobs WHERE state = 'running' LIMIT 1").fetchone() is None:
            return []                      # nothing to recover: no lock to probe (the usual case, and fast)
        lock = WorkerLock(self.worker_lock_path)
        if not lock.acquire():
            return []
        try:
            return [] if self.live_worker() else self._mark_interrupted()
        finally:
            lock.release()

    def beat(self) -> None:
        """The worker's heartbeat (at most every HEARTBEAT_S seconds while it lives, idle or training)."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO worker (id, pid, host, heartbeat) VALUES (1, ?, ?, ?)",
                       (os.getpid(), socket.gethostname(), time.time()))

    def live_worker(self) -> str | None:
        """Who else works on this store, if a worker other than this process beat recently, else None."""
        found = self._db().execute("SELECT pid, host, heartbeat FROM worker WHERE id = 1").fetchone()
        if found is None:
            return None
        pid, host, heartbeat = found
        if pid == os.getpid() and host == socket.gethostname():
            return None
        if time.time() - heartbeat > HEARTBEAT_STALE_S:
            return None
        if host == socket.gethostname() and not paths.process_alive(pid):
            return None
        return f"process {pid} on {host} (last heard of {time.time() - heartbeat:.0f} s ago)"

    def end_beat(self) -> None:
        """The worker stops: others may start at once."""
        with self._write() as db:
            db.execute("DELETE FROM worker WHERE id = 1 AND pid = ? AND host = ?", (os.getpid(), socket.gethostname()))

    def _mark_interrupted(self) -> list[int]:
        with self._write() as db:
            found = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()]
            for job_id in found:
                step = db.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
                db.execute("UPDATE jobs SET state = 'interrupted', finished = ?, request = NULL, error = ? "
                           "WHERE id = ?", (time.time(), f"the process ended while this job ran (at step {step}); "
                                            "resume continues it from its last save", job_id))
        return found


def _job_steps(spec: str) -> int:
    """Training steps of a queued job (a copier's two passes together), from its stored JSON."""
    data = json.loads(spec)
    if data.get("mode") == "copier":
        first, second = data.get("copier_pass", {}), data.get("difference_pass", {})
        return int(first.get("steps", 0)) + int((first if second.get("same_as_pass1", True) else second).get("steps", 0))
    return int(data.get("steps", 0))


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _store_problem(path: Path, e: sqlite3.Error) -> str:
    """A message for the user when the store cannot be opened or written."""
    text = str(e)
    if "readonly" in text or "read-only" in text or not os.access(path.parent, os.W_OK) or (
            path.exists() and not os.access(path, os.W_OK)):
        return (f"the queue database {path} is read-only ({text}): LoRA Queue must write it, even to list jobs "
                "(it records interrupted jobs). Make it and its folder writable, or set LORAQ_HOME to a "
                "writable folder")
    if "unable to open" in text:
        return f"cannot open the queue database {path} ({text}); check that its folder exists and is writable"
    if "malformed" in text or "not a database" in text:
        return (f"the queue database {path} is damaged ({text}); move it aside (the jobs in it are lost) "
                "and LoRA Queue starts a new one")
    return f"the queue database {path} cannot be used: {text}"


def _spec_with_absolute_paths(job: jobs.Job, root: Path, model_given: bool = False) -> str:
    """The job's JSON with relative file and folder paths made absolute: the worker may run elsewhere.
    ``model_given``: the host names models its own way (the WebUI: a checkpoint title), kept as it is."""
    data = jobs.job_to_dict(job)

    def absolute(value: str) -> str:
        if not value or value == "demo":
            return value
        path = Path(os.path.expanduser(value))
        return str(path if path.is_absolute() else (root / path).resolve())

    for f in job.spec_fields:
        if f.path == "output_dir" or (f.path == "model" and model_given):   # output_dir: below the output root
            continue
        if f.path and isinstance(data.get(f.name), str):
            data[f.name] = absolute(data[f.name])
        elif f.path and isinstance(data.get(f.name), list):
            data[f.name] = [absolute(v) for v in data[f.name]]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)




