"""What is checked when a job is queued, so that the night is never lost to a job we could have refused.

Field checks run when the job is built (``trainer.jobs``). Here come the checks that look at the world:
the files a job reads (a dataset with no readable image, a damaged or foreign ``init_lora``), the
arguments its optimizer takes, where it writes (inside the output root only, never a file another
queued job writes, never an existing LoRA unless ``overwrite``) and, inside the WebUI, which folders
it may read. Every problem names its field.

On a GPU host, a job whose memory budget (``trainer.train.budget``) exceeds the free GPU memory gets a
warning naming the setting that would make it fit: warned, not refused, because the estimate is an estimate.

Kept cheap for the common job: a dataset is scanned by headers and one image decoded; torch is only
imported for a job that names an ``init_lora`` or ``optimizer_args`` or asks for pair masks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from trainer import jobs, paths

_INPUT_KINDS = ("dir", "file")


@dataclass(frozen=True)
class Admission:
    """What the place a job is queued from knows beyond the job itself."""

    output_root: Path                                  # every output goes below it (WebUI: its LoRA folder)
    input_roots: tuple[Path, ...] | None = None        # inputs only below these (WebUI settings); None: anywhere
    model_arch: str | None = None                      # sd1 | sd2 | sdxl of the model the job trains, if known
    context_dim: int | None = None                     # its cross-attention width (tells SD1 from SD2)
    model_given: bool = False                          # the caller supplies the model (WebUI, --model)
    resume: bool = False                               # continues a saved state: its LoRA may exist
    #: The WebUI on CUDA: GPU bytes free beyond its loaded model (the driver's free memory plus what torch's
    #: cache holds unused), and the bytes per weight it holds the model in. None: no GPU, no memory check.
    gpu_free: int | None = None
    gpu_weight_bytes: int = 2


def output_key(job: jobs.Job) -> str:
    """Two jobs with the same key write the same files (case folded: Windows and macOS do)."""
    folder = os.path.normpath(job.output_dir) if job.output_dir else "."
    return f"{folder}/{job.name}".replace("\\", "/").casefold()


def admit(job: jobs.Job, root: str | os.PathLike | None, admission: Admission,
          taken: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(errors by field, warnings) for queuing ``job``; ``taken`` maps :func:`output_key` -> who writes there."""
    base = Path(root) if root is not None else Path.cwd()
    errors = jobs.validate_paths(job, base)
    if admission.model_given:
        errors.pop("model", None)
    warnings: list[str] = []
    images = 0

    if admission.input_roots is not None:
        for name, value in _inputs(job, base, admission.model_given):
            if name not in errors and not paths.inside_any(value, admission.input_roots):
                allowed = ", ".join(str(r) for r in admission.input_roots)
                errors[name] = (f"{value} is outside the folders LoRA Queue may read ({allowed}); move it there "
                                "or add its folder in Settings > LoRA Queue > allowed input folders")

    _check_outputs(job, admission, taken or {}, errors)
    if getattr(job, "dataset_dir", "") and "dataset_dir" not in errors:
        images = _check_dataset(job, base, errors, warnings)
    for name in ("image_a", "image_b"):
        if getattr(job, name, None) and name not in errors:
            _check_images(job, name, base, errors)
    if getattr(job, "image_b", None) and not errors.keys() & {"image_a", "image_b"}:
        _check_masks(job, base, errors)
    if getattr(job, "init_lora", "") and "init_lora" not in errors:
        _check_init_lora(job, base, admission, errors)
    _check_optimizers(job, errors)
    if admission.gpu_free is not None and admission.model_arch:
        warning = _memory_warning(job, admission, images)
        if warning:
            warnings.append(warning)
    return errors, warnings


def _memory_warning(job: jobs.Job, admission: Admission, images: int) -> str | None:
    from trainer.train import budget

    half = admission.gpu_weight_bytes < 4
    host = budget.Host(weight_bytes=admission.gpu_weight_bytes, vae_bytes=admission.gpu_weight_bytes,
                       vae_upcast=admission.model_arch == "sdxl" and half)
    return budget.fit_warning(admission.model_arch, budget.settings_for(job, images), host, admission.gpu_free)


def _inputs(job: jobs.Job, base: Path, model_given: bool) -> Iterable[tuple[str, Path]]:
    for f in job.spec_fields:
        # A host that gives the model names it its own way (the WebUI: a checkpoint title), not by a path.
        is_model_path = f.path == "model" and not model_given and getattr(job, f.name) != "demo"
        if f.path not in _INPUT_KINDS and not is_model_path:
            continue
        value = getattr(job, f.name)
        for entry in (value if isinstance(value, list) else [value]):
            if entry and entry != "demo":
                path = Path(os.path.expanduser(entry))
                yield f.name, (path if path.is_absolute() else base / path)


