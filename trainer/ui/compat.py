"""The few places where gradio 3.41 (AUTOMATIC1111 1.10) and gradio 4.x (Forge) differ.

Everything else in the UI uses what both versions share: ``gr.update``, plain string dropdown
choices, ``every=`` on ``Blocks.load`` for polling, no ``.style()`` and no ``gr.Timer``.
"""
from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def file_paths(value: Any) -> list[str]:
    """Paths of what a ``gr.File`` hands a callback: 3.41 gives temp-file objects, 4.x strings or dicts."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append(str(item))
        elif isinstance(item, dict):
            out.append(str(item.get("path") or item.get("name")))
        elif hasattr(item, "name"):
            out.append(str(item.name))
    return out


def file_input(label: str, elem_id: str, multiple: bool = True, visible: bool = True, height: int = 110) -> gr.File:
    kwargs = dict(label=label, elem_id=elem_id, file_count="multiple" if multiple else "single",
                  file_types=["image"], visible=visible, height=height)
    if GRADIO_MAJOR >= 4:
        kwargs["type"] = "filepath"
    return gr.File(**kwargs)


def run_js_on_load(blocks: gr.Blocks, script: str) -> None:
    """Run ``script`` (the text of javascript/loraq.js) once the page has loaded (standalone app only:
    the WebUI loads javascript/ by itself)."""
    body = "() => {\n" + script + "\n}"
    if GRADIO_MAJOR >= 4:
        blocks.load(None, None, None, js=body)
    else:
        blocks.load(None, None, None, _js=body)


def then_js(event: Any, script: str) -> None:
    """Run the browser function ``script`` once ``event``'s answer is on the page."""
    if GRADIO_MAJOR >= 4:
        event.then(None, None, None, js=script)
    else:
        event.then(None, None, None, _js=script)


def poll(blocks: gr.Blocks, fn: Callable, inputs: Sequence, outputs: Sequence, every: float) -> None:
    """Call ``fn(*inputs)`` every ``every`` seconds while the page is open (needs the gradio queue), with the
    inputs' current values.

    Neither version does that by itself. gradio 3.41 runs an ``every=`` event as one endless generator over
    the values the inputs had when the page loaded (``utils.get_continuous_fn``): a poll of the selected
    job never sees a selection. gradio 4.40's page warns "Too many arguments provided for the endpoint." for
    every request that carries input values (it looks the endpoint up by number in an API table the server
    fills only by name, gradio issue #9895), whatever the function takes: one warning a tick. So each browser
    session's current values are kept on the server, fed by the inputs' change events (one request per
    change, not per tick) and by the poll's own outputs (the details' plot key), and the tick sends none."""
    inputs, outputs = list(inputs), list(outputs)

    def tick_with(kept: list):
        result = fn(*kept)
        returned = list(result) if len(outputs) > 1 else [result]
        for component, value in zip(outputs, returned):
            if component in inputs and not (isinstance(value, dict) and value.get("__type__") == "update"):
                kept[inputs.index(component)] = value
        return result

    if GRADIO_MAJOR < 4:
        # A State's value is deep-copied for each browser session and handed to every event as the same
        # object: the generator's one argument stays current when the change events update it in place.
        box = gr.State([getattr(c, "value", None) for c in inputs])
        for index, component in enumerate(inputs):
            if component not in outputs:
                component.change(functools.partial(_keep, index), [component, box], None, queue=False)
        blocks.load(tick_with, [box], outputs, every=every, show_progress=False)
        return

    sessions: OrderedDict[str, list] = OrderedDict()
    lock = threading.Lock()

    def values(request: gr.Request) -> list:
        with lock:
            kept = sessions.setdefault(request.session_hash, [getattr(c, "value", None) for c in inputs])
            sessions.move_to_end(request.session_hash)
            while len(sessions) > _POLL_SESSIONS:  # closed pages never say so: forget the longest silent
                sessions.popitem(last=False)
            return kept

    def keep(index: int) -> Callable:
        def changed(value, request: gr.Request) -> None:
            values(request)[index] = value
        return changed

    for index, component in enumerate(inputs):
        if component not in outputs:
            component.change(keep(index), [component], None, queue=False, show_progress="hidden")
    def tick(request: gr.Request):          # gradio hands the request to a parameter annotated so
        return tick_with(values(request))

    blocks.load(tick, None, outputs, every=every, show_progress="hidden")


def _keep(index: int, value: Any, kept: list) -> None:
    kept[index] = value


_POLL_SESSIONS = 256  # browser sessions a gradio-4 poll remembers the inputs of


def _no_progress():
    return "hidden" if GRADIO_MAJOR >= 4 else False


def no_progress() -> dict:
    """Keyword for an event that must not grey out its outputs (polling, quick refreshes)."""
    return {"show_progress": _no_progress()}


def enable_queue(blocks: gr.Blocks, workers: int = 4) -> gr.Blocks:
    """The request queue (``every=`` needs it) with several workers: a slow grid never blocks polling.

    gradio 3.41 runs each ``every=`` event as an endless generator that holds one queue worker for as long as
    the page is open, so its worker count is ``workers`` plus one per poll; otherwise the polls leave one worker
    to every click, upload and grid of the page (A1111 itself queues with 64)."""
    if GRADIO_MAJOR >= 4:
        return blocks.queue(default_concurrency_limit=workers)
    polls = sum(1 for dependency in blocks.dependencies if dependency.get("every"))
    return blocks.queue(concurrency_count=workers + polls)


def blocks_kwargs(css: str | None, theme_fonts: bool) -> dict:
    """Keywords for ``gr.Blocks`` of the standalone app: our CSS and a theme with local fonts only
    (the default theme asks Google Fonts, which an offline machine cannot reach)."""
    kwargs: dict[str, Any] = {"analytics_enabled": False, "title": "LoRA Queue"}
    if css:
        kwargs["css"] = css
    if theme_fonts:
        kwargs["theme"] = gr.themes.Default(font=("ui-sans-serif", "system-ui", "sans-serif"),
                                            font_mono=("ui-monospace", "monospace"))
    return kwargs


def asset_text(relative: str) -> str:
    """A file of the extension's root (style.css, javascript/loraq.js) as text."""
    return (Path(__file__).resolve().parents[2] / relative).read_text(encoding="utf-8")
