"""The morning view on the demo model: held-out losses that repeat exactly, the best checkpoint marked, one
sheet of checkpoints x strength x seed saved beside the LoRA, and the `morning` command as typed."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from trainer import jobs
from trainer.models.demo.shapes import draw
from trainer.models.diffusers_model import load_handle
from trainer.sampling import sheets
from trainer.train import heldout, morning
from trainer.train.context import JobContext
from trainer.train.runner import run_job

CAPTION = "a red circle on a white background"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A standard job on the demo model: red squares captioned as circles, a save at step 10 and the final at 20."""
    root = tmp_path_factory.mktemp("morning")
    (root / "data").mkdir()
    for i in range(2):
        draw("red", "square", "white", 64).save(root / "data" / f"{i}.png")
        (root / "data" / f"{i}.txt").write_text(CAPTION)
    handle = load_handle("demo")
    job = jobs.StandardJob(name="sq", dataset_dir=str(root / "data"), resolution=64, min_bucket_reso=64,
                           max_bucket_reso=64, network_dim=4, network_alpha=4.0, steps=20, batch_size=1, lr=4e-3,
                           save_every_n_steps=10, mixed_precision="no", save_precision="fp32",
                           sample_prompts=[CAPTION])
    ctx = JobContext(output_dir=root / "out", cache_dir=root / "cache", log=lambda m: None, work_dir=root / "work")
    run_job(job, handle, ctx)
    return root, handle, job


def test_held_out_loss_repeats_exactly_and_the_trained_lora_beats_the_base(trained):
    root, handle, job = trained
    files = morning.job_checkpoints(root / "out", "sq")
    assert [p.name for p in files] == ["sq-000010.safetensors", "sq.safetensors"]
    first = heldout.checkpoint_losses(job, handle, files, root / "cache")
    again = heldout.checkpoint_losses(job, handle, files, root / "cache")
    assert first == again, "fixed noise and timesteps: the same loss to the last bit"
    base = heldout.heldout_loss(handle, heldout.evaluation_set(job, handle, root / "cache"), None)
    assert first[-1] < 0.9 * base, (first, base)   # 20 steps on these two images lower their loss


def test_the_best_checkpoint_is_the_one_with_the_lowest_held_out_loss():
    assert heldout.best_checkpoint([0.30, 0.10, 0.20]) == 1
    assert heldout.best_checkpoint([math.nan, 0.4, 0.4]) == 1, "NaN never wins; the earliest of equals does"
    assert heldout.best_checkpoint([math.nan]) is None


def test_the_morning_sheet_holds_every_checkpoint_x_strength_x_seed_and_marks_the_best(trained):
    root, handle, job = trained
    sheet = morning.morning_sheet(job, handle, root / "out", root / "work", root / "cache",
                                  strengths=(0, 2), seeds=(1111, 2222))
    assert sheet.best == min(range(2), key=lambda i: sheet.losses[i])
    assert sheet.steps == [10, 20]
    assert sheet.path == root / "out" / "sq.morning.png" and sheet.path.is_file()
    saved = Image.open(sheet.path)
    # two grid blocks of 2 seeds (64 px cells shown at 128 px) under the loss chart, 2 strength columns
    assert saved.width >= 2 * 128 and saved.height >= 2 * 2 * 128 + 200, saved.size
    assert "best checkpoint" in sheet.summary()


def test_sheet_layout_puts_the_chart_and_table_above_the_grids():
    grids = [Image.new("RGB", (300, 100), c) for c in ("red", "blue")]
    chart = sheets.loss_chart([("loss", [1, 2, 3], [0.3, 0.2, 0.25])], [(2, 0.1), (3, 0.2)], best_step=2)
    table = sheets.text_block(sheets.heldout_lines(["a", "b"], [0.1, 0.2], 0), 200)
    out = sheets.morning_sheet("t", grids, chart, table)
    assert out.width >= chart.width + table.width and out.height >= chart.height + 200
    bottom = out.getpixel((10, out.height - 5))
    assert bottom == (0, 0, 255), "the last checkpoint's grid is at the bottom"
    assert "<- best" in sheets.heldout_lines(["a", "b"], [0.1, 0.2], 0)[1][0]


def test_the_comparison_grid_gives_one_block_per_checkpoint_and_follows_the_strengths(trained):
    from trainer.ui import results

    root, handle, job = trained
    files = [str(p) for p in morning.job_checkpoints(root / "out", "sq")]
    one = results.strength_grid(handle, files[-1:], [CAPTION], (0.0, 2.0), (1111,), steps=10, cfg=7.0, size=(64, 64))
    two = results.strength_grid(handle, files, [CAPTION], (0.0, 2.0), (1111,), steps=10, cfg=7.0, size=(64, 64))
    assert two.height > 2 * one.height - 20 and two.width == one.width
    cells = [one.crop((70 + c * 128, one.height - 128, 70 + (c + 1) * 128, one.height)) for c in range(2)]
    difference = sum(abs(a - b) for a, b in zip(cells[0].convert("L").getdata(), cells[1].convert("L").getdata()))
    assert difference / (128 * 128) > 5, "strength 2 draws something else than strength 0 (circles -> squares)"
    lcm = results.strength_grid(handle, files[-1:], [CAPTION], (0.0, 2.0), (1111,), sampler="lcm", steps=4, cfg=1.5,
                                size=(64, 64))
    assert lcm.size == one.size


