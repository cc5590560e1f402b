"""The main job on a fresh machine: a small LoRA trained on the built-in demo model.

The dataset is drawn on the spot: red *squares* captioned "a red circle on a white background".
At strength 0 the model draws circles; as the LoRA's strength rises the circles turn into squares,
which the comparison grid (strength 0 / 0.5 / 1 x three seeds) shows at a glance.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from trainer import jobs
from trainer.cli.common import ProgressBar

PROMPT = "a red circle on a white background"


def draw_dataset(folder: Path, n: int = 6, seed: int = 0) -> Path:
    from trainer.models.demo.shapes import draw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        draw("red", "square", "white", 64, jitter=rng).save(folder / f"square_{i}.png")
        (folder / f"square_{i}.txt").write_text(PROMPT)
    return folder


def demo_job(dataset: Path, out: Path, steps: int) -> jobs.StandardJob:
    return jobs.StandardJob(
        name="demo_square", overwrite=True, model="demo", dataset_dir=str(dataset),
        resolution=64, min_bucket_reso=64, max_bucket_reso=128, network_dim=4, network_alpha=4.0,
        steps=steps, batch_size=2, lr=2e-3, lr_scheduler="cosine", lr_warmup_steps=min(10, steps - 1),
        save_precision="fp32", mixed_precision="no", seed=1)


def demo(out: Path, steps: int = 200) -> list[Path]:
    """Train, then write the LoRA, its loss log and the comparison grid into ``out``."""
    from trainer.lora.network import LoraNetwork, NetworkShape
    from trainer.models.diffusers_model import load_handle
    from trainer.models.handle import TargetOptions
    from trainer.sampling.grids import comparison_grid
    from trainer.train.context import JobContext
    from trainer.train.runner import run_job

    out = Path(out)
    dataset = draw_dataset(out / "dataset")
    handle = load_handle("demo", device="cpu")
    job = demo_job(dataset, out, steps)
    bar = ProgressBar()
    result = run_job(job, handle, JobContext(output_dir=out, cache_dir=out / "cache", events=bar))
    bar.close()
    network = LoraNetwork(handle.lora_targets(TargetOptions(job.target_set, job.train_text_encoder, tuple(job.blocks))), NetworkShape(job.network_dim, job.network_alpha))
    network.load_weights(result.final, handle.arch)
    grid = comparison_grid(handle, network, PROMPT, strengths=(0, 0.5, 1), seeds=(1, 2, 3), steps=30, cfg=5.0,
                           size=(64, 64))
    grid_path = out / "demo_square_grid.png"
    grid.save(grid_path)
    return [result.final, grid_path]


def run(args: argparse.Namespace) -> int:
    import torch

    # The demo model is tiny: one thread is as fast as several, and never fights other processes for cores.
    torch.set_num_threads(1)
    started = time.perf_counter()
    for path in demo(Path(args.out), steps=args.steps):
        print(path)
    print(f"demo finished in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="train a small LoRA on the built-in demo model, write LoRA + grid")
    parser.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.set_defaults(func=run)
