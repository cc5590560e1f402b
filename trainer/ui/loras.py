"""The LoRA folder as the merge panel sees it: list, filter, and resolve ``name:ratio`` entries."""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Callable

from PIL import Image

from trainer import jobs, paths
from trainer.device import free_memory
from trainer.lora.files import LoraFileError, read_header
from trainer.merge.supermerger import SuperMergerMode, supermerger_files
from trainer.merge.svd_merge import MergeError, MergeInput, RankPolicy, format_report, merge_files, parse_input_spec
from trainer.models.handle import ModelHandle
from trainer.ui.results import parse_seeds


def list_loras(folder: Path, filter_text: str = "") -> list[str]:
    """Names (relative to ``folder``, without .safetensors) of the LoRAs under it whose name contains every
    word of ``filter_text`` (case-insensitive)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    words = filter_text.lower().split()
    names = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.safetensors")
                   if not p.name.startswith("."))
    return [n for n in names if all(w in n.lower() for w in words)]


def describe_lora(path: Path) -> str:
    """``r16 · 37.2 MB`` from the file's header (no tensor is read); ``?`` parts for what it does not say."""
    try:
        size = f"{path.stat().st_size / 2**20:.1f} MB"
    except OSError:
        return "unreadable"
    try:
        header, _ = read_header(path)
        ranks = sorted({entry["shape"][0] for key, entry in header.items()
                        if key.endswith(("lora_down.weight", "lora_A.weight")) and entry.get("shape")})
        rank = f"r{ranks[0]}" if len(ranks) == 1 else f"r{ranks[0]}-{ranks[-1]}" if ranks else "LoHa/LoKr"
    except (LoraFileError, OSError, ValueError):
        rank = "not a LoRA"
    return f"{rank} · {size}"


def lora_list_html(names: list[str], folder: Path | None = None) -> str:
    """Clickable names (with rank and size when ``folder`` is given); javascript/loraq.js appends ``name:1.0``
    to the merge text on a click."""
    if not names:
        return '<div class="loraq-empty">No LoRA found.</div>'
    items = "".join(f'<button type="button" class="loraq-lora" data-name="{html.escape(n, quote=True)}">'
                    f"{html.escape(n)}"
                    + (f' <span class="loraq-lora-facts">{html.escape(describe_lora(folder / f"{n}.safetensors"))}'
                       "</span>" if folder is not None else "")
                    + "</button>" for n in names)
    return f'<div class="loraq-lora-list">{items}</div>'


