"""SVD merge of several LoRAs into one, exactly, in factor space.

For one module, input ``i`` contributes ``c_i * U_i @ D_i`` with ``c_i = ratio_i * block_weight_i *
alpha_i / rank_i``. The exact sum is ``U @ D`` with the stacked factors ``U = [c_1 U_1, ..., c_n U_n]``
[out, R] and ``D = [D_1; ...; D_n]`` [R, in*k*k], R = sum of the ranks. With thin QRs ``U = Qu Ru``
and ``D^T = Qv Rv``, ``U @ D = Qu (Ru Rv^T) Qv^T``: the SVD of the small R x R core gives the SVD
of the sum, so truncating it is the optimal (Eckart-Young) truncation of the sum, and no out x in
matrix is ever built. LoHa/LoKr deltas have no small factor form and are the only dense case.

Everything here is pure except :func:`load_inputs` (reads safetensors, never pickles) and
:func:`save_merged` (atomic write).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from trainer.lora import files as lora_files
from trainer.lora.metadata import file_metadata
from trainer.lora.reading import LoraFile, open_lora
from trainer.lora.svd import (
    dense_svd, factor_space_svd, frobenius_error_of_factors, quantile_clamp, split_singular_values, stack_scaled_factors,
)
from trainer.lora.formats import DenseDelta, Geometry, KeyGroup, ModuleDelta, kernel_from_name
from trainer.device import SAVE_PRECISION
from trainer.jobs.vocabulary import BLOCK_IDS
from trainer.models.naming import BLOCK_SLOTS, block_id_of_key


class MergeError(Exception):
    """A merge that cannot be done as asked; the message names the file, key or field."""


# --- inputs: "name:ratio[:blocks]" ------------------------------------------------------------

@dataclass(frozen=True)
class MergeInput:
    """One input LoRA: its path, ratio and optional block weights (preset name or value list)."""

    path: str
    ratio: float = 1.0
    blocks: str | None = None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _finite_ratio(spec: str, text: str) -> float:
    ratio = float(text)
    if not math.isfinite(ratio):
        raise MergeError(f"{spec}: the ratio {text!r} is not a finite number; use e.g. 0.6 or -1")
    return ratio


def parse_input_spec(spec: str) -> MergeInput:
    """``"a.safetensors:0.6:OUTD"`` -> MergeInput; split from the right so ``C:\\x`` paths work."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and _is_number(parts[1]) and parts[0]:
        return MergeInput(parts[0], _finite_ratio(spec, parts[1]), parts[2] or None)
    parts = spec.rsplit(":", 1)
    if len(parts) == 2 and _is_number(parts[1]) and parts[0]:
        return MergeInput(parts[0], _finite_ratio(spec, parts[1]))
    # "a.safetensors:abc" is a ratio that is not a number, not a file called that ("C:\x" is a path).
    head, tail = (spec.split(":")[0], spec.split(":")[1]) if spec.count(":") >= 1 else ("", "")
    drive = len(head) == 1 and tail[:1] in ("/", "\\")
    if head and tail and not os.path.exists(spec) and not any(c in tail for c in "/\\") and not drive:
        raise MergeError(f"{spec}: the ratio {tail!r} is not a number; write NAME:0.6 or NAME:0.6:BLOCKS")
    return MergeInput(spec)


# --- block weights -----------------------------------------------------------------------------

#: LoRA Block Weight's built-in presets (17 values: SD1/SD2 attention blocks).
BUILTIN_PRESETS_SD = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
"""

#: The same names for SDXL's 12 attention slots (BASE IN04 IN05 IN07 IN08 M00 OUT00..OUT05), by
#: analogy: IN04/IN05 and OUT03-05 are the shallow blocks, IN07/IN08 and OUT00-02 the deep ones.
BUILTIN_PRESETS_SDXL = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,0,0,0,0,0,0,0,0,0
IND:1,0,0,1,1,0,0,0,0,0,0,0
INALL:1,1,1,1,1,0,0,0,0,0,0,0
MIDD:1,0,0,1,1,1,1,1,1,0,0,0
OUTD:1,0,0,0,0,0,1,1,1,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,1,1,1
OUTALL:1,0,0,0,0,0,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
"""


