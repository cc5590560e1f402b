"""Does a default LCM job distil the demo model? The student's n-step LCM samples (CFG 1) against the teacher's
50-step guided DDIM samples (WebUI CFG = w + 1) from the same starting noise, as pixel MSE (0-255 scale), next
to the base model's n-step LCM samples; and how many prompts the demo scorer reads right (colour, shape and
background).

    python bench/lcm_demo.py --steps 600 --every 200 --curve 1,2,4,8 [--set key=value ...]

Every job field not given with --set is the LCM default (only the step count, the prompts and resolution 64
are set). Results are printed as one line per checkpoint; recorded in bench/README.md (## LCM).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import jobs  # noqa: E402
from trainer.models.demo import score  # noqa: E402
from trainer.models.demo.shapes import all_combinations, caption  # noqa: E402
from trainer.sampling import guided  # noqa: E402
from trainer.sampling import lcm as lcm_sampling  # noqa: E402

SEED_SETS = (range(5000, 5045), range(6000, 6045))   # never the teacher's training seeds (job seed 42 + i)


def reference_w(job) -> float:
    """The teacher's guidance the student is compared with: the middle of the drawn range (w, not CFG)."""
    w_max = job.guidance_scale_max if job.guidance_scale_max > job.guidance_scale else job.guidance_scale
    return (job.guidance_scale + w_max) / 2


class DemoCheck:
    """The 45 demo prompts x the seed sets: the teacher's references computed once, any LoRA state measured."""

    def __init__(self, handle, cfg: float, seed_sets=SEED_SETS):
        self.handle, self.cfg = handle, cfg
        self.combos = all_combinations()
        self.prompts = [caption(*c) for c in self.combos]
        size = (64, 64)
        with torch.no_grad():
            self.cond = handle.encode_prompts(self.prompts, size)
            self.uncond = handle.uncond(len(self.prompts), size)
            self.noises = [guided.seeded_noise(list(s), (4, 16, 16), "cpu") for s in seed_sets]
            # safetensors, like every file the project writes: no pickle anywhere
            saved = Path(tempfile.gettempdir()) / f"lcm_demo_refs_cfg{cfg:g}_{seed_sets[0].start}.safetensors"
            if saved.is_file():
                refs = load_file(str(saved))
                count = len(self.noises)
                self.teacher = [refs[f"teacher_{i}"] for i in range(count)]
                self.teacher_30 = [refs[f"teacher_30_{i}"] for i in range(count)]
            else:
                self.teacher = [self.pixels(guided.ddim_latents(handle, n, self.cond, self.uncond, steps=50, cfg=cfg))
                                for n in self.noises]
                self.teacher_30 = [self.pixels(guided.ddim_latents(handle, n, self.cond, self.uncond, steps=30,
                                                                   cfg=cfg)) for n in self.noises]
                save_file({**{f"teacher_{i}": t.contiguous() for i, t in enumerate(self.teacher)},
                           **{f"teacher_30_{i}": t.contiguous() for i, t in enumerate(self.teacher_30)}}, str(saved))

    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ((self.handle.decode_latents(latents).clamp(-1, 1) + 1) * 127.5).float()

    def lcm(self, steps: int, sampler: str = "lcm") -> list[torch.Tensor]:
        """n-step samples at CFG 1: the LCM sampler, or ("alternative") the LCM alternative with every step
        re-noised by the noise it removed (euler_steps = steps: deterministic, no fresh noise)."""
        if sampler == "alternative":
            return [self.pixels(lcm_sampling.lcm_latents(self.handle, n, self.cond, steps=steps,
                                                         sampler="lcm_alternative", euler_steps=steps))
                    for n in self.noises]
        return [self.pixels(lcm_sampling.lcm_latents(self.handle, n, self.cond, steps=steps)) for n in self.noises]

    def mse(self, images: list[torch.Tensor]) -> float:
        return float(sum(((a - b) ** 2).mean() for a, b in zip(images, self.teacher)) / len(images))

    def right(self, images: list[torch.Tensor]) -> int:
        """Images the scorer reads as their prompt's colour, shape and background (of 45 x seed sets)."""
        n = 0
        for batch in images:
            for combo, p in zip(self.combos, batch):
                img = guided.to_pil(p / 127.5 - 1)
                n += (score.dominant_colour(img), score.shape_of(img), score.background_colour(img)) == combo
        return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=0, help="also measure the checkpoints every N steps")
    parser.add_argument("--curve", default="4", help="LCM step counts to measure, e.g. 1,2,4,8")
    parser.add_argument("--set", action="append", default=[], help="job field=value (JSON value) beyond the defaults")
    parser.add_argument("--ref-w", type=float, default=None, help="teacher reference w (default: middle of the range)")
    parser.add_argument("--sampler", default="lcm",
                        help="lcm (the bar's) and/or alternative (the deterministic LCM alternative), comma-separated; "
                             "student and base sample alike")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from trainer.models.diffusers_model import load_handle
    from trainer.train.context import JobContext
    from trainer.train.plan import build_network
    from trainer.train.runner import run_job

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    prompts = [caption(*c) for c in all_combinations()]
    job = jobs.LcmJob(name="bench_lcm", prompts=prompts, resolution=64, steps=args.steps,
                      save_every_n_steps=args.every, **overrides)
    handle = load_handle("demo", device="cpu")
    w = reference_w(job) if args.ref_w is None else args.ref_w
    t0 = time.perf_counter()
    check = DemoCheck(handle, cfg=w + 1)
    curve = [int(s) for s in args.curve.split(",")]
    samplers = args.sampler.split(",")
    base = {(s, m): check.lcm(s, m) for s in curve for m in samplers}
    print(f"settings: {json.dumps(overrides)}; reference CFG {w + 1:g}; teacher 30-step right "
          f"{check.right(check.teacher_30)}/90; base right (4 steps) {check.right(check.lcm(4))}/90; "
          f"setup {time.perf_counter() - t0:.0f} s", flush=True)
    root = Path(tempfile.mkdtemp())
    cache = Path(__file__).resolve().parents[1] / "tests" / "data"
    t0 = time.perf_counter()
    result = run_job(job, handle, JobContext(output_dir=root / "out", cache_dir=cache, work_dir=root / "work", log=lambda m: None))
    train_seconds = time.perf_counter() - t0
    for path in [p for p in result.saved if p.suffix == ".safetensors"]:   # not the comparison sheet
        network = build_network(handle, dataclasses.replace(job, init_lora=str(path)))
        network.enable()
        try:
            parts = []
            for s in curve:
                for m in samplers:
                    student, b = check.lcm(s, m), base[(s, m)]
                    name = "" if m == "lcm" else f" ({m})"
                    parts.append(f"{s}-step{name} MSE student {check.mse(student):.0f} base {check.mse(b):.0f} "
                                 f"ratio {check.mse(b) / check.mse(student):.2f} right {check.right(student)}/90")
        finally:
            network.detach()
        print(f"{path.name}: " + "; ".join(parts), flush=True)
    print(f"training {train_seconds:.0f} s for {args.steps} steps")


if __name__ == "__main__":
    main()
