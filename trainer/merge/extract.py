"""A LoRA (LoCon for 3x3 convolutions) from two models: the truncated SVD of tuned - base, module by module.

The modules are the ones a LoRA of target set "all" trains (attention, feed-forward, projections, ResNet
convolutions, the text encoders' linear layers), found on the base model by the same target search as
training, so the file loads wherever our trained LoRAs load. Each module's rank follows a
:class:`RankPolicy` (a rank, an energy fraction, a separate conv rank), and the report gives what each
module keeps: for a truncated SVD the relative error is exactly sqrt(sum of the dropped s^2) / |delta|.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.lora import files as lora_files
from trainer.lora.metadata import file_metadata
from trainer.merge.svd_merge import MergeError, ModuleReport, RankPolicy, merge_totals, truncation_rank
from trainer.models.handle import ModelHandle, TargetOptions
from trainer.models.naming import block_id_of_key

#: A module whose difference is below this fraction of its weight's norm is the same in both models
#: (fp16 round trips of an untouched checkpoint differ by ~1e-4 of the weight).
SAME_MODULE_FRACTION = 1e-3


@dataclass
class Extracted:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[ModuleReport]
    unchanged: list[str]           # modules whose weights are the same in both models
    arch: str

    @property
    def totals(self) -> dict:
        return merge_totals(self.modules)


def extract_lora(tuned: ModelHandle, base: ModelHandle, policy: RankPolicy, *, dtype: torch.dtype = torch.float16,
                 text_encoder: bool = True, title: str = "extracted") -> Extracted:
    """The LoRA of ``tuned - base``; both handles must be the same architecture."""
    policy.validate()
    if tuned.arch != base.arch:
        raise MergeError(f"the two models are different architectures ({tuned.arch.upper()} and {base.arch.upper()})")
    options = TargetOptions("all", text_encoder)
    tuned_targets = {t.key: t for t in tuned.lora_targets(options)}
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    unchanged: list[str] = []
    for target in base.lora_targets(options):
        if target.fused is not None:         # OpenCLIP's fused attention (WebUI models only): not a single weight
            continue
        other = tuned_targets.get(target.key)
        if other is None:
            raise MergeError(f"{target.key} exists in the base model but not in the tuned one: not the same architecture")
        w0, w1 = target.module.weight.detach(), other.module.weight.detach()
        if w0.shape != w1.shape:
            raise MergeError(f"{target.key}: shapes {tuple(w1.shape)} and {tuple(w0.shape)} differ: not the same "
                             "architecture")
        delta = (w1.float() - w0.float()).reshape(w0.shape[0], -1)
        norm = float(torch.linalg.norm(delta))
        if norm <= SAME_MODULE_FRACTION * float(torch.linalg.norm(w0.float())):
            unchanged.append(target.key)
            continue
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        spatial = w0.dim() == 4 and tuple(w0.shape[2:]) != (1, 1)
        rank = truncation_rank(s, policy, spatial, min(delta.shape))
        if rank == 0:
            unchanged.append(target.key)
            continue
        # the singular values split evenly between the factors: neither is far larger (fp16 range)
        root = torch.sqrt(s[:rank])
        up = (u[:, :rank] * root).to(dtype)
        down = (root[:, None] * vh[:rank]).to(dtype)
        stored = up.float() @ down.float()
        error = float(torch.linalg.norm(stored - delta)) / norm
        energy = float((s ** 2).sum())
        kept = float((s[:rank] ** 2).sum()) / energy
        if w0.dim() == 4:
            up = up.reshape(w0.shape[0], rank, 1, 1)
            down = down.reshape(rank, *w0.shape[1:])
        tensors[f"{target.key}.lora_up.weight"] = up.contiguous()
        tensors[f"{target.key}.lora_down.weight"] = down.contiguous()
        tensors[f"{target.key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
        reports.append(ModuleReport(target.key, block_id_of_key(target.key, base.arch), rank, min(delta.shape),
                                    energy, kept, error))
    if not tensors:
        raise MergeError("the two models have the same weights in every module a LoRA covers: nothing to extract")
    def ranks(spatial: bool) -> str:
        found = sorted({r.rank for r in reports if _spatial(tensors[f"{r.name}.lora_down.weight"]) == spatial})
        return "" if not found else str(found[0]) if len(found) == 1 else f"{found[0]}-{found[-1]}"

    linear, conv = ranks(False) or ranks(True), ranks(True)
    # alpha = rank in every module (scale 1): the same text as the rank
    metadata = file_metadata(base.arch, base.prediction, None, linear, linear, conv or 0, conv or 1.0, title)
    metadata.update({
        "ss_extract_method": "truncated SVD of tuned - base per module",
        "ss_extract_rank_policy": policy.describe(),
        "ss_extract_report": str({k: round(v, 8) if isinstance(v, float) else v for k, v in merge_totals(reports).items()}),
        "ss_training_finished_at": str(int(datetime.datetime.now().timestamp())),
    })
    for name, handle in (("tuned", tuned), ("base", base)):
        source = getattr(handle, "source", "")
        if source:
            metadata[f"ss_extract_{name}_model"] = os.path.basename(str(source))
    return Extracted(tensors, metadata, reports, unchanged, base.arch)


def _spatial(down: torch.Tensor) -> bool:
    return down.dim() == 4 and down.shape[-1] > 1


def save_extracted(result: Extracted, out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise MergeError(f"output '{out}' must end in .safetensors")
    if not out.parent.is_dir():
        raise MergeError(f"output folder '{out.parent}' does not exist")
    return lora_files.write_lora(out, dict(result.tensors), dict(result.metadata))


def extract_models(tuned: str, base: str, policy: RankPolicy, *, dtype: str = "fp16", text_encoder: bool = True,
                   title: str = "extracted") -> Extracted:
    """:func:`extract_lora` of two models named as the CLI names them (diffusers folders, single files, 'demo')."""
    from trainer.device import SAVE_PRECISION
    from trainer.models.diffusers_model import load_handle

    if dtype not in SAVE_PRECISION:
        raise MergeError(f"save precision must be one of {', '.join(SAVE_PRECISION)}, got {dtype!r}")
    with torch.no_grad():
        return extract_lora(load_handle(tuned), load_handle(base), policy, dtype=SAVE_PRECISION[dtype],
                            text_encoder=text_encoder, title=title)
