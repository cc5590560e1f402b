"""Train panel: the job form generated from the field declarations, presets, "Add to queue"."""
from __future__ import annotations

from typing import Any

import dataclasses
import os
import time

import gradio as gr

from trainer import jobs
from trainer.ui import form
from trainer.ui.compat import file_input, file_paths, no_progress, then_js
from trainer.queue.store import QueueError
from trainer.ui.distil import DistilButton
from trainer.ui.presets import PresetError, PresetStore
from trainer.ui.services import UiServices



#: Run after an answer that may refuse a job: outline the fields in error, scroll to the first (javascript/loraq.js).
SHOW_ERRORS_JS = "() => { if (window.loraqShowErrors) window.loraqShowErrors(true); }"


class TrainPanel:
    """Builds the controls inside the current gradio context and wires their events."""

    def __init__(self, services: UiServices):
        self.services = services
        self.presets = PresetStore(services.presets_dir)
        self.controls = form.controls()
        self.by_key = {c.key: c for c in self.controls}
        self.inputs: dict[str, Any] = {}        # key -> component
        self.errors: dict[str, Any] = {}        # key -> markdown next to it
        self.containers: list[tuple[Any, tuple[str, ...]]] = []   # (block, modes it shows in)
        self.cells: dict[str, Any] = {}         # key -> the column holding a control of a row (shown by mode)
        self.accordions: list[tuple[Any, frozenset[str]]] = []    # (accordion, keys inside): opened on an error
        self.thumbs: dict[str, Any] = {}        # key -> previews of the picked images
        self.pass2_training: list[Any] = []     # pass 2's training settings, hidden while "as pass 1" is on
        self._build()

    # -- layout ----------------------------------------------------------------------------------

    def _build(self) -> None:
        with gr.Row(elem_id="loraq_train_top", elem_classes=["loraq-compact"]):
            self.mode = gr.Radio(list(jobs.MODES), value="standard", label="mode", elem_id="loraq_mode", scale=2,
                                 info="standard: a folder of captioned images · copier: the difference between "
                                      "image A and image B · addift: the same difference learnt directly (ADDifT) · "
                                      "lcm: distil a few-step LCM-LoRA · ileco: a slider from two prompts, no images")
            self.preset_name = gr.Dropdown(self.presets.names(), label="preset", elem_id="loraq_preset_name",
                                           allow_custom_value=True, value=None, scale=2,
                                           info="type a name to save the form, or pick one to load")
            with gr.Column(min_width=160, scale=1, elem_id="loraq_preset_buttons"):
                with gr.Row():
                    self.preset_load = gr.Button("Load", elem_id="loraq_preset_load", size="sm", min_width=60)
                    self.preset_save = gr.Button("Save", elem_id="loraq_preset_save", size="sm", min_width=60)
                self.preset_delete = gr.Button("Delete preset", elem_id="loraq_preset_delete", size="sm",
                                               min_width=60)
        if self.services.model_label:
            gr.Markdown(f"Jobs train on **{self.services.model_label}**"
                        + (" — a job queued with an empty base model names the checkpoint loaded at that moment, "
                           "and the worker loads it when the job's turn comes." if self.services.default_model()
                           else "."), elem_id="loraq_model_label", elem_classes=["loraq-note"])
        self._essentials()
        # Everything else, collapsed: one section per group, in declaration order, with its advanced part inside.
        for group, title in jobs.GROUPS.items():
            members = [c for c in self.controls if not c.part and not c.essential and c.field.group == group]
            if members:
                self._group(title, members, elem=f"loraq_group_{group}")
        with gr.Accordion("Copier passes: all other settings", open=False, elem_id="loraq_copier_passes") as passes:
            with gr.Row():
                for part in form.PASSES:
                    with gr.Column(min_width=300) as column:
                        gr.Markdown(f"**{form.PASS_TITLES[part]}**")
                        rest = [c for c in self.controls if c.part == part and not c.essential]
                        self._pass_group(part, [c for c in rest if c.field.group == "network"])
                        if part == "difference_pass":
                            with gr.Column() as training:
                                self._pass_group(part, [c for c in rest if c.field.group == "training"])
                            self.pass2_training.append(training)
                        else:
                            self._pass_group(part, [c for c in rest if c.field.group == "training"])
                        self._controls([c for c in rest if c.field.group not in ("network", "training")])
        self._accordion(passes, [c.key for c in self.controls if c.part and not c.essential])
        self.containers.append((passes, ("copier",)))
        self._wire()

    def _essentials(self) -> None:
        """The top of the form, from the fields declared ``essential``: first what every job names (output, model,
        dataset, resolution), then the mode's few settings people change; a copier job shows its images beside
        both passes' settings instead."""
        top = [c for c in self.controls if c.essential]
        shared = [c for c in top if not c.part and c.kind != "images"
                  and (c.kind == "text" or set(c.modes) == set(jobs.MODES))]
        with gr.Group(elem_id="loraq_essentials", elem_classes=["loraq-compact"]):
            with gr.Row():
                for c in shared:
                    self._cell(c, min_width=150, scale=2 if c.kind == "text" and c.field.path == "dir" else 1)
            with gr.Row(visible=False, elem_id="loraq_copier_top") as copier_row:
                for c in top:
                    if not c.part and c.kind == "images":
                        with gr.Column(min_width=150, scale=2):
                            self._controls([c])
                for part in form.PASSES:
                    with gr.Column(min_width=330, scale=5, elem_id=f"loraq_top_{part}") as pass_column:
                        self.containers.append((pass_column, ("copier",)))
                        gr.Markdown(f"**{form.PASS_TITLES[part]}**", elem_classes=["loraq-pass-title"])
                        members = [c for c in top if c.part == part]
                        self._controls([c for c in members if c.field.group == "pass2"])
                        with gr.Row():
                            for c in members:
                                if c.field.group != "pass2":
                                    # the row shows only in copier mode; pass 2's training cells follow the checkbox
                                    cell = self._cell(c, min_width=100, by_mode=False)
                                    if part == "difference_pass" and c.field.group == "training":
                                        self.pass2_training.append(cell)
            # the modes with images (copier, addift); the passes' columns only for a copier
            self.containers.append((copier_row, tuple(m for m in jobs.MODES if any(
                m in c.modes for c in top if c.kind == "images" or c.part))))
            with gr.Row():
                for c in top:
                    if not c.part and c not in shared and c.kind in ("number", "choice"):
                        self._cell(c, min_width=100)
            with gr.Row():
                self.sweep = gr.Textbox(label="sweep (optional): one job per combination", show_label=False,
                                        placeholder="sweep (optional), one job per combination: "
                                                    "lr=5e-5,1e-4,2e-4; network_alpha=2,4,8",
                                        elem_id="loraq_sweep", max_lines=1, scale=3)
                self.add = gr.Button("Add to queue", variant="primary", elem_id="loraq_add", scale=1, min_width=160)
                self.new_job = gr.Button("Add as a new job instead", elem_id="loraq_add_new", scale=0, min_width=120,
                                         size="sm", visible=False)
        self.status = gr.Markdown("", elem_id="loraq_train_status")
        self.distil = DistilButton(self.services)

    def _cell(self, c: form.Control, min_width: int, scale: int = 1, by_mode: bool = True):
        """A control with its error below it, as one column of a row; the column shows in the control's modes."""
        visible = "standard" in c.modes if by_mode else not (c.part == "difference_pass" and c.field.group == "training"
                                                              and jobs.FIELDS["same_as_pass1"].default_for(c.part))
        with gr.Column(min_width=min_width, scale=scale, visible=visible,
                       elem_id="loraq_cell_" + c.key.replace(".", "__")) as cell:
            self._controls([c], in_cell=True)
        self.cells[c.key] = cell
        if by_mode:
            self.containers.append((cell, c.modes))
        return cell

    def _accordion(self, box, keys: list[str]) -> None:
        self.accordions.append((box, frozenset(keys)))

    def _group(self, title: str, members: list[form.Control], elem: str) -> None:
        modes = tuple(m for m in jobs.MODES if any(m in c.modes for c in members))
        with gr.Accordion(title, open=False, elem_id=elem) as box:
            self._controls([c for c in members if not c.field.advanced])
            advanced = [c for c in members if c.field.advanced]
            if advanced:
                with gr.Accordion("advanced", open=False, elem_id=elem + "_advanced") as more:
                    self._controls(advanced)
                self.containers.append((more, tuple(m for m in jobs.MODES if any(m in c.modes for c in advanced))))
                self._accordion(more, [c.key for c in advanced])
        self.containers.append((box, modes))
        self._accordion(box, [c.key for c in members])

    def _pass_group(self, part: str, members: list[form.Control]) -> None:
        self._controls([c for c in members if not c.field.advanced])
        advanced = [c for c in members if c.field.advanced]
        if advanced:
            with gr.Accordion("advanced", open=False,
                              elem_id=f"loraq_{part}_{members[0].field.group}_advanced") as more:
                self._controls(advanced)
            self._accordion(more, [c.key for c in advanced])

    def _controls(self, members: list[form.Control], in_cell: bool = False) -> None:
        for c in members:
            self.inputs[c.key] = _component(c, visible=True if in_cell else None)
            self.errors[c.key] = gr.Markdown("", visible=False, elem_id="loraq_err_" + c.key.replace(".", "__"),
                                             elem_classes=["loraq-error"])
            if c.key == "dataset_dir":
                self.dataset_check = gr.Markdown("", elem_id="loraq_dataset_check", elem_classes=["loraq-note"])
            if c.kind == "images":
                self.thumbs[c.key] = gr.HTML("", elem_id="loraq_thumbs_" + c.key.replace(".", "__"))

    # -- events ----------------------------------------------------------------------------------

    def _wire(self) -> None:
        keys = list(self.inputs)
        values_in = [self.mode] + [self.inputs[k] for k in keys]
        visible_out = [self.inputs[k] for k in keys] + [self.errors[k] for k in keys] + [b for b, _ in self.containers]
        self.previous_mode = gr.State("standard")

        def on_mode(previous: str, mode: str, *values):
            changed = form.defaults_for_mode(self.by_key, mode, dict(zip(keys, values)))
            return [mode] + self._mode_updates(mode, changed)

        self.mode.change(on_mode, [self.previous_mode] + values_in, [self.previous_mode] + visible_out)
        # a message about the other mode's fields no longer applies (input: the user's change, not a preset's)
        self.mode.input(lambda: "", None, [self.status], **no_progress())
        same = self.inputs["difference_pass.same_as_pass1"]
        same.change(lambda on: [gr.update(visible=not on)] * len(self.pass2_training), [same], self.pass2_training)
        for key, thumbs in self.thumbs.items():
            # change: also a preset or a job loaded into the form; upload: gradio 3.41 drops the change of a
            # second picture picked while the first still uploads. Outside the request queue: a quick answer
            # that must not wait behind a grid or a merge
            for event in (self.inputs[key].change, self.inputs[key].upload):
                event(_thumbnails, [self.inputs[key]], [thumbs], queue=False, **no_progress())
        check_in = [self.inputs["dataset_dir"], self.inputs["caption_extension"]]
        for component in check_in:
            component.change(form.dataset_summary, check_in, [self.dataset_check], show_progress=False)

        errors_out = [self.errors[k] for k in keys] + [self.status] + [box for box, _ in self.accordions]

        # editing: the id of the queued job the form was loaded from (Add saves it in place), else None
        self.editing = gr.State(None)
        self.edit_out = [self.editing, self.add, self.new_job]

        def add(sweep: str, editing: int | None, mode: str, *values):
            data = self._job_dict(mode, values)
            in_place = editing is not None and not (sweep or "").strip()
            try:
                job = jobs.job_from_dict(data)
                if not job.model and self.services.default_model():
                    job = dataclasses.replace(job, model=self.services.default_model())
                if in_place:
                    self.services.queue.update(editing, job, root=self.services.root,
                                               admission=self.services.admission())
                    ids, many = [editing], [job]
                else:
                    many = jobs.sweep_jobs(job, jobs.parse_sweep(sweep)) if (sweep or "").strip() else [job]
                    ids = self.services.queue.add_many(many, root=self.services.root,
                                                       admission=self.services.admission())
            except jobs.JobError as e:
                errors = {**self._path_problems(data), **e.errors}
                for key in ("image_a", "image_b"):
                    # gradio 3.41 hands over a file picked a moment ago before its upload has finished
                    if "empty file" in errors.get(key, ""):
                        errors[key] = ("the image is empty: if you just picked it, it may still be uploading — "
                                       "wait a moment and click Add to queue again")
                return self._error_updates(mode, errors, e.message) + [gr.update()] * 3
            except QueueError as e:   # the job started since it was loaded: it runs as queued
                return self._error_updates(mode, {}, f"{e}") + self._editing_updates(None)
            if self.services.worker is not None:
                self.services.worker.wake()
            self.presets.remember(data)
            notes = "".join(f"\n- ⚠ {w}" for w in self.services.queue.get(ids[0]).warnings) + form.preview_note(job)
            where = self.services.lora_dir / job.output_dir / f"{job.name}.safetensors"
            what = (f"**{job.name}** as job {ids[0]} → `{where}`" if len(ids) == 1 else
                    f"a sweep of {len(ids)} jobs ({', '.join(j.name for j in many[:3])}{', ...' if len(ids) > 3 else ''})"
                    f" as jobs {ids[0]}-{ids[-1]}")
            done = f"✔ saved job {editing}: {what}" if in_place else f"✔ queued {what}"
            return self._error_updates(mode, {}, "", done=done + notes) + self._editing_updates(None)

        # after the answer is on the page: outline the fields in error and scroll to the first (javascript/loraq.js)
        then_js(self.add.click(add, [self.sweep, self.editing] + values_in, errors_out + self.edit_out),
                SHOW_ERRORS_JS)
        self.new_job.click(lambda: self._editing_updates(None) + ["the form queues a new job"], None,
                           self.edit_out + [self.status], **no_progress())

        def save_preset(name: str, mode: str, *values):
            try:
                self.presets.save((name or "").strip(), self._job_dict(mode, values))
            except jobs.JobError as e:
                return [gr.update()] + self._error_updates(mode, e.errors, f"preset not saved: {e.message}")
            except PresetError as e:
                return [gr.update()] + self._error_updates(mode, {}, str(e))
            return ([gr.update(choices=self.presets.names(), value=name.strip())]
                    + self._error_updates(mode, {}, "", done=f"✔ saved preset **{name.strip()}**"))

        then_js(self.preset_save.click(save_preset, [self.preset_name] + values_in, [self.preset_name] + errors_out),
                SHOW_ERRORS_JS)

        form_updates = self._form_updates
        self.form_out = [self.mode, self.previous_mode] + visible_out + [self.status]

        def load_preset(name: str):
            try:
                data = self.presets.load((name or "").strip())
            except PresetError as e:
                return [gr.update(), "standard"] + [gr.update()] * len(visible_out) + [gr.update(value=f"⚠ {e}")]
            return form_updates(data, f"✔ loaded preset **{name}**")

        def on_page_load():
            """The preset list as it is now, and the form as last queued (a reload keeps the work)."""
            last = self.presets.last_form()
            start = {"mode": "standard", **self.services.form_start} if self.services.form_start else None
            restored = (form_updates(last, "the form as last queued") if last is not None
                        else form_updates(start, "") if start is not None
                        else [gr.update(), gr.update()] + [gr.update()] * len(visible_out) + [gr.update()])
            return [gr.update(choices=self.presets.names())] + restored

        self.page_load = (on_page_load, [self.preset_name, self.mode, self.previous_mode] + visible_out + [self.status])

        self.preset_load.click(load_preset, [self.preset_name],
                               [self.mode, self.previous_mode] + visible_out + [self.status])

        def delete_preset(name: str):
            try:
                self.presets.delete((name or "").strip())
            except PresetError as e:
                return gr.update(), gr.update(value=f"⚠ {e}")
            return gr.update(choices=self.presets.names(), value=None), gr.update(value=f"✔ deleted preset **{name}**")

        self.preset_delete.click(delete_preset, [self.preset_name], [self.preset_name, self.status])

    def _form_updates(self, data: dict, message: str) -> list:
        """The whole form set to a job dict (a preset, a job loaded from the queue): its mode, its values, the
        defaults of that mode for the rest."""
        mode = data["mode"]
        values = {k: c.default(mode) for k, c in self.by_key.items() if mode in c.modes}
        values.update(form.ui_values(data))
        return [gr.update(value=mode), mode] + self._mode_updates(mode, values) + [gr.update(value=message)]

    def _editing_updates(self, job_id: int | None) -> list:
        """For ``edit_out``: which queued job Add saves in place (None: Add queues a new job)."""
        if job_id is None:
            return [None, gr.update(value="Add to queue"), gr.update(visible=False)]
        return [job_id, gr.update(value=f"Save job {job_id}"), gr.update(visible=True)]

    def load_job(self, selected: str):
        """Edit: the form set to the selected job. A queued job is saved back in place by the next Add; any
        other becomes a new job, under a name no job has yet (its own file exists)."""
        try:
            job_id = int(str(selected).strip())
            row = self.services.queue.get(job_id)
            data = jobs.job_to_dict(row.job)
        except (TypeError, ValueError):
            return [gr.update()] * len(self.form_out[:-1]) + ["⚠ select a job first: click a row of the table"] \
                + [gr.update()] * 3
        except (QueueError, jobs.JobError) as e:
            return [gr.update()] * len(self.form_out[:-1]) + [f"⚠ {getattr(e, 'message', e)}"] + [gr.update()] * 3
        if row.state == "queued":
            message = (f"editing queued job {job_id} (**{row.name}**): Save job {job_id} changes it in place "
                       "(refused if it has started by then)")
            return self._form_updates(data, message) + self._editing_updates(job_id)
        data["name"] = self.services.queue.free_name(row.name)
        message = (f"job {job_id} (**{row.name}**, {row.state}) loaded as a new job **{data['name']}**: "
                   "Add to queue queues it")
        return self._form_updates(data, message) + self._editing_updates(None)

    def _path_problems(self, data: dict) -> dict[str, str]:
        """Missing files and folders, also when other fields are invalid: every error shows at once."""
        paths_only = {k: v for k, v in data.items() if k in jobs.FIELDS and jobs.FIELDS[k].path}
        try:
            return jobs.validate_paths(jobs.job_from_dict({"mode": data["mode"], **paths_only}), self.services.root)
        except jobs.JobError as e:
            return dict(e.errors)

    def _job_dict(self, mode: str, values) -> dict:
        current = dict(zip(self.inputs, values))
        for key, c in self.by_key.items():
            if c.kind == "images":
                current[key] = [self.services.keep_upload(p) for p in file_paths(current.get(key))]
        return form.job_dict(mode, current, self.controls)

    def _mode_updates(self, mode: str, values: dict[str, Any]) -> list:
        keys = list(self.inputs)
        out = []
        for k in keys:
            kw = {} if k in self.cells else {"visible": mode in self.by_key[k].modes}
            if k in values:
                kw["value"] = values[k]
            out.append(gr.update(**kw))
        out += [gr.update(visible=False, value="") for _ in keys]
        out += [gr.update(visible=mode in modes) for _, modes in self.containers]
        return out

    def _error_updates(self, mode: str, errors: dict[str, str], message: str, done: str = "") -> list:
        """Each field's message below it, the status line, and the collapsed sections that hold an error opened."""
        placed, unplaced = form.place_errors(errors, mode)
        out = [gr.update(visible=k in placed, value=f"⚠ {placed[k]}" if k in placed else "") for k in self.inputs]
        lines = [f"- {k}: {v}" for k, v in unplaced.items()]
        if placed:
            lines.insert(0, f"⚠ not queued: {len(placed)} field{'s' if len(placed) > 1 else ''} to fix (marked below "
                            "each field)")
        elif message:
            lines.insert(0, f"⚠ {message}")
        out.append(gr.update(value=done or "\n".join(lines)))
        out += [gr.update(open=True) if keys & placed.keys() else gr.update() for _, keys in self.accordions]
        return out


