"""Parameter shapes of a model's parts from its config alone: no weights, no diffusers, no download.

The memory budget (``trainer.train.budget``) needs the size of every weight and the layout of the UNet
(which modules a LoRA targets, at which resolution each block runs). Both follow from the diffusers
configs we ship (``configs/sd15``, ``configs/sdxl``): this module walks a config the way diffusers'
``UNet2DConditionModel``, ``AutoencoderKL`` and transformers' ``CLIPTextModel`` build themselves, and
names every parameter as their state dicts do (a test compares the two, name for name and shape for shape).

Besides the parameters, the UNet walk records its *blocks* (each resnet and each transformer block with
its channels and downscale): what the activation estimate is computed from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import Any, Mapping

CONFIGS = Path(__file__).resolve().parent / "configs"
#: The architectures the budget knows, and the folder of their configs.
ARCH_CONFIGS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}


@dataclass(frozen=True)
class Block:
    """One unit of the UNet's forward, where the activations are: a resnet or a transformer block."""

    kind: str                # "resnet" | "transformer" | "sampler" | "io"
    path: str                # diffusers module path (resnets: the resnet; transformers: the Transformer2DModel)
    channels_in: int
    channels: int            # output channels
    downscale: int           # 1 at the latent's size, 2 after one downsampler, ...
    depth: int = 0           # transformer: number of BasicTransformerBlocks
    context_dim: int = 0     # transformer: cross-attention width
    heads: int = 0


@dataclass
class Shapes:
    """Every parameter of one model part, ``name -> shape``, and (UNet only) its blocks."""

    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    blocks: list[Block] = field(default_factory=list)

    def count(self) -> int:
        return sum(prod(s) for s in self.params.values())

    def modules(self) -> dict[str, tuple[int, ...]]:
        """Weighted modules (Linear, Conv2d): module path -> weight shape (norms and embeddings excluded)."""
        return {name[: -len(".weight")]: s for name, s in self.params.items()
                if name.endswith(".weight") and len(s) in (2, 4) and not _is_embedding(name)}

    # -- builders (diffusers' construction order) --------------------------------------------------------
    def linear(self, path: str, n_in: int, n_out: int, bias: bool = True) -> None:
        self.params[f"{path}.weight"] = (n_out, n_in)
        if bias:
            self.params[f"{path}.bias"] = (n_out,)

    def conv(self, path: str, n_in: int, n_out: int, kernel: int, bias: bool = True) -> None:
        self.params[f"{path}.weight"] = (n_out, n_in, kernel, kernel)
        if bias:
            self.params[f"{path}.bias"] = (n_out,)

    def norm(self, path: str, channels: int) -> None:
        self.params[f"{path}.weight"] = (channels,)
        self.params[f"{path}.bias"] = (channels,)


def _is_embedding(name: str) -> bool:
    return "embeddings." in name and "embedding" in name.rsplit(".", 2)[-2]


