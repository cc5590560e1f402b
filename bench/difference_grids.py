"""The pictures of docs/difference-modes.md: one strength x seed grid per difference mode, on the demo model.

    python bench/difference_grids.py [--out docs] [--only difference_multi_addift,...]

copier (red circle -> blue circle, as tests/test_copier.py trains it), ADDifT (the same pair, its defaults),
Multi-ADDifT (two pairs, red -> blue circles on white and on gray, each with its caption, 200 steps, shown
on gray) and ADDifT with a mask (only the left half of the circle, B's alpha). One CPU
thread; about a minute and a half.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import jobs  # noqa: E402
from trainer.models.demo.shapes import caption, draw  # noqa: E402
from trainer.models.diffusers_model import load_handle  # noqa: E402
from trainer.sampling.grids import lora_file_grid  # noqa: E402
from trainer.train.context import JobContext  # noqa: E402
from trainer.train.runner import run_job  # noqa: E402

STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0)
SEEDS = (1, 2, 3)


def pair(folder: Path, name: str, a, b) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    draw(*a).save(folder / f"{name}_a.png")
    draw(*b).save(folder / f"{name}_b.png")
    return str(folder / f"{name}_a.png"), str(folder / f"{name}_b.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    parser.add_argument("--only", default="", help="comma-separated picture names (e.g. difference_addift)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    handle = load_handle("demo", device="cpu")
    tmp = Path(tempfile.mkdtemp(prefix="difference_grids_"))
    ctx = JobContext(tmp / "out", tmp / "cache", log=lambda m: None)
    red = caption("red", "circle", "white")
    a, b = pair(tmp, "white", ("red", "circle", "white"), ("blue", "circle", "white"))
    a_gray, b_gray = pair(tmp, "gray", ("red", "circle", "gray"), ("blue", "circle", "gray"))
    half = draw("red", "circle", "white").convert("RGBA")
    half.paste(draw("blue", "circle", "white").crop((0, 0, 32, 64)), (0, 0))
    alpha = Image.new("L", (64, 64), 0)
    alpha.paste(255, (0, 0, 32, 64))
    half.putalpha(alpha)
    half.save(tmp / "half_b.png")
    training = dict(batch_size=2, lr=1e-3, lr_scheduler="constant", seed=1)
    cases = [
        ("difference_copier", red, jobs.CopierJob(
            name="copier", image_a=[a], image_b=[b], prompt=red, resolution=64, mixed_precision="no",
            copier_pass=dict(network_dim=16, network_alpha=16.0, steps=100, **training),
            difference_pass=dict(network_dim=8, network_alpha=8.0, same_as_pass1=False, steps=120, **training))),
        ("difference_addift", red, jobs.AddiftJob(
            name="addift", image_a=[a], image_b=[b], prompt=red, resolution=64, mixed_precision="no")),
        ("difference_multi_addift", caption("red", "circle", "gray"), jobs.AddiftJob(
            name="multi_addift", image_a=[a, a_gray], image_b=[b, b_gray], resolution=64, mixed_precision="no",
            pair_prompts=[red, caption("red", "circle", "gray")], steps=200)),
        ("difference_addift_mask", red, jobs.AddiftJob(
            name="addift_mask", image_a=[a], image_b=[str(tmp / "half_b.png")], prompt=red, resolution=64,
            mixed_precision="no", use_mask=True, steps=200)),
    ]
    for name, prompt, job in cases:
        if args.only and name not in args.only.split(","):
            continue
        result = run_job(job, handle, ctx)
        grid = lora_file_grid(handle, result.final, prompt, STRENGTHS, SEEDS, steps=30, cfg=5.0, size=(64, 64))
        grid.save(out / f"{name}.png", optimize=True)
        print(f"wrote {out / name}.png ({(out / f'{name}.png').stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
