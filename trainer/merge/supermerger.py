"""SuperMerger's LoRA merge semantics, as an option, so that a recipe made there gives the same LoRA here.

Read from sd-webui-supermerger ``scripts/mergers/pluslora.py`` (``lmerge``, ``merge_lora_models``,
``merge_lora_models_dim``) and written anew from the formulas; docs/merge-semantics.md sets them beside ours.
For module m, input i has the weight ``w_i = ratio_i * block_weight_i(m)`` (BASE's for modules outside the
blocks) and the delta ``s_i U_i D_i`` (``s_i = alpha_i / rank_i``):

- **same rank** (their "remake dimension" ``no``; ``auto`` when every input has the same rank): the factors
  are summed, each scaled by ``w_i``: ``delta = (sum_i sqrt(s_i) w_i U_i) @ (sum_i sqrt(s_i) w_i D_i)``.
  One input at ratio w gives ``w^2`` times its delta (0.5 quarters it, -1 adds it), and two inputs add
  cross terms ``sqrt(s_i s_j) w_i w_j U_i D_j`` that neither holds. The ranks must agree module by module.
- **rank N** (``N``; ``auto`` with inputs of different ranks, at the largest of them): linear, like ours,
  ``sum_i w_i s_i U_i D_i``, then a dense SVD truncated to N with the singular values on the up side and both
  factors clamped to the 0.99 quantile of their values; alpha = N.
- **same to Strength** (their setting): the factors are scaled by ``sqrt|w|`` (down also by the sign of w),
  so one input's delta is ``w`` times its own in the same-rank path; in the rank-N path that setting makes
  the weight ``sign(w) sqrt|w|``.

The report measures each module against the inputs applied together at their ratios (our semantics), so
it says how far the SuperMerger recipe lands from what the same ratios mean here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from trainer.lora import files as lora_files
from trainer.lora.formats import LowRankDelta
from trainer.lora.svd import factor_space_svd, quantile_clamp
from trainer.merge.svd_merge import (
    DTYPES, LoadedInput, MergeError, MergeInput, MergeResult, ModuleReport, RankPolicy, _block_of, common_arch,
    input_block_weights, load_input, merged_metadata, module_block_weight,
)

#: SuperMerger's clamp of the rank-N factors (``CLAMP_QUANTILE`` in pluslora.py).
CLAMP_QUANTILE = 0.99


@dataclass(frozen=True)
class SuperMergerMode:
    """SuperMerger's "remake dimension": ``"no"`` (same rank), ``"auto"`` or a rank N; and "same to Strength"."""

    dimension: str | int = "no"
    same_to_strength: bool = False

    def validate(self) -> None:
        if isinstance(self.dimension, bool) or not (self.dimension in ("no", "auto") or (
                isinstance(self.dimension, int) and self.dimension >= 1)):
            raise MergeError(f"supermerger: the dimension is no, auto or a whole number >= 1, got {self.dimension!r}")

    def describe(self) -> str:
        text = f"SuperMerger semantics, remake dimension {self.dimension}"
        return text + (", same to Strength" if self.same_to_strength else "")


def parse_dimension(text: str) -> str | int:
    """``no`` | ``auto`` | N, as SuperMerger's "remake dimension" radio offers them."""
    value = str(text).strip().lower()
    if value in ("no", "auto"):
        return value
    try:
        number = int(value)
    except ValueError:
        raise MergeError(f"supermerger: the dimension is no, auto or a whole number, got {text!r}") from None
    if number < 1:
        raise MergeError(f"supermerger: the dimension must be >= 1, got {number}")
    return number


def factor_weights(w: float, same_to_strength: bool) -> tuple[float, float]:
    """What multiplies (up, down) of one input in the same-rank path."""
    if not same_to_strength:
        return w, w
    root = math.sqrt(abs(w))
    return root, root * (1.0 if w > 0 else -1.0)