def _per_block(value: Any, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _resnet(s: Shapes, path: str, n_in: int, n_out: int, temb: int | None) -> None:
    s.norm(f"{path}.norm1", n_in)
    s.conv(f"{path}.conv1", n_in, n_out, 3)
    if temb:
        s.linear(f"{path}.time_emb_proj", temb, n_out)
    s.norm(f"{path}.norm2", n_out)
    s.conv(f"{path}.conv2", n_out, n_out, 3)
    if n_in != n_out:
        s.conv(f"{path}.conv_shortcut", n_in, n_out, 1)


def _transformer(s: Shapes, path: str, c: int, depth: int, context: int, linear_projection: bool) -> None:
    s.norm(f"{path}.norm", c)
    project = s.linear if linear_projection else (lambda p, i, o: s.conv(p, i, o, 1))
    project(f"{path}.proj_in", c, c)
    for k in range(depth):
        b = f"{path}.transformer_blocks.{k}"
        for n, (attn, kv) in enumerate((("attn1", c), ("attn2", context)), start=1):
            s.norm(f"{b}.norm{n}", c)
            s.linear(f"{b}.{attn}.to_q", c, c, bias=False)
            s.linear(f"{b}.{attn}.to_k", kv, c, bias=False)
            s.linear(f"{b}.{attn}.to_v", kv, c, bias=False)
            s.linear(f"{b}.{attn}.to_out.0", c, c)
        s.norm(f"{b}.norm3", c)
        s.linear(f"{b}.ff.net.0.proj", c, 8 * c)      # GEGLU: value and gate, 4c each
        s.linear(f"{b}.ff.net.2", 4 * c, c)
    project(f"{path}.proj_out", c, c)


def unet_shapes(config: Mapping[str, Any]) -> Shapes:
    """``UNet2DConditionModel(**config)``'s parameters and blocks (SD1/SD2/SDXL layouts)."""
    s = Shapes()
    channels = list(config["block_out_channels"])
    n = len(channels)
    layers = config.get("layers_per_block", 2)
    depth = _per_block(config.get("transformer_layers_per_block", 1), n)
    heads = _per_block(config.get("num_attention_heads") or config.get("attention_head_dim", 8), n)
    context = config["cross_attention_dim"]
    linear = bool(config.get("use_linear_projection", False))
    temb = 4 * channels[0]
    s.conv("conv_in", config.get("in_channels", 4), channels[0], config.get("conv_in_kernel", 3))
    s.blocks.append(Block("io", "conv_in", config.get("in_channels", 4), channels[0], 1))
    s.linear("time_embedding.linear_1", channels[0], temb)
    s.linear("time_embedding.linear_2", temb, temb)
    if config.get("addition_embed_type") == "text_time":
        s.linear("add_embedding.linear_1", config["projection_class_embeddings_input_dim"], temb)
        s.linear("add_embedding.linear_2", temb, temb)

    out, scale = channels[0], 1
    for i, kind in enumerate(config["down_block_types"]):
        n_in, out = out, channels[i]
        for j in range(layers):
            path = f"down_blocks.{i}.resnets.{j}"
            _resnet(s, path, n_in if j == 0 else out, out, temb)
            s.blocks.append(Block("resnet", path, n_in if j == 0 else out, out, scale))
            if kind.startswith("CrossAttn"):
                path = f"down_blocks.{i}.attentions.{j}"
                _transformer(s, path, out, depth[i], context, linear)
                s.blocks.append(Block("transformer", path, out, out, scale, depth[i], context, heads[i]))
        if i < n - 1:
            s.conv(f"down_blocks.{i}.downsamplers.0.conv", out, out, 3)
            s.blocks.append(Block("sampler", f"down_blocks.{i}.downsamplers.0", out, out, scale))
            scale *= 2

    c = channels[-1]
    _resnet(s, "mid_block.resnets.0", c, c, temb)
    s.blocks.append(Block("resnet", "mid_block.resnets.0", c, c, scale))
    _transformer(s, "mid_block.attentions.0", c, depth[-1], context, linear)
    s.blocks.append(Block("transformer", "mid_block.attentions.0", c, c, scale, depth[-1], context, heads[-1]))
    _resnet(s, "mid_block.resnets.1", c, c, temb)
    s.blocks.append(Block("resnet", "mid_block.resnets.1", c, c, scale))

    reversed_channels, reversed_depth, reversed_heads = channels[::-1], depth[::-1], heads[::-1]
    out = reversed_channels[0]
    for i, kind in enumerate(config["up_block_types"]):
        previous, out = out, reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, n - 1)]
        for j in range(layers + 1):
            path = f"up_blocks.{i}.resnets.{j}"
            n_in = (previous if j == 0 else out) + (skip_in if j == layers else out)
            _resnet(s, path, n_in, out, temb)
            s.blocks.append(Block("resnet", path, n_in, out, scale))
            if kind.startswith("CrossAttn"):
                path = f"up_blocks.{i}.attentions.{j}"
                _transformer(s, path, out, reversed_depth[i], context, linear)
                s.blocks.append(Block("transformer", path, out, out, scale, reversed_depth[i], context,
                                      reversed_heads[i]))
        if i < n - 1:
            s.conv(f"up_blocks.{i}.upsamplers.0.conv", out, out, 3)
            scale //= 2
            s.blocks.append(Block("sampler", f"up_blocks.{i}.upsamplers.0", out, out, scale))
    s.norm("conv_norm_out", channels[0])
    s.conv("conv_out", channels[0], config.get("out_channels", 4), config.get("conv_out_kernel", 3))
    s.blocks.append(Block("io", "conv_out", channels[0], config.get("out_channels", 4), 1))
    return s


def _vae_attention(s: Shapes, path: str, c: int) -> None:
    s.norm(f"{path}.group_norm", c)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        s.linear(f"{path}.{name}", c, c)


