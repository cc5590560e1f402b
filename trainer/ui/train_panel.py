"""Train panel: the job form generated from the field declarations, presets, "Add to queue"."""
from __future__ import annotations

from typing import Any

import dataclasses

import gradio as gr

from trainer import jobs
from trainer.ui import form
from trainer.ui.compat import file_input, file_paths
from trainer.ui.distil import DistilButton
from trainer.ui.presets import PresetError, PresetStore
from trainer.ui.services import UiServices

OPEN_GROUPS = ("saving", "network", "data", "training", "copier")


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
        self._build()

    # -- layout ----------------------------------------------------------------------------------

    def _build(self) -> None:
        with gr.Row(elem_id="loraq_train_top"):
            self.mode = gr.Radio(list(jobs.MODES), value="standard", label="mode", elem_id="loraq_mode",
                                 info="standard: a folder of captioned images; copier: the difference between "
                                      "image A and image B; lcm: distil a few-step LCM-LoRA")
            self.preset_name = gr.Dropdown(self.presets.names(), label="preset", elem_id="loraq_preset_name",
                                           allow_custom_value=True, value=None,
                                           info="type a name to save the form, or pick one to load")
            with gr.Column(min_width=120):
                self.preset_load = gr.Button("Load preset", elem_id="loraq_preset_load", size="sm")
                self.preset_save = gr.Button("Save preset", elem_id="loraq_preset_save", size="sm")
                self.preset_delete = gr.Button("Delete preset", elem_id="loraq_preset_delete", size="sm")
        if self.services.model_label:
            gr.Markdown(f"Jobs train on **{self.services.model_label}**"
                        + (" — a job queued with an empty base model names the checkpoint loaded at that moment, "
                           "and the worker loads it when the job's turn comes." if self.services.default_model()
                           else "."), elem_id="loraq_model_label")
        for group, title in jobs.GROUPS.items():
            members = [c for c in self.controls if not c.part and c.field.group == group]
            if members:
                self._group(title, members, open_=group in OPEN_GROUPS, elem=f"loraq_group_{group}")
        with gr.Group(visible=False, elem_id="loraq_copier_passes") as passes:
            with gr.Tabs():
                for part in form.PASSES:
                    with gr.Tab(form.PASS_TITLES[part], elem_id=f"loraq_tab_{part}"):
                        self._pass(part)
        self.containers.append((passes, ("copier",)))
        with gr.Row():
            self.sweep = gr.Textbox(label="sweep (optional): one job per combination",
                                    placeholder="lr=5e-5,1e-4,2e-4; network_alpha=2,4,8", elem_id="loraq_sweep",
                                    max_lines=2, scale=3)
            self.add = gr.Button("Add to queue", variant="primary", elem_id="loraq_add", scale=1)
        self.status = gr.Markdown("", elem_id="loraq_train_status")
        self.distil = DistilButton(self.services)
        self._wire()

    def _group(self, title: str, members: list[form.Control], open_: bool, elem: str) -> None:
        modes = tuple(m for m in jobs.MODES if any(m in c.modes for c in members))
        with gr.Accordion(title, open=open_, elem_id=elem) as box:
            self._controls([c for c in members if not c.field.advanced])
            advanced = [c for c in members if c.field.advanced]
            if advanced:
                with gr.Accordion("advanced", open=False, elem_id=elem + "_advanced") as more:
                    self._controls(advanced)
                self.containers.append((more, tuple(m for m in jobs.MODES if any(m in c.modes for c in advanced))))
        self.containers.append((box, modes))

    def _pass(self, part: str) -> None:
        members = [c for c in self.controls if c.part == part]
        if part == "difference_pass":
            self._controls([c for c in members if c.field.group == "pass2"])
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Network**")
                self._pass_group(part, [c for c in members if c.field.group == "network"])
            shared = part == "difference_pass" and jobs.FIELDS["same_as_pass1"].default_for(part)
            with gr.Column(visible=not shared) as training:
                gr.Markdown("**Training**")
                self._pass_group(part, [c for c in members if c.field.group == "training"])
        if part == "difference_pass":
            self.pass2_training = training

    def _pass_group(self, part: str, members: list[form.Control]) -> None:
        self._controls([c for c in members if not c.field.advanced])
        advanced = [c for c in members if c.field.advanced]
        if advanced:
            with gr.Accordion("advanced", open=False, elem_id=f"loraq_{part}_{members[0].field.group}_advanced"):
                self._controls(advanced)

    def _controls(self, members: list[form.Control]) -> None:
        for c in members:
            self.inputs[c.key] = _component(c)
            self.errors[c.key] = gr.Markdown("", visible=False, elem_id="loraq_err_" + c.key.replace(".", "__"),
                                             elem_classes=["loraq-error"])
            if c.key == "dataset_dir":
                self.dataset_check = gr.Markdown("", elem_id="loraq_dataset_check", elem_classes=["loraq-note"])

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
        same = self.inputs["difference_pass.same_as_pass1"]
        same.change(lambda on: gr.update(visible=not on), [same], [self.pass2_training])
        check_in = [self.inputs["dataset_dir"], self.inputs["caption_extension"]]
        for component in check_in:
            component.change(form.dataset_summary, check_in, [self.dataset_check], show_progress=False)

        errors_out = [self.errors[k] for k in keys] + [self.status]

        def add(sweep: str, mode: str, *values):
            data = self._job_dict(mode, values)
            try:
                job = jobs.job_from_dict(data)
                if not job.model and self.services.default_model():
                    job = dataclasses.replace(job, model=self.services.default_model())
                many = jobs.sweep_jobs(job, jobs.parse_sweep(sweep)) if (sweep or "").strip() else [job]
                ids = self.services.queue.add_many(many, root=self.services.root, admission=self.services.admission())
            except jobs.JobError as e:
                errors = {**self._path_problems(data), **e.errors}
                for key in ("image_a", "image_b"):
                    # gradio 3.41 hands over a file picked a moment ago before its upload has finished
                    if "empty file" in errors.get(key, ""):
                        errors[key] = ("the image is empty: if you just picked it, it may still be uploading — "
                                       "wait a moment and click Add to queue again")
                return self._error_updates(mode, errors, e.message)
            if self.services.worker is not None:
                self.services.worker.wake()
            self.presets.remember(data)
            notes = "".join(f"\n- ⚠ {w}" for w in self.services.queue.get(ids[0]).warnings)
            where = self.services.lora_dir / job.output_dir / f"{job.name}.safetensors"
            what = (f"**{job.name}** as job {ids[0]} → `{where}`" if len(ids) == 1 else
                    f"a sweep of {len(ids)} jobs ({', '.join(j.name for j in many[:3])}{', ...' if len(ids) > 3 else ''})"
                    f" as jobs {ids[0]}-{ids[-1]}")
            return self._error_updates(mode, {}, "") [:-1] + [gr.update(value=f"✔ queued {what}{notes}")]

        self.add.click(add, [self.sweep] + values_in, errors_out)

        def save_preset(name: str, mode: str, *values):
            try:
                self.presets.save((name or "").strip(), self._job_dict(mode, values))
            except jobs.JobError as e:
                return [gr.update()] + self._error_updates(mode, e.errors, f"preset not saved: {e.message}")
            except PresetError as e:
                return [gr.update()] + self._error_updates(mode, {}, str(e))
            return ([gr.update(choices=self.presets.names(), value=name.strip())]
                    + self._error_updates(mode, {}, "")[:-1] + [gr.update(value=f"✔ saved preset **{name.strip()}**")])

        self.preset_save.click(save_preset, [self.preset_name] + values_in, [self.preset_name] + errors_out)

        def form_updates(data: dict, message: str) -> list:
            mode = data["mode"]
            values = {k: c.default(mode) for k, c in self.by_key.items() if mode in c.modes}
            values.update(form.ui_values(data))
            return [gr.update(value=mode), mode] + self._mode_updates(mode, values) + [gr.update(value=message)]

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
            kw = {"visible": mode in self.by_key[k].modes}
            if k in values:
                kw["value"] = values[k]
            out.append(gr.update(**kw))
        out += [gr.update(visible=False, value="") for _ in keys]
        out += [gr.update(visible=mode in modes) for _, modes in self.containers]
        return out

    def _error_updates(self, mode: str, errors: dict[str, str], message: str) -> list:
        placed, unplaced = form.place_errors(errors, mode)
        out = [gr.update(visible=k in placed, value=f"⚠ {placed[k]}" if k in placed else "") for k in self.inputs]
        lines = [f"- {k}: {v}" for k, v in unplaced.items()]
        if placed:
            lines.insert(0, f"⚠ not queued: {len(placed)} field{'s' if len(placed) > 1 else ''} to fix (marked below "
                            "each field)")
        elif message:
            lines.insert(0, f"⚠ {message}")
        out.append(gr.update(value="\n".join(lines)))
        return out


def _component(c: form.Control):
    f, value = c.field, c.default("standard" if "standard" in c.modes else c.modes[0])
    common = dict(label=f.label, elem_id=c.elem_id, visible="standard" in c.modes)
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
