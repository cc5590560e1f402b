"""Jobs as dicts and JSON (with a schema version), and the default job of each mode."""
from __future__ import annotations

import json
from typing import Any, Mapping

from trainer.jobs.fields import JobError, _fmt
from trainer.jobs.job_types import AddiftJob, CopierJob, IlecoJob, LcmJob, StandardJob
from trainer.jobs.specs import Job, _build, _spec_to_dict
from trainer.jobs.vocabulary import MODES

SCHEMA_VERSION = 1
JOB_TYPES: dict[str, type[Job]] = {"standard": StandardJob, "copier": CopierJob, "lcm": LcmJob, "addift": AddiftJob,
                                   "ileco": IlecoJob}


def job_to_dict(job: Job) -> dict[str, Any]:
    """``{"schema": 1, "mode": ..., "name": ..., every field..., copier passes as objects}``."""
    return {"schema": SCHEMA_VERSION, "mode": job.mode, **_spec_to_dict(job)}



def job_from_dict(data: Mapping[str, Any]) -> Job:
    """A validated job from a dict as :func:`job_to_dict` writes it; missing fields take their defaults."""
    if not isinstance(data, Mapping):
        raise JobError(f"a job must be a JSON object with a \"mode\" (got {type(data).__name__})")
    schema = data.get("schema", SCHEMA_VERSION)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise JobError(f"schema must be a whole number >= 1 (got {_fmt(schema)})", field="schema")
    if schema > SCHEMA_VERSION:
        raise JobError(f"this job uses job schema {schema}, written by a newer LoRA Queue; this version reads "
                       f"schema {SCHEMA_VERSION} and older: update LoRA Queue to run it", field="schema")
    mode = data.get("mode")
    if mode not in JOB_TYPES:
        raise JobError(f"mode must be one of {', '.join(MODES)} (got {_fmt(mode)})", field="mode")
    return _build(JOB_TYPES[mode], {k: v for k, v in data.items() if k not in ("schema", "mode")})


def job_to_json(job: Job, indent: int | None = 2) -> str:
    return json.dumps(job_to_dict(job), indent=indent, ensure_ascii=False)


def job_from_json(text: str) -> Job:
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise JobError(f"not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return job_from_dict(data)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON allows a key twice and keeps the last: in a job that silently drops a setting the user wrote."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JobError(f"{key!r} is given twice in the job file ({_fmt(out[key])} and {_fmt(value)}); keep one",
                           field=key)
        out[key] = value
    return out


def _job_type(mode: str) -> type:
    if mode not in JOB_TYPES:
        raise JobError(f"mode must be one of {', '.join(MODES)} (got {_fmt(mode)})", field="mode")
    return JOB_TYPES[mode]


def template(mode: str) -> dict[str, Any]:
    """A complete default job of ``mode`` as a dict (what ``python -m trainer template MODE`` prints)."""
    return job_to_dict(_job_type(mode)())

