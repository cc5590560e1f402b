"""x/y/z plot axes for the WebUI: "[LoRA Queue] LoRA" and "[LoRA Queue] Strength".

The prompt edits are pure functions; ``axis_options`` wraps them in the WebUI's ``AxisOption`` objects
(the x/y/z module is passed in, never imported, so this file is testable without the WebUI).

- LoRA axis: puts ``<lora:NAME:S>`` into the prompt (S from the Strength axis, else 1).
- Strength axis: sets the strength of the LoRA chosen on the LoRA axis; without a LoRA axis it sets the
  strength of every ``<lora:...>`` tag the prompt already has, so "type the tag, sweep the strength" works.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

LORA_AXIS = "[LoRA Queue] LoRA"
STRENGTH_AXIS = "[LoRA Queue] Strength"

_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(:[^>]*)?>")


def _fmt(strength: float) -> str:
    return f"{strength:g}"


def set_lora_tag(prompt: str, name: str, strength: float) -> str:
    """The prompt with exactly one ``<lora:name:strength>`` (an existing tag for ``name`` is replaced)."""
    kept = _TAG.sub(lambda m: "" if m.group(1) == name else m.group(0), prompt).rstrip()
    return f"{kept} <lora:{name}:{_fmt(strength)}>".strip()


def set_all_strengths(prompt: str, strength: float) -> str:
    """Every ``<lora:NAME[:x][:rest]>`` tag gets strength ``strength`` (other arguments kept)."""
    return _TAG.sub(lambda m: f"<lora:{m.group(1)}:{_fmt(strength)}{m.group(3) or ''}>", prompt)


def apply_axes(prompt: str, name: str | None, strength: float | None) -> str:
    if name:
        return set_lora_tag(prompt, name, 1.0 if strength is None else strength)
    if strength is not None:
        return set_all_strengths(prompt, strength)
    return prompt


def _apply_to_processing(p) -> None:
    name, strength = getattr(p, "loraq_lora", None), getattr(p, "loraq_strength", None)
    base = getattr(p, "loraq_prompt", None)
    if base is None:
        base = p.prompt
        p.loraq_prompt = base
    p.prompt = apply_axes(base, name, strength)
    if getattr(p, "all_prompts", None):  # the x/y/z script may have expanded prompts already
        p.all_prompts = [apply_axes(x, name, strength) for x in p.all_prompts]


def _setter(attribute: str) -> Callable:
    def apply(p, value, values) -> None:
        setattr(p, attribute, value)
        _apply_to_processing(p)
    return apply


def axis_options(xyz_grid, list_loras: Callable[[], Sequence[str]]) -> list:
    """AxisOption objects for the WebUI's x/y/z plot module ``xyz_grid``."""
    return [
        xyz_grid.AxisOption(LORA_AXIS, str, _setter("loraq_lora"), choices=lambda: list(list_loras())),
        xyz_grid.AxisOption(STRENGTH_AXIS, float, _setter("loraq_strength")),
    ]


def register(xyz_grid, list_loras: Callable[[], Sequence[str]]) -> None:
    """Add our axes once (idempotent across UI reloads)."""
    names = {getattr(o, "label", None) for o in xyz_grid.axis_options}
    xyz_grid.axis_options.extend(o for o in axis_options(xyz_grid, list_loras) if o.label not in names)
