"""Does an iLECO slider from two prompts move the demo model's red circle to blue? Blue minus red of the circle
(-1 pure red, +1 pure blue; ``trainer.models.demo.score.blue_minus_red``) at LoRA strengths -1 .. 1 for three
sampling seeds, for a few settings of the job, with each run's training time (one torch thread) and what the
demo scorer reads (colour / shape / background) at -1 and +1.

    python bench/ileco_demo.py [--grid docs/ileco_grid.png] [--only NAME ...]

The source prompt is "a red circle on a white background", the target "a blue circle on a white background";
resolution 64; sampling 20 DDIM steps at CFG 5, seeds 11-13. Recorded in bench/README.md (## iLECO). With
--grid, the strength x seed grid of the first setting is written there (the picture of docs/ileco.md).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import jobs  # noqa: E402
from trainer.lora.network import network_for_file  # noqa: E402
from trainer.models.demo import score  # noqa: E402
from trainer.models.demo.shapes import caption  # noqa: E402
from trainer.models.diffusers_model import load_handle  # noqa: E402
from trainer.sampling.grids import grid_image, strength_grid_images  # noqa: E402
from trainer.train.context import JobContext  # noqa: E402
from trainer.train.runner import run_job  # noqa: E402

SOURCE, TARGET = caption("red", "circle", "white"), caption("blue", "circle", "white")
STRENGTHS = (-1.0, -0.5, 0.0, 0.5, 1.0)
SEEDS = (11, 12, 13)
SAMPLING = dict(steps=20, cfg=5.0, size=(64, 64))

#: name -> job fields beyond the prompts and resolution (the first is the test's setting and the grid's)
SETTINGS: dict[str, dict] = {
    "test: 60 steps, lr 2e-3": dict(steps=60, lr=2e-3),
    "60 steps, lr 2e-3, +1 only": dict(steps=60, lr=2e-3, both_directions=False),
    "60 steps, lr 2e-3, scale 2": dict(steps=60, lr=2e-3, slider_scale=2.0),
    "60 steps, lr 2e-3, denoise 1 (pure noise)": dict(steps=60, lr=2e-3, denoise_steps=1),
    "defaults: 300 steps, lr 5e-4": dict(),
}


def measure(handle, name: str, fields: dict, work: Path):
    job = jobs.IlecoJob(name="slider", source_prompt=SOURCE, target_prompt=TARGET, resolution=64,
                        mixed_precision="no", seed=1, overwrite=True, **fields)
    started = time.process_time()
    result = run_job(job, handle, JobContext(work / "out", work / "cache", log=lambda m: None))
    seconds = time.process_time() - started
    network = network_for_file(handle, result.final)
    network.requires_grad_(False)
    rows = strength_grid_images(handle, network, SOURCE, STRENGTHS, SEEDS, **SAMPLING)
    values = [[score.blue_minus_red(img) for img in row] for row in rows]
    reads = {s: sorted({"/".join((score.dominant_colour(r[i]), score.shape_of(r[i]), score.background_colour(r[i])))
                        for r in rows}) for i, s in enumerate(STRENGTHS) if s in (-1.0, 1.0)}
    monotone = all(v == sorted(v) for v in values)
    return job, seconds, values, reads, monotone, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=Path, help="write the first setting's strength x seed grid here")
    parser.add_argument("--only", nargs="*", help="names of SETTINGS to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    handle = load_handle("demo", device="cpu")
    names = args.only or list(SETTINGS)
    print("| setting | train CPU s | " + " | ".join(f"{s:+g}" for s in STRENGTHS) + " | monotone per seed | "
          "read at -1 | read at +1 |")
    print("|---|---|" + "---|" * len(STRENGTHS) + "---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n, name in enumerate(names):
            job, seconds, values, reads, monotone, rows = measure(handle, name, SETTINGS[name], Path(tmp) / str(n))
            means = [sum(v[i] for v in values) / len(values) for i in range(len(STRENGTHS))]
            cells = [f"{m:+.3f} ({' / '.join(f'{v[i]:+.2f}' for v in values)})" for i, m in enumerate(means)]
            print(f"| {name} | {seconds:.1f} | " + " | ".join(cells) + f" | {'yes' if monotone else 'no'} | "
                  f"{', '.join(reads[-1.0])} | {', '.join(reads[1.0])} |", flush=True)
            if args.grid and n == 0:
                title = f"iLECO '{SOURCE}' -> '{TARGET}' ({name})"
                grid_image(rows, [f"strength {s:g}" for s in STRENGTHS], [f"seed {s}" for s in SEEDS],
                           title).save(args.grid)


if __name__ == "__main__":
    main()
