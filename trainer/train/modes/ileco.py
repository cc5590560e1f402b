"""iLECO: a slider LoRA from two prompts alone, no images (traintrain's "instant LECO", as a mode of our loop).

The LoRA is trained so that the model, asked for the source prompt with the LoRA on, predicts what the base
model predicts for the source prompt moved toward the target prompt:

    target(+1) = out(source) + scale * (out(target) - out(source))      out = the base model's output

and, with ``both_directions``, so that the LoRA at strength -1 predicts the opposite move,
``out(source) - scale * (out(target) - out(source))``. With scale 1 the +1 target is the base model's
prediction for the target prompt: traintrain's iLECO. An empty target prompt is the empty prompt (the
unconditional input of guidance): the slider then erases the source concept, as traintrain's does.

Where traintrain trains on one fixed draw of pure noise at random timesteps, the latents here are, as in
LECO, noise denoised partway by the base model on the source prompt: what the model really sees at that
timestep when it draws the source. They do not depend on the LoRA, so they are computed once, before
training: the guided DDIM trajectories (``denoise_steps`` steps from t = 999) of ``TRAJECTORIES`` seeded
noises, every latent on the way kept (:func:`source_trajectories`). Each step then reads:

  1. draw, per sample, a trajectory and a point j on it: z_t at t = grid[j]
  2. the base model, LoRA off, no gradient: out(source) and out(target) at (z_t, t) in one batched forward
  3. the LoRA at +1 on the source prompt: squared error to target(+1)
  4. with both_directions, the LoRA at -1 as well, to target(-1); the loss is the mean of the two

The text encoder is not trained (traintrain's iLECO leaves BASE out too): the prompts' conditioning is
computed once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from trainer import jobs
from trainer.diffusion.ddim import ddim_step, ddim_timesteps, predict_x0_eps
from trainer.lora.network import LoraNetwork, at_strength, removed
from trainer.models.handle import Cond, ModelHandle
from trainer.sampling.guided import pad_cat, seeded_noise
from trainer.train.context import JobContext, job_outputs, run_loop
from trainer.train.loop import LoopResult, TrainingLoop
from trainer.train.plan import build_network, facts_for, loop_settings, prediction_of
from trainer.train.previews import previewer, render_guided_preview

#: Guidance of the base model's denoising of the source prompt: the WebUI scale the demo pictures use.
DENOISE_CFG = 5.0
#: Seeded noises whose trajectories the training latents come from (traintrain's iLECO uses one fixed draw).
TRAJECTORIES = 16


# -- the math (pure functions over tensors) -------------------------------------------------------

def slider_target(out_source: torch.Tensor, out_target: torch.Tensor, scale: float) -> torch.Tensor:
    """out(source) + scale * (out(target) - out(source)); a negative scale is the opposite direction."""
    return out_source + scale * (out_target - out_source)


def slider_strengths(both_directions: bool) -> tuple[float, ...]:
    """The LoRA strengths one step trains at: +1, and -1 for a slider trained both ways."""
    return (1.0, -1.0) if both_directions else (1.0,)


# -- the model calls ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SliderSettings:
    prediction: str = "eps"       # eps | v
    scale: float = 1.0
    both_directions: bool = True
    denoise_steps: int = 20

    @property
    def grid(self) -> list[int]:
        """The DDIM timesteps of the partial denoising (trailing, from t = 999), one per possible stop."""
        return ddim_timesteps(self.denoise_steps)

    @classmethod
    def from_job(cls, job, prediction: str) -> "SliderSettings":
        return cls(prediction, job.slider_scale, job.both_directions, job.denoise_steps)


@dataclass(frozen=True)
class SliderConds:
    """The conditioning of the prompts, batched: source, target (the empty prompt when it is empty), uncond."""

    source: Cond
    target: Cond
    uncond: Cond


def slider_conds(handle: ModelHandle, job, batch: int, size: tuple[int, int]) -> SliderConds:
    with torch.no_grad(), handle.lock():
        uncond = handle.uncond(batch, size).detach()
        source = handle.encode_prompts([job.source_prompt] * batch, size).detach()
        target = (handle.encode_prompts([job.target_prompt] * batch, size).detach() if job.target_prompt.strip()
                  else uncond)
    return SliderConds(source, target, uncond)


@torch.no_grad()
def source_trajectories(handle: ModelHandle, noise: torch.Tensor, conds: SliderConds, settings: SliderSettings,
                        check_stop: Callable[[], None] = lambda: None) -> torch.Tensor:
    """[T, N, 4, h, w]: for each noise, z at each of the N grid timesteps of the base model's guided DDIM
    sampling of the source prompt (the base model: the caller keeps the LoRA off). ``noise`` [T, 4, h, w];
    computed in chunks of the conditioning's batch."""
    grid = settings.grid
    chunk = len(conds.source)
    abar = handle.alphas_cumprod.to(noise.device)
    out_chunks = []
    for first in range(0, len(noise), chunk):
        z = noise[first:first + chunk].float()
        n = len(z)
        both = pad_cat(conds.uncond[:n], conds.source[:n]).to(noise.device, handle.dtype)
        points = [z]
        for i, t in enumerate(grid[:-1]):
            check_stop()
            steps = torch.full((2 * n,), t, device=z.device)
            with handle.lock():
                out = handle.predict(torch.cat([z, z]).to(handle.dtype), steps, both).float()
            out_uncond, out_source = out.chunk(2)
            x0, eps = predict_x0_eps(out_uncond + DENOISE_CFG * (out_source - out_uncond), z, abar[t],
                                     settings.prediction)
            z = ddim_step(x0, eps, abar[grid[i + 1]])
            points.append(z)
        out_chunks.append(torch.stack(points, dim=1))
    return torch.cat(out_chunks)


