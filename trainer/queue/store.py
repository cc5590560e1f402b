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
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from trainer import paths
from trainer import jobs
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

SCHEMA_VERSION = 1
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
    phase TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, position);
CREATE INDEX IF NOT EXISTS jobs_by_position ON jobs(position);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs(name);
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
                 "resume", "request", "step", "total", "loss", "smoothed_loss", "lr", "it_per_s", "eta_s", "phase")


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
    """An exclusive, non-blocking OS lock on ``path``; ``acquire()`` is False when another holder lives."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    def release(self) -> None:
        if self._file is None:
            return
        try:
            if os.name == "nt":
                import msvcrt
                self._file.seek(0)
                msvcrt.locking(self._file.fileno(), msvcrt.LK_UNLCK, 1)
            else:
                import fcntl
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None


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
        db = self._db()
        if db.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
            raise QueueError(f"{self.db_path} was written by a newer LoRA Queue; update it to open this queue")
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.recover_interrupted()

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def worker_lock_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + ".worker.lock")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA journal_size_limit=1048576")   # the WAL shrinks back to 1 MB after a checkpoint
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    class _Write:
        """``with self._write() as db:`` one IMMEDIATE transaction (one writer at a time, across processes)."""

        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, value, tb) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> "_Write":
        return JobQueue._Write(self._db())

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
        return JobRow(**data)

    def _require(self, db: sqlite3.Connection, job_id: int) -> tuple[str, str]:
        found = db.execute("SELECT state, name FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if found is None:
            raise QueueError(f"there is no job {job_id} in the queue")
        return found

    def _next_position(self, db: sqlite3.Connection) -> int:
        return db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]

    # -- adding ------------------------------------------------------------------------------------

    def add(self, job: jobs.Job, root: str | os.PathLike | None = None) -> int:
        """Validate ``job`` (fields and paths, relative to ``root`` or the current folder) and queue it."""
        return self.add_many([job], root)[0]

    def add_many(self, many: Sequence[jobs.Job], root: str | os.PathLike | None = None) -> list[int]:
        """Queue several jobs in one transaction (a sweep); nothing is queued if one is invalid."""
        specs = []
        for job in many:
            try:
                jobs.check_job(job, root)
            except jobs.JobError as e:
                raise jobs.JobError(f"job '{job.name}' not queued: {e.message}", field=e.field,
                                    errors=e.errors) from None
            specs.append((job.name, job.mode, _spec_with_absolute_paths(job, Path(root or Path.cwd()))))
        now = time.time()
        with self._write() as db:
            position = self._next_position(db)
            ids = []
            for i, (name, mode, spec) in enumerate(specs):
                cur = db.execute("INSERT INTO jobs (position, name, mode, spec, state, created) "
                                 "VALUES (?, ?, ?, ?, 'queued', ?)", (position + i, name, mode, spec, now))
                ids.append(cur.lastrowid)
        return ids

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
            data["name"] = self._free_name(source.name)
        return self.add(jobs.job_from_dict(data))

    def _free_name(self, name: str) -> str:
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
            if front:
                position = db.execute("SELECT COALESCE(MIN(position), 1) - 1 FROM jobs WHERE state = 'queued'"
                                      ).fetchone()[0]
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

    def claim_next(self) -> JobRow | None:
        """Mark the first queued job running and return it (None when nothing is queued)."""
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
            db.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, p.phase, p.step, number(p.loss), number(p.smoothed_loss), number(p.lr), time.time()))
            db.execute("UPDATE jobs SET step = ?, total = ?, loss = ?, smoothed_loss = ?, lr = ?, it_per_s = ?, "
                       "eta_s = ?, phase = ? WHERE id = ?",
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
        """Mark ``running`` jobs ``interrupted`` when no worker is alive (none holds the worker lock)."""
        lock = WorkerLock(self.worker_lock_path)
        if not lock.acquire():
            return []
        try:
            return self._mark_interrupted()
        finally:
            lock.release()

    def _mark_interrupted(self) -> list[int]:
        with self._write() as db:
            found = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()]
            for job_id in found:
                step = db.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
                db.execute("UPDATE jobs SET state = 'interrupted', finished = ?, request = NULL, error = ? "
                           "WHERE id = ?", (time.time(), f"the process ended while this job ran (at step {step}); "
                                            "resume continues it from its last save", job_id))
        return found


def _spec_with_absolute_paths(job: jobs.Job, root: Path) -> str:
    """The job's JSON with relative file and folder paths made absolute: the worker may run elsewhere."""
    data = jobs.job_to_dict(job)

    def absolute(value: str) -> str:
        if not value or value == "demo":
            return value
        path = Path(os.path.expanduser(value))
        return str(path if path.is_absolute() else (root / path).resolve())

    for f in job.spec_fields:
        if f.path and isinstance(data.get(f.name), str):
            data[f.name] = absolute(data[f.name])
        elif f.path and isinstance(data.get(f.name), list):
            data[f.name] = [absolute(v) for v in data[f.name]]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)




