"""The labelled grid every sheet uses: at 64 px cells no label runs into its neighbour's column or off the page."""
from __future__ import annotations

import numpy as np
from PIL import Image

from trainer.sampling.grids import grid_image

CELL = (200, 40, 40)


def _layout(grid: Image.Image) -> tuple[np.ndarray, int, int, int]:
    """The pixels, the cells' left edge and top edge, and a cell's width, read from the picture itself."""
    px = np.asarray(grid).astype(int)
    is_cell = (np.abs(px - CELL).sum(axis=2) == 0)
    ys, xs = np.nonzero(is_cell)
    return px, int(xs.min()), int(ys.min()), 128


def _ink(px: np.ndarray) -> np.ndarray:
    return (px < 128).all(axis=2)   # dark text on white


def test_long_column_labels_wrap_inside_their_column_and_the_title_stays_on_the_page():
    cells = [[Image.new("RGB", (64, 64), CELL) for _ in range(6)] for _ in range(4)]
    columns = [f"a red circle on a white studio background s{s}" for s in (1111, 2222, 3333, 4444, 5555, 6666)]
    title = "teacher: 20 DDIM steps, CFG 7.5; " + "a_very_long_lcm_lora_name_" * 4 + ": LCM steps, CFG 1; same seeds"
    rows = ["teacher 20", "LCM 2", "LCM 4", "#2 seed 1111111"]
    px, left, top, cell_w = _layout(grid_image(cells, columns, rows))
    ink = _ink(px)
    header = ink[:top]
    assert header.any(), "the labels were drawn"
    for c in range(1, len(columns)):   # a gap of clear pixels at every column boundary, above the cells
        x = left + c * cell_w
        assert not header[:, x - 2:x + 1].any(), f"a label crosses into column {c + 1}"
    assert not ink[:, :left][top:, left - 3:left].any(), "a row label runs into the cells"
    # the text wrapped rather than being dropped: the last column's seed is on the page
    assert header[:, left + 5 * cell_w:].sum() > 50

    px, left, top, _ = _layout(grid_image(cells, columns, rows, title))
    ink = _ink(px)
    assert not ink[:, -3:].any(), "the title runs off the right edge"
    lines_with_ink = np.nonzero(ink[:top].any(axis=1))[0]
    bands = 1 + int((np.diff(lines_with_ink) > 1).sum())
    assert bands >= 3, "the title wrapped onto a second line above the column labels"
