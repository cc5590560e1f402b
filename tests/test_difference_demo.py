"""Difference LoRAs on the demo model, as users rely on them: the strength semantics of ADDifT (0 is the base
model bit for bit, 1 moves to B, -1 away from B, monotone in between), and masks that keep a change local
(copier pass 2 and ADDifT: outside the mask the picture must change less than a tenth as much as inside).

The copier's own strength semantics are in tests/test_copier.py (its demo_run fixture)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import jobs
from trainer.lora.network import network_for_file
from trainer.models import demo
from trainer.models.demo import score
from trainer.models.demo.shapes import COLOURS, caption, draw
from trainer.models.diffusers_model import load_handle
from trainer.sampling.guided import sample
from trainer.train.context import JobContext
from trainer.train.runner import run_job

SEEDS = (11, 12)
SAMPLING = dict(steps=20, cfg=5.0, size=(64, 64))
STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def handle():
    if not demo.weights_available():
        pytest.fail("demo model weights are not built (python -m trainer.models.demo.train_demo)")
    return load_handle("demo", device="cpu")


def _train(handle, tmp: Path, job: jobs.Job):
    return run_job(job, handle, JobContext(tmp / "out", tmp / "cache", log=lambda m: None))


def _images_at(handle, lora: Path, prompt: str, strengths) -> dict[float, list[Image.Image]]:
    network = network_for_file(handle, lora)
    network.attach()
    try:
        out = {}
        for s in strengths:
            network.multiplier = s
            out[s] = sample(handle, [prompt] * len(SEEDS), SEEDS, **SAMPLING)
        return out
    finally:
        network.detach()


def brightness_of_background(img: Image.Image) -> float:
    """The median border pixel's mean channel, 0 (black) .. 1 (white)."""
    border = score._border(np.asarray(img.convert("RGB"), np.float32))
    return float(np.median(border, axis=0).mean() / 255.0)


# -- strength semantics: a gray background -> white, which has room both ways ----------------------

GRAY = caption("red", "circle", "gray")
#: Strength 1 brightens the background by at least this (measured +0.48 / +0.49 at 100 steps, seeds 11-12).
TOWARD_WHITE = 0.3
#: Strength -1 darkens it by at least this (measured ADDifT -0.051 / -0.021, copier -0.056 / -0.042: the demo
#: model's gray is a strong attractor, darker needs the prompt's help).
AWAY_FROM_WHITE = 0.01


def _brighter_job(mode: str, a: Path, b: Path) -> jobs.Job:
    if mode == "addift":   # the defaults otherwise
        return jobs.AddiftJob(name="brighter", image_a=[str(a)], image_b=[str(b)], prompt=GRAY, resolution=64,
                              mixed_precision="no")
    # the copier at the sizes of tests/test_copier.py's demo run (its defaults are 500 steps a pass)
    training = dict(batch_size=2, lr=1e-3, lr_scheduler="constant", seed=1)
    return jobs.CopierJob(name="brighter", image_a=[str(a)], image_b=[str(b)], prompt=GRAY, resolution=64,
                          mixed_precision="no", copier_pass=dict(network_dim=16, network_alpha=16.0, steps=100, **training),
                          difference_pass=dict(network_dim=8, network_alpha=8.0, same_as_pass1=False, steps=120,
                                               **training))


@pytest.mark.parametrize("mode", ["addift", "copier"])
def test_strength_0_is_the_base_model_1_moves_to_b_minus_1_away_and_monotone_between(handle, tmp_path, mode):
    """Measured, background brightness at -1 / 0 / +1: ADDifT 0.451 / 0.502 / 0.984 and 0.481 / 0.502 / 0.990
    (seeds 11, 12); the copier (train -1 too) 0.446 / 0.502 / 0.987 and 0.460 / 0.502 / 0.991 (without it
    0.502 / 0.502 / 0.992: -1 did nothing)."""
    draw("red", "circle", "gray").save(tmp_path / "a.png")
    draw("red", "circle", "white").save(tmp_path / "b.png")
    job = _brighter_job(mode, tmp_path / "a.png", tmp_path / "b.png")
    result = _train(handle, tmp_path, job)
    base = sample(handle, [GRAY] * len(SEEDS), SEEDS, **SAMPLING)
    images = _images_at(handle, result.final, GRAY, STRENGTHS)
    report = []
    for i, seed in enumerate(SEEDS):
        b = {s: brightness_of_background(images[s][i]) for s in STRENGTHS}
        report.append(f"seed {seed}: " + ", ".join(f"{s:+g}: {v:.3f}" for s, v in b.items()))
        assert list(images[0.0][i].getdata()) == list(base[i].getdata()), "strength 0 is the base model, bit for bit"
        assert b[1.0] >= b[0.0] + TOWARD_WHITE, report
        assert b[-1.0] <= b[0.0] - AWAY_FROM_WHITE, report
        values = [b[s] for s in STRENGTHS]
        assert all(x <= y + 1e-3 for x, y in zip(values, values[1:])), f"not monotone: {report}"
        for s in STRENGTHS:       # the circle stays a red circle: only the background moved
            assert (score.dominant_colour(images[s][i]), score.shape_of(images[s][i])) == ("red", "circle"), report
    print("background brightness by strength:", "; ".join(report))