def linear_weight(w: float, same_to_strength: bool) -> float:
    """What multiplies one input's delta in the rank-N path (``block_ratio * fugou`` there)."""
    return math.copysign(math.sqrt(abs(w)), w) if same_to_strength else w


def file_rank(item: LoadedInput) -> int:
    """The rank SuperMerger's ``auto`` compares: the file's rank (the largest, if its modules differ)."""
    from trainer.lora.files import read_header

    header, _ = read_header(item.file.path)
    ranks = [entry["shape"][0] for key, entry in header.items()
             if key.endswith(("lora_down.weight", "lora_A.weight")) and entry.get("shape")]
    if not ranks:
        raise MergeError(f"'{item.spec.path}': SuperMerger's LoRA merge takes LoRA/LoCon files; this one has no "
                         "lora_down tensors (LoHa/LoKr: merge it without --supermerger)")
    return max(ranks)


def _norm_of_product(U: torch.Tensor, V: torch.Tensor) -> float:
    """``||U @ V^T||_F`` through the thin QRs of both factors (no out x in matrix, no cancellation)."""
    return float(torch.linalg.vector_norm(factor_space_svd(U, V).s))


def same_rank_module(name: str, arch: str, terms: Sequence[tuple[str, LowRankDelta, float]], same_to_strength: bool,
                     out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """(up, down) with scale 1 and the report, from ``(file, delta, w)`` terms of one rank."""
    ranks = {d.rank for _, d, _ in terms}
    if len(ranks) > 1:
        listing = ", ".join(f"'{f}' rank {d.rank}" for f, d, _ in terms)
        raise MergeError(f"module '{name}': SuperMerger's same-rank merge needs one rank in every input ({listing}); "
                         "use --supermerger auto or a rank N")
    d64 = torch.float64
    up = sum(factor_weights(w, same_to_strength)[0] * math.sqrt(d.scale) * d.up.to(d64) for _, d, w in terms)
    down = sum(factor_weights(w, same_to_strength)[1] * math.sqrt(d.scale) * d.down.to(d64) for _, d, w in terms)
    up, down = up.to(out_dtype), down.to(out_dtype)
    # against the inputs applied together: stored - sum_i w_i s_i U_i D_i, as one factor product
    linear_u = torch.cat([w * d.scale * d.up.to(d64) for _, d, w in terms], 1)
    linear_v = torch.cat([d.down.to(d64) for _, d, _ in terms], 0).T
    linear = _norm_of_product(linear_u, linear_v)
    gap = _norm_of_product(torch.cat([up.to(d64), -linear_u], 1), torch.cat([down.to(d64).T, linear_v], 1))
    report = ModuleReport(name, _block_of(name, arch), ranks.pop(), sum(d.rank for _, d, _ in terms), linear ** 2,
                          1.0, gap / linear if linear else (0.0 if gap == 0 else math.inf))
    return up, down, report


def rank_n_module(name: str, arch: str, terms: Sequence[tuple[str, LowRankDelta, float]], rank: int,
                  same_to_strength: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """(up, down) with scale 1 and the report: SuperMerger's dense SVD of the linear sum, truncated and clamped."""
    # fp32, as SuperMerger's SVD runs (mat.to(torch.float)), so LAPACK picks the same singular-vector signs
    # and the sign-dependent quantile clamp cuts the same values
    dense = sum(linear_weight(w, same_to_strength) * (d.up.float() @ d.down.float()) * d.scale for _, d, w in terms)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    keep = min(rank, S.numel())
    up, down = quantile_clamp(U[:, :keep] * S[:keep], Vh[:keep], CLAMP_QUANTILE)
    up, down = up.to(out_dtype), down.to(out_dtype)
    linear = sum(w * (d.up.double() @ d.down.double()) * d.scale for _, d, w in terms)
    norm = float(torch.linalg.matrix_norm(linear))
    gap = float(torch.linalg.matrix_norm(up.double() @ down.double() - linear))
    energy = float((S.double() ** 2).sum())
    report = ModuleReport(name, _block_of(name, arch), keep, sum(d.rank for _, d, _ in terms), norm ** 2,
                          float((S[:keep].double() ** 2).sum()) / energy if energy else 1.0,
                          gap / norm if norm else (0.0 if gap == 0 else math.inf))
    return up, down, report


def supermerger_merge(inputs: Sequence[MergeInput], mode: SuperMergerMode, *,
                      presets: Mapping[str, list[float]] | None = None, presets_text: str | None = None,
                      dtype: str = "fp16", title: str = "merged") -> MergeResult:
    """``inputs`` merged as SuperMerger's "Merge LoRAs" merges them; nothing is written."""
    mode.validate()
    if not inputs:
        raise MergeError("no input LoRAs given")
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    loaded = [load_input(spec) for spec in inputs]
    arch = common_arch(loaded)
    weights_of = input_block_weights(loaded, arch, presets, presets_text)
    dims = [file_rank(item) for item in loaded]
    if mode.dimension == "no" or (mode.dimension == "auto" and len(set(dims)) == 1):
        rank = None
    else:
        rank = mode.dimension if isinstance(mode.dimension, int) else max(dims)
    out_dtype = DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    for name in sorted({name for item in loaded for name in item.groups}):
        block = _block_of(name, arch)
        terms = []
        for item, weights in zip(loaded, weights_of):
            if name not in item.groups:
                continue
            w = item.spec.ratio * module_block_weight(weights, block)
            if w == 0.0:
                continue
            try:
                delta = item.file.delta(name)
            except lora_files.LoraFileError as e:
                raise MergeError(str(e)) from None
            if not isinstance(delta, LowRankDelta):
                raise MergeError(f"'{item.spec.path}' module {name} is {delta.format}: SuperMerger merges LyCORIS "
                                 "files only alone and apart; merge it without --supermerger")
            if delta.scale < 0:
                raise MergeError(f"'{item.spec.path}' module {name}: a negative alpha has no square root "
                                 "(SuperMerger fails on it too)")
            terms.append((item.spec.path, delta, w))
        if not terms:
            continue
        geometry = terms[0][1].geometry
        if rank is None:
            up, down, report = same_rank_module(name, arch, terms, mode.same_to_strength, out_dtype)
        else:
            up, down, report = rank_n_module(name, arch, terms, rank, mode.same_to_strength, out_dtype)
        tensors[f"{name}.lora_up.weight"] = up.reshape(geometry.up_shape(report.rank)).contiguous()
        tensors[f"{name}.lora_down.weight"] = down.reshape(geometry.down_shape(report.rank)).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(report.rank), dtype=out_dtype)
        reports.append(report)
    if not tensors:
        raise MergeError("the merge is empty: every module has weight 0 (check ratios and block weights)")
    policy = RankPolicy(rank=rank) if rank is not None else RankPolicy(rank=max(dims))
    metadata = merged_metadata(loaded, arch, policy, reports, tensors, title, CLAMP_QUANTILE if rank else None)
    metadata["ss_merge_method"] = ("SuperMerger semantics: " + (
        "same-rank sum of the factors scaled by the ratios" if rank is None else
        f"dense SVD of the sum to rank {rank}, factors clamped at quantile {CLAMP_QUANTILE}"))
    metadata["ss_merge_rank_policy"] = mode.describe()
    return MergeResult(tensors, metadata, reports, arch)


def supermerger_files(inputs: Sequence[MergeInput], out_path, mode: SuperMergerMode, **options) -> MergeResult:
    """:func:`supermerger_merge` then the atomic write; on any error no output file exists."""
    from pathlib import Path

    from trainer.merge.svd_merge import save_merged

    out = Path(out_path)
    if not out.parent.is_dir():
        raise MergeError(f"output folder '{out.parent}' does not exist")
    if out.suffix != ".safetensors":
        raise MergeError(f"output '{out}' must end in .safetensors")
    result = supermerger_merge(inputs, mode, title=options.pop("title", out.stem), **options)
    save_merged(result, out)
    return result
