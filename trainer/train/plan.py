"""What the loop, the network and the metadata need, derived from a job in one place.

A job (or a copier pass) carries the declared fields; these functions turn them into the settings
objects of the parts below (dataset options, loop settings, noise settings, the network, the facts
written as metadata). Nothing else reads job fields for these purposes.
"""
from __future__ import annotations

from trainer import data, jobs
from trainer.device import SAVE_PRECISION
from trainer.diffusion.losses import NoiseSettings
from trainer.lora.metadata import TrainingFacts
from trainer.lora.network import LoraNetwork, NetworkShape
from trainer.models.handle import ModelHandle, TargetOptions
from trainer.train.loop import LoopSettings


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
