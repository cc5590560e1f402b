"""The one Gradio ``Blocks`` of LoRA Queue: the WebUI's tab and the standalone app.

    from trainer.ui.app import build_ui
    blocks = build_ui(services)        # WebUI: services with the host's model, LoRA folder, data folder

The standalone app (:func:`standalone_app`, ``python -m trainer ui``) wraps the same builder with
our CSS, the page script and a theme that needs no web fonts; the WebUI loads ``style.css`` and
``javascript/`` itself.
"""
from __future__ import annotations

import gradio as gr

from trainer.ui.compat import no_progress, asset_text, blocks_kwargs, enable_queue, run_js_on_load
from trainer.ui.lora_tools import LoraToolsPanel
from trainer.ui.queue_panel import QueuePanel
from trainer.ui.services import UiServices
from trainer.ui.train_panel import TrainPanel


def build_ui(services: UiServices, *, standalone: bool = False) -> gr.Blocks:
    """Train, Queue (with results) and LoRA tools tabs over ``services``."""
    kwargs = blocks_kwargs(asset_text("style.css"), theme_fonts=True) if standalone else {"analytics_enabled": False}
    with gr.Blocks(**kwargs) as blocks:
        # one tab selected from the start: gradio 4.40 otherwise warns "Attempted to select a non-interactive or
        # hidden tab." for each tab as it registers
        with gr.Tabs(selected="train", elem_id="loraq_tabs") as tabs:
            with gr.Tab("Train", id="train", elem_id="loraq_tab_train"):
                blocks.loraq_train = train = TrainPanel(services)
            with gr.Tab("Queue", id="queue", elem_id="loraq_tab_queue"):
                blocks.loraq_queue = queue = QueuePanel(services, blocks)
            with gr.Tab("LoRA tools", id="tools", elem_id="loraq_tab_tools"):
                blocks.loraq_tools = LoraToolsPanel(services)
        # Edit: the selected job into the form, and the form in view
        queue.edit.click(lambda selected: train.load_job(selected) + [gr.update(selected="train")], [queue.selected],
                         train.form_out + train.edit_out + [tabs])
        page_load, outputs = blocks.loraq_train.page_load
        blocks.load(page_load, None, outputs, **no_progress())
        if standalone:
            run_js_on_load(blocks, asset_text("javascript/loraq.js"))
    return blocks


def standalone_app(services: UiServices) -> gr.Blocks:
    """The page ``python -m trainer ui`` serves, with the request queue that polling needs."""
    return enable_queue(build_ui(services, standalone=True))
