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


def declared(job: jobs.Job, name: str):
    """A field's value in ``job``, or its declared default where the job's mode does not use it
    (e.g. ``gradient_accumulation`` of a copier job): the declaration is the one place defaults live."""
    if any(f.name == name for f in job.spec_fields):
        return getattr(job, name)
    return jobs.FIELDS[name].default_for(job.scope)


dataset_options = data.options_for


def loop_settings(settings, job, phase: str = "") -> LoopSettings:
    """LoopSettings from a job (or a copier pass) that carries the training group of fields."""
    return LoopSettings(
        steps=settings.steps, lr=settings.lr, text_encoder_lr=declared(job, "text_encoder_lr"),
        optimizer=settings.optimizer, optimizer_args=jobs.parse_optimizer_args(settings.optimizer_args),
        lr_scheduler=settings.lr_scheduler, lr_warmup_steps=settings.lr_warmup_steps,
        lr_scheduler_num_cycles=settings.lr_scheduler_num_cycles, lr_scheduler_power=settings.lr_scheduler_power,
        gradient_accumulation=declared(job, "gradient_accumulation"), max_grad_norm=job.max_grad_norm,
        mixed_precision=job.mixed_precision, gradient_checkpointing=job.gradient_checkpointing,
        save_every_n_steps=job.save_every_n_steps,
        save_dtype=SAVE_PRECISION[job.save_precision], seed=settings.seed, phase=phase)


def prediction_of(handle: ModelHandle, job) -> str:
    """eps or v: the job's override, or what the model says (``auto``)."""
    return handle.prediction if job.prediction == "auto" else job.prediction


def noise_settings(handle: ModelHandle, job, settings=None) -> NoiseSettings:
    settings = settings or job
    return NoiseSettings(prediction_of(handle, job), declared(settings, "timestep_min"),
                         declared(settings, "timestep_max"), declared(job, "min_snr_gamma"),
                         declared(job, "noise_offset"))


def network_shape(settings) -> NetworkShape:
    return NetworkShape(settings.network_dim, settings.network_alpha, settings.conv_dim, settings.conv_alpha)


def check_targets(targets: list, options: TargetOptions) -> None:
    """Refuse a target search that found less than the target set implies (a host whose layers we did not
    recognise), rather than train a LoRA that silently leaves them out."""
    unet = [t.key for t in targets if t.key.startswith("lora_unet_")]
    if not options.blocks and not any("_attn1_" in k or "_attn2_" in k for k in unet):   # every block: some attend
        raise jobs.JobError(f"no attention layer of this model's UNet was found to train ({len(unet)} other modules): "
                            "the model's layers are of a kind LoRA Queue does not recognise", field="target_set")
    if options.text_encoder and not any(t.key.startswith("lora_te") for t in targets):
        raise jobs.JobError("train text encoder is on but no layer of this model's text encoder was found to train",
                            field="train_text_encoder")


def build_network(handle: ModelHandle, job, settings=None) -> LoraNetwork:
    """The network of a job (or copier pass), optionally started from ``init_lora``, attached switched off
    under the model lock: a generation before the first step sees the base model (the loop switches the
    network on only inside each step)."""
    settings = settings or job
    options = TargetOptions(job.target_set, declared(job, "train_text_encoder"), tuple(settings.blocks))
    targets = handle.lora_targets(options)
    check_targets(targets, options)
    network = LoraNetwork(targets, network_shape(settings), seed=settings.seed)
    if declared(job, "init_lora"):
        network.load_weights(job.init_lora, handle.arch)
    network.to(handle.device).disable()
    with handle.lock():
        network.attach()
    return network


def dataset_facts(dataset: data.Dataset, buckets: list[tuple[int, int]], steps: int, batch_size: int
                  ) -> dict:
    """kohya's dataset_dirs / bucket_info / epochs for a scanned dataset and its buckets."""
    dirs: dict[str, dict[str, int]] = {}
    for item in dataset.items:
        entry = dirs.setdefault(item.group or dataset.root.name, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    counts: dict[tuple[int, int], int] = {}
    for bucket in buckets:
        counts[tuple(bucket)] = counts.get(tuple(bucket), 0) + 1
    info = {"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
            "mean_img_ar_error": 0.0}
    epochs = max(1, -(-steps * batch_size // max(1, dataset.num_samples)))
    return {"dataset_dirs": dirs, "bucket_info": info, "epochs": epochs}


def settings_metadata(job, settings=None) -> dict[str, str]:
    """The job's settings under the ``ss_*`` keys their fields declare (a copier pass's own first)."""
    out = {}
    for spec in (job, settings) if settings is not None and settings is not job else (job,):
        for f in spec.spec_fields:
            if f.metadata_key:
                value = getattr(spec, f.name)
                out[f.metadata_key] = repr(value) if isinstance(value, float) else str(value)
    return out


def facts_for(handle: ModelHandle, job, settings, prediction: str, **extra) -> TrainingFacts:
    shape = network_shape(settings)
    base = handle.base_model()
    return TrainingFacts(
        base_model_name=base.name, base_model_hash=base.legacy_hash, base_model_sha256=base.sha256,
        arch=handle.arch, prediction=prediction, output_name=job.name, network_dim=shape.network_dim,
        network_alpha=shape.network_alpha, conv_dim=shape.conv_dim, conv_alpha=shape.conv_alpha,
        resolution=job.resolution, train_text_encoder=declared(job, "train_text_encoder"),
        settings=settings_metadata(job, settings), **extra)
