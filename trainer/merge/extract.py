"""A LoRA (LoCon for 3x3 convolutions) from two models: the truncated SVD of tuned - base, module by module.

The modules are the ones a LoRA of target set "all" trains (attention, feed-forward, projections, ResNet
convolutions, the text encoders' linear layers), found on the base model by the same target search as
training, so the file loads wherever our trained LoRAs load. Each module's rank follows a
:class:`RankPolicy` (a rank, an energy fraction, a separate conv rank), and the report gives what each
module keeps: for a truncated SVD the relative error is exactly sqrt(sum of the dropped s^2) / |delta|.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.lora import files as lora_files
from trainer.lora.metadata import file_metadata
from trainer.merge.bake import WeightRef, weight_map
from trainer.merge.svd_merge import MergeError, ModuleReport, RankPolicy, merge_totals, truncation_rank
from trainer.merge.tensor_file import TensorFile
from trainer.models.handle import (ModelError, ModelHandle, TargetOptions, text_encoder_path_in_target_set,
                                   unet_path_in_target_set)
from trainer.models.single_file import detect_checkpoint
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
        spatial = w0.dim() == 4 and tuple(w0.shape[2:]) != (1, 1)
        found = low_rank_factors(delta, policy, spatial, "exact", dtype)
        if found is None:
            unchanged.append(target.key)
            continue
        _store(tensors, reports, target.key, base.arch, found, tuple(w0.shape), dtype)
    sources = {name: os.path.basename(str(getattr(h, "source", "") or "")) for name, h in (("tuned", tuned), ("base", base))}
    return _extracted(tensors, reports, unchanged, base.arch, base.prediction, policy, title, sources, "exact")


def _extracted(tensors: dict, reports: list, unchanged: list, arch: str, prediction: str, policy: RankPolicy,
               title: str, sources: dict[str, str], method: str) -> Extracted:
    if not tensors:
        raise MergeError("the two models have the same weights in every module a LoRA covers: nothing to extract")

    def ranks(spatial: bool) -> str:
        found = sorted({r.rank for r in reports if _spatial(tensors[f"{r.name}.lora_down.weight"]) == spatial})
        return "" if not found else str(found[0]) if len(found) == 1 else f"{found[0]}-{found[-1]}"

    linear, conv = ranks(False) or ranks(True), ranks(True)
    # alpha = rank in every module (scale 1): the same text as the rank
    metadata = file_metadata(arch, prediction, None, linear, linear, conv or 0, conv or 1.0, title)
    metadata.update({
        "ss_extract_method": f"truncated SVD of tuned - base per module ({method})",
        "ss_extract_rank_policy": policy.describe(),
        "ss_extract_report": str({k: round(v, 8) if isinstance(v, float) else v for k, v in merge_totals(reports).items()}),
        "ss_training_finished_at": str(int(datetime.datetime.now().timestamp())),
    })
    for name, source in sources.items():
        if source:
            metadata[f"ss_extract_{name}_model"] = source
    return Extracted(tensors, metadata, reports, unchanged, arch)


#: How the truncated SVD of a module's difference is found:
#: exact    - LAPACK's SVD of the dense difference in float64 (the reference; slowest);
#: gram     - eigenvectors of the smaller Gram matrix D D^T (or D^T D) in float64, then the other factor as
#:            D^T u / s: the same leading singular pairs at a few times less work (every singular value is
#:            found, so an energy fraction can be met);
#: lowrank  - torch.svd_lowrank (randomized subspace iteration, Halko et al.) in float32 for a fixed rank, at a
#:            cost that grows with the rank, not the width; its error is measured on the stored factors.
SVD_METHODS = ("exact", "gram", "lowrank")

#: svd_lowrank's oversampling and power iterations: q = rank + 10, 4 iterations keep it within ~1e-3 of the
#: optimal error on decaying spectra (bench/extract_compare.py measures it on SD1.5-size modules).
LOWRANK_OVERSAMPLE, LOWRANK_ITERATIONS = 10, 4


@dataclass(frozen=True)
class Factors:
    up: torch.Tensor          # [out, r] in float32, sqrt(s) folded in
    down: torch.Tensor        # [r, in*k*k]
    energy: float             # ||D||_F^2
    kept: float               # sum of the kept s^2 / energy
    error: float              # ||D - up @ down||_F / ||D||_F, with the factors as stored (dtype)
    full_rank: int


def low_rank_factors(delta: torch.Tensor, policy: RankPolicy, spatial: bool, method: str,
                     dtype: torch.dtype) -> Factors | None:
    """The truncated SVD of one module's difference ``delta`` [out, in*k*k] under ``policy``; None for rank 0."""
    if method not in SVD_METHODS:
        raise MergeError(f"svd method must be one of {', '.join(SVD_METHODS)}, got {method!r}")
    m, n = delta.shape
    cap = min(m, n)
    # norms in float32 (cascade-summed: ~1e-6 relative) — a float64 copy of a 1280 x 23040 difference is 236 MB
    energy = float(torch.linalg.vector_norm(delta.float())) ** 2
    fixed = policy.conv_rank if spatial and policy.conv_rank is not None else policy.rank
    if method == "lowrank" and policy.energy is None and fixed is not None and fixed + LOWRANK_OVERSAMPLE < cap:
        u, s, v = torch.svd_lowrank(delta.float(), q=fixed + LOWRANK_OVERSAMPLE, niter=LOWRANK_ITERATIONS)
        vh = v.T
    elif method == "exact":
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    else:
        u, s, vh = _gram_svd(delta)
    rank = truncation_rank(s, policy, spatial, cap)
    if rank == 0:
        return None
    # the singular values split evenly between the factors: neither is far larger (fp16 range)
    root = torch.sqrt(s[:rank].clamp_min(0)).to(torch.float32)
    up = (u[:, :rank].float() * root).to(dtype)
    down = (root[:, None] * vh[:rank].float()).to(dtype)
    residual = delta.float() - up.float() @ down.float()
    error = float(torch.linalg.vector_norm(residual)) / math.sqrt(energy) if energy else 0.0
    del residual
    kept = float((s[:rank].double() ** 2).sum()) / energy if energy else 1.0
    return Factors(up, down, energy, min(kept, 1.0), error, cap)


