"""Named presets: a job dict saved as ``NAME.json`` under the data folder (``$LORAQ_HOME/presets``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from trainer import jobs
from trainer.paths import write_atomic


class PresetError(ValueError):
    """A preset name or file a user must fix; the message says how."""


class PresetStore:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        problem = jobs.output_name_problem(name)
        if problem:
            raise PresetError(problem.replace("output name", "preset name"))
        return self.folder / f"{name}.json"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []

    def save(self, name: str, job: Mapping[str, Any]) -> Path:
        """Write (or replace) the preset; ``job`` must be a valid job dict (it is checked first)."""
        path = self.path(name)
        jobs.job_from_dict(job)
        self.folder.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(dict(job), indent=2, ensure_ascii=False).encode("utf-8"))

    def load(self, name: str) -> dict[str, Any]:
        path = self.path(name)
        if not path.is_file():
            raise PresetError(f"there is no preset named {name!r} (saved: {', '.join(self.names()) or 'none'})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PresetError(f"preset {name!r} cannot be read ({path}): {e}") from None
        if not isinstance(data, dict) or data.get("mode") not in jobs.MODES:
            raise PresetError(f"preset {name!r} is not a job (no valid \"mode\"): {path}")
        return data

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.is_file():
            raise PresetError(f"there is no preset named {name!r}")
        path.unlink()
