"""Load a user's single-file checkpoint (A1111 / ComfyUI ``.safetensors``) as a diffusers pipeline, offline.

Two steps:

1. :func:`detect_checkpoint` reads only the safetensors header (key names, shapes, dtypes, metadata)
   and says what the file is: ``sd1`` / ``sd2`` / ``sdxl``, eps or v prediction when the file tells.
   Pickle files are refused before anything is unpickled.
2. :func:`load_single_file` builds each component from the configs shipped in ``configs/`` (the
   official diffusers configs of SD 1.5, SD 2.1 (+ base) and SDXL base 1.0), converts the ldm/sgm
   weights with diffusers' own conversion functions, and loads them strictly. Tokenizers come from
   :mod:`clip_vocab`. Nothing touches a model hub.

``from_single_file(config=<local folder>, local_files_only=True)`` is not used: it also needs
tokenizer files in that folder, loads non-strictly (missing weights would stay random), and
decides SD2's prediction type by itself.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from trainer.models.handle import ModelError

CONFIGS_DIR = Path(__file__).parent / "configs"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_CONVERT_HINT = ("we load .safetensors only; convert the file first (e.g. the WebUI's "
                 "'Checkpoint Merger' tab or kohya's convert script, saving as .safetensors), "
                 "or download the .safetensors version of the model")
_MAX_HEADER = 100 * 1024 * 1024
#: safetensors dtype names of the float types checkpoints hold
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Expected cross-attention width (UNet ``attn2.to_k`` input) of the full-size models.
_ATTN2_K = UNET_PREFIX + "{block}.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint holds, read from its header only."""

    arch: str                          # sd1 | sd2 | sdxl
    prediction: str | None             # eps | v | None (unknown: SD2 without a marker)
    prediction_source: str             # why we believe it ("v_pred key", "metadata ...", "default", "unknown")
    dtype: torch.dtype                 # dtype of the UNet weights
    has_vae: bool
    has_text_encoders: bool
    context_dim: int | None            # cross-attention width found in the UNet
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def config_name(self) -> str:
        """Name of the shipped config folder that fits (SD2 depends on the prediction type)."""
        if self.arch == "sd1":
            return "sd15"
        if self.arch == "sdxl":
            return "sdxl"
        return "sd21-base" if self.prediction == "eps" else "sd21"


# ---------------------------------------------------------------- header


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """``({key: {"dtype", "shape", "data_offsets"}}, metadata)`` of a safetensors file.

    Reads the 8-byte length and the JSON header only; refuses pickles and broken files with a
    :class:`ModelError` that says what was found and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    name = path.name
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(f"'{name}' is a pickle checkpoint ({path.suffix}); {_CONVERT_HINT}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if size == 0:
            raise ModelError(f"'{name}' is empty (0 bytes); the download or copy probably failed — fetch it again")
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise ModelError(f"'{name}' is a pickle/zip checkpoint (torch.save format) with a .safetensors name; "
                             f"{_CONVERT_HINT}")
        if len(head) < 8:
            raise ModelError(f"'{name}' is truncated ({size} bytes); fetch it again")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ModelError(f"'{name}' is not a safetensors file (its first 8 bytes do not give a header "
                             f"length); {_CONVERT_HINT}")
        if 8 + n > size:
            raise ModelError(f"'{name}' is truncated: its header says {n} bytes but the file has {size}; "
                             "fetch it again")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"'{name}' is not a safetensors file (its header is not JSON); {_CONVERT_HINT}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end > data_size:
        raise ModelError(f"'{name}' is truncated: its tensors need {end} bytes of data but only {data_size} "
                         "are there; fetch it again")
    return header, {str(k): str(v) for k, v in metadata.items()}


def detect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Architecture, prediction type and dtype of a single-file ``.safetensors`` checkpoint."""
    header, metadata = read_header(path)
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: v["dtype"] for k, v in header.items()}
    try:
        return detect_from_header(shapes, metadata, dtypes)
    except ModelError as e:
        raise ModelError(f"'{Path(path).name}': {e}") from None


# ---------------------------------------------------------------- detection (pure)


