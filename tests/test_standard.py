"""Standard training on tiny real models: buckets, caches, resumable saves, bad input named clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import sd1_pipeline
from trainer import data, jobs
from trainer.models.diffusers_model import DiffusersHandle
from trainer.models.demo.shapes import draw
from trainer.train.loop import NonFiniteLoss
from trainer.train.context import JobContext
from trainer.train.runner import run_job

ROOT = Path(__file__).resolve().parents[1]


def _dataset(folder: Path, n: int = 10) -> Path:
    """n captioned pictures in two aspect ratios (square and 2:1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = draw(["red", "blue", "green", "yellow", "purple"][i % 5], ["circle", "square"][i % 2], "white", 64)
        if i % 2:
            img = img.resize((128, 64))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture {i}, shape")
    return folder


def _job(tmp_path: Path, **kw) -> jobs.StandardJob:
    base = dict(name="t", dataset_dir=str(tmp_path / "data"), resolution=64, min_bucket_reso=64,
                max_bucket_reso=128, steps=4, batch_size=2, lr=1e-3, network_dim=2, network_alpha=2.0,
                mixed_precision="no")
    base.update(kw)
    return jobs.StandardJob(**base)


def _ctx(tmp_path: Path, **kw) -> JobContext:
    return JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None, **kw)


class CountingHandle(DiffusersHandle):
    encoded = 0

    def encode_images(self, pixels):
        CountingHandle.encoded += pixels.shape[0]
        return super().encode_images(pixels)


@pytest.fixture()
def handle(tmp_path):
    CountingHandle.encoded = 0
    return CountingHandle(sd1_pipeline(tmp_path))