def _check_outputs(job: jobs.Job, admission: Admission, taken: Mapping[str, str], errors: dict[str, str]) -> None:
    try:
        folder = paths.output_folder(admission.output_root, job.output_dir)
    except ValueError as e:
        errors["output_dir"] = str(e)
        return
    other = taken.get(output_key(job))
    if other:
        errors["name"] = (f"{other} already writes '{job.name}' in this output folder; two jobs never write the "
                          "same file (overwrite or not): choose another name or output folder")
        return
    final = folder / f"{job.name}.safetensors"
    if final.exists() and not job.overwrite and not admission.resume:
        errors["name"] = f"{final} already exists: choose another name or tick overwrite"


def _check_dataset(job: jobs.Job, base: Path, errors: dict[str, str], warnings: list[str]) -> int:
    """Checks the dataset; returns its number of images (0 when refused)."""
    from trainer.data.dataset import DatasetError, inspect_image, scan_dataset, short_reason
    from trainer.data.options import DatasetOptions

    folder = Path(os.path.expanduser(job.dataset_dir))
    # Only what the scan reads: the folder and the caption extension (LCM jobs have no caption settings).
    options = DatasetOptions(folder if folder.is_absolute() else base / folder,
                             caption_extension=getattr(job, "caption_extension", ".txt"))
    try:
        found = scan_dataset(options, verify=False)     # headers only: fast on a large folder
    except DatasetError as e:
        errors["dataset_dir"] = str(e)
        return 0
    warnings.extend(found.warnings)
    # A header can be fine over broken pixel data: decode until one image reads, so that a folder of only
    # damaged files is refused now rather than at its turn. Usually the first one does.
    broken = []
    for item in found.items:
        try:
            inspect_image(item.path, verify=True)
            break
        except Exception as e:  # PIL raises many types for damaged files
            broken.append(f"{item.path.name} ({short_reason(e)})")
    else:
        errors["dataset_dir"] = f"dataset folder '{job.dataset_dir}' has no readable images: " + ", ".join(broken[:10])
        return 0
    if broken:
        warnings.append(f"{len(broken)} image(s) are damaged and will be skipped: " + ", ".join(broken[:10]))
    return len(found.items)


def _check_images(job: jobs.Job, name: str, base: Path, errors: dict[str, str]) -> None:
    from trainer.data.dataset import inspect_image, short_reason

    for entry in getattr(job, name):
        path = Path(os.path.expanduser(entry))
        try:
            inspect_image(path if path.is_absolute() else base / path, verify=True)
        except Exception as e:  # PIL raises many types for damaged files
            errors[name] = f"{entry}: {short_reason(e)}; choose a PNG, JPEG or WebP image that opens"
            return


def _check_masks(job: jobs.Job, base: Path, errors: dict[str, str]) -> None:
    """A difference or alpha mask that would be empty fails the job at its turn: refuse it now."""
    if not (getattr(job, "use_mask", False) or getattr(job, "difference_mask", False)):
        return      # the common pair job: torch (imported by the copier module) is not needed to queue it
    from trainer.train.modes.copier import check_masks
    try:
        check_masks(job, base)
    except jobs.JobError as e:
        errors.setdefault(e.field or "image_b", str(e))


def _check_init_lora(job: jobs.Job, base: Path, admission: Admission, errors: dict[str, str]) -> None:
    from trainer.lora.files import LoraFileError
    from trainer.lora.reading import check_starting_point

    path = Path(os.path.expanduser(job.init_lora))
    try:
        check_starting_point(path if path.is_absolute() else base / path, admission.model_arch, admission.context_dim)
    except LoraFileError as e:
        errors["init_lora"] = f"start from LoRA: {e}"


def _check_optimizers(job: jobs.Job, errors: dict[str, str]) -> None:
    parts = list(zip(("copier_pass.", "difference_pass."), job.passes())) if job.mode == "copier" else [("", job)]
    for prefix, part in parts:
        text, field = getattr(part, "optimizer_args", ""), f"{prefix}optimizer_args"
        if not text or field in errors:
            continue
        from trainer.train.optim import OptimizerError, check_optimizer
        try:
            check_optimizer(part.optimizer, part.lr, jobs.parse_optimizer_args(text))
        except OptimizerError as e:
            errors[field] = str(e)