def parse_presets(text: str, source: str = "presets") -> dict[str, list[float]]:
    """LoRA Block Weight's preset file: one ``NAME:v1,v2,...`` a line; blank and ``#`` lines skipped."""
    presets: dict[str, list[float]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, values = line.partition(":")
        if not sep:
            raise MergeError(f"{source} line {number}: expected NAME:v1,v2,..., got {line!r}")
        presets[name.strip()] = parse_block_values(values, f"{source} line {number} ({name.strip()})")
    return presets


def parse_block_values(text: str, where: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise MergeError(f"{where}: block weights must be numbers separated by commas, got {text!r}") from None


def builtin_presets(arch: str) -> dict[str, list[float]]:
    return parse_presets(BUILTIN_PRESETS_SDXL if arch == "sdxl" else BUILTIN_PRESETS_SD, "built-in presets")


def block_weights(blocks: str, arch: str, presets: Mapping[str, list[float]], where: str) -> dict[str, float]:
    """Block id -> weight for a preset name or value list. Blocks the list does not address get 0
    (SuperMerger's rule), so a 17-value list drops the LoCon-only blocks; modules outside every block
    take BASE's weight (:func:`module_block_weight`)."""
    spec = blocks.strip()
    if spec in presets:
        values, what = presets[spec], f"preset '{spec}'"
    elif "," in spec or _is_number(spec):
        values, what = parse_block_values(spec, where), "block list"
    else:
        raise MergeError(f"{where}: unknown block preset '{spec}' (known: {', '.join(sorted(presets))})")
    slots = BLOCK_SLOTS[arch].get(len(values))
    if slots is None:
        allowed = " or ".join(str(n) for n in sorted(BLOCK_SLOTS[arch]))
        raise MergeError(f"{where}: {what} has {len(values)} values; {arch.upper()} takes {allowed}")
    weights = dict.fromkeys(BLOCK_IDS, 0.0)
    weights.update(zip(slots, values))
    return weights


def module_block_weight(weights: Mapping[str, float] | None, block: str | None) -> float:
    """A module's block weight: 1 without block weights; a module outside the 25 UNet blocks (the time
    embedding, conv_out, SDXL's label embedding: ``block`` None) takes BASE's weight, as SuperMerger's
    ``blockfromkey`` gives every key it cannot place the BASE slot."""
    if weights is None:
        return 1.0
    return weights.get(block, 0.0) if block else weights["BASE"]


def input_block_weights(loaded: Sequence["LoadedInput"], arch: str, presets: Mapping[str, list[float]] | None,
                        presets_text: str | None) -> list[dict[str, float] | None]:
    """Each input's block weights (None = every block at 1), presets resolved: built in, file, then given."""
    table = dict(builtin_presets(arch))
    if presets_text:
        table.update(parse_presets(presets_text, "preset file"))
    table.update(presets or {})
    return [block_weights(i.spec.blocks, arch, table, f"'{i.spec.path}' blocks") if i.spec.blocks else None
            for i in loaded]


# --- rank policy ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankPolicy:
    """Target rank: fixed ``rank`` (``conv_rank`` for k>1 convs), ``energy`` = auto, or ``concat``.

    With ``energy`` set, ``rank``/``conv_rank`` (if given) cap the automatic rank.
    """

    rank: int | None = 8
    conv_rank: int | None = None
    energy: float | None = None
    concat: bool = False

    def validate(self) -> None:
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise MergeError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise MergeError(f"auto energy fraction must be in (0, 1], got {self.energy!r}")
        if self.rank is None and self.energy is None and not self.concat:
            raise MergeError("rank: give a rank, auto, or concat")

    def describe(self) -> str:
        if self.concat:
            return "concat (lossless)"
        text = f"auto {self.energy:g}" if self.energy is not None else f"rank {self.rank}"
        if self.energy is not None and self.rank is not None:
            text += f" (max {self.rank})"
        if self.conv_rank is not None:
            text += f", conv rank {self.conv_rank}"
        return text


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest r with ``sum(s[:r]^2) >= fraction * sum(s^2)``."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # tolerance: fraction 1.0 must not ask for ranks past the numerical rank
    return int(torch.searchsorted(cumulative, torch.tensor(fraction - 1e-12, dtype=cumulative.dtype)).item()) + 1


def truncation_rank(singular_values: torch.Tensor, policy: RankPolicy, spatial_conv: bool, cap: int) -> int:
    """The rank a module keeps under ``policy``, never above ``cap`` nor above its non-zero count."""
    nonzero = int((singular_values > 0).sum())
    if policy.concat:
        wanted = cap
    else:
        fixed = policy.conv_rank if spatial_conv and policy.conv_rank is not None else policy.rank
        wanted = energy_rank(singular_values, policy.energy) if policy.energy is not None else fixed
        if policy.energy is not None and fixed is not None:
            wanted = min(wanted, fixed)
    return max(0, min(wanted, cap, nonzero))


# --- one module --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleReport:
    name: str
    block: str | None
    rank: int
    input_rank: int
    energy: float            # ||exact delta W||_F^2
    retained_energy: float   # fraction of the energy the kept singular values hold
    relative_error: float    # ||stored - exact||_F / ||exact||_F, with the stored dtype

    def as_dict(self) -> dict:
        return {"module": self.name, "block": self.block, "rank": self.rank, "input_rank": self.input_rank,
                "retained_energy": self.retained_energy, "relative_error": self.relative_error}


@dataclass(frozen=True)
class MergedModule:
    up: torch.Tensor
    down: torch.Tensor
    alpha: float
    geometry: Geometry
    report: ModuleReport


def resolve_geometry(name: str, arch: str, deltas: Sequence[tuple[str, ModuleDelta]]) -> Geometry:
    """One weight shape for the module, or an error naming the files that disagree."""
    flat = {(d.geometry.out_features, d.geometry.flat_in) for _, d in deltas}
    exact = {d.geometry for _, d in deltas if d.geometry.kernel_known}
    if len(flat) > 1 or len(exact) > 1:
        shapes = ", ".join(f"'{f}' {d.geometry.describe()}" for f, d in deltas)
        raise MergeError(f"module '{name}': inputs disagree on its shape ({shapes})")
    if exact:
        return exact.pop()
    # only LoHa inputs storing in*k*k: the SD UNet's kernel for this name
    out, flat_in = flat.pop()
    kernel = kernel_from_name(name, arch)
    kh, kw = kernel or (1, 1)
    if flat_in % (kh * kw):
        kernel, kh, kw = None, 1, 1
    return Geometry(out, flat_in // (kh * kw), kernel)


def merge_module(name: str, arch: str, weighted: Sequence[tuple[str, ModuleDelta, float]], policy: RankPolicy, *,
                 alpha: float | None = None, clamp: float | None = None, out_dtype: torch.dtype = torch.float16,
                 compute_dtype: torch.dtype = torch.float32) -> MergedModule | None:
    """Merge one module's ``(file, delta, ratio * block weight)`` terms; None when nothing is left."""
    terms = [(f, d, w) for f, d, w in weighted if w != 0.0]
    if not terms:
        return None
    geometry = resolve_geometry(name, arch, [(f, d) for f, d, _ in terms])
    input_rank = sum(d.rank for _, d, _ in terms)
    if any(isinstance(d, DenseDelta) for _, d, _ in terms):
        dense = sum(_dense(d, compute_dtype) * w for _, d, w in terms)
        svd = dense_svd(dense)
    else:
        U, V = stack_scaled_factors([(d.up, d.down, w * d.scale) for _, d, w in terms], compute_dtype)
        svd = factor_space_svd(U, V)
    s = svd.s
    cap = min(geometry.out_features, geometry.flat_in, input_rank)
    rank = truncation_rank(s, policy, geometry.is_spatial_conv, cap)
    if rank == 0:
        return None
    out_alpha = float(rank) if alpha is None else float(alpha)
    scale = out_alpha / rank
    if clamp is not None:
        # kohya's split (s on the up side) so the clamp cuts the same values as svd_merge_lora.py
        up, down = quantile_clamp(svd.left(rank) * s[:rank], svd.right(rank).T, clamp)
        up, down = up / math.sqrt(scale), down / math.sqrt(scale)
    else:
        up, down = split_singular_values(svd, rank, scale)
    up, down = up.to(out_dtype), down.to(out_dtype)
    energy = float((s.double() ** 2).sum())
    error = frobenius_error_of_factors(svd, up, down, scale)
    report = ModuleReport(
        name=name, block=_block_of(name, arch), rank=rank, input_rank=input_rank, energy=energy,
        retained_energy=float((s[:rank].double() ** 2).sum()) / energy if energy else 1.0,
        relative_error=error / math.sqrt(energy) if energy else 0.0,
    )
    return MergedModule(up.reshape(geometry.up_shape(rank)).contiguous(),
                        down.reshape(geometry.down_shape(rank)).contiguous(), out_alpha, geometry, report)


def _dense(delta: ModuleDelta, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(delta, DenseDelta):
        return delta.weight.to(dtype)
    return (delta.up.to(dtype) * delta.scale) @ delta.down.to(dtype)


def _block_of(name: str, arch: str) -> str | None:
    try:
        return block_id_of_key(name, arch)
    except ValueError:
        return None


# --- files -------------------------------------------------------------------------------------

@dataclass
class LoadedInput:
    """An opened input: the LoRA file (groups by kohya module name, metadata, architecture) and its spec."""

    spec: MergeInput
    file: LoraFile

    @property
    def arch(self) -> str:
        return self.file.arch

    @property
    def arch_certain(self) -> bool:
        return self.file.arch_certain

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def groups(self) -> dict[str, KeyGroup]:
        return self.file.groups


def load_input(spec: MergeInput) -> LoadedInput:
    """Open one input lazily (tensors are read module by module) through the one LoRA reader."""
    try:
        return LoadedInput(spec, open_lora(spec.path))
    except lora_files.LoraFileError as e:
        raise MergeError(f"'{spec.path}': {e}") from None


def common_arch(inputs: Sequence[LoadedInput]) -> str:
    """The inputs' shared architecture; SD1 and SDXL (or SD1 and SD2 by metadata) never mix."""
    families = {i.arch == "sdxl" for i in inputs}
    if len(families) > 1:
        listing = ", ".join(f"'{i.spec.path}' {i.arch.upper()}" for i in inputs)
        raise MergeError(f"cannot merge LoRAs of different base models: {listing}")
    certain = {i.arch for i in inputs if i.arch_certain}
    if len(certain) > 1:
        listing = ", ".join(f"'{i.spec.path}' {i.arch.upper()}" for i in inputs if i.arch_certain)
        raise MergeError(f"cannot merge LoRAs of different base models (ss_base_model_version): {listing}")
    return certain.pop() if certain else inputs[0].arch


# --- the whole merge -----------------------------------------------------------------------------

#: fp64 is for tests and analysis; hosts load fp16/bf16/fp32.
DTYPES = {**SAVE_PRECISION, "fp64": torch.float64}


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[ModuleReport]
    arch: str

    @property
    def totals(self) -> dict:
        return merge_totals(self.modules)


def merge_totals(modules: Sequence[ModuleReport]) -> dict:
    """Energy-weighted totals: retained fraction and relative error of the whole network."""
    energy = sum(m.energy for m in modules)
    if not energy:
        return {"modules": len(modules), "retained_energy": 1.0, "relative_error": 0.0,
                "max_relative_error": 0.0}
    return {
        "modules": len(modules),
        "retained_energy": sum(m.retained_energy * m.energy for m in modules) / energy,
        "relative_error": math.sqrt(sum((m.relative_error ** 2) * m.energy for m in modules) / energy),
        "max_relative_error": max(m.relative_error for m in modules),
    }


def merge_loras(inputs: Sequence[MergeInput], policy: RankPolicy, *, presets: Mapping[str, list[float]] | None = None,
                presets_text: str | None = None, alpha: float | None = None, dtype: str = "fp16",
                clamp_quantile: float | None = None, title: str = "merged", precision: str = "fp32") -> MergeResult:
    """Merge ``inputs`` at their ratios and block weights under ``policy``; nothing is written.

    ``precision`` is the arithmetic of the QR/SVD: fp32 (default; its ~1e-6 relative rounding is far
    below the fp16 rounding of the saved file) or fp64 (for checking exactness).
    """
    policy.validate()
    if not inputs:
        raise MergeError("no input LoRAs given")
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if precision not in ("fp32", "fp64"):
        raise MergeError(f"precision must be fp32 or fp64, got {precision!r}")
    if alpha is not None and not alpha > 0:
        raise MergeError(f"alpha must be > 0, got {alpha!r}")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise MergeError(f"clamp quantile must be in (0, 1], got {clamp_quantile!r}")
    loaded = [load_input(spec) for spec in inputs]
    arch = common_arch(loaded)
    weights_of = input_block_weights(loaded, arch, presets, presets_text)

    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    names = sorted({name for i in loaded for name in i.groups})
    for name in names:
        block = _block_of(name, arch)
        weighted = []
        for item, weights in zip(loaded, weights_of):
            group = item.groups.get(name)
            if group is None:
                continue
            # ratio and block weight enter exactly once, here, linearly
            w = item.spec.ratio * module_block_weight(weights, block)
            if w == 0.0:
                continue
            try:   # the one reader's checks: damaged, rank 0, NaN or infinite values
                weighted.append((item.spec.path, item.file.delta(name), w))
            except lora_files.LoraFileError as e:
                raise MergeError(str(e)) from None
        merged = merge_module(name, arch, weighted, policy, alpha=alpha, clamp=clamp_quantile,
                              out_dtype=DTYPES[dtype], compute_dtype=DTYPES[precision])
        if merged is None:
            continue
        tensors[f"{name}.lora_up.weight"] = merged.up
        tensors[f"{name}.lora_down.weight"] = merged.down
        tensors[f"{name}.alpha"] = torch.tensor(merged.alpha, dtype=DTYPES[dtype])
        reports.append(merged.report)
    if not tensors:
        raise MergeError("the merge is empty: every module has weight 0 (check ratios and block weights)")
    metadata = merged_metadata(loaded, arch, policy, reports, tensors, title, clamp_quantile)
    return MergeResult(tensors, metadata, reports, arch)


def _uniform(values: Iterable[float]) -> str:
    distinct = set(values)
    if len(distinct) == 1:
        value = distinct.pop()
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return "Dynamic"  # kohya's word for per-module ranks (resize_lora.py)


def merged_metadata(loaded: Sequence[LoadedInput], arch: str, policy: RankPolicy, reports: Sequence[ModuleReport],
                    tensors: Mapping[str, torch.Tensor], title: str, clamp: float | None) -> dict[str, str]:
    """kohya ``ss_*`` fields true to the tensors, the inputs (``merged_from``) and the report totals."""
    ranks: dict[bool, list[int]] = {False: [], True: []}
    alphas: dict[bool, list[float]] = {False: [], True: []}
    for r in reports:
        spatial = tensors[f"{r.name}.lora_down.weight"].dim() == 4 and tensors[f"{r.name}.lora_down.weight"].shape[-1] > 1
        ranks[spatial].append(r.rank)
        alphas[spatial].append(float(tensors[f"{r.name}.alpha"]))
    linear_ranks = ranks[False] or ranks[True]
    linear_alphas = alphas[False] or alphas[True]
    prediction = "v" if any(i.metadata.get("ss_v_parameterization") == "True" for i in loaded) else "eps"
    resolution = next((i.metadata["modelspec.resolution"] for i in loaded if i.metadata.get("modelspec.resolution")),
                      "")
    totals = merge_totals(reports)
    metadata = file_metadata(arch, prediction, int(resolution.split("x")[0]) if resolution[:1].isdigit() else None,
                             _uniform(linear_ranks), _uniform(linear_alphas),
                             _uniform(ranks[True]) if ranks[True] else 0,
                             _uniform(alphas[True]) if ranks[True] else 1.0, title)
    version = next((i.metadata["ss_base_model_version"] for i in loaded if i.metadata.get("ss_base_model_version")),
                   None)
    if version:
        metadata["ss_base_model_version"] = version
    metadata.update({
        "ss_merge_method": "factor-space SVD (QR of stacked factors, SVD of the core)",
        "ss_merge_rank_policy": policy.describe(),
        "ss_merge_report": json.dumps({k: round(v, 8) if isinstance(v, float) else v for k, v in totals.items()}),
        "modelspec.merged_from": ", ".join(Path(i.spec.path).stem for i in loaded),
        "merged_from": json.dumps([
            {"file": os.path.basename(i.spec.path), "ratio": i.spec.ratio, "blocks": i.spec.blocks,
             "ss_network_dim": i.metadata.get("ss_network_dim"),
             "sshs_model_hash": i.metadata.get("sshs_model_hash")}
            for i in loaded
        ]),
    })
    if clamp is not None:
        metadata["ss_merge_clamp_quantile"] = str(clamp)
    return metadata


# --- writing -------------------------------------------------------------------------------------

def save_merged(result: MergeResult, out_path: str | os.PathLike) -> Path:
    """Write atomically with hashes of the bytes written (shared with every LoRA we save)."""
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise MergeError(f"output '{out}' must end in .safetensors")
    return lora_files.write_lora(out, dict(result.tensors), dict(result.metadata))


def merge_files(inputs: Sequence[MergeInput], out_path: str | os.PathLike, policy: RankPolicy,
                **options) -> MergeResult:
    """:func:`merge_loras` then :func:`save_merged`; on any error no output file exists."""
    out = Path(out_path)
    if not out.parent.is_dir():
        raise MergeError(f"output folder '{out.parent}' does not exist")
    if out.suffix != ".safetensors":
        raise MergeError(f"output '{out}' must end in .safetensors")
    result = merge_loras(inputs, policy, title=options.pop("title", out.stem), **options)
    save_merged(result, out)
    return result


#: Keys of the merge's own metadata that a resize writes over the file's (the rest of it is kept).
_RESIZED_KEYS = ("ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_merge_rank_policy", "ss_merge_report",
                 "ss_output_name", "modelspec.title", "modelspec.date")


def resize_file(path: str | os.PathLike, out_path: str | os.PathLike, policy: RankPolicy, *, dtype: str = "fp16",
                alpha: float | None = None) -> MergeResult:
    """One LoRA to another rank (or energy fraction): the merge of a single input at ratio 1, so the result is
    the optimal truncation of its own delta. The file's training metadata (dataset, tags, model, steps) is
    kept, as kohya's resize_lora keeps it; the rank, alpha, hashes and the report are the new file's."""
    source = Path(path)
    out = Path(out_path)
    if out.resolve() == source.resolve():
        raise MergeError(f"{out}: the resized LoRA must be written to another file than its input")
    if not out.parent.is_dir():
        raise MergeError(f"output folder '{out.parent}' does not exist")
    if out.suffix != ".safetensors":
        raise MergeError(f"output '{out}' must end in .safetensors")
    result = merge_loras([MergeInput(str(source))], policy, alpha=alpha, dtype=dtype, title=out.stem)
    original = load_input(MergeInput(str(source))).metadata
    metadata = {k: v for k, v in original.items() if not k.startswith("sshs_")}   # hashes: of the new bytes
    metadata.update({k: result.metadata[k] for k in _RESIZED_KEYS if k in result.metadata})
    metadata["ss_resized_from"] = json.dumps({"file": source.name, "ss_network_dim": original.get("ss_network_dim"),
                                              "sshs_model_hash": original.get("sshs_model_hash")})
    resized = MergeResult(result.tensors, metadata, result.modules, result.arch)
    save_merged(resized, out)
    return resized


def format_report(result: MergeResult, worst: int | None = 10, more: str = "(all with --verbose)") -> str:
    """Per-module lines (worst first, ``worst`` of them; None = all) and the totals."""
    modules = sorted(result.modules, key=lambda m: m.relative_error, reverse=True)
    shown = modules if worst is None else modules[:worst]
    lines = [f"{'module':<72} {'block':>5} {'rank':>4} {'in':>4} {'energy kept':>11} {'rel. error':>10}"]
    for m in shown:
        lines.append(f"{m.name:<72} {m.block or '-':>5} {m.rank:>4} {m.input_rank:>4} "
                     f"{m.retained_energy:>11.6f} {m.relative_error:>10.2e}")
    if len(shown) < len(modules):
        lines.append(f"... {len(modules) - len(shown)} more modules {more}")
    t = result.totals
    lines.append(f"total: {t['modules']} modules, energy kept {t['retained_energy']:.6f}, relative error "
                 f"{t['relative_error']:.3e} (worst module {t['max_relative_error']:.3e})")
    return "\n".join(lines)
