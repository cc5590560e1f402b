"""The metadata every LoRA file carries: kohya's ``ss_*`` keys and sai ``modelspec.*`` keys.

Pure: values in, a str->str dict out. Hashes are added by ``lora_files.write_lora`` from the bytes
actually written.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def modelspec_architecture(arch: str, prediction: str, resolution: int) -> str:
    if arch == "sdxl":
        base = "stable-diffusion-xl-v1-base"
    elif arch == "sd2":
        base = "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    else:
        base = "stable-diffusion-v1"
    return base + "/lora"


@dataclass
class TrainingFacts:
    """What a finished (or checkpointed) training run knows about itself.

    ``settings`` holds the job's declared settings under their ``ss_*`` keys (``trainer.train.plan``
    derives them from the field declarations); the rest is what only the run knows."""

    arch: str
    prediction: str = "eps"
    output_name: str = "lora"
    network_dim: int = 16
    network_alpha: float = 8.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    resolution: int = 512
    steps: int = 0
    train_text_encoder: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    num_images: int = 0
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    #: kohya's ``ss_dataset_dirs`` ({folder: {"n_repeats", "img_count"}}) and ``ss_bucket_info``
    #: ({"buckets": {i: {"resolution": [w, h], "count"}}}): A1111's metadata view shows the dataset size
    #: and the resolutions from them.
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    bucket_info: dict = field(default_factory=dict)
    epochs: int = 1
    base_model_name: str = ""
    base_model_hash: str = ""          # legacy 8-hex (ss_sd_model_hash)
    base_model_sha256: str = ""        # ss_new_sd_model_hash
    training_started_at: float = field(default_factory=time.time)
    session_id: int = field(default_factory=lambda: uuid.uuid4().int >> 96)
    extra: dict[str, str] = field(default_factory=dict)
    title: str = ""
    description: str = ""


def _num(x: float | str) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def file_metadata(arch: str, prediction: str, resolution: int | None, dim: int | str, alpha: float | str,
                  conv_dim: int | str = 0, conv_alpha: float | str = 1.0, title: str = "", description: str = "",
                  date: float | None = None) -> dict[str, str]:
    """The keys every LoRA file we write carries (trained or merged): the network's shape as kohya names
    it and the sai model spec. Merged files pass ranks that vary per module as text (e.g. "8" or "4-8")."""
    network_args = {"conv_dim": str(conv_dim), "conv_alpha": _num(conv_alpha)} if conv_dim else {}
    when = time.time() if date is None else date
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num(alpha),
        "ss_network_args": json.dumps(network_args),
        # kohya marks v-prediction SD1/SD2 models with "_v" (sd_v2_v); SDXL has one version name
        "ss_base_model_version": BASE_MODEL_VERSION[arch] + ("_v" if prediction == "v" and arch != "sdxl" else ""),
        "ss_v2": str(arch == "sd2"),
        "ss_v_parameterization": str(prediction == "v"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(arch, prediction, resolution or 512),
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if arch == "sdxl"
                                     else "diffusers"),
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when)),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
    }
    if resolution:
        meta["ss_resolution"] = f"({resolution}, {resolution})"
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    return meta


def lora_metadata(facts: TrainingFacts) -> dict[str, str]:
    """ss_* and modelspec.* metadata as kohya's train_network.py writes it."""
    meta = file_metadata(facts.arch, facts.prediction, facts.resolution, facts.network_dim, facts.network_alpha,
                         facts.conv_dim, facts.conv_alpha, facts.title or facts.output_name, facts.description,
                         facts.training_started_at)
    meta["ss_output_name"] = facts.output_name
    meta.update(facts.settings)
    lr = facts.settings.get("ss_learning_rate", "0.0")
    meta.update({
        "ss_steps": str(facts.steps),
        "ss_unet_lr": lr,
        "ss_network_train_unet_only": str(not facts.train_text_encoder),
        "ss_num_train_images": str(facts.num_images),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_session_id": str(facts.session_id),
        "ss_training_started_at": _num(facts.training_started_at),
        "ss_training_finished_at": _num(time.time()),
        "ss_epoch": str(facts.epochs),
        "ss_num_epochs": str(facts.epochs),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_bucket_info": json.dumps(facts.bucket_info) if facts.bucket_info else "null",
        # The conditioning is the host's own (A1111 applies its CLIP skip setting); kohya writes None when unset
        "ss_clip_skip": "None",
        "ss_sd_model_name": facts.base_model_name,
        "ss_sd_model_hash": facts.base_model_hash,
        "ss_new_sd_model_hash": facts.base_model_sha256,
    })
    meta.setdefault("ss_max_train_steps", str(facts.steps))
    meta.setdefault("ss_text_encoder_lr", lr)
    meta.update(facts.extra)
    return meta


#: The recipe an LCM job's defaults are: diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py
#: (and the LCM-LoRA report) for SD1.5 / SDXL.
LCM_RECIPE = "LCM-LoRA (diffusers train_lcm_distill_lora_sd_wds.py)"


def lcm_metadata(w_min: float, w_max: float, num_ddim_timesteps: int, loss_type: str, huber_c: float,
                 changed: list[str] = ()) -> dict[str, str]:
    """What an LCM-LoRA was distilled with. The teacher's guidance in WebUI terms (CFG scale = w + 1, both ends
    of the drawn range; equal when w was fixed) and in the LCM paper's w; the solver steps N; the recipe, with
    the recipe settings the job changed (``changed``, field names) named after it."""
    w_max = max(w_min, w_max)
    recipe = LCM_RECIPE + (f", changed: {', '.join(changed)}" if changed else "")
    return {
        "ss_lcm_teacher_cfg_min": _num(float(w_min) + 1),
        "ss_lcm_teacher_cfg_max": _num(float(w_max) + 1),
        "ss_lcm_guidance_w_min": _num(float(w_min)),
        "ss_lcm_guidance_w_max": _num(float(w_max)),
        "ss_lcm_num_ddim_timesteps": str(int(num_ddim_timesteps)),
        "ss_lcm_loss_type": loss_type,
        "ss_lcm_huber_c": _num(float(huber_c)),
        "ss_lcm_recipe": recipe,
    }
