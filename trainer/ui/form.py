"""The train form as data: which control each job field gets, and values <-> job dicts.

Pure (no gradio): the controls are generated from :data:`trainer.jobs.FIELDS`, so a field is never
declared again here. A control is keyed by where its value lives in a job dict: ``"lr"`` at the top
level, ``"copier_pass.lr"`` / ``"difference_pass.lr"`` inside a copier pass; these are also the keys
of :attr:`trainer.jobs.JobError.errors`, so every error lands next to its control.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from trainer import jobs

PASSES = ("copier_pass", "difference_pass")
PASS_TITLES = {"copier_pass": "Pass 1: copier (learns image A)", "difference_pass": "Pass 2: difference (A -> B)"}


@dataclass(frozen=True)
class Control:
    """One input of the form: ``key`` in a job dict, its field, and the modes that show it."""

    key: str
    field: jobs.Field
    modes: tuple[str, ...]

    @property
    def part(self) -> str:
        """"" for a job-level control, else the copier pass it belongs to."""
        return self.key.split(".", 1)[0] if "." in self.key else ""

    @property
    def kind(self) -> str:
        """number | choice | checkbox | checkboxes | lines | images | text"""
        f = self.field
        if f.type is bool:
            return "checkbox"
        if f.type in (int, float):
            return "number"
        if f.type == list[str]:
            return "checkboxes" if f.choices else ("images" if f.ui == "image" else "lines")
        return "choice" if f.choices else "text"

    @property
    def essential(self) -> bool:
        """At the top of the form: what a job needs and the handful of settings people change."""
        return self.field.essential

    @property
    def elem_id(self) -> str:
        return "loraq_f_" + self.key.replace(".", "__")

    def default(self, mode: str) -> Any:
        scope = self.part or mode
        return to_ui(self.field, self.field.default_for(scope))


def controls() -> list[Control]:
    """Every control of the form, in declaration order: job-level fields (shown in the modes that
    have them at the job level), then the two copier passes."""
    job_level: dict[str, list[str]] = {}
    for mode in jobs.MODES:
        for f in jobs.fields_for(mode):
            job_level.setdefault(f.name, []).append(mode)
    out = [Control(f.name, f, tuple(job_level[f.name])) for f in jobs.FIELDS.values() if f.name in job_level]
    for part in PASSES:
        out += [Control(f"{part}.{f.name}", f, ("copier",)) for f in jobs.fields_for(part)]
    return out


def to_ui(field: jobs.Field, value: Any) -> Any:
    """A job value as its control shows it (prompt lists as lines)."""
    if field.type == list[str] and not field.choices and field.ui != "image":
        return "\n".join(value or [])
    return list(value) if isinstance(value, (list, tuple)) else value


def from_ui(field: jobs.Field, value: Any) -> Any:
    """A control's value as the job field takes it; wrong values pass through for jobs.py to name."""
    if field.type == list[str]:
        if isinstance(value, str):
            return [line.strip() for line in value.splitlines() if line.strip()]
        return list(value or [])
    if field.type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if field.type is str and value is None:
        return ""
    return value


def job_dict(mode: str, values: Mapping[str, Any], all_controls: list[Control] | None = None) -> dict[str, Any]:
    """The job dict of ``mode`` from control values (key -> value); controls of other modes are ignored."""
    out: dict[str, Any] = {"schema": jobs.SCHEMA_VERSION, "mode": mode}
    for c in all_controls or controls():
        if mode not in c.modes or c.key not in values:
            continue
        value = from_ui(c.field, values[c.key])
        if c.part:
            out.setdefault(c.part, {})[c.field.name] = value
        else:
            out[c.key] = value
    return out


