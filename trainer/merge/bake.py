"""LoRAs baked into a checkpoint: ``W += sum ratio_i * block_weight_i * delta_i`` on the checkpoint's own tensors.

Works file to file on a single-file checkpoint in the layout the WebUIs load (ldm keys for SD1/SD2, sgm keys
for SDXL): every tensor not touched is copied bit for bit, touched ones are summed in float32 and stored
in the checkpoint's dtype. The kohya name of each checkpoint weight is computed with the same naming as
training (``trainer.models.naming``), so every module our LoRAs (and kohya's) carry finds its weight.
OpenCLIP text encoders (SD2, SDXL's second) keep q, k and v in one ``in_proj_weight``: their LoRA deltas go
into its three row blocks.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from trainer.lora.files import LoraFileError
from trainer.lora.formats import LowRankDelta
from trainer.lora.reading import family, open_lora
from trainer.merge.svd_merge import MergeError, MergeInput, block_weights, builtin_presets, module_block_weight
from trainer.models import naming
from trainer.models.single_file import (SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX,
                                        detect_checkpoint, read_header)
from trainer.models.webui_model import open_clip_path_to_hf
from trainer.paths import atomic_writer

UNET_PREFIX = "model.diffusion_model."
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclass
class Baked:
    modules: int                    # LoRA modules added into the checkpoint
    tensors_changed: int
    per_input: dict[str, int]       # file -> modules it contributed
    arch: str


@dataclass(frozen=True)
class WeightRef:
    """Where a kohya module's weight lives in a single-file checkpoint."""

    key: str                  # the checkpoint tensor
    row: int | None           # row block (q 0, k 1, v 2) of OpenCLIP's fused in_proj_weight, else None
    path: str                 # the module path as training names it (diffusers UNet / HF CLIP)
    text_encoder: bool


def weight_map(keys: Sequence[str], arch: str) -> dict[str, WeightRef]:
    """kohya module key -> where its weight is (tensor key, row block of a fused q/k/v weight, module path)."""
    layout = naming.SDXL_LAYOUT if arch == "sdxl" else naming.SD1_LAYOUT
    clip = {"sd1": [(SD1_TE_PREFIX, "lora_te_")], "sd2": [], "sdxl": [(SDXL_TE1_PREFIX, "lora_te1_")]}[arch]
    open_clip = {"sd1": [], "sd2": [(SD2_TE_PREFIX + "transformer.", "lora_te_")],
                 "sdxl": [(SDXL_TE2_PREFIX + "transformer.", "lora_te2_")]}[arch]
    found: dict[str, WeightRef] = {}
    for key in keys:
        if key.startswith(UNET_PREFIX) and key.endswith(".weight"):
            path = key[len(UNET_PREFIX):-len(".weight")]
            diffusers_path = naming.unet_ldm_to_diffusers(path, layout)
            found[naming.unet_kohya_key(diffusers_path, arch, layout)] = WeightRef(key, None, diffusers_path, False)
            continue
        for prefix, kohya in clip:
            if key.startswith(prefix) and key.endswith(".weight"):
                path = key[len(prefix):-len(".weight")]
                found[naming.text_encoder_kohya_key(path, kohya)] = WeightRef(key, None, path, True)
        for prefix, kohya in open_clip:
            if not key.startswith(prefix):
                continue
            path = key[len(prefix):]
            if path.endswith(".attn.in_proj_weight"):
                hf = open_clip_path_to_hf(path[:-len(".in_proj_weight")], layers_used=10**6)
                for part, row in _QKV.items():
                    found[naming.text_encoder_kohya_key(f"{hf}.{part}", kohya)] = WeightRef(key, row, f"{hf}.{part}",
                                                                                           True)
            elif path.endswith(".attn.out_proj.weight"):
                hf = open_clip_path_to_hf(path[:-len(".out_proj.weight")], layers_used=10**6)
                found[naming.text_encoder_kohya_key(f"{hf}.out_proj", kohya)] = WeightRef(key, None, f"{hf}.out_proj",
                                                                                         True)
            elif path.endswith(".weight"):
                hf = open_clip_path_to_hf(path[:-len(".weight")], layers_used=10**6)
                if hf is not None:
                    found[naming.text_encoder_kohya_key(hf, kohya)] = WeightRef(key, None, hf, True)
    return found


