"""Queue panel: the live table, the operations on the selected job, its loss plot, error and results."""
from __future__ import annotations

import html
import time
from pathlib import Path

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
        with gr.Accordion("Results: LoRA strength x seed grid", open=True, elem_id="loraq_results"):
            with gr.Row():
                self.checkpoint = gr.Dropdown([], label="LoRA file (final or checkpoint)", elem_id="loraq_checkpoint",
                                              scale=2)
                self.prompt = gr.Textbox(label="prompt", elem_id="loraq_grid_prompt", scale=3)
            with gr.Row():
                self.seeds = gr.Textbox(", ".join(map(str, results.SEEDS)), label="seeds (rows)",
                                        elem_id="loraq_grid_seeds")
                self.steps = gr.Number(20, label="sampling steps", precision=0, elem_id="loraq_grid_steps")
                self.cfg = gr.Number(5.0, label="CFG scale", elem_id="loraq_grid_cfg")
                self.generate = gr.Button("Generate comparison grid", variant="primary", elem_id="loraq_grid_generate")
            gr.Markdown("Columns: LoRA strength " + ", ".join(f"{s:g}" for s in results.STRENGTHS)
                        + " (negative = what the LoRA removes).")
            self.grid = gr.Image(label="comparison grid", type="pil", interactive=False, elem_id="loraq_grid")
            self.grid_status = gr.Markdown("", elem_id="loraq_grid_status")
        self._wire(blocks)

    # -- events ----------------------------------------------------------------------------------

    def _wire(self, blocks: gr.Blocks) -> None:
        poll(blocks, self.table, [self.selected, self.show], [self.table_html], TABLE_EVERY_S)
        self.refresh.click(self.table, [self.selected, self.show], [self.table_html], queue=False,
                           api_name="queue_table", **no_progress())
        self.show.change(self.table, [self.selected, self.show], [self.table_html], **no_progress())
        for elem, button in self.queue_ops.items():
            button.click(self._queue_operation(elem), [self.selected, self.show], [self.status, self.table_html])
        details_out = [self.summary, self.error, self.plot, self.plot_key, self.checkpoint]
        poll(blocks, self.details, [self.selected, self.plot_key], details_out, DETAILS_EVERY_S)
        # A click on a row: its text at once, outside the request queue (which a slow grid may hold); the plot after.
        self.selected.change(self.details_text, [self.selected], [self.summary, self.error], queue=False,
                             **no_progress())
        self.selected.change(self.details_plot, [self.selected], [self.plot, self.plot_key], **no_progress())
        # another job's grid does not stay on the page under this job's name
        self.selected.change(self.results_choices, [self.selected],
                             [self.checkpoint, self.prompt, self.grid, self.grid_status], **no_progress())
        self.selected.change(self.table, [self.selected, self.show], [self.table_html], queue=False, **no_progress())
        for method, button in self.ops.items():
            button.click(self._operation(method), [self.selected, self.show],
                         [self.status, self.table_html, self.selected])
        self.generate.click(self.make_grid, [self.selected, self.checkpoint, self.prompt, self.seeds, self.steps,
                                             self.cfg], [self.grid, self.grid_status])

    def details(self, selected: str, last_key):
        """The poll: summary, error, the plot when the job moved, and its files once it has finished."""
        job_id = selected_id(selected)
        if job_id is None:
            # nothing to refresh; the selection's own change event clears the details. A tick that read the
            # selection a moment before a click must not blank what that click has just shown.
            return gr.update(), gr.update(), gr.update(), None, gr.update()
        try:
            row = self.queue.get(job_id)
        except QueueError as e:
            return f"⚠ {e}", gr.update(visible=False), gr.update(), None, gr.update()
        summary, error = self._text(row)
        key = [row.id, row.state, row.step, row.phase]
        # a job selected while it ran lists its files when it ends (not on every tick: the user's choice stays)
        files = self._files(row)[0] if last_key and last_key[0] == row.id and last_key[1] != row.state \
            else gr.update()
        if key == last_key:
            return summary, error, gr.update(), key, files
        figure = queue_view.loss_svg(self.queue.progress(job_id), f"{row.name}: loss and learning rate")
        return summary, error, figure, key, files

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
            return gr.update(), None
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
                   + "".join(f"\n- output: `{self._shown(p)}`" for p in row.outputs)
                   + (f"\n\n(outputs in `{self.services.lora_dir}`)" if row.outputs else ""))
        failed = bool(row.error) and not stopped
        error = gr.update(visible=failed, value=(row.error or "") + (
            "\n\n" + row.error_detail if row.error_detail else "") if failed else "")
        return summary, error

    def _files(self, row) -> tuple[dict, dict]:
        """(the file list's update, the prompt's) for a job's row."""
        try:
            job = row.job
        except (QueueError, jobs.JobError):
            return gr.update(choices=[], value=None), gr.update()
        # names as the LoRA folder holds them ("sub/name-000500.safetensors"), not absolute paths cut off in the box
        files = [self._shown(p) for p in results.checkpoints(row.outputs, job, self.services.lora_dir)]
        return gr.update(choices=files, value=files[0] if files else None), gr.update(value=results.default_prompt(job))

    def results_choices(self, selected: str):
        cleared = [None, ""]
        job_id = selected_id(selected)
        if job_id is None:
            return [gr.update(choices=[], value=None), gr.update()] + cleared
        try:
            return list(self._files(self.queue.get(job_id))) + cleared
        except QueueError:
            return [gr.update(choices=[], value=None), gr.update()] + cleared

    def _shown(self, path: str) -> str:
        """A file of the LoRA folder by its name there; any other by its full path."""
        try:
            return Path(path).resolve().relative_to(Path(self.services.lora_dir).resolve()).as_posix()
        except ValueError:
            return str(path)

    def _file(self, shown: str) -> str:
        path = Path(shown)
        return str(path if path.is_absolute() else Path(self.services.lora_dir) / path)

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

    def make_grid(self, selected, checkpoint, prompt, seeds_text, steps, cfg):
        job_id = selected_id(selected)
        if job_id is None or not checkpoint:
            return None, "⚠ select a finished job and one of its LoRA files first"
        checkpoint = self._file(checkpoint)
        try:
            seeds = results.parse_seeds(seeds_text or "")
            job = self.queue.get(job_id).job
            handle = self.services.handle_for(job)
            started = time.perf_counter()
            grid = results.strength_grid(handle, checkpoint, prompt or "", seeds=seeds, steps=int(steps or 20),
                                         cfg=float(cfg if cfg is not None else 5.0),
                                         size=(job.resolution, job.resolution))
        except (ValueError, OSError, RuntimeError, QueueError, jobs.JobError) as e:
            return None, f"⚠ {getattr(e, 'message', e)}"
        out = Path(checkpoint).with_name(Path(checkpoint).stem + "_grid.png")
        grid.save(out)
        return grid, f"✔ {len(seeds)} x {len(results.STRENGTHS)} images in {time.perf_counter() - started:.1f} s; saved `{out}`"


def _model_line(row) -> str:
    """The checkpoint the job trains on, when it names one (jobs queued from the WebUI do)."""
    try:
        model = row.job.model
    except (QueueError, jobs.JobError):
        return ""
    return f"\n- base model: `{model}`" if model else ""