def resolve_inputs(text: str, folder: Path) -> list[MergeInput]:
    """One ``name:ratio[:blocks]`` per line; a name is a path, or a LoRA of ``folder`` with or without
    .safetensors."""
    entries = [line.strip() for line in text.splitlines() if line.strip()]
    if not entries:
        raise MergeError("add LoRAs to merge: click names in the list or type name:ratio, one per line")
    out = []
    for entry in entries:
        spec = parse_input_spec(entry)
        path = Path(spec.path).expanduser()
        candidates = [path] if path.is_absolute() else [Path(folder) / path, Path(folder) / f"{spec.path}.safetensors"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise MergeError(f"{spec.path!r}: no such LoRA in {folder} (give a name from the list or a full path)")
        out.append(MergeInput(str(found), spec.ratio, spec.blocks))
    return out


#: Ratio semantics: ours, or SuperMerger's with its "remake dimension" (docs/merge-semantics.md).
SEMANTICS = ("linear (ours)", "SuperMerger: no (same rank)", "SuperMerger: auto", "SuperMerger: rank box")


def supermerger_mode(semantics: str, rank, same_to_strength: bool) -> SuperMergerMode | None:
    """The SuperMerger mode the semantics choice describes; None for ours."""
    if semantics not in SEMANTICS:
        raise MergeError(f"ratio semantics: choose one of {', '.join(SEMANTICS)}")
    if semantics == SEMANTICS[0]:
        return None
    if semantics == SEMANTICS[3]:
        if rank in (None, "") or not float(rank).is_integer() or int(rank) < 1:
            raise MergeError(f"rank: SuperMerger's rank N needs a whole number >= 1 in the rank box, got {rank!r}")
        return SuperMergerMode(int(rank), bool(same_to_strength))
    return SuperMergerMode("no" if semantics == SEMANTICS[1] else "auto", bool(same_to_strength))


def merge_into_folder(text: str, policy: RankPolicy, output: str, precision: str, overwrite: bool, folder: Path,
                      written: Callable[[Path], None] = lambda path: None, library: Path | None = None,
                      supermerger: SuperMergerMode | None = None) -> str:
    """Merge the entries of ``text`` (names in ``library``, default ``folder``) into ``folder/OUTPUT.safetensors``;
    the report. ``written`` is told of the new file (the WebUI re-lists its LoRAs, as after a job). With
    ``supermerger`` the ratios mean what they mean in SuperMerger (the policy is then unused). Raises
    MergeError/ValueError/OSError."""
    name = (output or "").strip()
    problem = jobs.output_name_problem(name)
    if problem:
        raise MergeError(problem)
    out = Path(folder) / f"{name}.safetensors"
    if out.exists() and not overwrite:
        raise MergeError(f"{out} already exists: choose another output name or tick overwrite")
    inputs = resolve_inputs(text or "", library or folder)
    started = time.perf_counter()
    if supermerger is not None:
        supermerger.validate()
        result = supermerger_files(inputs, out, supermerger, dtype=precision)
    else:
        policy.validate()
        result = merge_files(inputs, out, policy, dtype=precision)
    written(out)
    ranks = sorted({m.rank for m in result.modules})
    got = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    if supermerger is None and policy.rank is not None and not policy.concat and ranks and ranks[-1] < policy.rank:
        got += f" (asked {policy.rank}: no module has more to keep — the inputs' ranks add up to less)"
    if supermerger is not None:
        got += "; " + supermerger.describe()
    head = (f"merged {len(inputs)} LoRAs ({result.arch.upper()}, {got}) -> {out} "
            f"in {time.perf_counter() - started:.1f} s")
    report = format_report(result, more="(the 10 worst modules are shown)")
    if supermerger is not None:
        report += "\n(relative error: distance from the LoRAs applied together at their ratios, as a merge here means)"
    return head + "\n" + report


def preview_in_folder(handle: ModelHandle, text: str, rank, prompt: str, seeds_text: str, steps, threshold,
                      folder: Path, size: int) -> tuple[Image.Image, str]:
    """The merge preview of the panel's entries on ``handle``: the grid and its report (nothing is saved).
    Raises MergeError/ValueError/OSError."""
    from trainer.sampling.merge_preview import preview_merge

    inputs = resolve_inputs(text or "", folder)
    seeds = parse_seeds(seeds_text or "")
    asked = int(rank) if rank not in (None, "") and float(rank).is_integer() and int(rank) >= 1 else None
    started = time.perf_counter()
    preview = preview_merge(handle, inputs, prompt or "", seeds, rank=asked, threshold=float(threshold),
                            steps=int(steps or 20), size=(size, size))
    head = (f"preview of {len(inputs)} LoRAs on the loaded model, {len(preview.renders) + 1} renders of "
            f"{len(seeds)} seeds in {time.perf_counter() - started:.1f} s (nothing saved)")
    return preview.grid, head + "\n" + preview.summary()


# --- resize, extract, bake: the other LoRA tools of the tab -------------------------------------------------

def readable_file(text: str, what: str, roots: tuple[Path, ...] | None, folder: Path | None = None,
                  suffix: str = ".safetensors") -> Path:
    """The file the user named for ``what``: a path, or a name in ``folder`` (with or without ``suffix``); inside
    the folders the host lets the tab read (``roots``; None: anywhere). Raises MergeError naming ``what``."""
    name = (text or "").strip()
    if not name:
        raise MergeError(f"{what}: give a file")
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() or folder is None else [Path(folder) / path,
                                                                        Path(folder) / f"{name}{suffix}", path]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        where = f" in {folder}" if folder is not None else ""
        raise MergeError(f"{what}: {name!r} does not exist{where}")
    if roots is not None:
        if not paths.inside_any(found, roots):
            allowed = ", ".join(str(r) for r in roots)
            raise MergeError(f"{what}: {found} is outside the folders LoRA Queue may read ({allowed}); move it there "
                             "or add its folder in Settings > LoRA Queue > allowed input folders")
    return found


def _new_output(output: str, folder: Path, overwrite: bool) -> Path:
    name = (output or "").strip()
    problem = jobs.output_name_problem(name)
    if problem:
        raise MergeError(problem)
    out = Path(folder) / f"{name}.safetensors"
    if out.exists() and not overwrite:
        raise MergeError(f"{out} already exists: choose another output name or tick overwrite")
    return out


def resize_into_folder(source: str, policy: RankPolicy, output: str, precision: str, overwrite: bool, folder: Path,
                       written: Callable[[Path], None] = lambda path: None, library: Path | None = None) -> str:
    """Resize the LoRA ``source`` (a name in ``library`` or a path) into ``folder/OUTPUT.safetensors``; the report."""
    from trainer.merge.svd_merge import resize_file

    path = readable_file(source, "LoRA to resize", None, library or folder)
    out = _new_output(output, folder, overwrite)
    policy.validate()
    started = time.perf_counter()
    result = resize_file(path, out, policy, dtype=precision)
    written(out)
    return (f"resized {path.name} ({result.arch.upper()}, {policy.describe()}) -> {out} in "
            f"{time.perf_counter() - started:.1f} s\n" + format_report(result, more="(the 10 worst modules are shown)"))


def extract_into_folder(tuned: str, base: str, policy: RankPolicy, output: str, precision: str, overwrite: bool,
                        folder: Path, written: Callable[[Path], None] = lambda path: None,
                        roots: tuple[Path, ...] | None = None, text_encoder: bool = True) -> str:
    """The LoRA of ``tuned - base`` (checkpoint files or model folders) into ``folder/OUTPUT.safetensors``."""
    from trainer.merge.extract import extract_models, save_extracted

    tuned_path = readable_file(tuned, "tuned model", roots)
    base_path = readable_file(base, "base model", roots)
    if tuned_path.resolve() == base_path.resolve():
        raise MergeError("the tuned and the base model are the same file: nothing to extract")
    out = _new_output(output, folder, overwrite)
    policy.validate()
    started = time.perf_counter()
    try:
        result = extract_models(str(tuned_path), str(base_path), policy, dtype=precision, text_encoder=text_encoder,
                                title=out.stem)
    finally:   # two checkpoints were read through the heap
        free_memory()
    save_extracted(result, out)
    written(out)
    return (f"extracted {len(result.modules)} modules of {tuned_path.name} - {base_path.name} ({result.arch.upper()}, "
            f"{policy.describe()}; {len(result.unchanged)} unchanged) -> {out} in "
            f"{time.perf_counter() - started:.1f} s\n" + format_report(result, more="(the 10 worst modules are shown)"))


def bake_into_folder(base: str, text: str, output: str, overwrite: bool, folder: Path,
                     library: Path | None = None, roots: tuple[Path, ...] | None = None) -> str:
    """LoRAs (``name:ratio[:blocks]`` lines from ``library``) baked into the checkpoint ``base``, saved as
    ``folder/OUTPUT.safetensors``."""
    from trainer.merge.bake import bake_loras

    base_path = readable_file(base, "base checkpoint", roots)
    inputs = resolve_inputs(text or "", library or folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = _new_output(output, folder, overwrite)
    started = time.perf_counter()
    try:
        baked = bake_loras(base_path, inputs, out)
    finally:   # the whole checkpoint passed through the heap: give it back (A1111 kept +3.6 GB RSS after a bake)
        free_memory()
    parts = ", ".join(f"{name}: {n} modules" for name, n in baked.per_input.items())
    return (f"baked {len(inputs)} LoRAs into {base_path.name} ({baked.arch.upper()}; {parts}; "
            f"{baked.tensors_changed} weights changed) -> {out} in {time.perf_counter() - started:.1f} s\n"
            "The WebUI lists it after a refresh of its checkpoint list.")
