"""Held-out loss of a job's checkpoints: the job's own objective on the job's data with fixed noise and fixed
timesteps, so that two checkpoints (or two runs of the sheet) are compared on exactly the same draws.

The training loss jumps with its random timesteps and noises; a curve of it says little about which saved
checkpoint is best. Here every checkpoint sees the same few images, the same noise per image and the same
timesteps spread over the schedule (standard and copier: the noise-prediction loss, eps or v; LCM: the
consistency-distillation loss at fixed solver steps, noise and guidance; ADDifT: its own loss on each pair, both
directions, at timesteps spread over the job's timestep range, with its masks and without min-SNR weights;
iLECO: its slider loss at fixed points of the base model's sampling of the source prompt from seeds it never
trained on). "Held-out" means the draws, not the images: a job has no separate validation images.
"""
from __future__ import annotations

import contextlib

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from trainer import data, jobs
from trainer.diffusion import schedules
from trainer.lora.network import LoraNetwork, applied, attached_file
from trainer.models.handle import Cond, ModelHandle
from trainer.train.modes import lcm as lcm_mode
from trainer.train.plan import dataset_options, prediction_of

#: Timesteps every checkpoint is evaluated at (of 1000): spread over the schedule, as training draws them.
EVAL_TIMESTEPS = (50, 200, 350, 500, 650, 800, 950)
EVAL_SEED = 20240611
#: The modes whose objective is measured here; another mode's checkpoints get NaN ("not measured"), and its
#: sheet still shows its grids and loss curves.
MEASURED_MODES = ("standard", "copier", "lcm", "addift", "ileco")
#: iLECO: the source prompt's trajectories it is measured on (from EVAL_SEED, not the job's seeds).
ILECO_TRAJECTORIES = 4
#: At most this many of the job's images (or prompts' images) are used: the sheet must not take an hour.
MAX_ITEMS = 8


@dataclass
class EvalItem:
    latents: torch.Tensor     # [1, C, h, w], clean (ADDifT: image B; iLECO: its trajectory [N, C, h, w])
    cond: Cond                # its caption's conditioning
    noise: torch.Tensor       # [T, C, h, w], one fixed draw per timestep
    pair: "Pair | None" = None    # ADDifT: the pair (A's latents, its mask)


@dataclass
class EvalSet:
    """What every checkpoint is measured on: the same items, noises and timesteps."""

    mode: str
    prediction: str
    items: list[EvalItem]
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS
    lcm: "lcm_mode.LcmSettings | None" = None
    uncond: dict | None = None       # (h, w) -> unconditional Cond (LCM's teacher)
    addift: dict | None = None       # ADDifT: strength, outside_mask, NoiseSettings
    ileco: dict | None = None        # iLECO: SliderSettings, SliderConds, the grid points measured


