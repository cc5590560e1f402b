"""Built-in demo model of LoRA Queue.

A tiny Stable-Diffusion-architecture pipeline (CLIP text encoder, AutoencoderKL,
UNet2DConditionModel, DDIM scheduler) trained from scratch on procedurally drawn
64 px pictures such as "a red circle on a white background".  It is small
(a few MB) and samples in well under a second on one CPU thread, so the
trainer's LoRA pipeline can be exercised end to end without any download.

    from trainer.models.demo import load_pipeline
    pipe = load_pipeline()
    img = pipe("a blue square on a black background", num_inference_steps=30,
               guidance_scale=5.0, height=64, width=64).images[0]

Retrain with ``python -m trainer.models.demo.train_demo``.
"""
from __future__ import annotations

from pathlib import Path

from trainer.models.demo.shapes import BACKGROUNDS, COLOURS, SHAPES, all_combinations, caption, draw

DEMO_DIR: Path = Path(__file__).resolve().parent / "weights"
SIZE = 64  # native resolution in pixels

_REQUIRED = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")

__all__ = ["DEMO_DIR", "SIZE", "load_pipeline", "weights_available", "draw", "caption",
           "all_combinations", "COLOURS", "SHAPES", "BACKGROUNDS"]


def weights_available(path: Path | str = DEMO_DIR) -> bool:
    path = Path(path)
    return all((path / name).exists() for name in _REQUIRED)


def load_pipeline(device="cpu", dtype=None, path: Path | str = DEMO_DIR):
    """Load the demo ``StableDiffusionPipeline`` offline from ``path``.

    ``dtype`` defaults to ``torch.float32``.  Raises ``FileNotFoundError`` with
    a retraining hint if the weights folder is missing or incomplete.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not weights_available(path):
        missing = [n for n in _REQUIRED if not (path / n).exists()]
        raise FileNotFoundError(
            f"demo model weights not found in {path} (missing: {', '.join(missing)}). "
            "Recreate them with: python -m trainer.models.demo.train_demo")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(path), torch_dtype=dtype or torch.float32, local_files_only=True,
        text_encoder=_text_encoder(path / "text_encoder", dtype or torch.float32),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        use_safetensors=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_encoder(folder: Path, dtype):
    """The CLIP text encoder, its weights keyed as the installed transformers names them.

    transformers 5 saves CLIPTextModel without the ``text_model.`` level that 4.x (the WebUI's
    transformers) expects; ``from_pretrained`` across that change silently starts from random weights.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder), local_files_only=True))
    wanted = set(model.state_dict())

    def key(name: str) -> str:
        if name not in wanted and "text_model." + name in wanted:
            return "text_model." + name
        if name not in wanted and name.startswith("text_model.") and name[len("text_model."):] in wanted:
            return name[len("text_model."):]
        return name

    missing, unexpected = model.load_state_dict({key(k): v for k, v in load_file(folder / "model.safetensors").items()},
                                                strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"demo text encoder in {folder} does not fit this transformers version: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(dtype).eval()