def _gram_svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, s, V^T`` (descending) from the eigendecomposition of the smaller Gram matrix, in float64."""
    d = delta.double()
    wide = d.shape[0] <= d.shape[1]
    gram = d @ d.T if wide else d.T @ d
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    s = values.sqrt()
    inverse = torch.where(s > s[0] * 1e-12, 1.0 / s, torch.zeros_like(s)) if s.numel() else s
    if wide:                       # vectors = U; V^T = diag(1/s) U^T D
        return vectors, s, (vectors.T @ d) * inverse[:, None]
    return (d @ vectors) * inverse, s, vectors.T


def _store(tensors: dict, reports: list, key: str, arch: str, found: Factors, shape: tuple[int, ...],
           dtype: torch.dtype) -> None:
    up, down, rank = found.up, found.down, found.up.shape[1]
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    tensors[f"{key}.lora_up.weight"] = up.contiguous()
    tensors[f"{key}.lora_down.weight"] = down.contiguous()
    tensors[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    reports.append(ModuleReport(key, block_id_of_key(key, arch), rank, found.full_rank, found.energy, found.kept,
                                found.error))


def checkpoint_targets(keys, arch: str, text_encoder: bool) -> dict[str, WeightRef]:
    """kohya key -> weight of every module a LoRA of target set "all" covers in a single-file checkpoint."""
    found = {}
    for name, ref in weight_map(list(keys), arch).items():
        if ref.text_encoder:
            if text_encoder and text_encoder_path_in_target_set(ref.path, "all"):
                found[name] = ref
        elif unet_path_in_target_set(ref.path, "all"):
            found[name] = ref
    return found


def extract_checkpoints(tuned: str | os.PathLike, base: str | os.PathLike, policy: RankPolicy, *,
                        dtype: torch.dtype = torch.float16, text_encoder: bool = True, title: str = "extracted",
                        method: str = "lowrank", progress=lambda done, total: None) -> Extracted:
    """The LoRA of ``tuned - base`` for two single-file checkpoints, read module by module (peak memory: a few
    modules, not two models). ``method``: see :data:`SVD_METHODS` (lowrank falls back to gram for energy
    fractions)."""
    policy.validate()
    try:
        infos = detect_checkpoint(tuned), detect_checkpoint(base)
    except ModelError as e:
        raise MergeError(str(e)) from None
    if infos[0].arch != infos[1].arch:
        raise MergeError(f"the two models are different architectures ({infos[0].arch.upper()} and "
                         f"{infos[1].arch.upper()})")
    arch = infos[1].arch
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    unchanged: list[str] = []
    with TensorFile(tuned) as t_file, TensorFile(base) as b_file:
        targets = checkpoint_targets(b_file.entries, arch, text_encoder)
        for number, (name, ref) in enumerate(sorted(targets.items())):
            if ref.key not in t_file.entries:
                raise MergeError(f"{name} ({ref.key}) exists in the base model but not in the tuned one: not the "
                                 "same architecture")
            if t_file.shape(ref.key) != b_file.shape(ref.key):
                raise MergeError(f"{name}: shapes {t_file.shape(ref.key)} and {b_file.shape(ref.key)} differ: not the "
                                 "same architecture")
            w0 = b_file.get(ref.key, ref.row)
            shape, base_norm = tuple(w0.shape), float(torch.linalg.vector_norm(w0.float()))
            delta = t_file.get(ref.key, ref.row).float().sub_(w0).reshape(shape[0], -1)
            del w0
            if float(torch.linalg.vector_norm(delta)) <= SAME_MODULE_FRACTION * base_norm:
                unchanged.append(name)
                continue
            spatial = len(shape) == 4 and shape[2:] != (1, 1)
            found = low_rank_factors(delta, policy, spatial, method, dtype)
            del delta
            if found is None:
                unchanged.append(name)
                continue
            _store(tensors, reports, name, arch, found, tuple(b_file.shape(ref.key)) if ref.row is None else
                   (b_file.shape(ref.key)[0] // 3, *b_file.shape(ref.key)[1:]), dtype)
            progress(number + 1, len(targets))
    prediction = infos[1].prediction or "eps"
    sources = {"tuned": Path(tuned).name, "base": Path(base).name}
    return _extracted(tensors, reports, unchanged, arch, prediction, policy, title, sources, method)


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
                   title: str = "extracted", method: str = "lowrank") -> Extracted:
    """The LoRA of two models named as the CLI names them: two single-file checkpoints are streamed
    (:func:`extract_checkpoints`); diffusers folders and 'demo' are loaded (:func:`extract_lora`)."""
    from trainer.device import SAVE_PRECISION
    from trainer.models.diffusers_model import load_handle

    if dtype not in SAVE_PRECISION:
        raise MergeError(f"save precision must be one of {', '.join(SAVE_PRECISION)}, got {dtype!r}")
    if all(str(m).endswith(".safetensors") and Path(m).is_file() for m in (tuned, base)):
        return extract_checkpoints(tuned, base, policy, dtype=SAVE_PRECISION[dtype], text_encoder=text_encoder,
                                   title=title, method=method)
    with torch.no_grad():
        return extract_lora(load_handle(tuned), load_handle(base), policy, dtype=SAVE_PRECISION[dtype],
                            text_encoder=text_encoder, title=title)