def test_ten_images_in_two_aspect_ratios_train_through_two_buckets(tmp_path, handle):
    _dataset(tmp_path / "data")
    events = []
    job = _job(tmp_path, save_every_n_steps=2, resolution=128, max_bucket_reso=256)
    result = run_job(job, handle, _ctx(tmp_path, events=events.append))
    assert [p.name for p in result.saved] == ["t-000002.safetensors", "t.safetensors"]
    assert [e.step for e in events] == [1, 2, 3, 4]
    rows = (tmp_path / "work" / "t" / "t.loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,smoothed_loss,lr" and len(rows) == 5
    assert not (tmp_path / "work" / "t" / "t.state.safetensors").exists(), "the state is removed once the job is done"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t-000002.safetensors", "t.safetensors"], \
        "the LoRA folder holds the finished LoRA and the checkpoints asked for, nothing else"
    assert handle.encoded == 10
    latents = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    f = handle.vae_scale
    # buckets of area <= 128^2: the squares go to 128x128, the 2:1 pictures to 192x64
    assert {tuple(load_file(str(p))["latents"].shape) for p in latents} == {(4, 128 // f, 128 // f),
                                                                             (4, 64 // f, 192 // f)}


def test_a_second_job_encodes_nothing_and_a_changed_image_only_itself(tmp_path, handle):
    _dataset(tmp_path / "data")
    run_job(_job(tmp_path, steps=1), handle, _ctx(tmp_path))
    assert handle.encoded == 10
    run_job(_job(tmp_path, name="again", steps=1), handle, _ctx(tmp_path))
    assert handle.encoded == 10
    draw("green", "triangle", "black", 64).save(tmp_path / "data" / "0.png")
    run_job(_job(tmp_path, name="third", steps=1), handle, _ctx(tmp_path))
    assert handle.encoded == 11


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, handle):
    _dataset(tmp_path / "data", n=4)
    full = run_job(_job(tmp_path, name="full", steps=6, seed=3), handle, _ctx(tmp_path))
    ctx = _ctx(tmp_path)
    steps_seen = []

    def stop_after_four(p):
        steps_seen.append(p.step)
        if p.step == 4:
            ctx.control.cancel = True

    ctx.events = stop_after_four
    from trainer.train.loop import Stopped
    with pytest.raises(Stopped):
        run_job(_job(tmp_path, name="cut", steps=6, seed=3, save_every_n_steps=2), handle, ctx)
    assert (tmp_path / "work" / "cut" / "cut.state.safetensors").exists()
    assert all(p.suffix == ".safetensors" and not p.name.startswith(".") for p in (tmp_path / "out").iterdir())
    # A1111 replaces torch.load by a "safe" loader that returns None for what current torch writes:
    # the state must not need it (no pickle at all)
    import torch
    real_load = torch.load
    torch.load = lambda *a, **k: None
    try:
        resumed = run_job(_job(tmp_path, name="cut", steps=6, seed=3, save_every_n_steps=2), handle,
                          _ctx(tmp_path, resume=True))
    finally:
        torch.load = real_load
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6)
    full_log = (tmp_path / "work" / "full" / "full.loss.csv").read_text().splitlines()
    cut_log = (tmp_path / "work" / "cut" / "cut.loss.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in cut_log] == [r.split(",")[2] for r in full_log], "the smoothed loss continues exactly"
    a, b = load_file(str(full.final)), load_file(str(resumed.final))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by up to {worst}"


def test_a_jobs_network_is_attached_switched_off_so_a_generation_before_its_first_step_sees_the_base(tmp_path, handle):
    from trainer.train.plan import build_network

    _dataset(tmp_path / "data", n=2)
    trained = run_job(_job(tmp_path, name="init", steps=2, lr=1e-2), handle, _ctx(tmp_path))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = handle.encode_prompts(["a"], (32, 32))
    with torch.no_grad():
        base = handle.predict(x, t, cond)
        network = build_network(handle, _job(tmp_path, init_lora=str(trained.final)))
        between = handle.predict(x, t, cond)           # e.g. the WebUI generating while the job sets up
        network.enable()
        on = handle.predict(x, t, cond)
    network.detach()
    assert torch.equal(between, base)
    assert not torch.allclose(on, base), "the network holds the trained LoRA"


def test_the_file_names_its_base_model_dataset_and_buckets_as_a1111s_metadata_view_reads_them(tmp_path, handle):
    import hashlib
    import json

    from trainer.lora.files import read_metadata

    checkpoint = tmp_path / "my_model.safetensors"       # stands for the checkpoint the handle was loaded from
    checkpoint.write_bytes(bytes(range(256)) * 8192)
    handle.source = str(checkpoint)
    _dataset(tmp_path / "data", n=4)
    meta = read_metadata(run_job(_job(tmp_path, steps=2), handle, _ctx(tmp_path)).final)
    blob = checkpoint.read_bytes()
    assert meta["ss_sd_model_name"] == "my_model"
    assert meta["ss_sd_model_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]   # A1111's model_hash
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(blob).hexdigest()
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 4}}
    from collections import Counter

    from trainer.train.plan import dataset_options
    options = dataset_options(_job(tmp_path))
    dataset = data.scan_dataset(options)
    trained_buckets = Counter(tuple(b) for b in data.assign_buckets(dataset, options))
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert {tuple(b["resolution"]): b["count"] for b in buckets.values()} == dict(trained_buckets)
    assert meta["ss_epoch"] == "1" and float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_clip_skip"] == "None"


def test_v_prediction_files_say_so_in_the_version_as_kohya_writes_it():
    from trainer.lora.metadata import file_metadata

    assert file_metadata("sd2", "v", 768, 8, 8.0)["ss_base_model_version"] == "sd_v2_v"
    assert file_metadata("sd1", "v", 512, 8, 8.0)["ss_base_model_version"] == "sd_v1_v"
    assert file_metadata("sdxl", "eps", 1024, 8, 8.0)["ss_base_model_version"] == "sdxl_base_v1-0"


def test_a_prediction_override_reaches_everything_that_calls_the_model_and_ends_with_the_job(tmp_path, handle):
    _dataset(tmp_path / "data", n=2)
    seen = []
    ctx = _ctx(tmp_path, events=lambda p: seen.append((p.phase, handle.prediction)))
    result = run_job(_job(tmp_path, steps=2, prediction="v", sample_prompts=["a red circle"]), handle, ctx)
    # two steps, then the final preview announced: all while the override holds
    assert seen == [("", "v"), ("", "v"), ("preview", "v")] and handle.prediction == "eps", \
        "v while the job runs (its final preview too), the model's own afterwards"
    from trainer.lora.files import read_metadata
    assert read_metadata(result.final)["ss_v_parameterization"] == "True"


def test_a_damaged_state_is_refused_naming_the_file(tmp_path, handle):
    from trainer.train.state import StateError, read_state, write_state

    path = write_state(tmp_path / "s.safetensors", {"step": 3, "opt": {0: {"m": torch.ones(2)}}, "rng": (3, (1, 2), None),
                                                   "smoothed": float("nan")})
    back = read_state(path)
    assert back["step"] == 3 and torch.equal(back["opt"][0]["m"], torch.ones(2)) and back["rng"] == (3, (1, 2), None)
    assert path.read_bytes()[:2] != b"PK" and b"\x80\x04" not in path.read_bytes()[:16], "not a pickle"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StateError, match="s.safetensors is damaged.*retry the job"):
        read_state(path)
    with pytest.raises(StateError, match="no saved state at"):
        read_state(tmp_path / "missing.safetensors")


def test_nan_loss_stops_the_job_and_keeps_the_last_good_save(tmp_path, handle):
    _dataset(tmp_path / "data", n=2)
    calls = {"n": 0}
    original = handle.predict

    def predict_then_explode(*args):
        calls["n"] += 1
        out = original(*args)
        return out * float("nan") if calls["n"] > 2 else out

    handle.predict = predict_then_explode
    with pytest.raises(NonFiniteLoss, match="step 3.*t-000002.safetensors"):
        run_job(_job(tmp_path, steps=5, save_every_n_steps=2, batch_size=1), handle, _ctx(tmp_path))
    assert (tmp_path / "out" / "t-000002.safetensors").exists()
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_empty_folder_is_named(tmp_path, handle):
    (tmp_path / "data").mkdir()
    from trainer.data import DatasetError
    with pytest.raises(DatasetError, match="has no images") as e:
        run_job(_job(tmp_path), handle, _ctx(tmp_path))
    assert e.value.field == "dataset_dir"
    assert not (tmp_path / "out").exists()


def test_non_images_and_corrupt_images_are_skipped_with_warnings(tmp_path, handle):
    _dataset(tmp_path / "data", n=2)
    (tmp_path / "data" / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    logged = []
    run_job(_job(tmp_path, steps=1), handle, _ctx(tmp_path, log=logged.append) if False else
            JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=logged.append))
    text = "\n".join(logged)
    assert "notes.pdf" in text and "broken.png" in text


def test_only_corrupt_images_is_an_error(tmp_path, handle):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    from trainer.data import DatasetError
    with pytest.raises(DatasetError, match="broken.png"):
        run_job(_job(tmp_path), handle, _ctx(tmp_path))


def test_existing_output_without_overwrite_is_refused(tmp_path, handle):
    _dataset(tmp_path / "data", n=2)
    run_job(_job(tmp_path, steps=1), handle, _ctx(tmp_path))
    with pytest.raises(jobs.JobError, match="already exists") as e:
        run_job(_job(tmp_path, steps=1), handle, _ctx(tmp_path))
    assert e.value.field == "name"
    run_job(_job(tmp_path, steps=1, overwrite=True), handle, _ctx(tmp_path))


@pytest.mark.parametrize("field,value", [("name", "../escape"), ("name", "a/b"), ("name", "con"), ("name", "x?y"),
                                         ("lr", 0.0), ("lr", -1e-4), ("steps", 0), ("optimizer", "Adam9000"),
                                         ("lr_scheduler", "warp")])
def test_bad_settings_name_the_field_before_anything_runs(tmp_path, field, value):
    with pytest.raises(jobs.JobError) as e:
        _job(tmp_path, **{field: value})
    assert field in e.value.errors


def test_cli_trains_a_job_file_and_fails_readably(tmp_path):
    pipe = sd1_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "model")
    _dataset(tmp_path / "data", n=2)
    job = jobs.job_to_dict(_job(tmp_path, steps=2, output_dir="cli-out"))
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAQ_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([sys.executable, "-m", "trainer", "train", str(tmp_path / "job.json"), "--model",
                         str(tmp_path / "model"), "--out", str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli-out" / "t.safetensors").exists()
    job["lr"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(job))
    bad = subprocess.run([sys.executable, "-m", "trainer", "train", str(tmp_path / "bad.json"), "--model", "demo"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2
    assert "lr:" in bad.stderr and "Traceback" not in bad.stderr


def test_gradient_checkpointing_gives_the_same_training(tmp_path, handle):
    _dataset(tmp_path / "data", n=2)
    plain = run_job(_job(tmp_path, name="plain", steps=3, train_text_encoder=True), handle, _ctx(tmp_path))
    import torch.utils.checkpoint as tuc
    calls = []
    original = tuc.checkpoint
    tuc.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        checkpointed = run_job(_job(tmp_path, name="ckpt", steps=3, train_text_encoder=True,
                                    gradient_checkpointing=True),
                               handle, _ctx(tmp_path))
    finally:
        tuc.checkpoint = original
    assert len(calls) >= 3, "activations were recomputed in every step"
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    a, b = load_file(str(plain.final)), load_file(str(checkpointed.final))
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-3
    assert not handle.pipe.unet.is_gradient_checkpointing, "the model is left as it was found"


def test_a_standard_job_renders_its_preview_prompts_base_above_lora_below(tmp_path, handle):
    """Preview prompts were accepted and silently ignored outside LCM jobs."""
    from PIL import Image

    _dataset(tmp_path / "data", n=2)
    run_job(_job(tmp_path, steps=2, lr=5e-2, save_every_n_steps=1, sample_prompts=["a red circle", "a blue square"]),
            handle, _ctx(tmp_path))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["t.preview.png"]
    assert sorted(p.name for p in (tmp_path / "work" / "t").glob("*.png")) == ["t-000001.preview.png"]
    grid = Image.open(tmp_path / "out" / "t.preview.png")
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64, "two prompts across, base and LoRA rows"


def test_while_a_preview_renders_the_job_says_preview_and_keeps_its_loss(tmp_path, handle):
    """The final preview comes at 100 %: on a CPU it took minutes in A1111 with the job shown as "running 100%",
    no phase, as if it hung. Each preview is announced as the phase "preview" of its step, without a loss."""
    import math

    _dataset(tmp_path / "data", n=2)
    heard = []
    run_job(_job(tmp_path, steps=3, lr=5e-2, save_every_n_steps=2, sample_prompts=["a red circle"]), handle,
            _ctx(tmp_path, events=heard.append))
    previews = [(p.step, p.total) for p in heard if p.phase == "preview"]
    assert previews == [(2, 3), (3, 3)], "with the save at step 2 and at the end"
    assert all(math.isnan(p.loss) for p in heard if p.phase == "preview")
    assert [p.step for p in heard if p.phase == ""] == [1, 2, 3]
    # each announcement follows its step's report, before the next step
    order = [(p.step, p.phase) for p in heard]
    assert order.index((2, "preview")) == order.index((2, "")) + 1 and order[-1] == (3, "preview")


class PromptCountingHandle(CountingHandle):
    """Records, for each text-encoder call, how many progress events (finished steps) came before it."""

    def __init__(self, pipe, events: list):
        super().__init__(pipe)
        self.events, self.calls = events, []

    def encode_prompts(self, texts, size):
        self.calls.append((len(self.events), list(texts), tuple(size)))
        return super().encode_prompts(texts, size)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fixed_captions_are_encoded_before_the_first_step_not_inside_the_steps(tmp_path, dropout):
    """Like kohya's --cache_text_encoder_outputs: with the text encoder frozen and captions that are not shuffled,
    every text a step can draw (each caption; the empty one too with caption dropout) is encoded once, before the
    first step, so no step pays for a text-encoder forward."""
    _dataset(tmp_path / "data", n=6)
    events: list = []
    handle = PromptCountingHandle(sd1_pipeline(tmp_path), events)
    run_job(_job(tmp_path, steps=6, batch_size=1, caption_dropout=dropout), handle,
            _ctx(tmp_path, events=events.append))
    assert len(events) == 6
    assert handle.calls and all(before == 0 for before, _, _ in handle.calls), "a step encoded a caption"
    encoded = sorted((t, size) for _, batch, size in handle.calls for t in batch)
    assert len(set(encoded)) == len(encoded), "each (text, size) once"
    texts = sorted(t for t, _ in encoded)
    sizes = {size for _, size in encoded}
    assert texts == sorted([f"picture {i}, shape" for i in range(6)] + ([""] * len(sizes) if dropout else []))


def test_shuffled_captions_are_encoded_as_the_steps_draw_them(tmp_path):
    _dataset(tmp_path / "data", n=4)
    events: list = []
    handle = PromptCountingHandle(sd1_pipeline(tmp_path), events)
    run_job(_job(tmp_path, steps=3, batch_size=1, shuffle_captions=True), handle, _ctx(tmp_path, events=events.append))
    assert [before for before, _, _ in handle.calls] == [0, 1, 2], "one batch encoded in each step, none before"