def fixed_noise(shape: Sequence[int], count: int, seed: int) -> torch.Tensor:
    """``count`` normal draws of ``shape`` from ``seed`` on the CPU: the same on every run and device."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def best_checkpoint(losses: Sequence[float]) -> int | None:
    """The index of the lowest finite loss (the earliest of equal ones); None when none is finite."""
    finite = [(loss, i) for i, loss in enumerate(losses) if loss is not None and math.isfinite(loss)]
    return min(finite)[1] if finite else None


# -- the job's data ---------------------------------------------------------------------------------

def _images_and_captions(job, cache_dir: Path, handle: ModelHandle) -> list[tuple[torch.Tensor, str]]:
    """(clean latents [1,C,h,w], caption) of at most MAX_ITEMS of the job's training images."""
    size = (job.resolution, job.resolution)
    if job.mode == "copier":
        names = list(job.image_a if getattr(job, "swap_ab", False) else job.image_b)[:MAX_ITEMS]
        pixels = [data.load_image_tensor(p, size) for p in names]
        return [(handle.encode_images(p[None].to(handle.device, handle.dtype)).float().cpu(), job.prompt)
                for p in pixels]
    if job.mode == "lcm" and not job.dataset_dir:
        prompts = lcm_mode.read_prompts(job)
        w = lcm_mode.LcmSettings.from_job(job, handle.prediction).w_middle
        latents, captions = lcm_mode.teacher_latents(handle, prompts, min(MAX_ITEMS, job.num_generated_images), w,
                                                     size, job.seed, cache_dir)
        return [(latents[i:i + 1].float(), captions[i]) for i in range(len(captions))]
    options = dataset_options(job) if job.mode == "standard" else data.DatasetOptions(
        folder=job.dataset_dir, resolution=job.resolution, min_bucket_reso=min(256, job.resolution),
        max_bucket_reso=max(1024, job.resolution))
    # the caption as trained, without its randomness: no dropout, no shuffling
    options = replace(options, caption_dropout=0.0, shuffle_captions=False, flip_horizontal=False)
    dataset = data.scan_dataset(options)
    buckets = data.assign_buckets(dataset, options)
    out = []
    for item, bucket in list(zip(dataset.items, buckets))[:MAX_ITEMS]:
        pixels = data.load_image_tensor(item.path, bucket)    # bucket: (w, h)
        latents = handle.encode_images(pixels[None].to(handle.device, handle.dtype)).float().cpu()
        out.append((latents, data.process_caption(item.caption, options, random.Random(0))))
    return out


def spread_timesteps(low: int, high: int, count: int = len(EVAL_TIMESTEPS)) -> tuple[int, ...]:
    """``count`` timesteps at the middles of equal parts of [low, high)."""
    return tuple(int(low + (i + 0.5) * (high - low) / count) for i in range(count))


@torch.no_grad()
def _addift_set(job, handle: ModelHandle, cache_dir: Path) -> EvalSet:
    """ADDifT: up to MAX_ITEMS of the job's pairs with their masks and prompts, noises from EVAL_SEED."""
    from trainer.diffusion.losses import NoiseSettings
    from trainer.train.modes import addift as addift_mode
    from trainer.train.modes.copier import check_pairs, load_pairs, mask_options
    from trainer.train.plan import noise_settings

    with handle.lock():
        pairs = load_pairs(check_pairs(job, handle)[:MAX_ITEMS], handle,
                           data.LatentCache(Path(cache_dir) / "latents"), **mask_options(job))
    conds = addift_mode.pair_conditions(handle, job, pairs)     # takes the lock itself
    noise = noise_settings(handle, job)
    timesteps = spread_timesteps(noise.timestep_min, noise.timestep_max)
    items = [EvalItem(pair.latent_b[None].float(), cond.to(handle.device, handle.dtype),
                      fixed_noise(pair.latent_b.shape, len(timesteps), EVAL_SEED + i), pair)
             for i, (pair, cond) in enumerate(zip(pairs, conds))]
    settings = {"strength": job.addift_strength, "keep": job.outside_mask == "keep",
                "noise": NoiseSettings(prediction=noise.prediction)}      # no min-SNR: every timestep counts alike
    return EvalSet("addift", noise.prediction, items, timesteps, addift=settings)


