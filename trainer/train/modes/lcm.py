"""LCM distillation into a LoRA: latent consistency distillation (Luo et al. 2023) as in the LCM-LoRA report.

The student is the model with the LoRA on; the teacher is the same model with the LoRA off (no second
copy in memory). Setup (data, network, previews) happens once in ``train_lcm``; each step,
``consistency_distillation_loss``, reads:

  1. draw n: t_{n+k} from the solver grid, t_n = t_{n+k} - k (at least 0); noise x0 to z_{n+k}; draw w
  2. teacher, LoRA off, no gradient: cond and uncond in one forward -> guided x0 and eps at t_{n+k}
  3. one DDIM step with them: z_n = sqrt(abar(t_n)) x0 + sqrt(1 - abar(t_n)) eps
  4. target, no gradient: f(z_n, t_n) of the online student (or of its EMA copy)
  5. student, with gradient: f(z_{n+k}, t_{n+k})
  6. loss: pseudo-Huber (c = 0.001) or L2 between student and target

where f(z, t) = c_skip(t) z + c_out(t) x0(z, t) is the consistency function with the boundary
scalings of the LCM paper. The target is computed before the student only so that an EMA target can
swap its weights in and out before the student's graph exists; nothing else depends on the order.

The job's defaults are the LCM-LoRA recipe of diffusers' train_lcm_distill_lora_sd_wds.py (SD1.5 / SDXL):
rank 64 / alpha 64 on every conv and linear layer of the UNet (target set all + conv rank 64 / alpha 64),
AdamW (weight decay 0.01) at a constant lr 1e-4, N = 50 solver steps, w drawn per sample from [3, 15]
(WebUI CFG 4 to 16), pseudo-Huber c = 0.001, no EMA target. What the demo model measures with them is in
bench/README.md (## LCM).

Learning rates and alpha: the LoRA's update is scaled by alpha / rank. The first LCM-LoRA script trained at
rank 64 with peft's alpha 8 (scale 1/8); at alpha 64 (scale 1) the same learning rate takes steps 8x larger.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save

from trainer import data
from trainer import jobs
from trainer.jobs.vocabulary import Phase
from trainer.diffusion import schedules
from trainer.models.handle import Cond, ModelHandle, weights_fingerprint
from trainer.lora.metadata import lcm_metadata
from trainer.lora.network import LoraNetwork, removed
from trainer.paths import write_atomic
from trainer.sampling.guided import ddim_latents, seeded_noise
from trainer.sampling.guided import pad_cat
from trainer.diffusion.ddim import ddim_step, predict_x0_eps
from trainer.train.loop import LoopResult, Progress, TrainingLoop
from trainer.train.plan import prediction_of, build_network, facts_for, loop_settings
from trainer.train.context import JobContext, job_outputs, run_loop
from trainer.train.previews import comparison_path, previewer, render_lcm_comparison, render_lcm_preview, sheet_prompts
from trainer.diffusion.lcm import _per_sample, at_least_fp32, boundary_scalings, consistency_function, consistency_loss, guided, skip_k, solver_grid, solver_times

TEACHER_SAMPLING_STEPS = 30   # DDIM steps of the images the teacher generates from prompts


# -- the math (pure functions over tensors) -------------------------------------------------------


# -- the model calls ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LcmSettings:
    prediction: str = "eps"          # eps | v
    num_ddim_timesteps: int = 50
    w_min: float = 7.5               # guidance w; fixed when w_max <= w_min
    w_max: float = 7.5
    loss_type: str = "huber"
    huber_c: float = 0.001

    @property
    def w_middle(self) -> float:
        """The middle of the guidance range: the teacher's images from prompts are generated at CFG w_middle + 1."""
        return (self.w_min + max(self.w_min, self.w_max)) / 2

    @property
    def k(self) -> int:
        return skip_k(self.num_ddim_timesteps)

    @property
    def grid(self) -> torch.Tensor:
        return solver_grid(self.num_ddim_timesteps)

    @classmethod
    def from_job(cls, job, prediction: str) -> "LcmSettings":
        w_max = job.guidance_scale_max if job.guidance_scale_max > job.guidance_scale else job.guidance_scale
        return cls(prediction, job.num_ddim_timesteps, job.guidance_scale, w_max, job.loss_type, job.huber_c)