# -- Multi-ADDifT: two pairs, red -> blue circles on white and on gray, each with its caption -------------

BLUE = COLOURS["blue"]


def test_multi_addift_moves_both_pairs_to_b_at_1_away_at_minus_1_and_monotone(handle, tmp_path):
    """Measured (colour distance to blue at -1 / 0 / 0.5 / 1, seeds 11-12, 200 steps): white 0.679 / 0.604 /
    0.563 / 0.084 and 0.706 / 0.609 / 0.560 / 0.068; gray 0.646 / 0.600 / 0.588 / 0.034 and 0.636 / 0.596 /
    0.591 / 0.032. At -1 the circle turns orange: away from blue."""
    files = {}
    for bg in ("white", "gray"):
        draw("red", "circle", bg).save(tmp_path / f"{bg}_a.png")
        draw("blue", "circle", bg).save(tmp_path / f"{bg}_b.png")
        files[bg] = (str(tmp_path / f"{bg}_a.png"), str(tmp_path / f"{bg}_b.png"))
    prompts = [caption("red", "circle", bg) for bg in files]
    job = jobs.AddiftJob(name="bluer", image_a=[a for a, _ in files.values()], image_b=[b for _, b in files.values()],
                         pair_prompts=prompts, resolution=64, mixed_precision="no", steps=200)
    result = _train(handle, tmp_path, job)
    batch = [p for p in prompts for _ in SEEDS]
    seeds = list(SEEDS) * len(prompts)
    base = sample(handle, batch, seeds, **SAMPLING)
    network = network_for_file(handle, result.final)
    network.attach()
    try:
        images = {}
        for s in (-1.0, 0.0, 0.5, 1.0):
            network.multiplier = s
            images[s] = sample(handle, batch, seeds, **SAMPLING)
    finally:
        network.detach()
    report = []
    for i, (prompt, seed) in enumerate(zip(batch, seeds)):
        to_blue = {s: score.colour_distance(images[s][i], BLUE) for s in images}
        report.append(f"{prompt.split()[-2]} seed {seed}: " + ", ".join(f"{s:+g}: {d:.3f}" for s, d in to_blue.items()))
        assert list(images[0.0][i].getdata()) == list(base[i].getdata()), "strength 0 is the base model, bit for bit"
        assert to_blue[1.0] <= to_blue[0.0] - 0.25, report
        assert to_blue[-1.0] >= to_blue[0.0] + 0.02, report
        assert to_blue[-1.0] >= to_blue[0.0] >= to_blue[0.5] - 1e-3 >= to_blue[1.0] - 1e-3, f"not monotone: {report}"
    print("distance to blue by strength:", "; ".join(report))


# -- masks that keep a change local: only the left half of the circle turns blue -------------------

RED_CIRCLE = caption("red", "circle", "white")
#: Outside the mask the picture must change less than this fraction of the change inside (issue #19.4).
LOCAL = 0.10


def half_blue_pair(folder: Path, alpha: bool) -> tuple[str, str]:
    """A: the red circle. B: its left half blue; with ``alpha`` B is opaque on the left half only."""
    folder.mkdir(parents=True, exist_ok=True)
    a = draw("red", "circle", "white")
    blue = draw("blue", "circle", "white")
    b = a.copy()
    b.paste(blue.crop((0, 0, 32, 64)), (0, 0))
    if alpha:
        b = b.convert("RGBA")
        mask = Image.new("L", b.size, 0)
        mask.paste(255, (0, 0, 32, 64))
        b.putalpha(mask)
    a.save(folder / "a.png")
    b.save(folder / "b.png")
    return str(folder / "a.png"), str(folder / "b.png")


