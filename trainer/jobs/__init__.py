"""Jobs: every training parameter declared once, and everything derived from the declarations.

- ``vocabulary``: modes and choices as ``Literal`` types (no torch; every layer imports it);
- ``fields``: :class:`Field` and the registry :data:`FIELDS` (type, default, range, help, modes, UI hint,
  kohya name), single-value checks;
- ``rules``: checks across fields; ``specs``: validation at construction and the copier's passes;
- ``job_types``: :class:`StandardJob`, :class:`CopierJob`, :class:`LcmJob`, :class:`AddiftJob`, :class:`IlecoJob`,
  :class:`PassSettings`, :class:`DifferencePass` as static frozen dataclasses, generated from the registry (``codegen``);
- ``serial``: dict / JSON / templates; ``docs``: JSON Schema and ``docs/parameters.md``;
  ``paths``: existence checks of the files a job names; ``sweeps``: one job per combination of values.

This package imports no torch: the commands that only read or write jobs start fast.
"""
from __future__ import annotations

from trainer.jobs.docs import json_schema, parameter_table_markdown
from trainer.jobs.fields import FIELDS, GROUPS, Field, JobError, fields_for, output_name_problem, parse_optimizer_args
from trainer.jobs.job_types import AddiftJob, CopierJob, DifferencePass, IlecoJob, LcmJob, PassSettings, StandardJob
from trainer.jobs.paths import check_job, validate_paths
from trainer.jobs.rules import check_rules
from trainer.jobs.serial import (
    JOB_TYPES, SCHEMA_VERSION, job_from_dict, job_from_json, job_to_dict, job_to_json, template,
)
from trainer.jobs.specs import Job
from trainer.jobs.sweeps import parse_sweep, sweep_jobs
from trainer.jobs.vocabulary import MODES, SCOPES

__all__ = [
    "FIELDS", "GROUPS", "JOB_TYPES", "MODES", "SCHEMA_VERSION", "SCOPES", "AddiftJob", "CopierJob", "DifferencePass", "Field",
    "IlecoJob", "Job", "JobError", "LcmJob", "PassSettings", "StandardJob", "check_job", "check_rules", "fields_for", "job_from_dict",
    "job_from_json", "job_to_dict", "job_to_json", "json_schema", "output_name_problem", "parameter_table_markdown",
    "parse_optimizer_args", "parse_sweep", "sweep_jobs", "template", "validate_paths",
]
