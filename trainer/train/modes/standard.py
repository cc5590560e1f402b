"""Standard LoRA / LoCon training from a folder of captioned images.

Setup (dataset, buckets, cached latents, network) happens once; each step then reads:
  1. take the next same-bucket batch (seeded order, resumable)
  2. its cached latents and processed captions -> conditioning (cached while the text encoder is frozen)
  3. the noise-prediction loss (eps or v, min-SNR, noise offset, timestep range)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainer import data
from trainer import jobs
from trainer.lora.metadata import TrainingFacts
from trainer.models.handle import ModelHandle, TargetOptions
from trainer.lora.network import LoraNetwork, NetworkShape
from trainer.train.loop import Control, EventSink, LoopResult, LoopSettings, NoiseSettings, Outputs, TrainingLoop, diffusion_loss
from trainer.device import SAVE_PRECISION


@dataclass
class JobContext:
    """What the caller (CLI, queue, WebUI) provides around a job."""

    output_dir: Path                 # used when the job leaves output_dir empty
    cache_dir: Path                  # latent cache, shared across jobs
    events: EventSink | None = None
    control: Control = field(default_factory=Control)
    resume: bool = False             # continue from the resumable state beside the output
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))


def job_outputs(job, ctx: JobContext) -> Outputs:
    """The output paths of a job; refuses to overwrite a finished LoRA unless asked."""
    outputs = Outputs(Path(job.output_dir) if job.output_dir else ctx.output_dir, job.name)
    if outputs.final.exists() and not job.overwrite and not ctx.resume:
        raise jobs.JobError(f"{outputs.final} already exists: choose another name or tick overwrite", field="name")
    return outputs


def dataset_options(job) -> data.DatasetOptions:
    return data.DatasetOptions(
        folder=job.dataset_dir, caption_extension=job.caption_extension, trigger_word=job.trigger_word,
        shuffle_captions=job.shuffle_captions, keep_tokens=job.keep_tokens, caption_dropout=job.caption_dropout,
        flip_horizontal=job.flip_horizontal, resolution=job.resolution, enable_buckets=job.enable_buckets,
        bucket_no_upscale=job.bucket_no_upscale, min_bucket_reso=job.min_bucket_reso,
        max_bucket_reso=job.max_bucket_reso)


def loop_settings(settings, job, phase: str = "") -> LoopSettings:
    """LoopSettings from a job (or a copier pass) that carries the training group of fields."""
    return LoopSettings(
        steps=settings.steps, lr=settings.lr, text_encoder_lr=getattr(job, "text_encoder_lr", 0.0),
        optimizer=settings.optimizer, optimizer_args=jobs.parse_optimizer_args(settings.optimizer_args),
        lr_scheduler=settings.lr_scheduler, lr_warmup_steps=settings.lr_warmup_steps,
        lr_scheduler_num_cycles=settings.lr_scheduler_num_cycles, lr_scheduler_power=settings.lr_scheduler_power,
        gradient_accumulation=getattr(job, "gradient_accumulation", 1), max_grad_norm=job.max_grad_norm,
        mixed_precision=job.mixed_precision, gradient_checkpointing=job.gradient_checkpointing,
        save_every_n_steps=job.save_every_n_steps,
        save_dtype=SAVE_PRECISION[job.save_precision], seed=settings.seed, phase=phase)


def noise_settings(handle: ModelHandle, job, settings=None) -> NoiseSettings:
    settings = settings or job
    prediction = handle.prediction if job.prediction == "auto" else job.prediction
    return NoiseSettings(prediction, settings.timestep_min, settings.timestep_max,
                         getattr(job, "min_snr_gamma", 0.0), getattr(job, "noise_offset", 0.0))


def build_network(handle: ModelHandle, job, settings=None) -> LoraNetwork:
    """The network of a job (or copier pass), attached, optionally started from ``init_lora``."""
    settings = settings or job
    options = TargetOptions(job.target_set, getattr(job, "train_text_encoder", False), tuple(settings.blocks))
    shape = NetworkShape(settings.network_dim, settings.network_alpha, settings.conv_dim, settings.conv_alpha)
    network = LoraNetwork(handle.lora_targets(options), shape, seed=settings.seed)
    if getattr(job, "init_lora", ""):
        network.load_weights(job.init_lora, handle.arch)
    return network.to(handle.device).attach()


def facts_for(handle: ModelHandle, job, settings, prediction: str, **extra) -> TrainingFacts:
    return TrainingFacts(
        arch=handle.arch, prediction=prediction, output_name=job.name, dim=settings.network_dim,
        alpha=settings.network_alpha, conv_dim=settings.conv_dim, conv_alpha=settings.conv_alpha,
        resolution=job.resolution, max_steps=settings.steps, lr=settings.lr, optimizer=settings.optimizer,
        lr_scheduler=settings.lr_scheduler, seed=settings.seed, batch_size=settings.batch_size,
        train_text_encoder=getattr(job, "train_text_encoder", False),
        text_encoder_lr=getattr(job, "text_encoder_lr", None), **extra)


def run_loop(loop: TrainingLoop, compute_loss, ctx: JobContext, restore_extra=None) -> LoopResult:
    """Resume from the saved state when asked, then run; the network is detached whatever happens."""
    if ctx.resume and loop.outputs.state.is_file():
        extra = loop.load_state_dict(TrainingLoop.read_state(loop.outputs.state))
        if restore_extra:
            restore_extra(extra)
    try:
        result = loop.run(compute_loss)
    finally:
        loop.network.detach()
        loop.network.enable()   # the loop leaves it disabled (see TrainingLoop.run)
    if not result.stopped_early:   # stop-and-save keeps the state so that resume can finish the job
        loop.outputs.state.unlink(missing_ok=True)
    return result


def train_standard(job: "jobs.StandardJob", handle: ModelHandle, ctx: JobContext) -> LoopResult:
    outputs = job_outputs(job, ctx)
    options = dataset_options(job)
    dataset = data.scan_dataset(options)
    for warning in dataset.warnings:
        ctx.log(f"warning: {warning}")
    buckets = data.assign_buckets(dataset, options)
    cache = data.LatentCache(ctx.cache_dir / "latents")
    latents = cache.get_latents(list(zip(dataset.items, buckets)), handle, batch_size=4,
                                flip=options.flip_horizontal)
    sampler = data.BatchSampler.for_dataset(dataset, buckets, job.batch_size, job.seed)
    text_cache = None if job.train_text_encoder else data.TextEmbeddingCache()
    noise = noise_settings(handle, job)
    network = build_network(handle, job)
    facts = facts_for(handle, job, job, noise.prediction, num_images=len(dataset.items),
                      tag_frequency=dataset.tag_frequency())
    loop = TrainingLoop(handle, network, loop_settings(job, job), outputs, facts, ctx.events, ctx.control,
                        extra_state=lambda: {"sampler": sampler.state_dict()})

    def compute_loss(micro_step: int) -> torch.Tensor:
        batch = next(sampler)
        x0, captions = data.collate(batch, dataset, latents, handle.identity, options)
        size = (batch.bucket[1], batch.bucket[0])
        if text_cache is not None:
            cond = text_cache.get(captions, size, handle)
        else:
            cond = handle.encode_prompts(captions, size)
        return diffusion_loss(handle, x0.to(handle.device), cond, noise, loop.generator)

    return run_loop(loop, compute_loss, ctx, lambda extra: sampler.load_state_dict(extra["sampler"]))
