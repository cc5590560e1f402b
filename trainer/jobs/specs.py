"""What every job class shares: validation at construction, parts (the copier's passes), unknown keys.

The job classes themselves are static dataclasses in ``job_types.py``, generated from :data:`FIELDS`
(``python -m trainer.jobs.codegen``); this module holds their behaviour.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainer.jobs.fields import FIELDS, Field, JobError, _copy, _fmt, fields_for
from trainer.jobs.rules import _conv_dim_needs_resnets, check_rules


@dataclass(frozen=True)
class _Spec:
    """Base of every generated spec: validates at construction, collects every error at once."""

    scope: ClassVar[str]
    spec_fields: ClassVar[tuple[Field, ...]]
    parts: ClassVar[dict[str, type]] = {}

    def __post_init__(self) -> None:
        errors: dict[str, str] = {}
        warnings: dict[str, str] = {}
        values: dict[str, Any] = {}
        for f in self.spec_fields:
            try:
                values[f.name] = f.validate(getattr(self, f.name))
            except ValueError as e:
                errors[f.name] = str(e)
            else:
                object.__setattr__(self, f.name, values[f.name])
        for name, part_type in self.parts.items():
            try:
                part = _as_part(part_type, getattr(self, name))
            except ValueError as e:
                errors[name] = str(e)
                continue
            except JobError as e:
                errors.update({f"{name}.{k}": v for k, v in e.errors.items()})
                continue
            object.__setattr__(self, name, part)
            warnings.update({f"{name}.{k}": v for k, v in part.warnings.items()})
        rule_errors, rule_warnings = check_rules(values)
        errors.update({k: v for k, v in rule_errors.items() if k not in errors})
        warnings.update(rule_warnings)
        if not errors:
            extra_errors, extra_warnings = self._check_parts_together()
            errors.update(extra_errors)
            warnings.update(extra_warnings)
        if errors:
            raise JobError(errors=errors)
        object.__setattr__(self, "_warnings", warnings)

    def _check_parts_together(self) -> tuple[dict[str, str], dict[str, str]]:
        """Rules that need the job and its parts together (copier); (errors, warnings)."""
        return {}, {}

    @property
    def warnings(self) -> dict[str, str]:
        """Settings that are allowed but probably not meant, as field -> message."""
        return dict(self.__dict__.get("_warnings", {}))


def _as_part(part_type: type, value: Any) -> Any:
    if type(value) is part_type:
        return value
    if isinstance(value, _Spec):            # e.g. a PassSettings given for the difference pass
        value = _spec_to_dict(value)
    if isinstance(value, Mapping):
        return _build(part_type, value)
    raise ValueError(f"pass settings must be an object of fields (got {_fmt(value)})")


class Job(_Spec):
    """A training job of one mode; see :class:`StandardJob`, :class:`CopierJob`, :class:`LcmJob`."""

    mode: ClassVar[str]



def typed_spec(scope: str):
    """Class decorator of the generated job classes: binds ``scope`` and its declared fields, and checks
    that the class's attributes are exactly the scope's fields with their declared types."""
    def bind(cls: type) -> type:
        declared = fields_for(scope)
        own = [f.name for f in dataclasses.fields(cls) if f.name not in getattr(cls, "parts", {})]
        if own != [f.name for f in declared]:
            raise TypeError(f"{cls.__name__} is out of date with the field declarations: "
                            "run python -m trainer.jobs.codegen")
        cls.scope, cls.spec_fields = scope, declared
        return cls
    return bind


class PairRules:
    """Jobs trained on pairs of images (ADDifT): one image B for each image A."""

    def _check_parts_together(self) -> tuple[dict[str, str], dict[str, str]]:
        errors: dict[str, str] = {}
        if len(self.image_a) != len(self.image_b) and self.image_a and self.image_b:
            errors["image_b"] = (f"{len(self.image_a)} image(s) A but {len(self.image_b)} image(s) B: "
                                 "give one B for each A, in the same order")
        if self.pair_prompts and len(self.pair_prompts) != len(self.image_b):
            errors["pair_prompts"] = (f"{len(self.pair_prompts)} pair prompt(s) for {len(self.image_b)} pair(s): "
                                      "give one per pair, in the order of image_a (or none: the prompt for all)")
        return errors, {}


class CopierRules:
    """Behaviour of copier jobs across their two passes."""

    def _check_parts_together(self) -> tuple[dict[str, str], dict[str, str]]:
        errors: dict[str, str] = {}
        warnings: dict[str, str] = {}
        for part in ("copier_pass", "difference_pass"):
            found = _conv_dim_needs_resnets({"conv_dim": getattr(self, part).conv_dim, "target_set": self.target_set})
            if found:
                errors[f"{part}.conv_dim"] = found[1]
        if self.image_a and len(self.image_a) != len(self.image_b):
            errors["image_b"] = (f"{len(self.image_a)} image(s) A but {len(self.image_b)} image(s) B: "
                                 "give one B for each A, in the same order")
        if self.copier_file and self.image_a and not self.train_opposite:
            warnings["image_a"] = "image A is not used: the saved copier (copier_file) replaces pass 1"
        if self.train_opposite and not self.image_a:
            warnings["train_opposite"] = ("without images A (a saved copier holds A's look, not the images) pass 2 "
                                          "cannot train -1: the LoRA learns only A -> B; give image A to train both")
        return errors, warnings

    def passes(self) -> tuple[Any, Any]:
        """(pass 1, pass 2) as they will run: with same_as_pass1, pass 2 takes pass 1's training settings."""
        first, second = self.copier_pass, self.difference_pass
        if second.same_as_pass1:
            shared = {f.name: getattr(first, f.name) for f in first.spec_fields if f.group == "training"}
            second = dataclasses.replace(second, **shared)
        return first, second


def _unknown_key_message(key: str, spec_type: type) -> str:
    scope = spec_type.scope
    known = [f.name for f in spec_type.spec_fields] + list(spec_type.parts)
    declared = FIELDS.get(key)
    if declared is not None and scope == "copier" and "copier" in declared.modes:
        return f"{key!r} is set per pass in copier jobs: put it inside copier_pass and/or difference_pass"
    if declared is not None and scope in ("copier_pass", "difference_pass"):
        return f"{key!r} is a setting of the whole copier job, not of one pass: put it at the top level"
    if declared is not None:
        where = "copier" if scope.endswith("_pass") else scope
        return f"{key!r} is not used by {where} jobs (it belongs to {', '.join(declared.modes)} jobs)"
    renamed = next((f.name for f in FIELDS.values() if f.kohya == key), None)
    guess = [renamed] if renamed else difflib.get_close_matches(key, known, 1)
    return f"unknown field {key!r}" + (f"; did you mean {guess[0]!r}?" if guess else "")


def _build(spec_type: type, data: Mapping[str, Any]) -> Any:
    """``spec_type(**data)``, naming unknown keys; every problem is collected into one JobError."""
    known = {f.name for f in spec_type.spec_fields} | set(spec_type.parts)
    errors = {str(k): _unknown_key_message(str(k), spec_type) for k in data if k not in known}
    try:
        spec = spec_type(**{k: v for k, v in data.items() if k in known})
    except JobError as e:
        errors.update(e.errors)
    if errors:
        raise JobError(errors=errors)
    return spec


def _spec_to_dict(spec: _Spec) -> dict[str, Any]:
    out = {f.name: _copy(getattr(spec, f.name)) for f in spec.spec_fields}
    out.update({name: _spec_to_dict(getattr(spec, name)) for name in spec.parts})
    return out

