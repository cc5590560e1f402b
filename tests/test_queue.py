"""The persistent queue and its worker: states, bounded progress, fast listing, crash safety and resume,
cancel / stop-and-save within one step, generation between training steps, the CLI.

Models: a "micro" SD1-architecture pipeline built here (one down/up block, 8 channels, no mid block, 16x16 latents at 64 px:
a step costs a third of tests/tiny.py's SD1 model), random and seeded. The demo model is not used:
its steps cost 10x more, and 200 jobs must finish in under a minute on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

import tiny
from trainer import jobs
from trainer.lora import files as lora_files
from trainer.train import runner
from trainer.cli import main as cli
from trainer.models.demo.shapes import draw
from trainer.models.diffusers_model import DiffusersHandle, load_handle
from trainer.train.loop import Progress
from trainer.train.context import JobContext
from trainer.queue.store import JobQueue, QueueError, WorkerLock, thinning_plan, thinning_stride
from trainer.queue.admission import Admission
from trainer.queue.worker import Worker, work_folder
from trainer.sampling.guided import sample

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def micro_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(4, 4, 4), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=32)
    return StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(tiny._text_config(16)),
                                   tokenizer=tiny.char_tokenizer(tmp / "tok"), unet=unet,
                                   scheduler=tiny._scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _dataset(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw(["red", "blue", "green"][i % 3], ["circle", "square"][i % 2], "white", 64).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}")
    return folder


def _job(tmp_path: Path, name: str = "t", **kw) -> jobs.StandardJob:
    base = dict(name=name, dataset_dir=str(tmp_path / "data"), resolution=64, min_bucket_reso=64,
                max_bucket_reso=128, steps=2, batch_size=1, lr=1e-3, network_dim=2, network_alpha=2.0,
                mixed_precision="no", save_precision="fp32", seed=5)
    base.update(kw)
    return jobs.StandardJob(**base)


def _worker(queue: JobQueue, handle, tmp_path: Path, **kw) -> Worker:
    return Worker(queue, lambda job: handle,
                  lambda row: JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None),
                  **kw)


def _max_difference(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


@pytest.fixture()
def handle(tmp_path):
    return DiffusersHandle(micro_pipeline(tmp_path))


@pytest.fixture()
def queue(tmp_path):
    q = JobQueue(tmp_path / "queue.sqlite")
    yield q
    q.close()


# -- the store --------------------------------------------------------------------------------------

def test_progress_thinning_keeps_the_recent_steps_and_at_most_history_rows_before():
    assert thinning_stride(250, 250) == 1 and thinning_stride(251, 250) == 2 and thinning_stride(4000, 250) == 16
    def kept(steps, latest, recent, history_rows):   # what the store's DELETE leaves
        cutoff, stride = thinning_plan(latest, recent, history_rows)
        return [s for s in steps if s > cutoff or s % stride == 0 or s == latest]

    kept_5000 = kept(range(1, 5001), latest=5000, recent=1000, history_rows=250)
    assert [s for s in kept_5000 if s > 4000] == list(range(4001, 5001))
    older = [s for s in kept_5000 if s <= 4000]
    assert len(older) == 250 and all(s % 16 == 0 for s in older)
    assert kept(range(1, 601), latest=600, recent=0, history_rows=250)[-1] == 600


def test_a_report_without_a_loss_moves_the_rows_phase_and_adds_no_point_to_the_plot(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite")
    _dataset(tmp_path / "data")
    job_id = q.add(_job(tmp_path, steps=4))
    q.claim_next()
    for step in (1, 2, 3, 4):
        q.record_progress(job_id, Progress(step, 4, 0.5, 0.5, 1e-3, 1.0, 4.0 - step))
    q.record_progress(job_id, Progress(4, 4, float("nan"), float("nan"), 0.0, 0.0, float("nan"),
                                       phase="comparison sheet"))
    row = q.get(job_id)
    assert (row.state, row.step, row.total, row.phase) == ("running", 4, 4, "comparison sheet")
    assert (row.loss, row.smoothed_loss) == (0.5, 0.5), "the last loss stays on show"
    assert [(p.step, p.phase, p.loss) for p in q.progress(job_id)] == [(s, "", 0.5) for s in (1, 2, 3, 4)]


def test_a_job_records_every_step_and_the_store_keeps_a_bounded_history(tmp_path):
    q = JobQueue(tmp_path / "q.sqlite", recent_steps=100, history_rows=25)
    _dataset(tmp_path / "data")
    job_id = q.add(_job(tmp_path, steps=1000))
    q.claim_next()
    most = 0
    for step in range(1, 1001):
        q.record_progress(job_id, Progress(step, 1000, 1.0 / step, 1.0, 1e-3, 10.0, 0.0))
        most = max(most, len(q.progress(job_id))) if step % 50 == 0 else most
    assert most <= 2 * 100 + 25, "while running: at most 2 x recent_steps + history_rows rows"
    assert [p.step for p in q.progress(job_id)][-100:] == list(range(901, 1001))
    q.finish(job_id, "done")
    steps = [p.step for p in q.progress(job_id)]
    assert len(steps) <= 25 + 1 and steps[-1] == 1000, "finished: at most history_rows + the last step"
    row = q.get(job_id)
    assert (row.step, row.total, row.loss) == (1000, 1000, pytest.approx(1e-3))


def test_operations_follow_the_job_states(tmp_path, queue):
    _dataset(tmp_path / "data")
    a, b, c = queue.add_many([_job(tmp_path, "a"), _job(tmp_path, "b"), _job(tmp_path, "c")])
    assert [r.name for r in queue.list()] == ["a", "b", "c"]
    queue.move(c, -2)
    assert [r.name for r in queue.list(states=["queued"])] == ["c", "a", "b"]
    assert queue.cancel(a) == "cancelled"
    with pytest.raises(QueueError, match="only queued jobs can be moved"):
        queue.move(a, 1)
    queue.retry(a)
    assert [r.name for r in queue.list(states=["queued"])] == ["c", "b", "a"]
    running = queue.claim_next()
    assert running.id == c and queue.get(c).state == "running"
    with pytest.raises(QueueError, match="running: cancel it first"):
        queue.delete(c)
    with pytest.raises(QueueError, match="only interrupted, stopped, cancelled, failed jobs can be resumed"):
        queue.resume(b)
    assert queue.cancel(c) == "running" and queue.get(c).request == "cancel"
    copy = queue.duplicate(b, {"network_dim": 8})
    assert (queue.get(copy).name, queue.get(copy).job.network_dim) == ("b_2", 8)
    queue.delete(b)
    assert [r.name for r in queue.list()] == ["c", "a", "b_2"]


def test_a_resumed_job_runs_next_but_is_listed_after_the_finished_ones(tmp_path, queue):
    _dataset(tmp_path / "data")
    a, b, c, d = queue.add_many([_job(tmp_path, n) for n in "abcd"])
    for _ in range(2):
        queue.finish(queue.claim_next().id, "done")
    assert queue.stop_and_save(queue.claim_next().id) == "running"
    queue.finish(c, "stopped")
    queue.resume(c)
    assert [r.name for r in queue.list()] == ["a", "b", "c", "d"], "not above the jobs that ran before it"
    assert queue.claim_next().id == c
    queue.finish(c, "done")
    queue.finish(queue.claim_next().id, "stopped")   # d, with nothing queued after it
    queue.resume(d)
    assert [r.name for r in queue.list()] == ["a", "b", "c", "d"] and queue.claim_next().id == d


def test_a_queued_job_is_changed_in_place_and_a_started_one_never(tmp_path, queue):
    _dataset(tmp_path / "data")
    a, b, c = queue.add_many([_job(tmp_path, "a"), _job(tmp_path, "b"), _job(tmp_path, "c")])
    changed = jobs.job_from_dict({**jobs.job_to_dict(queue.get(b).job), "name": "b_rank8", "network_dim": 8})
    queue.update(b, changed)
    row = queue.get(b)
    assert (row.id, row.name, row.state, row.job.network_dim) == (b, "b_rank8", "queued", 8)
    assert [r.name for r in queue.list()] == ["a", "b_rank8", "c"], "it keeps its place"
    queue.update(b, changed)     # its own output is no conflict with itself
    with pytest.raises(jobs.JobError, match="job 3 'c'") as e:   # another queued job writes that file
        queue.update(b, jobs.job_from_dict({**jobs.job_to_dict(changed), "name": "c"}))
    assert "name" in e.value.errors or "output_dir" in e.value.errors
    with pytest.raises(jobs.JobError, match="not changed"):
        queue.update(b, jobs.job_from_dict({**jobs.job_to_dict(changed), "dataset_dir": str(tmp_path / "nowhere")}))
    assert queue.get(b).job.network_dim == 8 and queue.get(b).job.dataset_dir == str(tmp_path / "data")
    assert queue.claim_next().id == a
    with pytest.raises(QueueError, match="is running: only a queued job can be changed"):
        queue.update(a, changed)
    queue.finish(a, "done")
    with pytest.raises(QueueError, match="is done: only a queued job can be changed"):
        queue.update(a, changed)
    assert queue.get(a).name == "a"


def test_an_invalid_job_is_refused_at_add_with_the_field_named(tmp_path, queue):
    with pytest.raises(jobs.JobError, match="not queued") as e:
        queue.add(_job(tmp_path, dataset_dir=str(tmp_path / "nowhere")))
    assert "dataset_dir" in e.value.errors
    assert queue.count() == 0


def test_relative_paths_are_stored_absolute(tmp_path, queue, monkeypatch):
    _dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    job_id = queue.add(_job(tmp_path, dataset_dir="data"))
    assert queue.get(job_id).job.dataset_dir == str(tmp_path / "data")


def test_a_running_job_without_a_live_worker_is_interrupted_on_opening(tmp_path):
    _dataset(tmp_path / "data")
    first = JobQueue(tmp_path / "q.sqlite")
    job_id = first.add(_job(tmp_path))
    first.claim_next()
    held = WorkerLock(first.worker_lock_path)
    assert held.acquire()
    assert JobQueue(tmp_path / "q.sqlite").get(job_id).state == "running", "a live worker keeps its job"
    held.release()
    row = JobQueue(tmp_path / "q.sqlite").get(job_id)
    assert row.state == "interrupted" and "resume" in row.error


def test_listing_10000_finished_jobs_takes_under_50_ms(tmp_path, queue, capsys):
    _dataset(tmp_path / "data")
    queue.add_many([_job(tmp_path, f"job{i}") for i in range(10_000)])
    # Mark them finished as a worker would, in one statement (10,000 claim/finish transactions add nothing here).
    with sqlite3.connect(queue.db_path) as db:
        db.execute("UPDATE jobs SET state = 'done', step = 2, total = 2, loss = 0.1, finished = created")
    queue.add(_job(tmp_path, "waiting"))

    def median_ms(call) -> float:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    assert median_ms(lambda: queue.list(limit=100)) < 50
    assert median_ms(lambda: queue.list(limit=100, newest_first=True)) < 50
    assert median_ms(lambda: queue.list(states=["queued", "running"])) < 50
    assert [r.name for r in queue.list(states=["queued"])] == ["waiting"]
    cli_ms = median_ms(lambda: cli(["queue", "--db", str(queue.db_path), "list"]))
    assert cli_ms < 50, f"the CLI listing took {cli_ms:.1f} ms"
    assert "job99 " in capsys.readouterr().out


# -- the worker -------------------------------------------------------------------------------------

def test_200_jobs_run_to_the_end_with_nothing_lost_and_a_bounded_store(tmp_path, queue, handle, monkeypatch):
    """200 one-step jobs on the micro model (the demo model would take minutes on 2 cores)."""
    _dataset(tmp_path / "data", n=1)
    freed = []
    monkeypatch.setattr(runner, "free_memory", lambda: freed.append(1))   # gc.collect costs ~0.4 s a job here
    ids = queue.add_many([_job(tmp_path, f"j{i:03d}", steps=1) for i in range(200)])
    ran = _worker(queue, handle, tmp_path).run_until_empty()
    assert ran == ids
    rows = queue.list(limit=1000)
    assert [r.state for r in rows] == ["done"] * 200
    assert all(Path(r.outputs[-1]).name == f"{r.name}.safetensors" and Path(r.outputs[-1]).is_file() for r in rows)
    assert all(len(queue.progress(i)) == 1 for i in ids)
    assert len(freed) == 200, "memory is freed after every job"
    queue.close()                                   # the last connection folds the WAL into the file
    size = sum(p.stat().st_size for p in tmp_path.glob("queue.sqlite*"))
    assert size < 200 * 5_000, f"the store holds {size} bytes for 200 finished jobs (limit 5 kB a job)"


@pytest.mark.parametrize("mode", ["standard", "lcm"])
def test_a_finished_jobs_outputs_list_its_previews_in_step_order_before_its_loras(tmp_path, queue, handle, mode,
                                                                                   monkeypatch):
    """Every mode renders its preview prompts; the tab and `queue show` list them with the job's files."""
    from trainer.train.modes import lcm as lcm_mode

    monkeypatch.setattr(lcm_mode, "TEACHER_SAMPLING_STEPS", 2)   # speed only: the teacher's own images
    _dataset(tmp_path / "data", n=1)
    common = dict(steps=2, save_every_n_steps=1, sample_prompts=["red"], resolution=64)
    job = (_job(tmp_path, "p", **common) if mode == "standard" else
           jobs.LcmJob(name="p", prompts=["red circle"], num_generated_images=2, batch_size=1, network_dim=2,
                       network_alpha=2.0, mixed_precision="no", **common))
    job_id = queue.add(job, admission=Admission(tmp_path / "out"))
    _worker(queue, handle, tmp_path).run_until_empty()
    row = queue.get(job_id)
    assert row.state == "done", row.error
    names = [Path(p).name for p in row.outputs]
    sheets = ["p.comparison.png"] if mode == "lcm" else []     # an LCM job's comparison sheet (on by default)
    assert names == ["p-000001.preview.png", "p.preview.png", *sheets, "p-000001.safetensors", "p.safetensors"], names
    assert all(Path(p).is_file() for p in row.outputs)
    assert Path(row.outputs[0]).parent == work_folder(queue, job_id)


