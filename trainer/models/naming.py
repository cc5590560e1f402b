"""Module paths <-> kohya LoRA keys <-> LoRA Block Weight block ids.

Pure string functions. Two UNet spellings exist:

- diffusers: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
- ldm/sgm (A1111, kohya for SDXL): ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``

kohya writes SD1/SD2 UNet keys with the diffusers spelling and SDXL UNet keys with the ldm spelling,
whatever model it trained on; we do the same so that every host loads our files.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from trainer.jobs.vocabulary import BLOCK_IDS, KeyPrefix

UNET_PREFIX: KeyPrefix = "lora_unet_"
TE_PREFIXES: tuple[KeyPrefix, ...] = ("lora_te_", "lora_te1_", "lora_te2_")


#: Which slots a weight list of a given length addresses, per architecture family.
#: SD1/SD2: 17 = blocks that hold attention (plain LoRA), 26 = all (LoCon/LyCORIS).
#: SDXL: 12 = attention blocks, 20 = all.
BLOCK_SLOTS: dict[str, dict[int, tuple[str, ...]]] = {
    "sd1": {
        17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
        26: BLOCK_IDS,
    },
    "sdxl": {
        12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
             "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
        20: ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9)),
    },
}
BLOCK_SLOTS["sd2"] = BLOCK_SLOTS["sd1"]


@dataclass(frozen=True)
class UNetLayout:
    """What the index arithmetic between the two UNet spellings needs to know."""

    layers_per_block: int
    down_has_attention: tuple[bool, ...]
    up_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config) -> "UNetLayout":
        """From a diffusers ``UNet2DConditionModel.config`` (object or dict)."""
        get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
        lpb = get("layers_per_block")
        if not isinstance(lpb, int):
            raise ValueError("UNets with a different layers_per_block per block are not supported")
        return cls(
            layers_per_block=lpb,
            down_has_attention=tuple("CrossAttn" in t for t in get("down_block_types")),
            up_has_attention=tuple("CrossAttn" in t for t in get("up_block_types")),
        )


SD1_LAYOUT = UNetLayout(2, (True, True, True, False), (False, True, True, True))
SDXL_LAYOUT = UNetLayout(2, (False, True, True), (True, True, False))

_RESNET_DIFFUSERS_TO_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_RESNET_LDM_TO_DIFFUSERS = {v: k for k, v in _RESNET_DIFFUSERS_TO_LDM.items()}


def _resnet_inner_to_ldm(rest: str) -> str:
    for d, l in _RESNET_DIFFUSERS_TO_LDM.items():
        if rest == d or rest.startswith(d + "."):
            return l + rest[len(d):]
    return rest


def _resnet_inner_to_diffusers(rest: str) -> str:
    for l, d in _RESNET_LDM_TO_DIFFUSERS.items():
        if rest == l or rest.startswith(l + "."):
            return d + rest[len(l):]
    return rest


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


#: The UNet modules outside the down/mid/up blocks (LyCORIS "full" LoRAs and bakes reach the embeddings too).
_OUTSIDE_DIFFUSERS_TO_LDM = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}


def unet_diffusers_to_ldm(path: str, layout: UNetLayout) -> str:
    """``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SD1 layout)."""
    n = layout.layers_per_block
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?", path)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "downsamplers":
            return _join(f"input_blocks.{1 + b * (n + 1) + n}.0", "op" if rest.startswith("conv") else "",
                         rest[len("conv."):] if rest.startswith("conv.") else "")
        idx = 1 + b * (n + 1) + i
        if kind == "resnets":
            return _join(f"input_blocks.{idx}.0", _resnet_inner_to_ldm(rest))
        return _join(f"input_blocks.{idx}.1", rest)
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?", path)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3] or ""
        if kind == "attentions":
            return _join("middle_block.1", rest)
        return _join(f"middle_block.{2 * i}", _resnet_inner_to_ldm(rest))
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?", path)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "upsamplers":
            slot = 2 if layout.up_has_attention[b] else 1
            return _join(f"output_blocks.{b * (n + 1) + n}.{slot}", rest)
        idx = b * (n + 1) + i
        if kind == "resnets":
            return _join(f"output_blocks.{idx}.0", _resnet_inner_to_ldm(rest))
        return _join(f"output_blocks.{idx}.1", rest)
    return _OUTSIDE_DIFFUSERS_TO_LDM.get(path, path)


def unet_ldm_to_diffusers(path: str, layout: UNetLayout) -> str:
    """Inverse of :func:`unet_diffusers_to_ldm`."""
    n = layout.layers_per_block
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)(?:\.(.*))?", path)
    if m:
        idx, slot, rest = int(m[1]), int(m[2]), m[3] or ""
        if idx == 0:
            return _join("conv_in", rest)
        b, i = divmod(idx - 1, n + 1)
        if i == n:
            if rest == "op" or rest.startswith("op."):
                rest = "conv" + rest[2:]
            return _join(f"down_blocks.{b}.downsamplers.0", rest)
        if slot == 0:
            return _join(f"down_blocks.{b}.resnets.{i}", _resnet_inner_to_diffusers(rest))
        return _join(f"down_blocks.{b}.attentions.{i}", rest)
    m = re.fullmatch(r"middle_block\.(\d+)(?:\.(.*))?", path)
    if m:
        slot, rest = int(m[1]), m[2] or ""
        if slot == 1:
            return _join("mid_block.attentions.0", rest)
        return _join(f"mid_block.resnets.{slot // 2}", _resnet_inner_to_diffusers(rest))
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)(?:\.(.*))?", path)
    if m:
        idx, slot, rest = int(m[1]), int(m[2]), m[3] or ""
        b, i = divmod(idx, n + 1)
        upsampler_slot = 2 if layout.up_has_attention[b] else 1
        if slot == upsampler_slot and i == n and b < len(layout.up_has_attention) - 1:
            return _join(f"up_blocks.{b}.upsamplers.0", rest)
        if slot == 0:
            return _join(f"up_blocks.{b}.resnets.{i}", _resnet_inner_to_diffusers(rest))
        return _join(f"up_blocks.{b}.attentions.{i}", rest)
    return {ldm: diffusers for diffusers, ldm in _OUTSIDE_DIFFUSERS_TO_LDM.items()}.get(path, path)


def block_id_of_ldm_path(path: str) -> str | None:
    """LoRA Block Weight id of an ldm UNet module path; None for modules outside the blocks."""
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", path)
    if not m:
        return None
    if m[1] == "middle_block":
        return "M00"
    return ("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02d}"


def unet_kohya_key(diffusers_path: str, arch: str, layout: UNetLayout) -> str:
    """kohya key of a UNet module given its diffusers path (SDXL keys use the ldm spelling)."""
    path = unet_diffusers_to_ldm(diffusers_path, layout) if arch == "sdxl" else diffusers_path
    return UNET_PREFIX + path.replace(".", "_")


def text_encoder_kohya_key(module_path: str, prefix: str) -> str:
    """kohya key of a CLIP text-encoder module, always with the ``text_model_`` level.

    transformers 5 dropped ``text_model.`` from ``CLIPTextModel``'s tree but kept it in
    ``CLIPTextModelWithProjection``; hosts expect it either way.
    """
    if prefix not in TE_PREFIXES:
        raise ValueError(f"unknown text-encoder prefix {prefix!r}")
    if module_path.startswith("text_model."):
        module_path = module_path[len("text_model."):]
    return prefix + "text_model_" + module_path.replace(".", "_")


def block_id_of_key(key: str, arch: str, layout: UNetLayout | None = None) -> str | None:
    """Block id of a kohya key (any suffix after the first ``.`` is ignored).

    Text encoders are ``BASE``. SD1/SD2 keys (diffusers spelling) are mapped through ``layout``
    (default: the SD1.5 UNet). Returns None for UNet modules outside the 25 UNet blocks.
    """
    name = key.split(".", 1)[0]
    if name.startswith(TE_PREFIXES):
        return "BASE"
    if not name.startswith(UNET_PREFIX):
        raise ValueError(f"{key!r} is not a kohya LoRA key (expected lora_unet_ or lora_te*_ prefix)")
    body = name[len(UNET_PREFIX):]
    dotted = _undo_underscores(body)
    if dotted.startswith(("input_blocks", "middle_block", "output_blocks")):
        return block_id_of_ldm_path(dotted)
    layout = layout or (SDXL_LAYOUT if arch == "sdxl" else SD1_LAYOUT)
    return block_id_of_ldm_path(unet_diffusers_to_ldm(dotted, layout))


_KNOWN_WORDS = (
    "down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
    "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out", "ff_net",
    "conv_shortcut", "time_emb_proj", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "conv_in", "conv_out", "conv_norm_out",
)


def _undo_underscores(body: str) -> str:
    """Turn a kohya key body back into a dotted module path (enough for block-id parsing)."""
    protected = body
    for i, word in enumerate(_KNOWN_WORDS):
        protected = protected.replace(word, f"\0{i}\0")
    dotted = protected.replace("_", ".")
    for i, word in enumerate(_KNOWN_WORDS):
        dotted = dotted.replace(f"\0{i}\0", word)
    return dotted