def vae_shapes(config: Mapping[str, Any]) -> Shapes:
    """``AutoencoderKL(**config)``'s parameters; blocks: the encoder's resnets (what caching latents runs)."""
    s = Shapes()
    channels, layers = list(config["block_out_channels"]), config.get("layers_per_block", 1)
    latent = config.get("latent_channels", 4)
    n = len(channels)
    s.conv("encoder.conv_in", config.get("in_channels", 3), channels[0], 3)
    out, scale = channels[0], 1
    for i in range(n):
        n_in, out = out, channels[i]
        for j in range(layers):
            _resnet(s, f"encoder.down_blocks.{i}.resnets.{j}", n_in if j == 0 else out, out, None)
            s.blocks.append(Block("resnet", f"encoder.down_blocks.{i}.resnets.{j}", n_in if j == 0 else out, out,
                                  scale))
        if i < n - 1:
            s.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", out, out, 3)
            scale *= 2
    for part in ("encoder", "decoder"):
        c = channels[-1]
        if part == "decoder":
            s.conv("decoder.conv_in", latent, c, 3)
        _resnet(s, f"{part}.mid_block.resnets.0", c, c, None)
        _vae_attention(s, f"{part}.mid_block.attentions.0", c)
        _resnet(s, f"{part}.mid_block.resnets.1", c, c, None)
        if part == "encoder":
            s.norm("encoder.conv_norm_out", c)
            s.conv("encoder.conv_out", c, 2 * latent, 3)
    reversed_channels = channels[::-1]
    out = reversed_channels[0]
    for i in range(n):
        previous, out = out, reversed_channels[i]
        for j in range(layers + 1):
            _resnet(s, f"decoder.up_blocks.{i}.resnets.{j}", previous if j == 0 else out, out, None)
        if i < n - 1:
            s.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", out, out, 3)
    s.norm("decoder.conv_norm_out", channels[0])
    s.conv("decoder.conv_out", channels[0], config.get("out_channels", 3), 3)
    s.conv("quant_conv", 2 * latent, 2 * latent, 1)
    s.conv("post_quant_conv", latent, latent, 1)
    return s


def text_encoder_shapes(config: Mapping[str, Any]) -> Shapes:
    """transformers' ``CLIPTextModel`` (or ``...WithProjection``) parameters, named ``text_model.*``."""
    s = Shapes()
    h, inner = config["hidden_size"], config["intermediate_size"]
    s.params["text_model.embeddings.token_embedding.weight"] = (config["vocab_size"], h)
    s.params["text_model.embeddings.position_embedding.weight"] = (config["max_position_embeddings"], h)
    for k in range(config["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{k}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s.linear(f"{p}.self_attn.{name}", h, h)
        s.norm(f"{p}.layer_norm1", h)
        s.linear(f"{p}.mlp.fc1", h, inner)
        s.linear(f"{p}.mlp.fc2", inner, h)
        s.norm(f"{p}.layer_norm2", h)
    s.norm("text_model.final_layer_norm", h)
    if "WithProjection" in "".join(config.get("architectures") or []):
        s.linear("text_projection", h, config["projection_dim"], bias=False)
    return s


@dataclass(frozen=True)
class ModelShapes:
    """The parts of one architecture (SDXL has two text encoders)."""

    arch: str
    unet: Shapes
    vae: Shapes
    text_encoders: tuple[Shapes, ...]
    text_widths: tuple[int, ...]     # hidden size of each text encoder
    text_layers: tuple[int, ...]
    text_length: int                 # tokens per caption chunk (77)


def read_config(folder: str | Path, part: str) -> dict[str, Any]:
    return json.loads((Path(folder) / part / "config.json").read_text(encoding="utf-8"))


def shapes_from_folder(arch: str, folder: str | Path) -> ModelShapes:
    folder = Path(folder)
    parts = ["text_encoder"] + (["text_encoder_2"] if (folder / "text_encoder_2").is_dir() else [])
    texts = [read_config(folder, p) for p in parts]
    return ModelShapes(arch, unet_shapes(read_config(folder, "unet")), vae_shapes(read_config(folder, "vae")),
                       tuple(text_encoder_shapes(t) for t in texts), tuple(t["hidden_size"] for t in texts),
                       tuple(t["num_hidden_layers"] for t in texts), texts[0]["max_position_embeddings"])


@lru_cache(maxsize=None)
def model_shapes(arch: str) -> ModelShapes:
    """The shipped full-size architecture: ``sd1`` (SD1.5), ``sd2`` (SD2.1) or ``sdxl``."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"no shapes for architecture {arch!r}; known: {', '.join(ARCH_CONFIGS)}")
    return shapes_from_folder(arch, CONFIGS / ARCH_CONFIGS[arch])
