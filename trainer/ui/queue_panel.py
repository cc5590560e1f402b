"""Queue panel: the live table, the operations on the selected job, its loss plot, error and results."""
from __future__ import annotations

import html

import gradio as gr

from trainer import jobs
from trainer.queue.store import QueueError
from trainer.ui import queue_view, results
from trainer.ui.compat import no_progress, poll
from trainer.ui.services import UiServices

OPERATIONS = (  # (label, queue method, elem id)
    ("Cancel", "cancel", "loraq_op_cancel"),
    ("Stop and save", "stop_and_save", "loraq_op_stop"),
    ("Move up", "move_up", "loraq_op_up"),
    ("Move down", "move_down", "loraq_op_down"),
    ("Duplicate", "duplicate", "loraq_op_duplicate"),
    ("Retry", "retry", "loraq_op_retry"),
    ("Resume", "resume", "loraq_op_resume"),
    ("Delete", "delete", "loraq_op_delete"),
)
#: The table's filter: label -> states shown (None: all).
SHOW = {"all": None, "queued and running": ["queued", "running"], "finished": ["done", "stopped", "failed", "cancelled",
                                                                             "interrupted"],
        "failed or interrupted": ["failed", "interrupted", "cancelled"], "done": ["done"]}
QUEUE_OPERATIONS = (  # (label, elem id): on the whole queue
    ("Pause after current", "loraq_q_pause"),
    ("Resume queue", "loraq_q_resume"),
    ("Clear finished", "loraq_q_clear"),
)
TABLE_EVERY_S = 1.0
DETAILS_EVERY_S = 2.0


def selected_id(text: str | float | None) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