def model_x0_eps(handle: ModelHandle, z_t: torch.Tensor, t: torch.Tensor, cond: Cond, prediction: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) the model predicts at (z_t, t), for eps- and v-prediction models alike."""
    out = at_least_fp32(handle.predict(z_t.to(handle.dtype), t, cond.to(dtype=handle.dtype)))
    alpha_bar = _per_sample(handle.alphas_cumprod.to(z_t.device)[t], out)
    return predict_x0_eps(out, z_t.to(out.dtype), alpha_bar, prediction)


def student_output(handle: ModelHandle, z_t: torch.Tensor, t: torch.Tensor, cond: Cond, prediction: str
                   ) -> torch.Tensor:
    """f(z_t, t) with whatever LoRA state the model has now (the student when it is on)."""
    x0, _ = model_x0_eps(handle, z_t, t, cond, prediction)
    c_skip, c_out = boundary_scalings(t)
    return consistency_function(z_t.to(x0.dtype), x0, c_skip, c_out)


@torch.no_grad()
def teacher_guided_x0_eps(handle: ModelHandle, network: LoraNetwork, z_t: torch.Tensor, t: torch.Tensor,
                          cond: Cond, uncond: Cond, w: torch.Tensor | float, prediction: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided (x0, eps) of the teacher; the conditional and unconditional passes are one batched forward."""
    with removed(network):
        x0, eps = model_x0_eps(handle, torch.cat([z_t, z_t]), torch.cat([t, t]), pad_cat(cond, uncond), prediction)
    x0_cond, x0_uncond = x0.chunk(2)
    eps_cond, eps_uncond = eps.chunk(2)
    return guided(x0_cond, x0_uncond, w), guided(eps_cond, eps_uncond, w)


def teacher_solver_step(handle: ModelHandle, network: LoraNetwork, z_start: torch.Tensor, t_start: torch.Tensor,
                        t_end: torch.Tensor, cond: Cond, uncond: Cond, w: torch.Tensor | float, prediction: str
                        ) -> torch.Tensor:
    """z_n: one guided DDIM step of the teacher from t_{n+k} to t_n (abar(0) at the bottom of the grid)."""
    x0, eps = teacher_guided_x0_eps(handle, network, z_start, t_start, cond, uncond, w, prediction)
    alpha_bar_prev = _per_sample(handle.alphas_cumprod.to(z_start.device)[t_end], x0)
    return ddim_step(x0, eps, alpha_bar_prev)


