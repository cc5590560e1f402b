"""Sweeps: one job per combination of values, e.g. ``lr=5e-5,1e-4,2e-4; network_alpha=2,4,8`` -> 9 jobs.

Each job is the base job with those values, named ``BASE_lr1e-04_network_alpha4`` so the morning's files say
what they are; a copier pass setting is written ``difference_pass.lr``. Values are parsed as the field's type
and every job is validated as any other, so a sweep is refused as a whole, naming the field, before anything
is queued.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import Any, Mapping

from trainer.jobs.fields import FIELDS, JobError, _fmt
from trainer.jobs.serial import job_from_dict, job_to_dict
from trainer.jobs.specs import Job

#: More combinations than this is a typo (a night holds a few dozen jobs), not a plan.
MAX_SWEEP_JOBS = 100


def parse_sweep(text: str) -> dict[str, list[Any]]:
    """``"lr=5e-5,1e-4; network_alpha=2,4,8"`` (``;`` or new lines between fields) -> {field: [values]}."""
    out: dict[str, list[Any]] = {}
    for part in re.split(r"[;\n]", text or ""):
        part = part.strip()
        if not part:
            continue
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise JobError(f"sweep: {part!r} must look like field=value1,value2 (e.g. lr=5e-5,1e-4)", field="sweep")
        field = FIELDS.get(key.split(".")[-1])
        if field is None:
            raise JobError(f"sweep: {key!r} is not a job field", field="sweep")
        if field.type not in (int, float, str, bool):
            raise JobError(f"sweep: {key} is a list field; sweeps take numbers and choices", field="sweep")
        if key in out:
            raise JobError(f"sweep: {key} is given twice", field="sweep")
        out[key] = [_value(field.type, v.strip(), key) for v in values.split(",") if v.strip()]
    return out


def _value(kind: type, raw: str, key: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise JobError(f"sweep: {key} value {raw!r} is not a {kind.__name__}", field="sweep") from None


def _label(key: str, value: Any) -> str:
    text = f"{value:.0e}" if isinstance(value, float) and (abs(value) < 1e-2 or abs(value) >= 1e4) and value else str(value)
    return f"{key.split('.')[-1]}{text}".replace("+", "").replace("/", "_")


def sweep_jobs(base: Job | Mapping[str, Any], sweep: Mapping[str, list[Any]]) -> list[Job]:
    """Every combination of ``sweep``'s values applied to ``base``, validated, named after the values."""
    data = job_to_dict(base) if isinstance(base, Job) else dict(base)
    keys = list(sweep)
    combinations = list(itertools.product(*(sweep[k] for k in keys)))
    if not keys or not combinations:
        raise JobError("sweep: no values to sweep", field="sweep")
    if len(combinations) > MAX_SWEEP_JOBS:
        raise JobError(f"sweep: {len(combinations)} combinations; at most {MAX_SWEEP_JOBS} are queued at once",
                       field="sweep")
    out = []
    for values in combinations:
        job = json.loads(json.dumps(data))
        for key, value in zip(keys, values):
            target = job
            *parts, last = key.split(".")
            for part in parts:
                target = target.setdefault(part, {})
            target[last] = value
        job["name"] = "_".join([data.get("name", "job")] + [_label(k, v) for k, v in zip(keys, values)])
        try:
            out.append(job_from_dict(job))
        except JobError as e:
            where = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(keys, values))
            raise JobError(f"sweep ({where}): {e.message}", field=e.field, errors=e.errors) from None
    return out
