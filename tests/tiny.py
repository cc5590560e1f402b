"""Tiny real diffusers pipelines (random, seeded) for tests: SD1 and SDXL architectures."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from trainer.models.clip_vocab import bytes_to_unicode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_LEN = 16


def char_tokenizer(folder: Path, pad: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer with no merges: every word becomes its letters (514 tokens)."""
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad,
                         model_max_length=MAX_LEN)


def _text_config(hidden: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=512,
                          eos_token_id=513, pad_token_id=513, **kw)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1, sample_size=32)


def _scheduler(prediction: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)


def sd1_pipeline(tmp: Path, seed: int = 0, prediction: str = "epsilon") -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    text = CLIPTextModel(_text_config(32))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=char_tokenizer(tmp / "tok"), unet=unet,
                                   scheduler=_scheduler(prediction), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe


def sdxl_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32)
    te1 = CLIPTextModel(_text_config(32))
    te2 = CLIPTextModelWithProjection(_text_config(32, projection_dim=32))
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=char_tokenizer(tmp / "tok1"),
                                     tokenizer_2=char_tokenizer(tmp / "tok2", pad="!"), unet=unet,
                                     scheduler=_scheduler())
    return pipe
