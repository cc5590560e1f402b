"""Checks of the files and folders a job names (existence and kind; the data package looks inside)."""
from __future__ import annotations

import os
from pathlib import Path

from trainer.jobs.fields import Field, JobError
from trainer.jobs.specs import Job

def _path_problem(f: Field, value: str, root: Path) -> str | None:
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else root / path
    if f.path == "model" and value == "demo":
        return None
    if not path.exists():
        return f"{f.label} '{value}' does not exist"
    if f.path == "dir" and not path.is_dir():
        return f"{f.label} '{value}' is a file, not a folder"
    if f.path == "file" and not path.is_file():
        return f"{f.label} '{value}' is a folder, not a file"
    return None


def validate_paths(job: Job, root: str | os.PathLike | None = None) -> dict[str, str]:
    """field -> problem for referenced files and folders that are missing or of the wrong kind.

    Relative paths are taken from ``root`` (default: the current directory). Only existence is
    checked; the dataset module looks for images and captions.
    """
    base = Path(root) if root is not None else Path.cwd()
    problems: dict[str, str] = {}
    for f in job.spec_fields:
        if not f.path or f.path == "output_dir":   # relative to the output root: see trainer.paths.output_folder
            continue
        value = getattr(job, f.name)
        entries = [v for v in (value if isinstance(value, list) else [value]) if v]
        if not entries and job.mode in f.required_in:
            problems[f.name] = f"{f.label} is required"
        for entry in entries:
            try:
                problem = _path_problem(f, entry, base)
            except OSError as e:          # a name too long, a folder we may not enter
                problem = f"{f.label} '{entry[:80]}' cannot be read: {e.strerror or e}"
            if problem:
                problems.setdefault(f.name, problem)
    if job.mode == "copier" and not job.image_a and not job.copier_file:
        problems.setdefault("image_a", "image A is required (or a saved copier in copier_file)")
    if job.mode == "lcm" and not (job.dataset_dir or job.prompts_file or job.prompts):
        problems.setdefault("dataset_dir", "choose a dataset folder, a prompts file or prompts: "
                                           "LCM needs images or prompts to generate them from")
    if job.mode == "ileco" and not job.source_prompt.strip():
        problems.setdefault("source_prompt", "source prompt is required: the concept the slider changes, "
                                             "e.g. 'a red circle' (iLECO trains from prompts alone)")
    return problems


def check_job(job: Job, root: str | os.PathLike | None = None, model_given: bool = False) -> None:
    """Everything that can be checked before a model is touched; raises JobError naming each field.

    ``model_given``: the caller supplies the model (WebUI, ``--model``), so the job's own is not needed.
    """
    problems = validate_paths(job, root)
    if model_given:
        problems.pop("model", None)
    if problems:
        raise JobError(errors=problems)