def _thumbnails(files) -> str:
    paths = file_paths(files)
    deadline = time.monotonic() + 3.0
    # gradio 3.41 may call before the picked file's bytes have arrived: wait for them a moment
    while time.monotonic() < deadline and any(_empty(p) for p in paths):
        time.sleep(0.1)
    return form.thumbnails_html(paths)


def _empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return True


def _component(c: form.Control, visible: bool | None = None):
    f, value = c.field, c.default("standard" if "standard" in c.modes else c.modes[0])
    common = dict(label=f.label, elem_id=c.elem_id, visible="standard" in c.modes if visible is None else visible)
    if c.kind == "checkbox":
        return gr.Checkbox(value=value, info=f.help, **common)
    if c.kind == "number":
        return gr.Number(value=value, info=f.help, precision=0 if f.type is int else None, **common)
    if c.kind == "choice":
        return gr.Dropdown(list(f.choices), value=value, info=f.help, **common)
    if c.kind == "checkboxes":
        return gr.CheckboxGroup(list(f.choices), value=value, info=f.help, **common)
    if c.kind == "images":
        return file_input(f"{f.label} — {f.help}", c.elem_id, visible=common["visible"])
    lines = 3 if c.kind == "lines" else 1
    return gr.Textbox(value=value, lines=lines, max_lines=12 if lines > 1 else 1, info=f.help, **common)