def ui_values(data: Mapping[str, Any]) -> dict[str, Any]:
    """Control values (key -> value) from a job dict, e.g. a preset; keys absent from it are left out."""
    out: dict[str, Any] = {}
    by_key = {c.key: c for c in controls()}
    for name, value in data.items():
        if name in PASSES and isinstance(value, Mapping):
            for inner, v in value.items():
                key = f"{name}.{inner}"
                if key in by_key:
                    out[key] = to_ui(by_key[key].field, v)
        elif name in by_key:
            out[name] = to_ui(by_key[name].field, value)
    return out


def place_errors(errors: Mapping[str, str], mode: str) -> tuple[dict[str, str], dict[str, str]]:
    """(messages by control key, messages that belong to no visible control) of a JobError."""
    shown = {c.key for c in controls() if mode in c.modes}
    placed = {k: v for k, v in errors.items() if k in shown}
    return placed, {k: v for k, v in errors.items() if k not in shown}


def dataset_summary(folder: str, caption_extension: str = ".txt") -> str:
    """"N images found, M captions" for a dataset folder, or what is wrong with it (header-only scan)."""
    from trainer.data import DatasetError, DatasetOptions, scan_dataset

    if not folder or not folder.strip():
        return ""
    try:
        found = scan_dataset(DatasetOptions(folder.strip(), caption_extension=caption_extension or ".txt"),
                             verify=False)
    except DatasetError as e:
        return f"⚠ {e}"
    captions = sum(1 for item in found.items if item.caption_file is not None)
    text = f"{len(found.items)} image{'s' if len(found.items) != 1 else ''} found, {captions} caption{'s' if captions != 1 else ''}"
    return text + "".join(f"\n\n⚠ {w}" for w in found.warnings)


def defaults_for_mode(controls: Mapping[str, "Control"], mode: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The values to set when the mode changes to ``mode``: a field still at the default of one of its modes
    (untouched by the user) takes ``mode``'s default (lcm rank 64, copier names...); edited values stay.
    Whatever path led here (standard -> copier -> lcm or standard -> lcm), the untouched fields are the same."""
    changed = {}
    for key, c in controls.items():
        if key not in current or mode not in c.modes:
            continue
        untouched = any(current[key] == c.default(m) for m in c.modes)
        if untouched and current[key] != c.default(mode):
            changed[key] = c.default(mode)
    return changed


def thumbnails_html(paths: list[str], size: int = 72) -> str:
    """Small inline previews of the picked images (data URIs: nothing for the server to serve), or what is
    wrong with a file that is no image."""
    import base64
    import html
    import io

    from PIL import Image, UnidentifiedImageError

    cells = []
    for path in paths:
        name = html.escape(path.replace("\\", "/").rsplit("/", 1)[-1])
        try:
            with Image.open(path) as image:
                thumb = image.convert("RGBA")
                thumb.thumbnail((size, size))
                detail = f"{image.width}x{image.height}"
        except (OSError, UnidentifiedImageError, ValueError):
            cells.append(f'<figure class="loraq-thumb"><div class="loraq-thumb-bad">⚠ not an image</div>'
                         f"<figcaption>{name}</figcaption></figure>")
            continue
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        cells.append(f'<figure class="loraq-thumb" title="{name} ({detail})"><img alt="{name}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>')
    return f'<div class="loraq-thumbs">{"".join(cells)}</div>' if cells else ""


def preview_note(job) -> str:
    """What "Add to queue" says about the job's previews: the prompts live in a closed group and the form comes
    back as last queued, so a job can carry an earlier job's preview prompts (minutes per preview on a CPU)."""
    prompts = [p for p in getattr(job, "sample_prompts", None) or [] if str(p).strip()]
    if not prompts:
        return ""
    every = [f"every {n} steps" for n in (getattr(job, "sample_every_n_steps", 0),) if n]
    saves = ["at each save"] if getattr(job, "save_every_n_steps", 0) else []
    parts = every + saves
    when = (", ".join(parts) + " and " if parts else "") + "at the end"
    return (f"\n- previews of {len(prompts)} prompt(s) {when} (group *{jobs.GROUPS['preview']}*; "
            "empty its prompts for none)")