def _prediction_from_markers(keys, metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """v/eps from a ``v_pred`` key or training metadata; (None, "unknown") when the file is silent."""
    if "v_pred" in keys:
        return "v", "v_pred key"
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec:
        if spec in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
            return "v", "metadata modelspec.prediction_type"
        if spec in ("eps", "epsilon"):
            return "eps", "metadata modelspec.prediction_type"
    flag = metadata.get("ss_v_parameterization", "").strip().lower()
    if flag in ("true", "1"):
        return "v", "metadata ss_v_parameterization"
    if flag in ("false", "0"):
        return "eps", "metadata ss_v_parameterization"
    return None, "unknown"


def _top_level(keys, limit: int = 6) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    more = f" (+{len(prefixes) - limit} more)" if len(prefixes) > limit else ""
    return ", ".join(prefixes[:limit]) + more


def detect_from_header(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None,
                       dtypes: Mapping[str, str] | None = None) -> CheckpointInfo:
    """Pure detection from ``{key: shape}`` (+ header metadata and dtypes)."""
    metadata = metadata or {}
    keys = shapes.keys()
    if not shapes:
        raise ModelError("the file holds no tensors")
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise ModelError("this is a LoRA, not a checkpoint; load a full model (SD1/SD2/SDXL) and apply the LoRA to it")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(("down_blocks.", "unet.", "text_model.")) for k in keys):
            raise ModelError("this looks like a diffusers component (UNet / text encoder weights alone), not a "
                             "single-file checkpoint; load the diffusers folder instead")
        raise ModelError(f"no Stable Diffusion UNet found (no '{UNET_PREFIX}*' keys); the file holds "
                         f"{_top_level(keys)} — we load SD1, SD2 and SDXL single-file checkpoints")
    if any(k.startswith(("embedder.model.", "depth_model.", "control_model.")) for k in keys):
        raise ModelError("this is an SD2 unCLIP / depth / ControlNet model; only SD1, SD2 and SDXL text-to-image "
                         "checkpoints are supported")
    in_channels = conv_in[1]
    sdxl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    refiner = not sdxl and any(k.startswith("conditioner.embedders.0.model.") for k in keys)
    if refiner:
        raise ModelError("this is an SDXL refiner (one OpenCLIP-G text encoder, no CLIP-L); train on the SDXL base "
                         "model or a fine-tune of it")
    if in_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_channels, "an unknown variant")
        raise ModelError(f"this is {kind} (the UNet takes {in_channels} input channels, text-to-image models take 4); "
                         "use the matching text-to-image checkpoint")

    context = None
    for block in ("input_blocks.1", "input_blocks.4", "middle_block"):
        shape = shapes.get(_ATTN2_K.format(block=block))
        if shape is not None:
            context = shape[1]
            break
    if sdxl:
        arch = "sdxl"
    elif any(k.startswith(SD2_TE_PREFIX) for k in keys):
        arch = "sd2"
    elif any(k.startswith(SD1_TE_PREFIX) for k in keys):
        arch = "sd1"
    elif any(k.startswith("conditioner.") for k in keys) or any(k.startswith("cond_stage_model.") for k in keys):
        raise ModelError(f"unknown text encoder layout ({_top_level([k for k in keys if 'cond' in k])}); "
                         "we load SD1 (CLIP-L), SD2 (OpenCLIP-H) and SDXL (CLIP-L + OpenCLIP-G) checkpoints")
    elif context in (768, 1024):
        arch = "sd1" if context == 768 else "sd2"   # UNet + VAE only: decide from the cross-attention width
    elif context == 2048 or any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        arch = "sdxl"
    else:
        raise ModelError(f"cannot tell SD1 / SD2 / SDXL apart (cross-attention width {context}); "
                         "the file has no text encoder to go by")

    prediction, source = _prediction_from_markers(keys, metadata)
    if prediction is None and arch != "sd2":
        prediction, source = "eps", "default for " + arch
    unet_dtype = (dtypes or {}).get(UNET_PREFIX + "input_blocks.0.0.weight", "F32")
    text_prefixes = {"sd1": (SD1_TE_PREFIX,), "sd2": (SD2_TE_PREFIX,), "sdxl": (SDXL_TE1_PREFIX, SDXL_TE2_PREFIX)}[arch]
    return CheckpointInfo(
        arch=arch, prediction=prediction, prediction_source=source,
        dtype=SAFETENSORS_DTYPES.get(unet_dtype, torch.float32),
        has_vae=any(k.startswith(VAE_PREFIX) for k in keys),
        has_text_encoders=all(any(k.startswith(p) for k in keys) for p in text_prefixes),
        context_dim=context, metadata=dict(metadata),
    )


