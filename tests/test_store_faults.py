"""The store under faults: read-only files, a database deleted or replaced while a worker runs, a deleted
worker lock, a reader opening the store while a worker starts, temporaries left by a killed process."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trainer import jobs, paths
from trainer.models.demo.shapes import draw
from trainer.queue.admission import Admission
from trainer.queue.store import JobQueue, QueueError
from trainer.queue.worker import Worker
from trainer.train.context import JobContext

ROOT = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "LORAQ_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def test_a_read_only_store_gives_a_clear_error_even_for_queue_list(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    JobQueue(home / "queue.sqlite").close()
    if os.geteuid() != 0:          # file modes: the real thing
        for f in home.iterdir():
            f.chmod(0o444)
        home.chmod(0o555)
    else:                          # root ignores file modes: SQLite's own read-only mode gives the same errors
        real_connect = sqlite3.connect
        monkeypatch.setattr(sqlite3, "connect", lambda path, **kw: real_connect(
            f"file:{path}?mode=ro", uri=True, **kw))
    monkeypatch.setenv("LORAQ_HOME", str(home))
    from trainer.cli import main as cli
    try:
        code = cli(["queue", "list"])
    finally:
        home.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "read-only" in err and "LORAQ_HOME" in err, err
    assert "Traceback" not in err, err


def test_a_database_deleted_while_the_worker_runs_is_noticed_and_new_jobs_are_picked_up(tmp_path):
    (tmp_path / "data").mkdir()
    draw("red", "circle", "white", 64).save(tmp_path / "data" / "a.png")
    db = tmp_path / "home" / "queue.sqlite"
    queue = JobQueue(db)
    ran: list[int] = []

    class NoModel(Exception):
        pass

    def provider(job):               # records the job and fails it fast: no model needed to see it picked up
        ran.append(job.name)
        raise NoModel("no model in this test")

    worker = Worker(queue, provider, lambda row: JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "c"),
                    poll_s=0.05)
    worker.start()
    try:
        time.sleep(0.3)
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        other = JobQueue(db)             # another process (the tab, the CLI) adds to the new file
        job_id = other.add(jobs.StandardJob(name="after", dataset_dir=str(tmp_path / "data")), tmp_path,
                           Admission(tmp_path / "out"))
        deadline = time.monotonic() + 10
        while other.get(job_id).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ran == ["after"], "the worker never saw the job added after the database was deleted"
        assert other.get(job_id).state == "failed" and "no model" in other.get(job_id).error
        assert queue.replaced == 1
    finally:
        worker.stop()


def test_a_deleted_worker_lock_file_does_not_let_a_second_worker_in(tmp_path):
    home = tmp_path / "home"
    env = _env(home)
    first = subprocess.Popen([sys.executable, "-m", "trainer", "queue", "run", "--model", "demo", "--poll", "0.2"],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = home / "queue.sqlite.worker.lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if lock.exists() and JobQueue(home / "queue.sqlite").live_worker():
                break
            time.sleep(0.1)
        assert JobQueue(home / "queue.sqlite").live_worker(), "the first worker never started"
        lock.unlink()
        second = subprocess.run([sys.executable, "-m", "trainer", "queue", "run", "--model", "demo", "--until-empty"],
                                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "another worker is already running" in second.stderr and f"process {first.pid}" in second.stderr
    finally:
        first.terminate()
        first.wait(30)


def test_a_process_that_only_opens_the_store_never_makes_a_worker_start_fail(tmp_path):
    db = tmp_path / "queue.sqlite"
    JobQueue(db).close()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            JobQueue(db).close()         # each open probes the worker lock for a moment

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    refused = 0
    try:
        for _ in range(60):
            worker = Worker(JobQueue(db), lambda job: None, poll_s=0.01)
            try:
                worker.start()
            except QueueError:
                refused += 1
                continue
            worker.stop()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert refused == 0, f"{refused} of 60 worker starts refused because another process opened the store"


def test_temporaries_left_by_a_killed_writer_are_removed_when_a_worker_starts(tmp_path):
    db = tmp_path / "queue.sqlite"
    queue = JobQueue(db)
    work = tmp_path / "jobs" / "3"
    work.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = work / f".t.state.safetensors.{dead}.tmp"
    alive = work / f".t.state.safetensors.{os.getpid()}.tmp"     # a writer at work: kept
    stale.write_bytes(b"half")
    alive.write_bytes(b"half")
    worker = Worker(queue, lambda job: None, poll_s=0.01)
    worker.start()
    worker.stop()
    assert not stale.exists() and alive.exists()


def test_a_damaged_database_file_is_reported_with_what_to_do(tmp_path):
    db = tmp_path / "queue.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError, match="damaged"):
        JobQueue(db)


def test_job_ids_are_never_reused_after_deleting_the_newest_job(tmp_path):
    (tmp_path / "data").mkdir()
    draw("red", "circle", "white", 64).save(tmp_path / "data" / "a.png")
    queue = JobQueue(tmp_path / "queue.sqlite")
    add = lambda name: queue.add(jobs.StandardJob(name=name, dataset_dir=str(tmp_path / "data")), tmp_path,
                                 Admission(tmp_path / "out"))
    first, second = add("a"), add("b")
    queue.delete(second)
    third = add("c")
    assert (first, second, third) == (1, 2, 3)
    queue.close()
    assert JobQueue(tmp_path / "queue.sqlite").add(jobs.StandardJob(name="d", dataset_dir=str(tmp_path / "data")),
                                                   tmp_path, Admission(tmp_path / "out")) == 4