def test_a_job_whose_dataset_vanished_fails_clearly_and_the_queue_goes_on(tmp_path, queue, handle):
    _dataset(tmp_path / "data", n=1)
    _dataset(tmp_path / "gone", n=1)
    first, broken, last = queue.add_many([_job(tmp_path, "first"), _job(tmp_path, "broken",
                                          dataset_dir=str(tmp_path / "gone")), _job(tmp_path, "last")])
    for p in (tmp_path / "gone").iterdir():
        p.unlink()
    (tmp_path / "gone").rmdir()
    _worker(queue, handle, tmp_path).run_until_empty()
    assert [queue.get(i).state for i in (first, broken, last)] == ["done", "failed", "done"]
    assert queue.get(broken).error == f"dataset_dir: dataset folder '{tmp_path / 'gone'}' does not exist"


def test_a_dataset_emptied_after_queuing_fails_with_its_message_and_no_traceback(tmp_path, queue, handle):
    _dataset(tmp_path / "data", n=1)
    job_id = queue.add(_job(tmp_path, "emptied"))
    for p in (tmp_path / "data").iterdir():
        p.unlink()
    _worker(queue, handle, tmp_path).run_until_empty()
    row = queue.get(job_id)
    assert row.state == "failed" and "has no images" in row.error and "DatasetError" not in row.error
    assert row.error_detail is None, "an ordinary mistake shows no Python traceback"


