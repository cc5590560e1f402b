"""diffusers -> ldm/sgm state dicts, to write tiny single-file checkpoints in tests.

The inverse of what diffusers' ``single_file_utils`` does, written independently so that a round
trip (diffusers -> file -> ``load_single_file``) checks both sides. UNet paths go through
``trainer.models.naming.unet_diffusers_to_ldm``.
"""
from __future__ import annotations

import torch

from trainer.models.naming import UNetLayout, unet_diffusers_to_ldm

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    layout = UNetLayout.from_config(unet.config)
    out = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        ldm = _UNET_TOP.get(module) or unet_diffusers_to_ldm(module, layout)
        out["model.diffusion_model." + ldm + "." + param] = value
    return out


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        k = key.replace("conv_norm_out", "norm_out")
        parts = k.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            side, kind, b = parts[0], parts[1], int(parts[2])
            rest = ".".join(parts[3:])
            block = f"down.{b}" if kind == "down_blocks" else f"up.{n_up - 1 - b}"
            rest = (rest.replace("resnets.", "block.").replace("downsamplers.0.", "downsample.")
                    .replace("upsamplers.0.", "upsample."))
            for d, l in _VAE_RESNET.items():
                rest = rest.replace(d, l)
            k = f"{side}.{block}.{rest}"
        elif parts[1] == "mid_block":
            side, kind, i = parts[0], parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if kind == "resnets":
                for d, l in _VAE_RESNET.items():
                    rest = rest.replace(d, l)
                k = f"{side}.mid.block_{i + 1}.{rest}"
            else:
                module, param = rest.rsplit(".", 1)
                k = f"{side}.mid.attn_1.{_VAE_ATTN[module]}.{param}"
                if value.ndim == 2:                       # ldm attention uses 1x1 convs
                    value = value[:, :, None, None]
        out["first_stage_model." + k] = value
    return out


def _clip_state(model) -> dict[str, torch.Tensor]:
    """State dict with the ``text_model.`` level, whatever the transformers version."""
    sd = model.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L as the ldm ``FrozenCLIPEmbedder`` stores it (transformers' own names under ``prefix``)."""
    return {prefix + k: v for k, v in _clip_state(text_encoder).items() if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(text_encoder, prefix: str, extra_layers: int = 0) -> dict[str, torch.Tensor]:
    """OpenCLIP as ``FrozenOpenCLIPEmbedder`` stores it: fused ``attn.in_proj_*``, ``text_projection`` [width, dim].

    ``extra_layers`` appends random resblocks (and a text projection when the model has none) the way
    real SD2 files carry OpenCLIP-H's last layer that the diffusers SD2 text encoder leaves out.
    """
    sd = _clip_state(text_encoder)
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    n = text_encoder.config.num_hidden_layers
    for i in range(n):
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for d, l in _OPEN_CLIP_LAYER.items():
            for p in ("weight", "bias"):
                out[dst + f"{l}.{p}"] = sd[src + f"{d}.{p}"]
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([sd[src + f"self_attn.{q}_proj.{p}"] for q in "qkv"])
    for j in range(n, n + extra_layers):
        for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            out[k.replace("resblocks.0.", f"resblocks.{j}.")] = torch.randn_like(out[k])
    if extra_layers and "text_projection" not in out:
        width = text_encoder.config.hidden_size
        out["text_projection"] = torch.randn(width, width)
        out["logit_scale"] = torch.tensor(4.6052)
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, arch: str, extra_open_clip_layers: int = 0) -> dict[str, torch.Tensor]:
    """A whole SD1 / SD2 / SDXL diffusers pipeline as one ldm/sgm state dict."""
    out = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if arch == "sd1":
        out.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    elif arch == "sd2":
        out.update(open_clip_to_ldm(pipe.text_encoder, "cond_stage_model.model.", extra_open_clip_layers))
    elif arch == "sdxl":
        out.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        out.update(open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        raise ValueError(arch)
    return {k: v.detach().contiguous() for k, v in out.items()}
