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
from trainer.models.demo.shapes import caption, draw
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
#: Strength -1 darkens it by at least this (measured -0.051 / -0.021: the demo model's gray is a strong
#: attractor, darker needs the prompt's help; the copier at -1 moves it by 0.000 / -0.001, see test_copier).
AWAY_FROM_WHITE = 0.01


def test_addift_strength_0_is_the_base_model_1_moves_to_b_minus_1_away_and_monotone_between(handle, tmp_path):
    draw("red", "circle", "gray").save(tmp_path / "a.png")
    draw("red", "circle", "white").save(tmp_path / "b.png")
    job = jobs.AddiftJob(name="brighter", image_a=[str(tmp_path / "a.png")], image_b=[str(tmp_path / "b.png")],
                         prompt=GRAY, resolution=64, mixed_precision="no")       # the defaults otherwise
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