@pytest.mark.parametrize("operation,state", [("cancel", "cancelled"), ("stop_and_save", "stopped")])
def test_cancel_and_stop_and_save_take_effect_within_one_step(tmp_path, queue, handle, operation, state):
    _dataset(tmp_path / "data", n=1)
    job_id = queue.add(_job(tmp_path, steps=50, save_every_n_steps=2))
    worker = _worker(queue, handle, tmp_path)
    worker.subscribe(lambda e: getattr(queue, operation)(job_id) if e.kind == "progress" and e.progress.step == 3
                     else None)
    worker.run_until_empty()
    row = queue.get(job_id)
    assert (row.state, row.step) == (state, 4), "asked after step 3: step 4 was already under way, then it ends"
    final = tmp_path / "out" / "t.safetensors"
    if operation == "cancel":
        assert not final.exists()
        return
    assert row.outputs[-1] == str(final) and lora_files.read_metadata(final)["ss_steps"] == "4"
    queue.resume(job_id)                                  # a stopped job can still be finished
    worker.run_until_empty()
    row = queue.get(job_id)
    assert (row.state, row.step, row.error) == ("done", 50, None)
    assert lora_files.read_metadata(final)["ss_steps"] == "50"


def test_generation_between_training_steps_sees_the_base_model_and_leaves_training_unchanged(tmp_path, queue,
                                                                                            handle):
    _dataset(tmp_path / "data", n=2)

    def generate():
        return np.asarray(sample(handle, ["a red circle"], [7], steps=2, cfg=3.0, size=(64, 64))[0])

    base_image = generate()
    alone = queue.add(_job(tmp_path, "alone", steps=20, lr=2e-2))
    worker = _worker(queue, handle, tmp_path, poll_s=0.05)
    worker.run_until_empty()                        # the reference: nothing else uses the model
    assert queue.get(alone).state == "done"
    shared = queue.add(_job(tmp_path, "interleaved", steps=20, lr=2e-2))

    images, during = [], []
    worker.start()
    try:
        while queue.get(shared).state in ("queued", "running"):
            images.append(generate())
            row = queue.get(shared)
            during.append(row.state == "running" and 0 < row.step < 20)
    finally:
        worker.stop()
    assert sum(during) >= 3, "generations ran while the job was between its steps"
    assert all(np.array_equal(image, base_image) for image in images), "the training LoRA leaked into generation"
    assert queue.get(shared).state == "done"
    assert _max_difference(tmp_path / "out" / "alone.safetensors", tmp_path / "out" / "interleaved.safetensors") == 0


