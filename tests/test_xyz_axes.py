"""The x/y/z plot axes edit prompts the way a person would by hand."""
from __future__ import annotations

import copy
import types

from trainer.host import xyz_axes


def test_lora_axis_adds_one_tag_and_strength_sets_it():
    assert xyz_axes.apply_axes("a cat", "mine", None) == "a cat <lora:mine:1>"
    assert xyz_axes.apply_axes("a cat <lora:mine:0.3>", "mine", -0.5) == "a cat <lora:mine:-0.5>"
    assert xyz_axes.apply_axes("a cat <lora:other:0.7>", "mine", 2) == "a cat <lora:other:0.7> <lora:mine:2>"


def test_strength_alone_sets_every_tag_and_keeps_extra_arguments():
    prompt = "a cat <lora:a:1> <lora:b:0.5:0.2> <lora:c>"
    assert xyz_axes.apply_axes(prompt, None, 0.25) == "a cat <lora:a:0.25> <lora:b:0.25:0.2> <lora:c:0.25>"
    assert xyz_axes.apply_axes(prompt, None, None) == prompt


class _AxisOption:
    def __init__(self, label, type, apply, choices=None):
        self.label, self.type, self.apply, self.choices = label, type, apply, choices


def test_axes_register_once_and_apply_to_each_cell_in_any_order():
    xyz_grid = types.SimpleNamespace(AxisOption=_AxisOption, axis_options=[])
    xyz_axes.register(xyz_grid, lambda: ["mine", "mine-000500"])
    xyz_axes.register(xyz_grid, lambda: ["mine"])
    assert [o.label for o in xyz_grid.axis_options] == [xyz_axes.LORA_AXIS, xyz_axes.STRENGTH_AXIS]
    lora, strength = xyz_grid.axis_options
    assert lora.choices() == ["mine", "mine-000500"]
    p = types.SimpleNamespace(prompt="a red circle")
    for s in (0.0, 1.5):
        for name in ("mine", "mine-000500"):
            cell = copy.copy(p)  # the x/y/z script works on a copy per cell
            strength.apply(cell, s, [])
            lora.apply(cell, name, [])
            assert cell.prompt == f"a red circle <lora:{name}:{s:g}>"
    assert p.prompt == "a red circle"