@dataclass
class StepDraw:
    """The random choices of one step: per sample, a trajectory and a point on it."""

    trajectory: torch.Tensor   # [B] index into the trajectories
    point: torch.Tensor        # [B] index into the grid


def draw_step(batch: int, trajectories: int, settings: SliderSettings, generator: torch.Generator) -> StepDraw:
    """Drawn on the CPU from ``generator`` (in this order), so runs repeat on any device and resume exactly."""
    trajectory = torch.randint(0, trajectories, (batch,), generator=generator)
    point = torch.randint(0, settings.denoise_steps, (batch,), generator=generator)
    return StepDraw(trajectory, point)


def slider_loss(handle: ModelHandle, network: LoraNetwork, trajectories: torch.Tensor, conds: SliderConds,
                settings: SliderSettings, draw: StepDraw) -> torch.Tensor:
    """One iLECO step's loss (see the module docstring); the network must be attached and enabled."""
    # 1. z_t: a point of a trajectory of the base model's sampling of the source prompt
    z = trajectories[draw.trajectory, draw.point].to(handle.device)
    timesteps = torch.tensor([settings.grid[j] for j in draw.point.tolist()], device=z.device)
    # 2. the base model's outputs for both prompts, one forward
    with torch.no_grad(), removed(network):
        out = handle.predict(torch.cat([z, z]).to(handle.dtype), torch.cat([timesteps, timesteps]),
                             pad_cat(conds.source, conds.target).to(z.device, handle.dtype)).float()
    out_source, out_target = out.chunk(2)
    # 3.-4. the LoRA at each trained strength, on the source prompt, to its target
    source = conds.source.to(z.device, handle.dtype)
    losses = []
    for strength in slider_strengths(settings.both_directions):
        with at_strength(network, strength):
            student = handle.predict(z.to(handle.dtype), timesteps, source).float()
        target = slider_target(out_source, out_target, strength * settings.scale)
        losses.append(torch.nn.functional.mse_loss(student, target))
    return torch.stack(losses).mean()


# -- the mode -------------------------------------------------------------------------------------

def train_ileco(job: "jobs.IlecoJob", handle: ModelHandle, ctx: JobContext) -> LoopResult:
    outputs = job_outputs(job, ctx)
    prediction = prediction_of(handle, job)
    settings = SliderSettings.from_job(job, prediction)
    size = (job.resolution, job.resolution)
    f = handle.vae_scale
    network = build_network(handle, job)
    try:
        conds = slider_conds(handle, job, job.batch_size, size)
        noise = seeded_noise(range(job.seed, job.seed + TRAJECTORIES), (4, size[0] // f, size[1] // f), handle.device)
        ctx.log(f"iLECO: sampling {TRAJECTORIES} trajectories of {job.denoise_steps} steps of the source prompt")
        with removed(network):
            trajectories = source_trajectories(handle, noise, conds, settings,
                                               lambda: ctx.control.check("sampling the source prompt"))
    except BaseException:
        network.detach()                                  # leave the host's model as it was
        raise
    prompts = {"source": job.source_prompt, "target": job.target_prompt or "(empty: erase)"}
    facts = facts_for(handle, job, job, prediction, tag_frequency={"ileco": {p: 1 for p in prompts.values()}})
    preview = previewer(job, handle, network, outputs, render_guided_preview, ctx.log, size, ctx.events)

    def on_progress(progress) -> None:
        if ctx.events:
            ctx.events(progress)
        preview(progress)

    loop = TrainingLoop(handle, network, loop_settings(job, job), outputs, facts, on_progress, ctx.control)

    def compute_loss(micro_step: int) -> torch.Tensor:
        return slider_loss(handle, network, trajectories, conds, settings,
                           draw_step(job.batch_size, TRAJECTORIES, settings, loop.generator))

    return run_loop(loop, compute_loss, ctx)