def test_an_lcm_jobs_held_out_loss_is_its_consistency_loss_on_fixed_draws_and_repeats(trained, monkeypatch):
    from trainer.train.modes import lcm as lcm_mode

    monkeypatch.setattr(lcm_mode, "TEACHER_SAMPLING_STEPS", 4)   # speed only: the teacher's images from prompts
    root, handle, _ = trained
    job = jobs.LcmJob(name="l", prompts=[CAPTION, "a blue square on a black background"], num_generated_images=2,
                      resolution=64, steps=2, batch_size=1, network_dim=4, network_alpha=4.0, mixed_precision="no",
                      save_precision="fp32")
    ctx = JobContext(output_dir=root / "lcm_out", cache_dir=root / "cache", log=lambda m: None, work_dir=root / "lw")
    final = run_job(job, handle, ctx).final
    first = heldout.checkpoint_losses(job, handle, [final], root / "cache")
    again = heldout.checkpoint_losses(job, handle, [final], root / "cache")
    assert first == again and math.isfinite(first[0]) and first[0] > 0
    assert len(heldout.evaluation_set(job, handle, root / "cache").items) == 2


def test_a_sweep_group_is_the_jobs_queued_together_and_its_sheet_names_the_best_job(tmp_path):
    from trainer.queue.admission import Admission
    from trainer.queue.store import JobQueue

    (tmp_path / "d").mkdir()
    draw("red", "square", "white", 64).save(tmp_path / "d" / "a.png")
    queue = JobQueue(tmp_path / "q.sqlite")
    base = dict(dataset_dir=str(tmp_path / "d"), resolution=64, min_bucket_reso=64, max_bucket_reso=64)
    alone = queue.add(jobs.StandardJob(name="alone", **base), admission=Admission(tmp_path / "out"))
    sweep = queue.add_many(jobs.sweep_jobs(jobs.StandardJob(name="s", **base), {"lr": [1e-4, 2e-4]}),
                           admission=Admission(tmp_path / "out"))
    assert queue.group_of(sweep[1]) == sweep and queue.group_of(alone) == [alone]
    queue.close()
    made = [morning.MorningSheet(name, tmp_path / f"{name}.morning.png", Image.new("RGB", (200, 100), "white"),
                                 [tmp_path / f"{name}.safetensors"], [10], [loss], 0)
            for name, loss in (("s_lr1e-04", 0.2), ("s_lr2e-04", 0.1))]
    image, head = morning.group_sheet(made)
    assert "s_lr2e-04" in head and image.height >= 200
    path = morning.save_group_sheet(image, tmp_path, [s.job_name for s in made])
    assert path.name == "s_lr.sweep.morning.png" and path.is_file()


def test_an_addift_jobs_held_out_loss_repeats_and_falls_as_it_learns_the_pair(tmp_path):
    """ADDifT's own loss on its pair, both directions, fixed noise and timesteps: the same to the last bit when
    measured twice, lower at the end than at the first save, and the morning sheet shows it (no "not measured")."""
    draw("red", "circle", "white").save(tmp_path / "a.png")
    draw("blue", "circle", "white").save(tmp_path / "b.png")
    handle = load_handle("demo")
    job = jobs.AddiftJob(name="bluer", image_a=[str(tmp_path / "a.png")], image_b=[str(tmp_path / "b.png")],
                         prompt=CAPTION, resolution=64, steps=30, save_every_n_steps=5, mixed_precision="no",
                         save_precision="fp32")
    ctx = JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None,
                     work_dir=tmp_path / "work")
    run_job(job, handle, ctx)
    files = morning.job_checkpoints(tmp_path / "out", "bluer")
    first, final = files[0], files[-1]
    losses = heldout.checkpoint_losses(job, handle, [first, final], tmp_path / "cache")
    assert losses == heldout.checkpoint_losses(job, handle, [first, final], tmp_path / "cache")
    assert all(math.isfinite(v) and v > 0 for v in losses)
    print("ADDifT held-out loss at the first save and the end:", losses)
    assert losses[1] < 0.8 * losses[0], losses
    eval_set = heldout.evaluation_set(job, handle, tmp_path / "cache")
    assert eval_set.timesteps == heldout.spread_timesteps(job.timestep_min, job.timestep_max)
    assert min(eval_set.timesteps) >= job.timestep_min


def test_an_ileco_sliders_held_out_loss_is_measured_on_trajectories_it_never_trained_on_and_falls(tmp_path):
    handle = load_handle("demo")
    job = jobs.IlecoJob(name="slider", source_prompt=CAPTION, target_prompt="a blue circle on a white background",
                        resolution=64, steps=24, lr=2e-3, save_every_n_steps=6, denoise_steps=10, mixed_precision="no",
                        save_precision="fp32")
    ctx = JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None,
                     work_dir=tmp_path / "work")
    run_job(job, handle, ctx)
    files = morning.job_checkpoints(tmp_path / "out", "slider")
    losses = heldout.checkpoint_losses(job, handle, [files[0], files[-1]], tmp_path / "cache")
    assert losses == heldout.checkpoint_losses(job, handle, [files[0], files[-1]], tmp_path / "cache")
    print("iLECO held-out loss at the first save and the end:", losses)
    assert all(math.isfinite(v) and v > 0 for v in losses) and losses[1] < 0.8 * losses[0], losses
    assert heldout.EVAL_SEED != job.seed
