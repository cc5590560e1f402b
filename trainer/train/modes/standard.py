"""Standard LoRA / LoCon training from a folder of captioned images.

Setup (dataset, buckets, cached latents, network) happens once; each step then reads:
  1. take the next same-bucket batch (seeded order, resumable)
  2. its cached latents and processed captions -> conditioning (cached while the text encoder is frozen)
  3. the noise-prediction loss (eps or v, min-SNR, noise offset, timestep range)
"""
from __future__ import annotations


import torch

from trainer import data
from trainer import jobs
from trainer.data.caches import LATENT_CACHE_MAX_BATCH
from trainer.models.handle import ModelHandle
from trainer.train.loop import LoopResult, TrainingLoop, diffusion_loss
from trainer.train.context import JobContext, job_outputs, run_loop
from trainer.train.previews import previewer, render_guided_preview
from trainer.train.plan import build_network, dataset_facts, dataset_options, facts_for, loop_settings, noise_settings


def train_standard(job: "jobs.StandardJob", handle: ModelHandle, ctx: JobContext) -> LoopResult:
    outputs = job_outputs(job, ctx)
    options = dataset_options(job)
    dataset = data.scan_dataset(options)
    for warning in dataset.warnings:
        ctx.warn(warning)
    buckets = data.assign_buckets(dataset, options)
    cache = data.LatentCache(ctx.cache_dir / "latents")
    identity = handle.identity     # the latents' key for the whole job (a VAE changed meanwhile counts next job)
    latents = cache.get_latents(list(zip(dataset.items, buckets)), handle,
                                batch_size=min(LATENT_CACHE_MAX_BATCH, job.batch_size),
                                flip=options.flip_horizontal, check_stop=lambda: ctx.control.check("caching latents"))
    sampler = data.BatchSampler.for_dataset(dataset, buckets, job.batch_size, job.seed)
    text_cache = None if job.train_text_encoder else data.TextEmbeddingCache()
    if text_cache is not None:
        wanted = data.caption_keys(dataset, buckets, options)
        if wanted is not None:
            text_cache.prime(wanted, handle, check_stop=lambda: ctx.control.check("encoding captions"))
    noise = noise_settings(handle, job)
    network = build_network(handle, job)
    facts = facts_for(handle, job, job, noise.prediction, num_images=len(dataset.items),
                      **dataset_facts(dataset, buckets, job.steps, job.batch_size * job.gradient_accumulation),
                      tag_frequency=dataset.tag_frequency())
    preview = previewer(job, handle, network, outputs, render_guided_preview, ctx.log,
                        (job.resolution, job.resolution), ctx.events)

    def on_progress(progress) -> None:
        if ctx.events:
            ctx.events(progress)
        preview(progress)

    loop = TrainingLoop(handle, network, loop_settings(job, job), outputs, facts, on_progress, ctx.control,
                        extra_state=lambda: {"sampler": sampler.state_dict()})

    def compute_loss(micro_step: int) -> torch.Tensor:
        batch = next(sampler)
        x0, captions = data.collate(batch, dataset, latents, identity, options)
        size = (batch.bucket[1], batch.bucket[0])
        if text_cache is not None:
            cond = text_cache.get(captions, size, handle)
        else:
            cond = handle.encode_prompts(captions, size)
        return diffusion_loss(handle, x0.to(handle.device), cond, noise, loop.generator)

    return run_loop(loop, compute_loss, ctx, lambda extra: sampler.load_state_dict(extra["sampler"]))
