"""How close can any LCM-LoRA get to the teacher with the n-step LCM sampler? The "ideal student" on the demo model.

Issue 18's bar compares, from the same starting noise, the student's n-step LCM samples (CFG 1) with the teacher's
50-step guided DDIM samples (WebUI CFG w + 1), as pixel MSE next to the base model's n-step LCM samples. This
script replaces the student by the function LCM distillation trains it towards: a perfect consistency function
of the teacher, whose answer at (z, t) is the teacher's own probability-flow ODE solution from z at t -- the same
guided DDIM chain as the reference, on the same trailing 50-point grid (t, t - 20, ..., 19), run from t. The
sampler around it is the real one (``trainer.diffusion.lcm.lcm_loop``, the same fresh noise as
``lcm_latents``), so what remains is what the sampler costs: each of its steps after the first re-noises the
prediction with fresh noise, and the ODE from that new point lands on another sample of the prompt.

    python bench/lcm_ceiling.py [--steps 1,2,4,8] [--cfg 10] [--sets 2] [--no-alternative]

At 1 step the ideal student is the reference itself (ratio infinite). The 4-step ratio is the ceiling of the
bar's metric for a student that distils the teacher's ODE exactly; recorded in bench/README.md (## LCM). The
"alternative" column is the ideal student under the deterministic LCM alternative (every step re-noises with
the noise it removed, ``lcm_alternative_loop`` with euler_steps = steps): not the bar's sampler, shown for scale.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.diffusion.ddim import ddim_step  # noqa: E402
from trainer.diffusion.lcm import lcm_alternative_loop, lcm_loop, lcm_timesteps  # noqa: E402
from trainer.models.demo import score  # noqa: E402
from trainer.models.demo.shapes import all_combinations, caption  # noqa: E402
from trainer.models.handle import Cond, ModelHandle  # noqa: E402
from trainer.sampling import guided  # noqa: E402
from trainer.sampling import lcm as lcm_sampling  # noqa: E402
from trainer.train.modes.lcm import teacher_guided_x0_eps  # noqa: E402

SEED_SETS = (range(5000, 5045), range(6000, 6045))   # the proof test's seed sets (tests/test_lcm.py)
GRID_STEP = 20                                       # the 50-point solver grid: 999, 979, ..., 19


@torch.no_grad()
def teacher_ode_x0(handle: ModelHandle, z: torch.Tensor, t: int, cond: Cond, uncond: Cond, w: float) -> torch.Tensor:
    """The teacher's ODE solution from z at t: guided DDIM on the trailing grid t, t - 20, ..., 19, its last x0
    (exactly ``guided.ddim_latents(steps=50)`` when t = 999). WebUI CFG = w + 1."""
    times = list(range(t, 0, -GRID_STEP))
    abar = handle.alphas_cumprod.to(z.device)
    for i, ti in enumerate(times):
        x0, eps = teacher_guided_x0_eps(handle, None, z, torch.full((len(z),), ti, device=z.device), cond, uncond, w,
                                        handle.prediction)
        if i + 1 == len(times):
            return x0
        z = ddim_step(x0, eps, abar[times[i + 1]])
    return z


def fresh_noises(shape: torch.Size, seed: int = 0):
    """The fresh noise ``lcm_latents`` draws at each re-noising (its generator, seed 0): the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    return lambda i: torch.randn(shape, generator=generator)


@torch.no_grad()
def ideal_student_latents(handle: ModelHandle, noise: torch.Tensor, cond: Cond, uncond: Cond, w: float, steps: int,
                          sampler: str = "lcm") -> torch.Tensor:
    """The n-step LCM sample of a perfect consistency model of the teacher (its denoiser = the teacher's ODE)."""
    denoise = lambda z, t: teacher_ode_x0(handle, z, t, cond, uncond, w)
    abar = handle.alphas_cumprod.to(noise.device)
    timesteps = lcm_timesteps(steps)
    if sampler == "lcm":
        return lcm_loop(denoise, noise.float(), timesteps, abar, fresh_noises(noise.shape))
    return lcm_alternative_loop(denoise, noise.float(), timesteps, abar, fresh_noises(noise.shape), euler_steps=steps)


def pixels(handle: ModelHandle, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (handle.decode_latents(latents).clamp(-1, 1) + 1) * 127.5


def read_right(images: torch.Tensor, combos) -> int:
    right = 0
    for combo, p in zip(combos, images):
        img = guided.to_pil(p / 127.5 - 1)
        right += (score.dominant_colour(img), score.shape_of(img), score.background_colour(img)) == combo
    return right


def measure(handle: ModelHandle, steps_list=(1, 2, 4, 8), cfg: float = 10.0, seed_sets=SEED_SETS,
            alternative: bool = True) -> dict:
    """Per step count: pixel MSE to the teacher's 50-step samples of the ideal student and of the base model."""
    combos = all_combinations()
    prompts = [caption(*c) for c in combos]
    size = (64, 64)
    w = cfg - 1
    with torch.no_grad():
        cond, uncond = handle.encode_prompts(prompts, size), handle.uncond(len(prompts), size)
    noises = [guided.seeded_noise(list(s), (4, 16, 16), "cpu") for s in seed_sets]
    reference = [pixels(handle, guided.ddim_latents(handle, n, cond, uncond, steps=50, cfg=cfg)) for n in noises]

    def mse(images: list[torch.Tensor]) -> float:
        return sum(float(((a - b) ** 2).mean()) for a, b in zip(images, reference)) / len(images)

    rows = {}
    for steps in steps_list:
        base = [pixels(handle, lcm_sampling.lcm_latents(handle, n, cond, steps=steps)) for n in noises]
        ideal = [pixels(handle, ideal_student_latents(handle, n, cond, uncond, w, steps)) for n in noises]
        row = {"base_mse": mse(base), "ideal_mse": mse(ideal),
               "ideal_right": sum(read_right(i, combos) for i in ideal), "of": len(combos) * len(noises)}
        row["ratio"] = row["base_mse"] / row["ideal_mse"] if row["ideal_mse"] > 0 else float("inf")
        if alternative:
            alt = [pixels(handle, ideal_student_latents(handle, n, cond, uncond, w, steps, "alternative"))
                   for n in noises]
            row["alternative_mse"] = mse(alt)
        rows[steps] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="1,2,4,8", help="LCM step counts, comma-separated")
    parser.add_argument("--cfg", type=float, default=10.0, help="the teacher's WebUI CFG (the default job: w 9)")
    parser.add_argument("--sets", type=int, default=2, help="how many of the two 45-seed sets")
    parser.add_argument("--no-alternative", action="store_true", help="skip the LCM alternative column")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from trainer.models.diffusers_model import load_handle

    handle = load_handle("demo", device="cpu")
    started = time.perf_counter()
    rows = measure(handle, [int(s) for s in args.steps.split(",")], args.cfg, SEED_SETS[:args.sets],
                   alternative=not args.no_alternative)
    print("| LCM steps | ideal student MSE | base MSE | ratio (ceiling) | ideal right | ideal, LCM alternative MSE |")
    print("|---|---|---|---|---|---|")
    for steps, r in rows.items():
        ratio = "the reference itself" if r["ideal_mse"] < 1e-3 else f"{r['ratio']:.2f}"
        alt = f"{r['alternative_mse']:.0f}" if "alternative_mse" in r else "-"
        print(f"| {steps} | {r['ideal_mse']:.0f} | {r['base_mse']:.0f} | {ratio} | {r['ideal_right']}/{r['of']} | {alt} |")
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "cfg": args.cfg,
                      "rows": {str(k): v for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