# -- crash safety ------------------------------------------------------------------------------------

def _worker_process(tmp_path: Path, db: Path, model: str) -> subprocess.Popen:
    """``python -m trainer queue run --until-empty`` in a process of its own, one torch thread."""
    env = {**os.environ, "LORAQ_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer", "queue", "--db", str(db), "run", "--until-empty",
                             "--model", model, "--out", str(tmp_path / "out")],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_step(worker: subprocess.Popen, db: Path, job_id: int, step: int) -> JobQueue:
    watcher = JobQueue(db)
    deadline = time.monotonic() + 240
    while watcher.get(job_id).step < step:
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"the worker did not reach step {step} in 4 minutes"
        time.sleep(0.02)
    return watcher


def test_ctrl_c_on_queue_run_stops_after_the_step_saves_marks_the_job_stopped_and_exits_0(tmp_path):
    _dataset(tmp_path / "data")
    db = tmp_path / "queue.sqlite"
    job_id = JobQueue(db).add(_job(tmp_path, "night", steps=400, save_every_n_steps=50))
    worker = _worker_process(tmp_path, db, "demo")
    watcher = _wait_for_step(worker, db, job_id, 3)
    pressed = time.monotonic()
    worker.send_signal(signal.SIGINT)
    assert worker.wait(60) == 0, worker.stderr.read().decode()[-2000:]
    assert time.monotonic() - pressed < 30
    row = watcher.get(job_id)
    assert row.state == "stopped" and "stopped and saved" in row.error, (row.state, row.error)
    assert 3 <= row.step < 400
    assert (tmp_path / "out" / "night.safetensors").is_file(), "the LoRA so far is saved"
    assert (db.parent / "jobs" / str(job_id) / "night.state.safetensors").is_file(), "and the state to resume from"
    stderr = worker.stderr.read().decode()
    assert "Traceback" not in stderr and "terminate called" not in stderr


