"""ADDifT (one pair) and Multi-ADDifT (several): the job on a tiny SD1 model (file, resume, previews, early
errors, the queue's refusals) and the pure pieces (timestep strata, roles, the difference region)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from tiny import sd1_pipeline
from trainer import jobs
from trainer.lora import files as lora_files
from trainer.models.demo.shapes import draw
from trainer.models.diffusers_model import DiffusersHandle
from trainer.queue.admission import Admission
from trainer.queue.store import JobQueue
from trainer.train.context import JobContext
from trainer.train.loop import Stopped
from trainer.train.modes import addift, copier
from trainer.train.runner import run_job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return DiffusersHandle(sd1_pipeline(tmp_path_factory.mktemp("model")))


def _pair(folder: Path, a=("red", "circle", "white"), b=("blue", "circle", "white"), size=32) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    draw(*a, size=size).save(folder / "a.png")
    draw(*b, size=size).save(folder / "b.png")
    return str(folder / "a.png"), str(folder / "b.png")


def _job(tmp_path: Path, **kw) -> jobs.AddiftJob:
    a, b = _pair(tmp_path / "pair")
    base = dict(name="slider", image_a=[a], image_b=[b], prompt="a red circle", resolution=64, mixed_precision="no",
                steps=4, batch_size=2, network_dim=2, network_alpha=2.0, save_precision="fp32")
    base.update(kw)
    return jobs.AddiftJob(**base)


def _ctx(tmp_path: Path, **kw) -> JobContext:
    return JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None, **kw)


# -- pure pieces ---------------------------------------------------------------------------------

def test_timesteps_of_successive_rows_come_from_successive_tenths_of_the_range():
    g = torch.Generator().manual_seed(0)
    t = addift.stratified_timesteps(20, 500, 1000, first=3, generator=g)
    assert t.dtype == torch.long and int(t.min()) >= 500 and int(t.max()) <= 999
    strata = ((t - 500) // 50).tolist()
    assert strata == [(3 + i) % 10 for i in range(20)]


def test_pairs_take_turns_and_the_direction_swaps_after_each_round():
    assert [addift.step_roles(s, 2) for s in range(6)] == [(0, True), (1, True), (0, False), (1, False),
                                                          (0, True), (1, True)]
    assert [addift.step_roles(s, 1)[1] for s in range(4)] == [True, False, True, False]


def test_the_difference_region_is_the_pixels_that_differ_widened_by_the_dilation():
    a = torch.zeros(3, 16, 16)
    b = a.clone()
    b[:, 8, 8] = 4.0                         # 12 in sum: above 10
    b[:, 2, 2] = 3.0                         # 9: below
    region = copier.difference_region(a, b, threshold=10, dilate=0)
    assert region.sum() == 1 and region[8, 8] == 1
    wide = copier.difference_region(a, b, threshold=10, dilate=2)
    assert wide.sum() == 25 and wide[6:11, 6:11].min() == 1


# -- the job on a tiny SD1 model ----------------------------------------------------------------

def test_an_addift_job_saves_one_lora_of_its_rank_with_its_mode_and_pairs(tmp_path, sd1):
    events = []
    result = run_job(_job(tmp_path), sd1, _ctx(tmp_path, events=events.append))
    assert [e.step for e in events] == [1, 2, 3, 4]
    tensors = load_file(str(result.final))
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {2}
    meta = lora_files.read_metadata(result.final)
    assert meta["lq_mode"] == "addift" and meta["ss_network_dim"] == "2" and meta["ss_max_train_steps"] == "4"
    assert len(json.loads(meta["lq_addift_pairs"])) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["slider.safetensors"]
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.losses[0] > 0


def test_several_pairs_train_one_lora_multi_addift(tmp_path, sd1):
    a1, b1 = _pair(tmp_path / "front")
    a2, b2 = _pair(tmp_path / "side", a=("red", "square", "white"), b=("blue", "square", "white"), size=48)
    result = run_job(_job(tmp_path, image_a=[a1, a2], image_b=[b1, b2], pair_prompts=["a red circle", "a red square"]),
                     sd1, _ctx(tmp_path))
    pairs = json.loads(lora_files.read_metadata(result.final)["lq_addift_pairs"])
    assert len(pairs) == 2 and len({p[0] for p in pairs}) == 2


def test_a_cancelled_addift_job_resumes_and_ends_as_if_uninterrupted(tmp_path, sd1):
    full = run_job(_job(tmp_path, name="full", difference_mask=True), sd1, _ctx(tmp_path))
    ctx = _ctx(tmp_path)

    def cancel_at_2(p):
        if p.step == 2:
            ctx.control.cancel = True

    ctx.events = cancel_at_2
    cut = _job(tmp_path, name="cut", save_every_n_steps=2, difference_mask=True)
    with pytest.raises(Stopped):
        run_job(cut, sd1, ctx)
    steps = []
    resumed = run_job(cut, sd1, _ctx(tmp_path, resume=True, events=lambda p: steps.append(p.step)))
    assert steps == [3, 4]
    a, b = load_file(str(full.final)), load_file(str(resumed.final))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"the resumed LoRA differs by {worst}"


def test_an_addift_job_renders_previews_of_its_lora(tmp_path, sd1):
    run_job(_job(tmp_path, steps=2, sample_prompts=["a red circle"], sample_every_n_steps=1), sd1, _ctx(tmp_path))
    assert (tmp_path / "out" / "slider.preview.png").is_file()
    assert [p.name for p in sorted((tmp_path / "work" / "slider").glob("*.png"))] == ["slider-000001.preview.png"]


# -- refused early, naming the field -------------------------------------------------------------

def _fails_before_training(tmp_path, handle, job, field: str, *words: str) -> None:
    with pytest.raises(jobs.JobError) as caught:
        run_job(job, handle, _ctx(tmp_path))
    assert caught.value.field == field, caught.value.message
    for word in words:
        assert word in caught.value.message, caught.value.message
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir()), "nothing was trained or written"


def test_a_pair_of_different_sizes_is_refused(tmp_path, sd1):
    job = _job(tmp_path)
    draw("blue", "circle", "white", size=48).save(job.image_b[0])
    _fails_before_training(tmp_path, sd1, job, "image_b", "48x48", "32x32", "same size")


def test_identical_images_with_the_difference_mask_are_refused(tmp_path, sd1):
    job = _job(tmp_path, difference_mask=True)
    draw("red", "circle", "white", size=32).save(job.image_b[0])
    _fails_before_training(tmp_path, sd1, job, "difference_mask", "differ nowhere")


def test_the_job_needs_both_images_and_one_b_for_each_a(tmp_path):
    with pytest.raises(jobs.JobError) as caught:
        jobs.AddiftJob(image_a=["a.png", "b.png"], image_b=["c.png"])
    assert caught.value.field == "image_b" and "2 image(s) A but 1 image(s) B" in caught.value.message
    with pytest.raises(jobs.JobError) as caught:
        jobs.AddiftJob(image_a=["a.png"], image_b=["c.png"], pair_prompts=["one", "two"])
    assert caught.value.field == "pair_prompts" and "2 pair prompt(s) for 1 pair(s)" in caught.value.message
    problems = jobs.validate_paths(jobs.AddiftJob(), root=tmp_path)
    assert problems == {"image_a": "image A is required", "image_b": "image B is required"}


def test_the_queue_refuses_an_addift_job_with_a_damaged_image_naming_the_field(tmp_path):
    a, b = _pair(tmp_path / "pair")
    Path(b).write_bytes(b"not a png")
    queue = JobQueue(tmp_path / "queue.sqlite")
    with pytest.raises(jobs.JobError) as caught:
        queue.add(jobs.job_from_dict({"mode": "addift", "name": "s", "image_a": [a], "image_b": [b]}), tmp_path,
                  Admission(tmp_path / "loras"))
    assert caught.value.field == "image_b", caught.value.message


def test_the_template_command_prints_a_complete_addift_job():
    out = subprocess.run([sys.executable, "-m", "trainer", "template", "addift"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    job = json.loads(out)
    assert job["mode"] == "addift" and job["timestep_min"] == 500 and job["network_dim"] == 4
    assert jobs.job_from_dict(job) == jobs.AddiftJob()


# -- masks -------------------------------------------------------------------------------------------

def test_outside_a_kept_mask_the_target_is_the_unchanged_prediction(sd1):
    from trainer.diffusion.losses import NoiseSettings
    from trainer.train.loop import diffusion_loss
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = sd1.encode_prompts(["a red circle"], (64, 64)).repeat(2)
    same = lambda noisy, t, c: sd1.predict(noisy, t, c)          # the model itself: nothing to change
    loss = lambda mask, unchanged=None: float(diffusion_loss(sd1, x0, cond, NoiseSettings(), torch.Generator().manual_seed(1),
                                                             mask=mask, unchanged=unchanged))
    with torch.no_grad():
        assert loss(torch.zeros(2, 1, 8, 8), same) == 0.0, "all outside: the target is the model's own output"
        assert loss(torch.ones(2, 1, 8, 8), same) == pytest.approx(loss(None)), "all inside: the usual loss"
        half = torch.zeros(2, 1, 8, 8)
        half[..., :4] = 1
        assert 0 < loss(half, same) < loss(half), "kept outside: the loss there is zero, not the noise's"


def test_with_masks_from_alpha_the_transparent_pixels_of_b_are_a_not_white(tmp_path):
    from PIL import Image
    a_path, _ = _pair(tmp_path, size=64)
    b = draw("blue", "circle", "white").convert("RGBA")
    alpha = Image.new("L", (64, 64), 0)
    alpha.paste(255, (0, 0, 32, 64))
    b.putalpha(alpha)
    b.save(tmp_path / "b_alpha.png")
    item_a = copier._image_item(a_path, "image_a")
    item_b = copier._image_item(str(tmp_path / "b_alpha.png"), "image_b")
    trained = copier.over_the_other(item_b, item_a, (64, 64), tmp_path / "pairs")
    pixels = torch.tensor(list(Image.open(trained.path).getdata())).view(64, 64, 3)
    a_pixels = torch.tensor(list(Image.open(a_path).getdata())).view(64, 64, 3)
    blue_pixels = torch.tensor(list(draw("blue", "circle", "white").getdata())).view(64, 64, 3)
    assert torch.equal(pixels[:, 32:], a_pixels[:, 32:]) and torch.equal(pixels[:, :32], blue_pixels[:, :32])
    assert copier.over_the_other(item_a, item_b, (64, 64), tmp_path / "pairs") is item_a, "A has no alpha"
