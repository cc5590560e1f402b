"""LoRAs baked into a checkpoint: ``W += sum ratio_i * block_weight_i * delta_i`` on the checkpoint's own tensors.

Works file to file on a single-file checkpoint in the layout the WebUIs load (ldm keys for SD1/SD2, sgm keys
for SDXL): every tensor not touched is copied bit for bit, touched ones are summed in float32 and stored
in the checkpoint's dtype. The kohya name of each checkpoint weight is computed with the same naming as
training (``trainer.models.naming``), so every module our LoRAs (and kohya's) carry finds its weight.
OpenCLIP text encoders (SD2, SDXL's second) keep q, k and v in one ``in_proj_weight``: their LoRA deltas go
into its three row blocks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from trainer.lora.files import LoraFileError
from trainer.lora.formats import LowRankDelta
from trainer.lora.reading import family, open_lora
from trainer.merge.svd_merge import MergeError, MergeInput, block_weights, builtin_presets, module_block_weight
from trainer.merge.tensor_file import TensorFile, header_bytes, tensor_bytes
from trainer.models import naming
from trainer.models.single_file import (SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX,
                                        detect_checkpoint)
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
    with TensorFile(source) as tensors:
        where = weight_map(list(tensors.entries), info.arch)
        plan, per_input = _plan(inputs, info.arch, where, source.name, presets)
        metadata = {**tensors.metadata, "loraq_baked": ", ".join(
            f"{Path(s.path).name}:{s.ratio:g}" + (f":{s.blocks}" if s.blocks else "") for s in inputs)}
        # the source's data order; a tensor's dtype and so its size never change, only the bytes of the baked ones
        order = sorted(tensors.entries, key=lambda k: int(tensors.entries[k]["data_offsets"][0]))
        layout, offset = {}, 0
        for key in order:
            entry = tensors.entries[key]
            size = int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            layout[key] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + size]}
            offset += size
        with atomic_writer(out) as f:
            f.write(header_bytes(layout, metadata))
            for key in order:
                if key in plan:
                    f.write(tensor_bytes(_baked(tensors.get(key), plan[key])))
                else:
                    tensors.copy_to(key, f)
    return Baked(sum(per_input.values()), len(plan), per_input, info.arch)


def _plan(inputs: Sequence[MergeInput], arch: str, where: Mapping[str, WeightRef], base_name: str,
          presets: Mapping[str, list[float]] | None):
    """Every LoRA module's contribution, by the checkpoint tensor it goes into (weight, fused-q/k/v row, LoRA,
    module), and the modules each input gives; a LoRA with a module the checkpoint lacks is refused here, before
    anything is written."""
    table = {**builtin_presets(arch), **(presets or {})}
    plan: dict[str, list[tuple[float, int | None, object, str]]] = {}
    per_input: dict[str, int] = {}
    for spec in inputs:
        try:
            lora = open_lora(spec.path, expected_arch=arch)
        except LoraFileError as e:
            raise MergeError(str(e)) from None
        weights = block_weights(spec.blocks, arch, table, f"'{spec.path}' blocks") if spec.blocks else None
        missing = sorted(name for name in lora.groups if name not in where)
        if missing:
            raise MergeError(f"{Path(spec.path).name}: {len(missing)} of its {len(lora.groups)} modules have no weight "
                             f"in {base_name} (first: {missing[0]}): is it for another model?")
        used = 0
        for name in sorted(lora.groups):
            w = spec.ratio * module_block_weight(weights, naming.block_id_of_key(name, arch))
            if w != 0.0:
                plan.setdefault(where[name].key, []).append((w, where[name].row, lora, name))
                used += 1
        per_input[Path(spec.path).name] = used
    return plan, per_input


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