@torch.no_grad()
def _ileco_set(job, handle: ModelHandle) -> EvalSet:
    """iLECO: ILECO_TRAJECTORIES of the base model's sampling of the source prompt from EVAL_SEED, measured at
    len(EVAL_TIMESTEPS) points spread over each (the LoRA off while they are sampled)."""
    from trainer.sampling.guided import seeded_noise
    from trainer.train.modes import ileco as ileco_mode

    settings = ileco_mode.SliderSettings.from_job(job, prediction_of(handle, job))
    points = sorted({min(settings.denoise_steps - 1, i * settings.denoise_steps // len(EVAL_TIMESTEPS))
                     for i in range(len(EVAL_TIMESTEPS))})
    size, f = (job.resolution, job.resolution), handle.vae_scale
    conds = ileco_mode.slider_conds(handle, job, len(points), size)
    noise = seeded_noise(range(EVAL_SEED, EVAL_SEED + ILECO_TRAJECTORIES), (4, size[0] // f, size[1] // f),
                         handle.device)
    trajectories = ileco_mode.source_trajectories(handle, noise, conds, settings)
    items = [EvalItem(trajectory, conds.source, noise[i]) for i, trajectory in enumerate(trajectories)]
    timesteps = tuple(settings.grid[j] for j in points)
    return EvalSet("ileco", settings.prediction, items, timesteps,
                   ileco={"settings": settings, "conds": conds, "points": points})


@torch.no_grad()
def evaluation_set(job: jobs.Job, handle: ModelHandle, cache_dir: Path) -> EvalSet:
    """The job's fixed evaluation: its images (or its teacher's, for a prompts-only LCM job; its pairs for
    ADDifT), captions and noises drawn once from EVAL_SEED."""
    if job.mode == "addift":
        return _addift_set(job, handle, cache_dir)
    if job.mode == "ileco":
        return _ileco_set(job, handle)
    prediction = prediction_of(handle, job)
    with handle.lock():
        pairs = _images_and_captions(job, Path(cache_dir), handle)
        if not pairs:
            raise jobs.JobError("the job has no images to measure its checkpoints on", field="dataset_dir")
        items = []
        for i, (latents, caption) in enumerate(pairs):
            size = (latents.shape[2] * handle.vae_scale, latents.shape[3] * handle.vae_scale)
            cond = handle.encode_prompts([caption], size).to(handle.device, handle.dtype)
            items.append(EvalItem(latents, cond, fixed_noise(latents.shape[1:], len(EVAL_TIMESTEPS), EVAL_SEED + i)))
        settings, uncond = None, None
        if job.mode == "lcm":
            settings = lcm_mode.LcmSettings.from_job(job, prediction)
            sizes = {(it.latents.shape[2] * handle.vae_scale, it.latents.shape[3] * handle.vae_scale) for it in items}
            uncond = {s: handle.uncond(1, s).to(handle.device, handle.dtype) for s in sizes}
    return EvalSet(job.mode, prediction, items, EVAL_TIMESTEPS, settings, uncond)


# -- the loss -----------------------------------------------------------------------------------------

def _noise_prediction_loss(handle: ModelHandle, item: EvalItem, timesteps: Sequence[int], prediction: str) -> float:
    x0 = item.latents.to(handle.device).repeat(len(timesteps), 1, 1, 1)
    noise = item.noise.to(handle.device)
    t = torch.tensor(list(timesteps), device=handle.device)
    alpha_bar = handle.alphas_cumprod.to(handle.device)[t]
    noisy = schedules.add_noise(x0, noise, alpha_bar)
    cond = Cond.cat([item.cond] * len(timesteps))
    pred = handle.predict(noisy.to(handle.dtype), t, cond).float()
    target = schedules.v_target(x0, noise, alpha_bar) if prediction == "v" else noise
    return float(((pred - target.float()) ** 2).mean())


def _consistency_loss(handle: ModelHandle, network: LoraNetwork, item: EvalItem, eval_set: EvalSet) -> float:
    settings = eval_set.lcm
    n = len(eval_set.timesteps)
    x0 = item.latents.to(handle.device).repeat(n, 1, 1, 1)
    # solver-grid indices spread like the timesteps; w at the middle of the job's guidance range
    index = torch.tensor([min(settings.num_ddim_timesteps - 1, t * settings.num_ddim_timesteps // 1000)
                          for t in eval_set.timesteps], device=handle.device)
    draw = lcm_mode.StepDraw(index, item.noise.to(handle.device, x0.dtype),
                             torch.full((n,), settings.w_middle, device=handle.device))
    size = (item.latents.shape[2] * handle.vae_scale, item.latents.shape[3] * handle.vae_scale)
    cond = Cond.cat([item.cond] * n)
    uncond = Cond.cat([eval_set.uncond[size]] * n)
    return float(lcm_mode.consistency_distillation_loss(handle, network, x0, cond, uncond, settings, draw))


def _addift_loss(handle: ModelHandle, network: LoraNetwork, item: EvalItem, eval_set: EvalSet) -> float:
    from trainer.train.differential import addift_loss

    settings, pair = eval_set.addift, item.pair
    n = len(eval_set.timesteps)
    a = pair.latent_a[None].to(handle.device).float().expand(n, -1, -1, -1)
    b = item.latents.to(handle.device).expand(n, -1, -1, -1)
    t = torch.tensor(list(eval_set.timesteps), device=handle.device)
    mask = pair.mask_ab[None].to(handle.device).expand(n, -1, -1, -1) if pair.mask_ab is not None else None
    cond, noise = item.cond.repeat(n), item.noise.to(handle.device)
    # both directions, as trained: the LoRA at +strength on B gives the base on A, at -strength on A the base on B
    return sum(float(addift_loss(handle, network, source, other, cond, noise, t, strength, settings["noise"], mask,
                                 settings["keep"]))
               for source, other, strength in ((a, b, settings["strength"]), (b, a, -settings["strength"]))) / 2


def _slider_loss(handle: ModelHandle, network: LoraNetwork, item: EvalItem, eval_set: EvalSet) -> float:
    from trainer.train.modes import ileco as ileco_mode

    points = eval_set.ileco["points"]
    draw = ileco_mode.StepDraw(torch.zeros(len(points), dtype=torch.long), torch.tensor(points))
    return float(ileco_mode.slider_loss(handle, network, item.latents[None], eval_set.ileco["conds"],
                                        eval_set.ileco["settings"], draw))


@torch.no_grad()
def heldout_loss(handle: ModelHandle, eval_set: EvalSet, network: LoraNetwork | None,
                 under: LoraNetwork | None = None) -> float:
    """The mean loss over the set's items and timesteps with ``network`` (attached, disabled outside) on, over
    ``under`` (a copier, likewise); None: the base model (an LCM, ADDifT or iLECO set needs a network: the
    model without it is their target). Both are on only while the model lock is held: a job training meanwhile
    never sees them."""
    losses = []
    with handle.lock(), applied(under), applied(network):
        for item in eval_set.items:
            if eval_set.mode == "lcm":
                losses.append(_consistency_loss(handle, network, item, eval_set))
            elif eval_set.mode == "addift":
                losses.append(_addift_loss(handle, network, item, eval_set))
            elif eval_set.mode == "ileco":
                losses.append(_slider_loss(handle, network, item, eval_set))
            else:
                losses.append(_noise_prediction_loss(handle, item, eval_set.timesteps, eval_set.prediction))
    return sum(losses) / len(losses)


def copier_file(job, lora_folder: Path) -> Path | None:
    """The copier a difference was trained over: the job's saved copier or the one it reused; None if neither
    exists any more (the difference is then measured alone)."""
    for candidate in (getattr(job, "copier_file", ""), Path(lora_folder) / f"{job.name}_copier.safetensors"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def checkpoint_losses(job: jobs.Job, handle: ModelHandle, files: Sequence[str | Path], cache_dir: Path,
                      lora_folder: Path | None = None) -> list[float]:
    """The held-out loss of each LoRA file of ``job`` (a copier difference over its copier when that is kept);
    NaN for every file of a mode not in MEASURED_MODES."""
    if job.mode not in MEASURED_MODES:
        return [math.nan] * len(files)
    eval_set = evaluation_set(job, handle, cache_dir)
    copier_path = copier_file(job, lora_folder) if job.mode == "copier" and lora_folder is not None else None
    with attached_file(handle, copier_path) if copier_path else contextlib.nullcontext() as copier:
        losses = []
        for path in files:
            with attached_file(handle, path) as network:
                losses.append(heldout_loss(handle, eval_set, network, under=copier))
        return losses
