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


#: Recipes people use, shipped: (name, job). Only what differs from the mode's defaults is written.
_LION_COSINE = {"optimizer": "Lion", "lr_scheduler": "cosine", "batch_size": 1, "seed": 1111}
_ADDIFT = {"network_dim": 4, "network_alpha": 1.0, "batch_size": 1, "lr_scheduler": "cosine", "addift_strength": 0.25}
BUILTIN: dict[str, dict[str, Any]] = {
    # traintrain's SDXL difference recipe: a strong copier, a small difference
    "built-in SDXL copier two-pass": {
        "mode": "copier", "resolution": 1024, "target_set": "all",
        "copier_pass": {"network_dim": 16, "network_alpha": 16.0, "conv_dim": 8, "conv_alpha": 8.0, "lr": 5e-5,
                        "steps": 1000, **_LION_COSINE},
        "difference_pass": {"same_as_pass1": False, "network_dim": 4, "network_alpha": 4.0, "conv_dim": 0,
                            "lr": 5e-5, "steps": 1000, **_LION_COSINE}},
    "built-in SDXL copier, stronger pass 2": {
        "mode": "copier", "resolution": 1024, "target_set": "all", "save_every_n_steps": 500,
        "copier_pass": {"network_dim": 16, "network_alpha": 16.0, "conv_dim": 8, "conv_alpha": 8.0, "lr": 5e-5,
                        "steps": 1000, **_LION_COSINE},
        "difference_pass": {"same_as_pass1": False, "network_dim": 32, "network_alpha": 8.0, "conv_dim": 0,
                            "lr": 5e-5, "steps": 1000, **_LION_COSINE}},
    "built-in SD1.5 copier two-pass": {
        "mode": "copier", "resolution": 512,
        "copier_pass": {"network_dim": 16, "network_alpha": 16.0, "lr": 1e-3, "steps": 500, "batch_size": 1},
        "difference_pass": {"same_as_pass1": False, "network_dim": 4, "network_alpha": 4.0, "lr": 1e-3, "steps": 500,
                            "batch_size": 1}},
    # the usual kohya character LoRA on SD1.5: rank 16 / alpha 8, AdamW 1e-4 cosine, shuffled tags, keep the trigger
    "built-in SD1.5 character LoRA": {
        "mode": "standard", "resolution": 512, "network_dim": 16, "network_alpha": 8.0, "lr": 1e-4,
        "lr_scheduler": "cosine", "steps": 2000, "batch_size": 2, "shuffle_captions": True, "keep_tokens": 1,
        "save_every_n_steps": 500},
    "built-in SDXL character LoRA": {
        "mode": "standard", "resolution": 1024, "network_dim": 16, "network_alpha": 8.0, "lr": 1e-4,
        "lr_scheduler": "cosine", "steps": 2000, "batch_size": 1, "shuffle_captions": True, "keep_tokens": 1,
        "gradient_checkpointing": True, "save_every_n_steps": 500},
    # traintrain's ADDifT presets (ADDifT_Action / ADDifT_Style, SD1.5 and XL) with AdamW in place of CAME: rank 4 /
    # alpha 1, batch 1, 30-50 steps, cosine, trained at strength 0.25 as traintrain does (so strength 1 gives up to
    # 4x the pair's change); actions and decorations (closed eyes) at timesteps 500-1000, styles at 200-400
    "built-in SD1.5 ADDifT action": {
        "mode": "addift", "resolution": 512, **_ADDIFT, "lr": 1e-4, "steps": 30, "min_snr_gamma": 5.0,
        "timestep_min": 500, "timestep_max": 1000},
    "built-in SDXL ADDifT action": {
        "mode": "addift", "resolution": 1024, **_ADDIFT, "lr": 2e-4, "steps": 30, "min_snr_gamma": 5.0,
        "timestep_min": 500, "timestep_max": 1000},
    "built-in SD1.5 ADDifT style": {
        "mode": "addift", "resolution": 512, **_ADDIFT, "lr": 5e-5, "steps": 50, "min_snr_gamma": 5.0,
        "timestep_min": 200, "timestep_max": 400},
    "built-in SDXL ADDifT style": {
        "mode": "addift", "resolution": 1024, **_ADDIFT, "lr": 2e-4, "steps": 30, "min_snr_gamma": 1.0,
        "timestep_min": 200, "timestep_max": 400},
    # the LCM-LoRA recipe is the LCM mode's defaults; these only set the model's resolution
    "built-in LCM-LoRA SD1.5": {"mode": "lcm", "resolution": 512},
    "built-in LCM-LoRA SDXL": {"mode": "lcm", "resolution": 1024, "gradient_checkpointing": True},
    # traintrain's iLECO preset (rank 4 / alpha 8, AdamW 5e-4 cosine, 300 steps, batch 2) is the iLECO defaults
    "built-in iLECO slider SD1.5": {"mode": "ileco", "resolution": 512},
    "built-in iLECO slider SDXL": {"mode": "ileco", "resolution": 1024, "gradient_checkpointing": True},
}
#: The form as last queued, restored when the page loads again (a hidden file: not a preset).
LAST_FORM = ".last_form"


class PresetStore:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        if name in BUILTIN:
            raise PresetError(f"{name!r} is built in and cannot be changed: save under another name")
        problem = jobs.output_name_problem(name) if name != LAST_FORM else None
        if problem:
            raise PresetError(problem.replace("output name", "preset name")
                              .replace(" (choose the folder with output_dir)", ""))
        return self.folder / f"{name}.json"

    def names(self) -> list[str]:
        """Saved presets (read now: a preset saved from another page shows), then the built-in ones."""
        saved = sorted(p.stem for p in self.folder.glob("*.json") if not p.name.startswith(".")) \
            if self.folder.is_dir() else []
        return saved + list(BUILTIN)

    def save(self, name: str, job: Mapping[str, Any]) -> Path:
        """Write (or replace) the preset; ``job`` must be a valid job dict (it is checked first)."""
        path = self.path(name)
        jobs.job_from_dict(job)
        self.folder.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, json.dumps(dict(job), indent=2, ensure_ascii=False).encode("utf-8"))

    def load(self, name: str) -> dict[str, Any]:
        if name in BUILTIN:
            return json.loads(json.dumps(BUILTIN[name]))
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

    def remember(self, job: Mapping[str, Any]) -> None:
        """Keep the form as queued, for the next page load."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / f"{LAST_FORM}.json", json.dumps(dict(job), ensure_ascii=False).encode("utf-8"))

    def last_form(self) -> dict[str, Any] | None:
        path = self.folder / f"{LAST_FORM}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("mode") in jobs.MODES else None

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.is_file():
            raise PresetError(f"there is no preset named {name!r}")
        path.unlink()
