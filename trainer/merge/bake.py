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
from trainer.models import naming
from trainer.models.single_file import (SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX,
                                        detect_checkpoint)
from trainer.models.webui_model import open_clip_path_to_hf
from trainer.paths import write_atomic

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
    """Write ``checkpoint`` with ``inputs`` (ratios, block weights) merged into its weights to ``out_path``."""
    from safetensors import safe_open
    from safetensors.torch import save

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
    with safe_open(str(source), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in keys}
    where = weight_map(keys, info.arch)
    table = {**builtin_presets(info.arch), **(presets or {})}
    sums: dict[str, torch.Tensor] = {}
    per_input: dict[str, int] = {}
    modules = 0
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
            block = naming.block_id_of_key(name, info.arch)
            w = spec.ratio * module_block_weight(weights, block)
            if w == 0.0:
                continue
            try:
                delta = lora.delta(name)
            except LoraFileError as e:
                raise MergeError(str(e)) from None
            dense = ((delta.up.double() @ delta.down.double()) * delta.scale if isinstance(delta, LowRankDelta)
                     else delta.weight.double())
            key, row = where[name].key, where[name].row
            target = tensors[key]
            acc = sums.setdefault(key, torch.zeros(target.shape, dtype=torch.float64))
            if row is None:
                acc += w * dense.reshape(target.shape)
            else:
                size = target.shape[0] // 3
                acc[row * size:(row + 1) * size] += w * dense.reshape(size, *target.shape[1:])
            used += 1
        per_input[Path(spec.path).name] = used
        modules += used
    for key, acc in sums.items():
        tensors[key] = (tensors[key].double() + acc).to(tensors[key].dtype)
    metadata["loraq_baked"] = ", ".join(f"{Path(s.path).name}:{s.ratio:g}" + (f":{s.blocks}" if s.blocks else "")
                                        for s in inputs)
    write_atomic(out, save(tensors, metadata=metadata))
    return Baked(modules, len(sums), per_input, info.arch)