class QueuePanel:
    def __init__(self, services: UiServices, blocks: gr.Blocks):
        self.services, self.queue = services, services.queue
        self._build(blocks)

    def table(self, selected: str | None = None, show: str | None = None) -> str:
        """The summary line (counts, total time of the queued work, paused) and the table of the shown states."""
        states = SHOW.get(show or "all")
        rows = self.queue.list(limit=200, states=states)
        head = queue_view.queue_summary(self.queue.list(limit=1000), self.queue.estimated_seconds_left(),
                                        self.queue.paused())
        return (f'<div class="loraq-queue-summary">{html.escape(head)}</div>'
                + queue_view.queue_table_html(rows, selected_id(selected)))

    def _build(self, blocks: gr.Blocks) -> None:
        with gr.Row(elem_id="loraq_queue_controls"):
            self.show = gr.Dropdown(list(SHOW), value="all", label="show", elem_id="loraq_queue_show", scale=1)
            self.queue_ops = {elem: gr.Button(label, elem_id=elem, size="sm", scale=0) for label, elem in QUEUE_OPERATIONS}
        self.table_html = gr.HTML(self.table(), elem_id="loraq_queue_table")
        with gr.Row():
            self.selected = gr.Textbox(label="selected job", placeholder="click a row of the table",
                                       elem_id="loraq_selected_job", max_lines=1, scale=1)
            self.refresh = gr.Button("Refresh", elem_id="loraq_queue_refresh", size="sm", scale=0)
        with gr.Row(elem_id="loraq_queue_ops"):
            self.ops = {method: gr.Button(label, elem_id=elem, size="sm") for label, method, elem in OPERATIONS}
            # the form is the Train tab's: wired by the app (trainer/ui/app.py)
            self.edit = gr.Button("Edit in form", elem_id="loraq_op_edit", size="sm")
        self.status = gr.Markdown("", elem_id="loraq_queue_status")
        self.summary = gr.Markdown("", elem_id="loraq_job_summary")
        self.error = gr.Textbox(label="error", visible=False, lines=3, interactive=False, elem_id="loraq_job_error")
        self.plot = gr.HTML(queue_view.loss_svg([], "loss and learning rate"), elem_id="loraq_loss_plot")
        self.plot_key = gr.State(None)
        # previews, comparison grid and morning sheet of the selected job (trainer/ui/results.py)
        self.results = results.ResultsPanel(self.services, blocks, self.selected)
        self._wire(blocks)

    # -- events ----------------------------------------------------------------------------------

    def _wire(self, blocks: gr.Blocks) -> None:
        poll(blocks, self.table, [self.selected, self.show], [self.table_html], TABLE_EVERY_S)
        self.refresh.click(self.table, [self.selected, self.show], [self.table_html], queue=False,
                           api_name="queue_table", **no_progress())
        self.show.change(self.table, [self.selected, self.show], [self.table_html], **no_progress())
        for elem, button in self.queue_ops.items():
            button.click(self._queue_operation(elem), [self.selected, self.show], [self.status, self.table_html])
        details_out = [self.summary, self.error, self.plot, self.plot_key]
        poll(blocks, self.details, [self.selected, self.plot_key], details_out, DETAILS_EVERY_S)
        # A click on a row: its text at once, outside the request queue (which a slow grid may hold); the plot after.
        self.selected.change(self.details_text, [self.selected], [self.summary, self.error], queue=False,
                             **no_progress())
        self.selected.change(self.details_plot, [self.selected], [self.plot, self.plot_key], **no_progress())
        self.selected.change(self.table, [self.selected, self.show], [self.table_html], queue=False, **no_progress())
        for method, button in self.ops.items():
            button.click(self._operation(method), [self.selected, self.show],
                         [self.status, self.table_html, self.selected])

    def details(self, selected: str, last_key):
        """The poll: summary, error, and the plot when the job moved."""
        job_id = selected_id(selected)
        if job_id is None:
            # nothing to refresh; the selection's own change event clears the details. A tick that read the
            # selection a moment before a click must not blank what that click has just shown.
            return gr.update(), gr.update(), gr.update(), None
        try:
            row = self.queue.get(job_id)
        except QueueError as e:
            return f"⚠ {e}", gr.update(visible=False), gr.update(), None
        summary, error = self._text(row)
        key = [row.id, row.state, row.step, row.phase]
        if key == last_key:
            return summary, error, gr.update(), key
        return summary, error, queue_view.loss_svg(self.queue.progress(job_id), f"{row.name}: loss and learning rate"), key

    def details_text(self, selected: str):
        """Summary and error of the newly selected job: answered first, before its plot is drawn."""
        job_id = selected_id(selected)
        if job_id is None:
            return "", gr.update(visible=False)
        try:
            return self._text(self.queue.get(job_id))
        except QueueError as e:
            return f"⚠ {e}", gr.update(visible=False)

    def details_plot(self, selected: str):
        job_id = selected_id(selected)
        if job_id is None:
            return queue_view.loss_svg([], "loss and learning rate"), None
        try:
            row = self.queue.get(job_id)
        except QueueError:
            return gr.update(), None
        return (queue_view.loss_svg(self.queue.progress(job_id), f"{row.name}: loss and learning rate"),
                [row.id, row.state, row.step, row.phase])

    def _text(self, row) -> tuple[str, dict]:
        done = f"{queue_view.percent_done(row)}%"
        speed = f", {row.it_per_s:.2f} it/s" if row.it_per_s else ""
        # stop-and-save is no error: its note ("stopped and saved at step N; resume continues it") is the state's
        stopped = row.state == "stopped"
        state = f"stopped — {row.error}" if stopped and row.error else row.state
        summary = (f"**job {row.id}: {row.name}** ({row.mode}) — {state}, step {row.step}/{row.total} "
                   f"({done}{speed})" + _model_line(row) + "".join(f"\n- warning: {w}" for w in row.warnings)
                   + "".join(f"\n- output: `{results.relative(p, self.services.lora_dir)}`" for p in row.outputs)
                   + (f"\n\n(outputs in `{self.services.lora_dir}`)" if row.outputs else ""))
        failed = bool(row.error) and not stopped
        error = gr.update(visible=failed, value=(row.error or "") + (
            "\n\n" + row.error_detail if row.error_detail else "") if failed else "")
        return summary, error

    def _operation(self, method: str):
        def run(selected: str, show: str | None = None):
            job_id = selected_id(selected)
            new_selection = gr.update()
            if job_id is None:
                message = "⚠ select a job first: click a row of the table"
            else:
                try:
                    if method in ("move_up", "move_down"):
                        self.queue.move(job_id, -1 if method == "move_up" else 1)
                        message = f"moved job {job_id}"
                    elif method == "duplicate":
                        copy = self.queue.duplicate(job_id)
                        message, new_selection = f"✔ job {job_id} duplicated as job {copy}", gr.update(value=str(copy))
                    elif method == "delete":
                        self.queue.delete(job_id)
                        message, new_selection = f"✔ job {job_id} deleted", gr.update(value="")
                    else:
                        result = getattr(self.queue, method)(job_id)
                        message = f"✔ job {job_id}: {method.replace('_', ' ')}" + (f" ({result})" if result else "")
                    if self.services.worker is not None:
                        self.services.worker.wake()
                except (QueueError, jobs.JobError) as e:
                    message = f"⚠ {getattr(e, 'message', e)}"
            return message, self.table(selected, show), new_selection
        return run

    def _queue_operation(self, elem: str):
        def run(selected: str, show: str):
            if elem == "loraq_q_pause":
                self.queue.set_paused(True)
                message = "⏸ the queue takes no next job; the running one finishes (Resume queue goes on)"
            elif elem == "loraq_q_resume":
                self.queue.set_paused(False)
                if self.services.worker is not None:
                    self.services.worker.wake()
                message = "▶ the queue goes on"
            else:
                message = f"✔ removed {self.queue.clear_finished()} finished job(s) (done, failed, cancelled)"
            return message, self.table(selected, show)
        return run


def _model_line(row) -> str:
    """The checkpoint the job trains on, when it names one (jobs queued from the WebUI do)."""
    try:
        model = row.job.model
    except (QueueError, jobs.JobError):
        return ""
    return f"\n- base model: `{model}`" if model else ""