def test_kill_9_mid_job_leaves_no_half_written_lora_and_resume_matches_an_uninterrupted_run(tmp_path):
    pipe = micro_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "model")
    _dataset(tmp_path / "data", n=3)
    db = tmp_path / "queue.sqlite"
    job = _job(tmp_path, "crash", steps=60, save_every_n_steps=5, batch_size=2)
    job_id = JobQueue(db).add(job)
    worker = _worker_process(tmp_path, db, str(tmp_path / "model"))
    watcher = _wait_for_step(worker, db, job_id, 8)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_at = watcher.get(job_id).step
    assert 8 <= killed_at < 60

    queue = JobQueue(db)
    row = queue.get(job_id)
    assert row.state == "interrupted" and f"step {killed_at}" in row.error
    out = tmp_path / "out"
    assert not (out / "crash.safetensors").exists()
    for written in out.glob("*.safetensors"):              # every LoRA under its real name is whole
        lora_files.read_header(written)
    work = db.parent / "jobs" / str(job_id)
    assert (work / "crash.state.safetensors").exists()
    assert all(p.suffix == ".safetensors" for p in out.iterdir()), "no state, log or temporary file in the LoRA folder"

    handle = load_handle(str(tmp_path / "model"))
    worker = _worker(queue, handle, tmp_path)
    queue.resume(job_id)
    uninterrupted = queue.add(_job(tmp_path, "whole", steps=60, save_every_n_steps=5, batch_size=2))
    worker.run_until_empty()
    assert [queue.get(i).state for i in (job_id, uninterrupted)] == ["done", "done"]
    assert _max_difference(out / "whole.safetensors", out / "crash.safetensors") <= 1e-6
    log = (work / "crash.loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == list(range(1, 61)), "the resumed loss log has each step once"
    assert not list(out.glob(".*.tmp"))


def test_cli_adds_lists_shows_cancels_and_explains_refusals(tmp_path, capsys):
    _dataset(tmp_path / "data")
    db = str(tmp_path / "q.sqlite")
    for name in ("one", "two"):
        (tmp_path / f"{name}.json").write_text(json.dumps(jobs.job_to_dict(_job(tmp_path, name))))
    assert cli(["queue", "--db", db, "add", str(tmp_path / "one.json"), str(tmp_path / "two.json")]) == 0
    assert capsys.readouterr().out.split() == ["1", "2"]
    assert cli(["queue", "--db", db, "cancel", "2"]) == 0
    assert capsys.readouterr().out == "job 2: cancelled\n"
    assert cli(["queue", "--db", db, "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[1].split()[:3] == ["1", "queued", "standard"] and listing[2].split()[:2] == ["2", "cancelled"]
    assert cli(["queue", "--db", db, "show", "1", "--spec"]) == 0
    assert '"name": "one"' in capsys.readouterr().out
    assert cli(["queue", "--db", db, "resume", "1"]) == 2
    assert "job 1 (one) is queued; only interrupted, stopped, cancelled, failed jobs can be resumed" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({**jobs.job_to_dict(_job(tmp_path, "bad")), "lr": -1}))
    assert cli(["queue", "--db", db, "add", str(tmp_path / "bad.json")]) == 2
    assert "lr:" in capsys.readouterr().err


def test_resume_interrupted_requeues_crashed_jobs_at_the_front_in_their_order(tmp_path):
    _dataset(tmp_path / "data")
    first = JobQueue(tmp_path / "q.sqlite")
    a, b, c = (first.add(_job(tmp_path, name)) for name in ("a", "b", "c"))
    for _ in range(2):
        first.claim_next()                          # a and b were running when the process died
    first.close()
    queue = JobQueue(tmp_path / "q.sqlite")         # no worker holds the lock: a and b are interrupted
    assert [queue.get(i).state for i in (a, b, c)] == ["interrupted", "interrupted", "queued"]
    assert queue.resume_interrupted() == [a, b]
    rows = queue.list(states=["queued"])
    assert [r.id for r in rows] == [a, b, c] and rows[0].resume and rows[1].resume and not rows[2].resume
    assert queue.resume_interrupted() == []


def _slowed(handle, method: str, seconds: float) -> list[float]:
    """Make one of the handle's calls slow (an SD1.5 VAE or UNet on a GPU); returns the times it was called."""
    calls: list[float] = []
    original = getattr(handle, method)

    def slow(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(seconds)
        return original(*args, **kwargs)
    setattr(handle, method, slow)
    return calls


@pytest.mark.parametrize("where", ["caching latents", "the teacher generated its images"])
def test_cancel_takes_effect_within_2_s_while_latents_are_cached_or_the_lcm_teacher_generates(tmp_path, queue,
                                                                                             handle, where):
    if where == "caching latents":
        _dataset(tmp_path / "data", n=40)
        for i, png in enumerate(sorted((tmp_path / "data").glob("*.png"))):   # 40 different images, 40 latents
            image = Image.open(png).convert("RGB")
            image.putpixel((0, 0), (i, i, i))
            image.save(png)
        calls = _slowed(handle, "encode_images", 0.3)     # 10 batches of 4: 3 s of caching
        job_id = queue.add(_job(tmp_path, steps=5), tmp_path)
    else:
        calls = _slowed(handle, "predict", 0.05)          # 50 teacher steps a batch: 2.5 s a batch, 4 batches
        job_id = queue.add(jobs.LcmJob(name="l", prompts=["a red circle"], num_generated_images=32, resolution=64,
                                       steps=5, network_dim=2, network_alpha=2.0, mixed_precision="no"), tmp_path)
    worker = _worker(queue, handle, tmp_path, poll_s=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls, "the job never reached the slow part"
        time.sleep(0.4)
        asked = time.monotonic()
        queue.cancel(job_id)
        while queue.get(job_id).state == "running" and time.monotonic() - asked < 10:
            time.sleep(0.02)
        took = time.monotonic() - asked
    finally:
        worker.stop()
    row = queue.get(job_id)
    assert row.state == "cancelled" and where in row.error, row.error
    assert took < 2.0, f"cancel took {took:.2f} s while {where}"
    assert queue.get(job_id).step == 0


@pytest.mark.parametrize("mode", ["standard", "copier", "lcm"])
def test_a_finished_job_frees_its_network_without_a_full_garbage_collection(tmp_path, handle, monkeypatch, mode):
    """Per-job overhead: free_memory collects only young objects (a full collection walks the WebUI's whole heap,
    1.3-1.6 s a job in A1111), which holds only if no job leaves its LoRA in a reference cycle."""
    import gc
    import weakref

    from trainer.train.modes import copier, lcm, standard

    refs = []
    for module in (standard, copier, lcm):
        def capture(*args, _build=module.build_network, **kwargs):
            network = _build(*args, **kwargs)
            refs.extend(weakref.ref(p) for p in network.parameters())
            refs.append(weakref.ref(network))
            return network
        monkeypatch.setattr(module, "build_network", capture)
    monkeypatch.setattr(runner, "free_memory", lambda: None)
    draw("red", "circle", "white", 64).save(tmp_path / "a.png")
    draw("blue", "circle", "white", 64).save(tmp_path / "b.png")
    _dataset(tmp_path / "data", n=2)
    job = {"standard": _job(tmp_path, steps=2),
           "copier": jobs.job_from_dict({"mode": "copier", "name": "c", "image_a": [str(tmp_path / "a.png")],
                                         "image_b": [str(tmp_path / "b.png")], "resolution": 64, "mixed_precision": "no",
                                         "copier_pass": {"steps": 2, "network_dim": 2, "network_alpha": 2.0},
                                         "difference_pass": {"same_as_pass1": False, "steps": 2, "network_dim": 2,
                                                             "network_alpha": 2.0}}),
           "lcm": jobs.LcmJob(name="l", prompts=["a red circle"], num_generated_images=2, resolution=64, steps=2,
                              network_dim=2, network_alpha=2.0, mixed_precision="no")}[mode]
    gc.collect()
    gc.disable()
    try:
        runner.run_job(job, handle, JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                                               log=lambda m: None))
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert refs and alive == 0, f"{alive} of {len(refs)} LoRA tensors of a finished {mode} job are still alive"


def test_freeing_memory_between_jobs_takes_little_time_on_a_big_heap():
    from trainer.device import free_memory

    heap = [{"i": i} for i in range(2_000_000)]    # a WebUI holds millions of objects
    started = time.perf_counter()
    free_memory()
    took = time.perf_counter() - started
    assert took < 0.1, f"free_memory took {took:.2f} s"
    assert heap