def blueness(img: Image.Image) -> np.ndarray:
    """Per pixel [H, W]: how far its colour has gone from the demo red toward the demo blue (0 red, 1 blue)."""
    red, blue = (np.asarray(COLOURS[c], np.float32) for c in ("red", "blue"))
    return (np.asarray(img.convert("RGB"), np.float32) - red) @ (blue - red) / float((blue - red) @ (blue - red))


def change_by_region(base: list[Image.Image], changed: list[Image.Image], inside: slice, outside: slice
                     ) -> tuple[float, float]:
    """How much bluer the circle became in the columns ``inside`` and ``outside``: the change of the mean
    blueness over the pixels inside the circle in both pictures (a pixel the outline moved over would count
    white as half blue), as its absolute value, averaged over the seeds. The issue's measure: "the unmasked
    right half came out 0.90x as blue as the masked left half"."""
    inner, outer = [], []
    for b, c in zip(base, changed):
        circle = score.foreground_mask(b) & score.foreground_mask(c)     # colour, not the outline's shift
        d = blueness(c) - blueness(b)
        inner.append(abs(d[:, inside][circle[:, inside]].mean()))
        outer.append(abs(d[:, outside][circle[:, outside]].mean()))
    return float(np.mean(inner)), float(np.mean(outer))


def _local_change(handle, lora: Path, inside: slice, outside: slice) -> tuple[float, float]:
    images = _images_at(handle, lora, RED_CIRCLE, [0.0, 1.0])
    return change_by_region(images[0.0], images[1.0], inside, outside)


def _copier_job(a, b, pass_2_steps=120, pass_2_lr=1e-3, pass_2_rank=8, **kw) -> jobs.CopierJob:
    training = dict(batch_size=2, lr=1e-3, lr_scheduler="constant", seed=1)
    return jobs.CopierJob(name="half", image_a=[a], image_b=[b], prompt=RED_CIRCLE, resolution=64,
                          mixed_precision="no", copier_pass=dict(network_dim=16, network_alpha=16.0, steps=100, **training),
                          difference_pass=dict(network_dim=pass_2_rank, network_alpha=float(pass_2_rank), same_as_pass1=False, steps=pass_2_steps,
                                               **{**training, "lr": pass_2_lr}), **kw)


@pytest.mark.parametrize("mode, mask", [("addift", "alpha"), ("addift", "difference"), ("copier", "alpha")])
def test_outside_the_mask_the_picture_changes_less_than_a_tenth_as_much_as_inside(handle, tmp_path, mode, mask):
    """Measured (inside / outside, seeds 11-12): ADDifT at 200 steps alpha 0.327 / 0.008 (2.5%), difference
    0.321 / 0.011 (3.4%) (at its default 100 steps about 11%); the copier with pass 2 at rank 4, lr 3e-3, 240
    steps, min-SNR 5: 0.406 / 0.024 (6.0%); at 120 steps and lr 1e-3 its left half hardly changes. Before
    outside_mask keep (ignore) the copier's outside moved about 0.6x as much as the inside (the issue: 0.90x)."""
    a, b = half_blue_pair(tmp_path / "pair", alpha=mask == "alpha")
    masks = dict(use_mask=True) if mask == "alpha" else dict(difference_mask=True, difference_dilate=4)
    if mode == "copier":
        job = _copier_job(a, b, pass_2_steps=240, pass_2_lr=3e-3, pass_2_rank=4, min_snr_gamma=5.0, **masks)
    else:
        job = jobs.AddiftJob(name="half", image_a=[a], image_b=[b], prompt=RED_CIRCLE, resolution=64,
                             mixed_precision="no", steps=200, **masks)
    result = _train(handle, tmp_path, job)
    # the region outside the mask starts where the mask (widened by the dilation) ends
    edge = 32 + (0 if mask == "alpha" else 4)
    inside, outside = _local_change(handle, result.final, slice(0, 32), slice(edge, 64))
    print(f"{mode} with the {mask} mask: change inside {inside:.4f}, outside {outside:.4f} ({outside / inside:.1%})")
    assert inside >= 0.25, f"the left half hardly turned blue ({inside:.4f})"
    assert outside < LOCAL * inside, f"outside the mask {outside:.4f} vs inside {inside:.4f}"