# ---------------------------------------------------------------- v-prediction probe (A1111's idea)


def v_prediction_from_probe(output: torch.Tensor, sample: torch.Tensor) -> bool:
    """At t=999 on a constant 0.5 input an eps model returns about its input (output - input ~ 0);
    a v model returns about -x0, far below it. A1111 draws the line at a mean difference of -1."""
    return (output.float() - sample.float()).mean().item() < -1.0


@torch.no_grad()
def probe_v_prediction(unet: Callable, context_dim: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> bool:
    """Run an SD2 UNet once on a fixed input and decide eps vs v (see :func:`v_prediction_from_probe`)."""
    sample = torch.full((1, 4, 8, 8), 0.5, dtype=dtype, device=device)
    context = torch.full((1, 2, context_dim), 0.5, dtype=dtype, device=device)
    out = unet(sample, torch.tensor([999], device=device), encoder_hidden_states=context)
    out = out.sample if hasattr(out, "sample") else out
    return v_prediction_from_probe(out, sample)


# ---------------------------------------------------------------- building components


def _read_tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}


def _config(folder: Path, component: str, file: str = "config.json") -> dict:
    config_path = folder / component / file
    if not config_path.is_file():
        raise ModelError(f"config '{config_path}' is missing; the config folder must hold "
                         f"{component}/{file} (see trainer/models/configs/)")
    return json.loads(config_path.read_text())


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                 ignore: Callable[[str], bool] = lambda k: False) -> torch.nn.Module:
    """Load ``state`` into a model built on the meta device (or a real one); every weight must be there."""
    expected = set(model.state_dict().keys())
    state = {k: v for k, v in state.items() if k in expected or not ignore(k)}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        detail = "; ".join(s for s in (
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else "") if s)
        raise ModelError(f"the {what} weights do not match its config: {detail}. The file is probably a "
                         "different variant than detected, or damaged")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"the {what} weights do not fit its config ({str(e).splitlines()[-1].strip()}); "
                         "the file is a different variant than detected, or damaged") from None
    for name, buffer in model.named_buffers():       # non-persistent buffers are still on meta
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise ModelError(f"internal: {what} buffer {name} was not initialised")
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                  persistent=False)
    return model.eval().requires_grad_(False)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast when the dtype differs (plain ``nn.Module.to``: diffusers' override only adds a warning)."""
    if next(module.parameters()).dtype != dtype:
        torch.nn.Module.to(module, dtype=dtype)
    return module


def _unet(folder: Path, tensors: dict[str, torch.Tensor]):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _config(folder, "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return _load_strict(unet, convert_ldm_unet_checkpoint(tensors, dict(unet.config)), "UNet")


def _vae(folder: Path, tensors: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = _config(folder, "vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    return _load_strict(vae, convert_ldm_vae_checkpoint(tensors, dict(vae.config)), "VAE")


def _text_encoder(folder: Path, component: str, tensors: dict[str, torch.Tensor], prefix: str | None):
    """CLIP-L (``prefix`` None: the ldm CLIP prefixes) or OpenCLIP (``prefix`` = its ``.model.`` root)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = _config(folder, component)
    architectures = config.get("architectures") or []
    with_projection = component == "text_encoder_2" or "CLIPTextModelWithProjection" in architectures
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    if prefix is None:
        state = convert_ldm_clip_checkpoint(tensors)
    else:
        state = convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    if not hasattr(model, "text_model"):                  # transformers >= 5.6 flattened CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    n_layers = config["num_hidden_layers"]

    def ignore(key: str) -> bool:
        # SD2 files carry OpenCLIP's 24th layer and its projection; diffusers' SD2 text encoder
        # stops at the penultimate layer (23), as SD2 itself does. Old files carry position_ids.
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= n_layers:
                return True
        return key.endswith("position_ids") or (cls is CLIPTextModel and key.startswith("text_projection"))
    return _load_strict(model, state, component.replace("_", " "), ignore)


def _scheduler(folder: Path, prediction: str):
    import diffusers

    config = _config(folder, "scheduler", "scheduler_config.json")
    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), None)
    if cls is None:
        raise ModelError(f"unknown scheduler class {config.get('_class_name')!r} in {folder}/scheduler")
    return cls.from_config(config, prediction_type="v_prediction" if prediction == "v" else "epsilon")


def load_single_file(path: str | os.PathLike, *, prediction: str = "auto", config_dir: str | os.PathLike | None = None,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     tokenizer_cache_dir: str | os.PathLike | None = None):
    """A ``StableDiffusionPipeline`` (SD1/SD2) or ``StableDiffusionXLPipeline`` from one ``.safetensors``.

    ``prediction``: ``"auto"`` (the file's ``v_pred`` key / metadata; SD2 without them: run the UNet
    once as A1111 does), or ``"eps"`` / ``"v"`` to override. ``config_dir`` replaces the shipped
    configs (a folder laid out like ``configs/sd15``). Works with ``HF_HUB_OFFLINE=1``.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from trainer.models.clip_vocab import PAD_CLIP_L, PAD_OPEN_CLIP, clip_tokenizer

    if prediction not in ("auto", "eps", "v"):
        raise ModelError(f"prediction must be auto, eps or v, got {prediction!r}")
    path = Path(path)
    info = detect_checkpoint(path)
    if not info.has_vae or not info.has_text_encoders:
        lacking = " and ".join(s for s in ("" if info.has_vae else "VAE",
                                           "" if info.has_text_encoders else "text encoder") if s)
        raise ModelError(f"'{path.name}' has no {lacking} weights (a UNet-only file); use a full checkpoint")
    if prediction == "auto":
        prediction = info.prediction or "unknown"
    folder = Path(config_dir) if config_dir else CONFIGS_DIR / ("sd21" if info.arch == "sd2" else info.config_name)

    unet = _cast(_unet(folder, _read_tensors(path, (UNET_PREFIX,))), dtype)
    if prediction == "unknown":                           # SD2 that does not say: ask the UNet
        prediction = "v" if probe_v_prediction(unet, unet.config.cross_attention_dim, dtype) else "eps"
    if info.arch == "sd2" and not config_dir and prediction == "eps":
        folder = CONFIGS_DIR / "sd21-base"                # 512 px eps model: base scheduler and sample size
        unet.register_to_config(sample_size=_config(folder, "unet")["sample_size"])
    vae = _vae(folder, _read_tensors(path, (VAE_PREFIX,)))
    scheduler = _scheduler(folder, prediction)

    if info.arch == "sdxl":
        tensors = _read_tensors(path, ("conditioner.embedders.",))
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=_text_encoder(folder, "text_encoder", tensors, None),
            text_encoder_2=_text_encoder(folder, "text_encoder_2", tensors, SDXL_TE2_PREFIX),
            tokenizer=clip_tokenizer(PAD_CLIP_L, tokenizer_cache_dir),
            tokenizer_2=clip_tokenizer(PAD_OPEN_CLIP, tokenizer_cache_dir),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        tensors = _read_tensors(path, ("cond_stage_model.",))
        sd2 = info.arch == "sd2"
        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=_text_encoder(folder, "text_encoder", tensors, SD2_TE_PREFIX if sd2 else None),
            tokenizer=clip_tokenizer(PAD_OPEN_CLIP if sd2 else PAD_CLIP_L, tokenizer_cache_dir),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            _cast(module, dtype)
    return pipe if torch.device(device).type == "cpu" else pipe.to(device)