def bake_loras(checkpoint: str | os.PathLike, inputs: Sequence[MergeInput], out_path: str | os.PathLike, *,
               presets: Mapping[str, list[float]] | None = None) -> Baked:
    """Write ``checkpoint`` with ``inputs`` (ratios, block weights) merged into its weights to ``out_path``.

    Streamed: every LoRA is checked against the checkpoint first (nothing is written for a LoRA of another
    model), then the output is written tensor by tensor in the source's order, untouched tensors copied as bytes,
    so the memory it takes is one weight and the LoRAs, not the checkpoint (an SD1.5 bake inside A1111 took
    10 GB more than the WebUI when it held all tensors, their float64 sums and the file's bytes at once)."""
    from safetensors import safe_open

    source, out = Path(checkpoint), Path(out_path)
    if out.suffix != ".safetensors":
        raise MergeError(f"output '{out}' must end in .safetensors")
    if out.resolve() == source.resolve():
        raise MergeError(f"{out}: write the baked checkpoint to a new file, not over its base")
    if not out.parent.is_dir():
        raise MergeError(f"output folder '{out.parent}' does not exist")
    if not inputs:
        raise MergeError("no LoRAs to bake in")
    info = detect_checkpoint(source)
    header, metadata = read_header(source)
    where = weight_map(list(header), info.arch)
    table = {**builtin_presets(info.arch), **(presets or {})}
    # Every module's contribution, by the checkpoint tensor it goes into: (weight, fused-q/k/v row, LoRA, module)
    plan: dict[str, list[tuple[float, int | None, object, str]]] = {}
    per_input: dict[str, int] = {}
    for spec in inputs:
        try:
            lora = open_lora(spec.path, expected_arch=info.arch)
        except LoraFileError as e:
            raise MergeError(str(e)) from None
        weights = block_weights(spec.blocks, info.arch, table, f"'{spec.path}' blocks") if spec.blocks else None
        missing = sorted(name for name in lora.groups if name not in where)
        if missing:
            raise MergeError(f"{Path(spec.path).name}: {len(missing)} of its {len(lora.groups)} modules have no weight "
                             f"in {source.name} (first: {missing[0]}): is it for another model?")
        used = 0
        for name in sorted(lora.groups):
            w = spec.ratio * module_block_weight(weights, naming.block_id_of_key(name, info.arch))
            if w != 0.0:
                plan.setdefault(where[name].key, []).append((w, where[name].row, lora, name))
                used += 1
        per_input[Path(spec.path).name] = used
    metadata["loraq_baked"] = ", ".join(f"{Path(s.path).name}:{s.ratio:g}" + (f":{s.blocks}" if s.blocks else "")
                                        for s in inputs)
    order = sorted(header, key=lambda k: int(header[k]["data_offsets"][0]))
    layout, offset = {}, 0
    for key in order:
        begin, end = (int(x) for x in header[key]["data_offsets"])
        layout[key] = {"dtype": header[key]["dtype"], "shape": header[key]["shape"],
                       "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    head = json.dumps({"__metadata__": metadata, **layout}, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)      # the data starts 8-byte aligned, as safetensors writes it
    with open(source, "rb") as raw, safe_open(str(source), framework="pt") as handle, atomic_writer(out) as f:
        data_start = 8 + struct.unpack("<Q", raw.read(8))[0]
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key in order:
            if key in plan:
                f.write(_tensor_bytes(_baked(handle.get_tensor(key), plan[key])))
                continue
            begin, end = (int(x) for x in header[key]["data_offsets"])
            raw.seek(data_start + begin)
            left = end - begin
            while left:
                chunk = raw.read(min(left, _CHUNK))
                if not chunk:
                    raise MergeError(f"{source.name} ended inside tensor {key}: the file is truncated")
                f.write(chunk)
                left -= len(chunk)
    return Baked(sum(per_input.values()), len(plan), per_input, info.arch)


_CHUNK = 16 << 20


def _baked(weight: torch.Tensor, contributions) -> torch.Tensor:
    """``weight`` plus its LoRA deltas, summed in float64 and stored in the weight's dtype."""
    acc = weight.double()
    for w, row, lora, name in contributions:
        try:
            delta = lora.delta(name)
        except LoraFileError as e:
            raise MergeError(str(e)) from None
        dense = ((delta.up.double() @ delta.down.double()) * delta.scale if isinstance(delta, LowRankDelta)
                 else delta.weight.double())
        if row is None:
            acc += w * dense.reshape(acc.shape)
        else:
            size = acc.shape[0] // 3
            acc[row * size:(row + 1) * size] += w * dense.reshape(size, *acc.shape[1:])
    return acc.to(weight.dtype)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's little-endian bytes as safetensors stores them."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