class EmaTarget:
    """An exponential moving average of the LoRA weights only (the original LCM's target network)."""

    def __init__(self, network: LoraNetwork, decay: float):
        self.decay = decay
        self.weights = {name: p.detach().clone() for name, p in network.named_parameters()}

    @torch.no_grad()
    def update(self, network: LoraNetwork) -> None:
        """theta_ema <- decay theta_ema + (1 - decay) theta."""
        for name, p in network.named_parameters():
            self.weights[name].lerp_(p.detach(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, network: LoraNetwork) -> Iterator[None]:
        """The network carries the EMA weights inside the block, its own ones again after it."""
        params = dict(network.named_parameters())
        with torch.no_grad():
            online = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.weights[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(online[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: w.cpu() for name, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, w in state.items():
            self.weights[name].copy_(w)


@torch.no_grad()
def consistency_target(handle: ModelHandle, network: LoraNetwork, z_end: torch.Tensor, t_end: torch.Tensor,
                       cond: Cond, prediction: str, ema: EmaTarget | None = None) -> torch.Tensor:
    """f(z_n, t_n) of the online student without gradient, or of its EMA copy."""
    with ema.swapped_in(network) if ema is not None else contextlib.nullcontext():
        return student_output(handle, z_end, t_end, cond, prediction)


@dataclass
class StepDraw:
    """The random choices of one step."""

    index: torch.Tensor    # [B] solver-grid index n
    noise: torch.Tensor    # like x0
    w: torch.Tensor        # [B] guidance


def draw_step(x0: torch.Tensor, settings: LcmSettings, generator: torch.Generator) -> StepDraw:
    """Drawn on the CPU from ``generator`` (in this order), so runs repeat on any device."""
    b = x0.shape[0]
    index = torch.randint(0, settings.num_ddim_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    w = settings.w_min + (settings.w_max - settings.w_min) * torch.rand((b,), generator=generator)
    return StepDraw(index.to(x0.device), noise.to(x0.device, x0.dtype), w.to(x0.device))


def consistency_distillation_loss(handle: ModelHandle, network: LoraNetwork, x0: torch.Tensor, cond: Cond,
                                  uncond: Cond, settings: LcmSettings, draw: StepDraw,
                                  ema: EmaTarget | None = None) -> torch.Tensor:
    """One LCM distillation step's loss (see the module docstring); the network must be attached."""
    p = settings.prediction
    # 1. t_{n+k} from the solver grid, t_n a solver step below; z_{n+k} = x0 noised to t_{n+k}
    t_start, t_end = solver_times(settings.grid, draw.index, settings.k)
    alpha_bar_start = handle.alphas_cumprod.to(x0.device)[t_start]
    z_start = schedules.add_noise(at_least_fp32(x0), at_least_fp32(draw.noise), alpha_bar_start)
    # 2.-3. the teacher's guided DDIM step to t_n
    z_end = teacher_solver_step(handle, network, z_start, t_start, t_end, cond, uncond, draw.w, p)
    # 4. the target: the (EMA) student at t_n, without gradient
    target = consistency_target(handle, network, z_end, t_end, cond, p, ema)
    # 5. the student at t_{n+k}
    student = student_output(handle, z_start, t_start, cond, p)
    # 6. the distance
    return consistency_loss(student, target, settings.loss_type, settings.huber_c)


#: The fields whose LCM defaults are the LCM-LoRA recipe (``trainer.lora.metadata.LCM_RECIPE``).
RECIPE_FIELDS = ("target_set", "network_dim", "network_alpha", "conv_dim", "conv_alpha", "num_ddim_timesteps",
                 "guidance_scale", "guidance_scale_max", "loss_type", "huber_c", "lr", "optimizer",
                 "optimizer_args", "lr_scheduler", "use_ema_target")


def changed_from_recipe(job) -> list[str]:
    """The recipe settings a job changed from the LCM defaults, by field name."""
    return [name for name in RECIPE_FIELDS if getattr(job, name) != jobs.FIELDS[name].default_for("lcm")]


# -- data -----------------------------------------------------------------------------------------

def read_prompts(job) -> list[str]:
    """The job's prompts: prompts_file (one per line, # comments) then the typed prompts."""
    lines = []
    if job.prompts_file:
        try:
            lines = Path(job.prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise jobs.JobError(f"cannot read prompts file {job.prompts_file!r}: {e.strerror}", field="prompts_file")
    prompts = [p.strip() for p in lines + list(job.prompts) if p.strip() and not p.strip().startswith("#")]
    if not prompts:
        raise jobs.JobError("no prompts: the prompts file and the prompts list are both empty", field="prompts")
    return prompts


def teacher_latents(handle: ModelHandle, prompts: list[str], count: int, w: float, size: tuple[int, int],
                    seed: int, cache_dir: Path, log: Callable[[str], None] = lambda m: None,
                    batch_size: int = 8, check_stop: Callable[[], None] = lambda: None
                    ) -> tuple[torch.Tensor, list[str]]:
    """``count`` latents the base model generates (prompts in turn, seeds seed, seed + 1, ...; guided DDIM at
    WebUI CFG w + 1), cached on disk by model, prompts and settings: a second job starts at once."""


    captions = [prompts[i % len(prompts)] for i in range(count)]
    key_source = json.dumps([weights_fingerprint(handle.identity, [handle.unet]), handle.prediction, captions, w, list(size), seed,
                             TEACHER_SAMPLING_STEPS])
    path = Path(cache_dir) / "lcm_teacher" / f"{hashlib.sha256(key_source.encode()).hexdigest()[:24]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["latents"], captions
        except Exception:
            log(f"warning: the cached teacher images {path.name} are damaged; generating them again")
    f = handle.vae_scale
    chunks = []
    for start in range(0, count, batch_size):
        end = min(count, start + batch_size)
        log(f"teacher: generating training images {start + 1}-{end} of {count}")
        noise = seeded_noise(range(seed + start, seed + end), (4, size[0] // f, size[1] // f),
                                          handle.device)
        with torch.no_grad(), handle.lock():
            cond = handle.encode_prompts(captions[start:end], size)
            uncond = handle.uncond(end - start, size)
            chunks.append(ddim_latents(handle, noise, cond, uncond, steps=TEACHER_SAMPLING_STEPS, cfg=w + 1,
                                       check_stop=check_stop).cpu())
    latents = torch.cat(chunks).contiguous()
    write_atomic(path, save({"latents": latents}, metadata={"prompts": json.dumps(captions)}))
    return latents, captions


@dataclass
class TrainingBatches:
    """Same-size batches of (clean latents, captions, size (h, w)), resumable through the sampler's state."""

    sampler: data.BatchSampler
    fetch: Callable[[data.Batch], tuple[torch.Tensor, list[str]]]
    num_images: int
    tag_frequency: dict
    prompts: list[str]      # what the images show (captions or the teacher's prompts): the comparison sheet's
    text_keys: list[tuple[str, tuple[int, int]]] | None = None   # every (text, size) a batch can carry, if known

    def next(self) -> tuple[torch.Tensor, list[str], tuple[int, int]]:
        batch = next(self.sampler)
        x0, captions = self.fetch(batch)
        return x0, captions, (batch.bucket[1], batch.bucket[0])


def training_batches(job, handle: ModelHandle, ctx: JobContext) -> TrainingBatches:
    """The standard mode's folder + captions + latent cache, or, without a folder, the teacher's own images."""
    if job.dataset_dir:
        options = data.DatasetOptions(folder=job.dataset_dir, resolution=job.resolution,
                                      min_bucket_reso=min(256, job.resolution),
                                      max_bucket_reso=max(1024, job.resolution))
        dataset = data.scan_dataset(options)
        for warning in dataset.warnings:
            ctx.warn(warning)
        buckets = data.assign_buckets(dataset, options)
        latents = data.LatentCache(ctx.cache_dir / "latents").get_latents(
            list(zip(dataset.items, buckets)), handle, check_stop=lambda: ctx.control.check("caching latents"))
        sampler = data.BatchSampler.for_dataset(dataset, buckets, job.batch_size, job.seed)
        identity = handle.identity
        return TrainingBatches(sampler, lambda b: data.collate(b, dataset, latents, identity, options),
                               len(dataset.items), dataset.tag_frequency(), [item.caption for item in dataset.items],
                               data.caption_keys(dataset, buckets, options))
    prompts = read_prompts(job)
    size = (job.resolution, job.resolution)
    w = LcmSettings.from_job(job, handle.prediction).w_middle
    latents, captions = teacher_latents(handle, prompts, job.num_generated_images, w, size,
                                        job.seed, ctx.cache_dir, ctx.log,
                                        check_stop=lambda: ctx.control.check("the teacher generated its images"))
    sampler = data.BatchSampler([1] * len(captions), [size] * len(captions), job.batch_size, job.seed)
    return TrainingBatches(sampler, lambda b: (latents[b.indices], [captions[i] for i in b.indices]),
                           len(captions), {"teacher": {p: captions.count(p) for p in prompts}}, prompts,
                           [(caption, size) for caption in dict.fromkeys(captions)])


# -- the mode -------------------------------------------------------------------------------------

def train_lcm(job: "jobs.LcmJob", handle: ModelHandle, ctx: JobContext) -> LoopResult:
    outputs = job_outputs(job, ctx)
    prediction = prediction_of(handle, job)
    settings = LcmSettings.from_job(job, prediction)
    network = build_network(handle, job)                  # first: a LoRA file that does not fit fails at once
    try:
        with removed(network):                           # the teacher generates any training images
            batches = training_batches(job, handle, ctx)
    except BaseException:
        network.detach()                                  # leave the host's model as it was
        raise
    text_cache = data.TextEmbeddingCache()
    if batches.text_keys:     # encoded before the first step, so no step pays for a caption's first use
        text_cache.prime(batches.text_keys, handle, check_stop=lambda: ctx.control.check("encoding captions"))
    uncond_by_size: dict[tuple[int, int], Cond] = {}
    ema = EmaTarget(network, job.ema_decay) if job.use_ema_target else None
    facts = facts_for(handle, job, job, prediction, num_images=batches.num_images,
                      tag_frequency=batches.tag_frequency,
                      extra=lcm_metadata(settings.w_min, settings.w_max, settings.num_ddim_timesteps,
                                         settings.loss_type, settings.huber_c, changed_from_recipe(job)))
    preview = previewer(job, handle, network, outputs, render_lcm_preview, ctx.log, (job.resolution, job.resolution),
                        ctx.events)

    def on_progress(progress: Progress) -> None:
        if ctx.events:
            ctx.events(progress)
        preview(progress)

    loop = TrainingLoop(handle, network, loop_settings(job, job), outputs, facts, on_progress, ctx.control,
                        extra_state=lambda: {"sampler": batches.sampler.state_dict(),
                                             "ema": ema.state_dict() if ema else None})

    def compute_loss(micro_step: int) -> torch.Tensor:
        if ema is not None and micro_step % job.gradient_accumulation == 0 and micro_step > 0:
            ema.update(network)            # after the previous optimizer step
        x0, captions, size = batches.next()
        cond = text_cache.get(captions, size, handle)
        if size not in uncond_by_size:
            with torch.no_grad():
                uncond_by_size[size] = handle.uncond(1, size).detach()
        uncond = uncond_by_size[size].repeat(len(captions))
        x0 = x0.to(handle.device)
        return consistency_distillation_loss(handle, network, x0, cond, uncond, settings,
                                             draw_step(x0, settings, loop.generator), ema)

    def restore(extra: dict) -> None:
        batches.sampler.load_state_dict(extra["sampler"])
        if ema is not None and extra.get("ema"):
            ema.load_state_dict(extra["ema"])

    result = run_loop(loop, compute_loss, ctx, restore)
    if job.comparison_sheet and result.final is not None and not result.stopped_early:
        sheet = comparison_sheet(job, handle, outputs, batches.prompts, result.final, ctx)
        if sheet is not None:
            result.saved.append(sheet)
    return result


def comparison_sheet(job, handle: ModelHandle, outputs, training_prompts: list[str], lora_file: Path,
                     ctx: JobContext) -> Path | None:
    """NAME.comparison.png beside the finished LoRA (see ``render_lcm_comparison``); a failure is a warning:
    the LoRA is saved and good either way."""
    prompts = sheet_prompts(list(job.sample_prompts), training_prompts)
    if not prompts:
        return None
    what = f"comparison sheet: the teacher and the LoRA at 2, 4 and 8 LCM steps for {len(prompts)} prompt(s)"
    ctx.log(what)
    if ctx.events:   # the queue shows the job at 100 % "comparison sheet", not as a training that hangs
        ctx.events(Progress(job.steps, job.steps, math.nan, math.nan, 0.0, 0.0, math.nan,
                            phase=Phase.COMPARISON_SHEET.value, message=what))
    try:
        return render_lcm_comparison(handle, Path(lora_file), prompts, (job.resolution, job.resolution),
                                     comparison_path(outputs))
    except Exception as e:   # noqa: BLE001 - reported with the job, never fatal
        ctx.warn(f"the comparison sheet could not be made: {type(e).__name__}: {e}")
        return None
