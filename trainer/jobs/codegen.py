"""Writes ``job_types.py``: the job classes as static dataclasses, generated from :data:`FIELDS`.

Type checkers and IDEs see ``job.lr: float`` and ``job.optimizer: OptimizerName``; the declaration of
each field stays in one place (``fields.py``). ``tests/test_jobs.py`` fails when the generated file is
out of date. Regenerate with ``python -m trainer.jobs.codegen``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from trainer.jobs import vocabulary
from trainer.jobs.fields import Field, fields_for

TARGET = Path(__file__).with_name("job_types.py")

#: (scope, class name, bases, parts, docstring)
CLASSES: tuple[tuple[str, str, str, dict[str, str], str], ...] = (
    ("copier_pass", "PassSettings", "_Spec", {},
     "Network and training settings of one copier pass (pass 1, the copier)."),
    ("difference_pass", "DifferencePass", "PassSettings", {},
     "Settings of copier pass 2 (the difference); ``same_as_pass1`` reuses pass 1's training settings."),
    ("standard", "StandardJob", "Job", {},
     "Standard LoRA training: a folder of captioned images -> one LoRA."),
    ("copier", "CopierJob", "CopierRules, Job", {"copier_pass": "PassSettings", "difference_pass": "DifferencePass"},
     "Copier two-pass difference: pass 1 learns image A (the copier), pass 2 learns A -> B on top of it.\n\n"
     "    ``passes()`` gives the two passes as they run (pass 2 resolved through ``same_as_pass1``)."),
    ("lcm", "LcmJob", "Job", {},
     "LCM distillation into a LoRA (LCM-LoRA) from a dataset or from prompts."),
    ("addift", "AddiftJob", "PairRules, Job", {},
     "ADDifT difference LoRA: trained directly on the prediction difference of one or several pairs A -> B."),
    ("ileco", "IlecoJob", "Job", {},
     "iLECO: a slider LoRA from two prompts alone (no images), moving source_prompt toward target_prompt."),
)

_CHOICE_TYPES = {
    vocabulary.TARGET_SETS: "TargetSet", vocabulary.OPTIMIZERS: "OptimizerName", vocabulary.LR_SCHEDULES: "LrSchedule",
    vocabulary.MIXED_PRECISIONS: "MixedPrecision", vocabulary.SAVE_PRECISIONS: "SavePrecision",
    vocabulary.PREDICTIONS: "PredictionChoice", vocabulary.LOSS_TYPES: "LossType",
    vocabulary.OUTSIDE_MASK: "OutsideMask",
}


def annotation(f: Field) -> str:
    if f.type == list[str]:
        return "list[str]"
    if f.choices is not None:
        return _CHOICE_TYPES[tuple(f.choices)]
    return f.type.__name__


def default_expression(value: Any) -> str:
    if isinstance(value, list):
        return f"field(default_factory=lambda: {value!r})" if value else "field(default_factory=list)"
    return repr(value)


def source() -> str:
    aliases = sorted(set(_CHOICE_TYPES.values()))
    out = [
        '"""The job classes, generated from trainer/jobs/fields.py by ``python -m trainer.jobs.codegen``; do not edit."""',
        "from __future__ import annotations",
        "",
        "from dataclasses import dataclass, field",
        "from typing import ClassVar, Literal",
        "",
        "from trainer.jobs.specs import CopierRules, Job, PairRules, _Spec, typed_spec",
        f"from trainer.jobs.vocabulary import {', '.join(aliases)}",
        "",
    ]
    for scope, name, bases, parts, doc in CLASSES:
        out += ["", f"@typed_spec({scope!r})", "@dataclass(frozen=True)", f"class {name}({bases}):", f'    """{doc}"""', ""]
        if scope in vocabulary.MODES:
            out.append(f"    mode: ClassVar[Literal[{scope!r}]] = {scope!r}")
        if parts:
            listed = ", ".join(f"{k!r}: {v}" for k, v in parts.items())
            out.append(f"    parts: ClassVar[dict[str, type]] = {{{listed}}}")
        base_scope = next((c[0] for c in CLASSES if c[1] == bases), None)   # a generated base class
        inherited = {f.name: f.default_for(base_scope) for f in fields_for(base_scope)} if base_scope else {}
        for f in fields_for(scope):
            default = f.default_for(scope)
            if f.name in inherited and inherited[f.name] == default:
                continue                     # the base class declares it with this default
            out.append(f"    {f.name}: {annotation(f)} = {default_expression(default)}")
        for part, part_type in parts.items():
            out.append(f"    {part}: {part_type} = field(default_factory={part_type})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    TARGET.write_text(source(), encoding="utf-8")
    sys.stdout.write(f"wrote {TARGET}\n")
