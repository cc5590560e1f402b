"""Refused at enqueue, naming the field: every failure a job would otherwise meet hours later, at its turn.

Each case is a job the queue took without complaint before (issue: a night must never be wasted on a job
we could have rejected at 23:00): datasets with no readable image, 16 kinds of bad ``init_lora``,
optimizer arguments the optimizer rejects, outputs that exist, collide or leave the output folder, and
inputs outside the folders the WebUI allows. The same checks serve the CLI, the tab and the Python API
(``JobQueue.add``); the CLI is run as typed.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from trainer import jobs
from trainer.models.demo.shapes import draw
from trainer.queue.admission import Admission
from trainer.queue.store import JobQueue

ROOT = Path(__file__).resolve().parents[1]
TE_KEY = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
XATTN_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def _dataset(folder: Path, n: int = 2, captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw("red", "circle", "white", 64).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(f"picture {i}")
    return folder


def _job(tmp_path: Path, **kw) -> jobs.StandardJob:
    base = dict(name="t", dataset_dir=str(tmp_path / "data"), resolution=64, min_bucket_reso=64, max_bucket_reso=128,
                steps=2, network_dim=4, network_alpha=4.0)
    base.update(kw)
    return jobs.StandardJob(**base)


@pytest.fixture()
def queue(tmp_path):
    _dataset(tmp_path / "data")
    return JobQueue(tmp_path / "home" / "queue.sqlite")


def _admission(tmp_path: Path, **kw) -> Admission:
    return Admission(tmp_path / "loras", **kw)


def _refused(queue: JobQueue, job, tmp_path, field: str, admission: Admission | None = None) -> str:
    with pytest.raises(jobs.JobError) as e:
        queue.add(job, tmp_path, admission or _admission(tmp_path))
    assert field in e.value.errors, e.value.errors
    assert queue.count() == 0 or all(r.name != "never" for r in queue.list())
    return e.value.errors[field]


# -- datasets ------------------------------------------------------------------------------------

def _truncated_png(path: Path) -> None:
    draw("red", "circle", "white", 64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])      # the header is fine, the pixel data is cut


@pytest.mark.parametrize("case", ["empty", "corrupt_png", "zero_byte_png", "only_gif"])
def test_a_dataset_without_a_readable_image_is_refused_when_queued(tmp_path, case):
    queue = JobQueue(tmp_path / "q.sqlite")
    folder = tmp_path / "bad"
    folder.mkdir()
    if case == "corrupt_png":
        _truncated_png(folder / "a.png")
    elif case == "zero_byte_png":
        (folder / "a.png").write_bytes(b"")
    elif case == "only_gif":
        Image.new("RGB", (64, 64), "red").save(folder / "a.gif")
    message = _refused(queue, _job(tmp_path, dataset_dir=str(folder)), tmp_path, "dataset_dir")
    assert "no" in message and ("image" in message), message
    assert queue.count() == 0


def test_a_dataset_with_some_damaged_images_is_queued_with_a_warning_kept_with_the_job(tmp_path, queue):
    _truncated_png(tmp_path / "data" / "z_broken.png")
    (tmp_path / "data" / "no_caption.png").write_bytes((tmp_path / "data" / "0.png").read_bytes())
    job_id = queue.add(_job(tmp_path), tmp_path, _admission(tmp_path))
    kept = queue.get(job_id).warnings
    assert any("z_broken.png" in w and ("corrupt" in w or "damaged" in w) for w in kept), kept
    assert any("no caption" in w for w in kept), kept
    assert queue.list()[0].warnings == kept


# -- init_lora -----------------------------------------------------------------------------------

def _lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _pair(key: str, rank: int, out: int, inp: int, up_rank: int | None = None) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": torch.randn(rank, inp), f"{key}.lora_up.weight": torch.randn(out, up_rank or rank),
            f"{key}.alpha": torch.tensor(float(rank))}


def _bad_init_loras(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    good = _pair(XATTN_KEY, 4, 320, 64)
    good_file = _lora(folder / "good.safetensors", good)
    blob = good_file.read_bytes()
    nan = dict(good)
    nan[f"{XATTN_KEY}.lora_up.weight"] = torch.full((320, 4), float("nan"))
    inf = dict(good)
    inf[f"{XATTN_KEY}.alpha"] = torch.tensor(float("inf"))
    cases = {
        "truncated": blob[: len(blob) - 100],
        "header_only": blob[:8],
        "zero_byte": b"",
        "pickle": pickle.dumps({"a": 1}),
        "text": b"this is not a LoRA\n" * 10,
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(data)
    torch.save(good, folder / "torch_pickle.pt")
    paths["torch_pickle"] = folder / "torch_pickle.pt"
    paths["nan"] = _lora(folder / "nan.safetensors", nan)
    paths["inf_alpha"] = _lora(folder / "inf.safetensors", inf)
    paths["rank_mismatch"] = _lora(folder / "mismatch.safetensors", _pair(XATTN_KEY, 4, 320, 64, up_rank=8))
    paths["zero_rank"] = _lora(folder / "zero.safetensors", _pair(XATTN_KEY, 0, 320, 64))
    paths["loha"] = _lora(folder / "loha.safetensors", {
        f"{XATTN_KEY}.hada_w1_a": torch.randn(320, 4), f"{XATTN_KEY}.hada_w1_b": torch.randn(4, 64),
        f"{XATTN_KEY}.hada_w2_a": torch.randn(320, 4), f"{XATTN_KEY}.hada_w2_b": torch.randn(4, 64),
        f"{XATTN_KEY}.alpha": torch.tensor(4.0)})
    paths["lokr"] = _lora(folder / "lokr.safetensors", {
        f"{XATTN_KEY}.lokr_w1": torch.randn(16, 8), f"{XATTN_KEY}.lokr_w2": torch.randn(20, 8)})
    paths["sdxl"] = _lora(folder / "sdxl.safetensors", _pair(
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 4, 640, 2048), {"ss_base_model_version": "sdxl_base_v1-0"})
    paths["sd2_width"] = _lora(folder / "sd2.safetensors", _pair(XATTN_KEY, 4, 320, 1024))
    paths["unknown_keys"] = _lora(folder / "unknown.safetensors", {"model.diffusion_model.x.weight": torch.randn(2, 2)})
    paths["empty"] = _lora(folder / "empty.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)})
    return paths


def test_sixteen_kinds_of_bad_init_lora_are_refused_when_queued_and_a_good_one_is_taken(tmp_path, queue):
    bad = _bad_init_loras(tmp_path / "loras_in")
    assert len(bad) == 16
    admission = _admission(tmp_path, model_arch="sd1", context_dim=64)
    for case, path in bad.items():
        message = _refused(queue, _job(tmp_path, init_lora=str(path)), tmp_path, "init_lora", admission)
        assert path.name in message, (case, message)
        assert "Traceback" not in message and len(message) < 400, (case, message)
    assert queue.count() == 0
    assert queue.add(_job(tmp_path, init_lora=str(tmp_path / "loras_in" / "good.safetensors")), tmp_path, admission)


def test_the_messages_for_bad_init_loras_name_the_cause(tmp_path, queue):
    bad = _bad_init_loras(tmp_path / "loras_in")
    admission = _admission(tmp_path, model_arch="sd1", context_dim=64)

    def why(case: str) -> str:
        return _refused(queue, _job(tmp_path, init_lora=str(bad[case])), tmp_path, "init_lora", admission)

    assert "NaN or infinite" in why("nan") and "NaN or infinite" in why("inf_alpha")
    assert "rank 0" in why("zero_rank")
    assert "rank 8" in why("rank_mismatch")
    assert "LoHa" in why("loha") and "LoKr" in why("lokr")
    assert "SDXL" in why("sdxl")
    assert "1024" in why("sd2_width") and "another architecture" in why("sd2_width")
    assert "pickle" in why("pickle") or "not a" in why("pickle")


# -- optimizer arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("args", ["weight_decay=abc", "bogus_kw=1", "betas=0.9"])
def test_optimizer_arguments_the_optimizer_rejects_are_refused_when_queued(tmp_path, queue, args):
    message = _refused(queue, _job(tmp_path, optimizer_args=args), tmp_path, "optimizer_args")
    assert args.split("=")[0] in message


def test_a_copier_pass_with_bad_optimizer_arguments_is_refused_naming_the_pass(tmp_path, queue):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    draw("red", "circle", "white", 64).save(a)
    draw("blue", "circle", "white", 64).save(b)
    job = jobs.job_from_dict({"mode": "copier", "name": "c", "image_a": [str(a)], "image_b": [str(b)],
                              "resolution": 64, "difference_pass": {"same_as_pass1": False,
                                                                   "optimizer_args": "bogus_kw=1"}})
    _refused(queue, job, tmp_path, "difference_pass.optimizer_args")
    assert queue.add(jobs.job_from_dict({"mode": "copier", "name": "c", "image_a": [str(a)], "image_b": [str(b)],
                                         "resolution": 64, "copier_pass": {"optimizer_args": "weight_decay=0.1"}}),
                     tmp_path, _admission(tmp_path))


# -- outputs: existing files, collisions, confinement --------------------------------------------

def test_an_existing_lora_is_refused_unless_overwrite(tmp_path, queue):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "t.safetensors").write_bytes(b"x")
    assert "already exists" in _refused(queue, _job(tmp_path), tmp_path, "name")
    assert queue.add(_job(tmp_path, overwrite=True), tmp_path, _admission(tmp_path))


def test_two_queued_jobs_never_write_the_same_file_whatever_overwrite_says(tmp_path, queue):
    first = queue.add(_job(tmp_path, overwrite=True), tmp_path, _admission(tmp_path))
    message = _refused(queue, _job(tmp_path, overwrite=True), tmp_path, "name")
    assert f"job {first}" in message
    _refused(queue, _job(tmp_path, name="T"), tmp_path, "name")          # the same file on Windows and macOS
    assert queue.add(_job(tmp_path, output_dir="v2"), tmp_path, _admission(tmp_path))   # another folder: fine
    with pytest.raises(jobs.JobError):                                     # within one sweep too: nothing queued
        queue.add_many([_job(tmp_path, name="s"), _job(tmp_path, name="s")], tmp_path, _admission(tmp_path))
    assert queue.count() == 2
    queue.finish(first, "done")                                            # a finished job no longer writes
    assert queue.add(_job(tmp_path, overwrite=True), tmp_path, _admission(tmp_path))


@pytest.mark.parametrize("output_dir", ["/etc", "../outside", "a/../../b", "~/x"])
def test_outputs_outside_the_output_folder_are_refused(tmp_path, output_dir):
    with pytest.raises(jobs.JobError) as e:
        _job(tmp_path, output_dir=output_dir)
    assert "output_dir" in e.value.errors


def test_a_link_leading_out_of_the_output_folder_is_refused(tmp_path, queue):
    (tmp_path / "loras").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "loras" / "out")
    assert "outside" in _refused(queue, _job(tmp_path, output_dir="out"), tmp_path, "output_dir")
    (tmp_path / "loras" / "inside").mkdir()
    os.symlink(tmp_path / "loras" / "inside", tmp_path / "loras" / "in_link")
    assert queue.add(_job(tmp_path, output_dir="in_link/v1"), tmp_path, _admission(tmp_path))


def test_the_worker_writes_below_its_output_root_and_refuses_a_link_made_after_queuing(tmp_path):
    from trainer.train.context import JobContext, job_outputs

    ctx = JobContext(output_dir=tmp_path / "loras", cache_dir=tmp_path / "cache")
    assert job_outputs(_job(tmp_path, output_dir="styles/v2"), ctx).final == tmp_path / "loras/styles/v2/t.safetensors"
    (tmp_path / "loras").mkdir()
    os.symlink("/tmp", tmp_path / "loras" / "late")
    with pytest.raises(jobs.JobError, match="outside"):
        job_outputs(_job(tmp_path, output_dir="late"), ctx)


# -- inputs inside the WebUI ---------------------------------------------------------------------

def test_inside_the_webui_inputs_must_lie_under_the_allowed_folders(tmp_path, queue):
    allowed = _admission(tmp_path, input_roots=(tmp_path / "models",))
    assert "outside the folders" in _refused(queue, _job(tmp_path), tmp_path, "dataset_dir", allowed)
    (tmp_path / "models").mkdir()
    # a way out by ".." is refused; a link inside the folder is taken (the owner made it: WebUI users link their
    # model folders, and the tab cannot make links)
    _refused(queue, _job(tmp_path, dataset_dir=str(tmp_path / "models" / ".." / "data")), tmp_path, "dataset_dir",
             allowed)
    os.symlink(tmp_path / "data", tmp_path / "models" / "data_link")
    assert queue.add(_job(tmp_path, name="linked", dataset_dir=str(tmp_path / "models" / "data_link")), tmp_path,
                     allowed)
    _dataset(tmp_path / "models" / "mine")
    assert queue.add(_job(tmp_path, dataset_dir=str(tmp_path / "models" / "mine")), tmp_path, allowed)


# -- the CLI, as typed ---------------------------------------------------------------------------

def test_queue_add_refuses_a_bad_job_naming_the_field_and_shows_warnings(tmp_path):
    _dataset(tmp_path / "data", captions=False)
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "LORAQ_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    bad = jobs.job_to_dict(_job(tmp_path, dataset_dir=str(tmp_path / "empty")))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    run = subprocess.run([sys.executable, "-m", "trainer", "queue", "add", "bad.json"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "dataset_dir" in run.stderr and "no images" in run.stderr and "Traceback" not in run.stderr
    (tmp_path / "ok.json").write_text(json.dumps(jobs.job_to_dict(_job(tmp_path))))
    run = subprocess.run([sys.executable, "-m", "trainer", "queue", "add", "ok.json"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "1", run.stderr
    assert "no caption" in run.stderr
    shown = subprocess.run([sys.executable, "-m", "trainer", "queue", "show", "1"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=120)
    assert "warning:" in shown.stdout and "no caption" in shown.stdout
    again = subprocess.run([sys.executable, "-m", "trainer", "queue", "add", "ok.json"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "job 1" in again.stderr


def test_a_copier_image_that_does_not_open_is_refused_when_queued(tmp_path, queue):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    draw("red", "circle", "white", 64).save(a)
    _truncated_png(b)
    job = jobs.job_from_dict({"mode": "copier", "name": "c", "image_a": [str(a)], "image_b": [str(b)], "resolution": 64})
    assert "b.png" in _refused(queue, job, tmp_path, "image_b")


@pytest.mark.parametrize("mode", ["copier", "addift"])
def test_pair_masks_that_would_be_empty_are_refused_when_queued_and_a_real_change_is_taken(tmp_path, queue, mode):
    a, b, clear, other_half = (tmp_path / f"{n}.png" for n in ("a", "b", "clear", "right"))
    draw("red", "circle", "white", 64).save(a)
    a_copy = tmp_path / "a_copy.png"
    draw("red", "circle", "white", 64).save(a_copy)
    draw("blue", "circle", "white", 64).save(b)
    transparent = draw("blue", "circle", "white", 64).convert("RGBA")
    transparent.putalpha(0)
    transparent.save(clear)
    left, right = (draw("blue", "circle", "white", 64).convert("RGBA") for _ in range(2))
    alpha_left = Image.new("L", (64, 64), 0)
    alpha_left.paste(255, (0, 0, 32, 64))
    alpha_right = Image.new("L", (64, 64), 0)
    alpha_right.paste(255, (32, 0, 64, 64))
    left.putalpha(alpha_left)
    right.putalpha(alpha_right)
    left.save(tmp_path / "left.png")
    right.save(other_half)

    def job(name, image_a, image_b, **kw):
        return jobs.job_from_dict({"mode": mode, "name": name, "image_a": [str(image_a)], "image_b": [str(image_b)],
                                   "resolution": 64, **kw})

    # A and B the same picture: the difference mask would be empty (it would fail at its turn, hours later)
    assert "differ nowhere" in _refused(queue, job("same", a, a_copy, difference_mask=True), tmp_path, "difference_mask")
    assert "fully transparent" in _refused(queue, job("clear", a, clear, use_mask=True), tmp_path, "image_b")
    assert "do not overlap" in _refused(queue, job("apart", tmp_path / "left.png", other_half, use_mask=True),
                                        tmp_path, "use_mask")
    # the same images without masks, and a real change with the difference mask, are queued
    queue.add(job("plain", a, a_copy), tmp_path, _admission(tmp_path))
    queue.add(job("changed", a, b, difference_mask=True), tmp_path, _admission(tmp_path))
    assert [r.name for r in queue.list()] == ["plain", "changed"]


def test_captions_that_are_not_utf8_are_refused_when_queued_naming_the_files(tmp_path, queue):
    (tmp_path / "data" / "0.txt").write_bytes("café, crème".encode("latin-1"))
    message = _refused(queue, _job(tmp_path), tmp_path, "dataset_dir")
    assert "0.txt" in message and "not UTF-8" in message
