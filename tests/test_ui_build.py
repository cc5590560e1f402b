"""The tab's construction under both WebUI gradio versions, and the UI's pure parts.

The pure parts (the form generated from the job fields, presets, the queue table, the LoRA list)
run here, in the main environment. The Blocks are built and served under gradio 3.41.2 (A1111 1.10)
and gradio 4.40.0 (Forge) by running this file as a script in ``.venv-gradio3`` / ``.venv-gradio4``;
the script prints what it found as JSON and the tests below assert on it.
"""
from __future__ import annotations

import dataclasses
import json
import re
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer import jobs
from trainer.merge.svd_merge import MergeError
from trainer.models.demo.shapes import draw
from trainer.queue.store import ProgressRow
from trainer.ui import form, loras, queue_view, results
from trainer.queue.store import ProgressRow
from trainer.ui.presets import BUILTIN, PresetError, PresetStore

ROOT = Path(__file__).resolve().parents[1]
UI_ENVS = {"3.41.2": ROOT / ".venv-gradio3" / "bin" / "python", "4.40.0": ROOT / ".venv-gradio4" / "bin" / "python"}


# -- the form: one control per declared field, values <-> job dicts ---------------------------------

def test_every_job_field_has_exactly_one_control_per_place_it_lives():
    keys = [c.key for c in form.controls()]
    assert len(keys) == len(set(keys))
    for mode in jobs.MODES:
        top_level = {c.key for c in form.controls() if mode in c.modes and not c.part}
        assert top_level == {f.name for f in jobs.fields_for(mode)}
    for part in form.PASSES:
        assert {c.field.name for c in form.controls() if c.part == part} == {f.name for f in jobs.fields_for(part)}


def test_the_loss_plot_draws_each_phase_in_milliseconds():
    import random
    rows = [ProgressRow("pass 1" if i < 500 else "pass 2", i % 500, random.random(), 0.5, 1e-4 * (1 - i / 1000), 0.0)
            for i in range(1000)]
    started = time.perf_counter()
    svg = queue_view.loss_svg(rows, "job: loss")
    took = time.perf_counter() - started
    assert svg.count("<polyline") == 6 and "pass 2 lr" in svg and "job: loss" in svg
    assert took < 0.1, f"{took * 1000:.0f} ms (matplotlib took ~800 ms to draw and encode, holding the interpreter)"
    # at most 400 points a line (+ the last): the page gets tens of kilobytes, not one per step
    assert max(len(p.split(" ")) for p in re.findall(r'points="([^"]+)"', svg)) <= 401
    assert "no steps recorded yet" in queue_view.loss_svg([], "x")


def test_the_top_of_the_form_holds_what_each_mode_needs_and_shows_its_pictures(tmp_path):
    top = {c.key for c in form.controls() if c.essential}
    # what a job needs and the handful of settings people change, per copier pass too
    assert {"name", "model", "dataset_dir", "resolution", "steps", "network_dim", "network_alpha", "lr", "optimizer",
            "batch_size", "image_a", "image_b"} <= top
    for part in form.PASSES:
        assert {f"{part}.{k}" for k in ("steps", "network_dim", "network_alpha", "lr", "optimizer", "batch_size")} <= top
    for mode in jobs.MODES:   # the few settings people change, in any one mode
        shown = [c for c in form.controls() if c.essential and mode in c.modes]
        assert len(shown) <= (18 if mode == "copier" else 12), (mode, [c.key for c in shown])   # copier: 2 passes
    draw("red", "circle", "white", 64).save(tmp_path / "a.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    html = form.thumbnails_html([str(tmp_path / "a.png"), str(tmp_path / "junk.png")])
    assert html.count("<img") == 1 and "a.png (64x64)" in html and "⚠ not an image" in html
    assert form.thumbnails_html([]) == ""


def test_form_defaults_give_each_modes_template():
    for mode in jobs.MODES:
        values = {c.key: c.default(mode) for c in form.controls() if mode in c.modes}
        assert form.job_dict(mode, values) == jobs.template(mode)


def test_a_preset_job_fills_the_form_and_comes_back_unchanged():
    job = jobs.template("copier")
    job.update(name="eyes", image_a=["a.png"], image_b=["b.png"], sample_prompts=["one", "two"])
    job["difference_pass"].update(same_as_pass1=False, lr=3e-5, blocks=["OUT03", "OUT04"])
    values = form.ui_values(job)
    assert values["sample_prompts"] == "one\ntwo" and values["difference_pass.lr"] == 3e-5
    assert form.job_dict("copier", values) == job


def test_numbers_from_the_browser_become_whole_numbers_where_the_field_is_int():
    c = next(c for c in form.controls() if c.key == "copier_pass.steps")
    assert form.from_ui(c.field, 40.0) == 40 and isinstance(form.from_ui(c.field, 40.0), int)


def test_errors_land_on_the_control_with_the_same_key():
    with pytest.raises(jobs.JobError) as e:
        jobs.job_from_dict({"mode": "copier", "copier_pass": {"network_dim": 0}, "resolution": 100})
    placed, unplaced = form.place_errors(e.value.errors, "copier")
    assert set(placed) == {"copier_pass.network_dim", "resolution"} and unplaced == {}
    assert "must be >= 1 (got 0)" in placed["copier_pass.network_dim"]
    assert form.place_errors({"schema": "too new"}, "standard") == ({}, {"schema": "too new"})


def test_dataset_check_counts_images_and_captions(tmp_path):
    for i in range(3):
        draw("red", "circle", "white", 64).save(tmp_path / f"{i}.png")
    for i in range(2):
        (tmp_path / f"{i}.txt").write_text("a red circle")
    summary = form.dataset_summary(str(tmp_path))
    assert summary.startswith("3 images found, 2 captions")
    assert "1 of 3 image(s) have no caption file" in summary
    assert "does not exist" in form.dataset_summary(str(tmp_path / "missing"))
    assert form.dataset_summary("") == ""


# -- presets ------------------------------------------------------------------------------------------

def test_presets_save_load_delete_by_name(tmp_path):
    store = PresetStore(tmp_path / "presets")
    job = jobs.template("lcm")
    store.save("lcm fast", job)
    assert store.names() == ["lcm fast"] + list(BUILTIN)
    assert store.load("lcm fast") == job
    store.delete("lcm fast")
    assert store.names() == list(BUILTIN)
    with pytest.raises(PresetError, match="there is no preset named 'lcm fast'"):
        store.load("lcm fast")
    with pytest.raises(PresetError, match="preset name must be a file name"):
        store.save("../escape", job)
    with pytest.raises(jobs.JobError, match="rank"):
        store.save("bad", {**job, "network_dim": 0})
    assert store.names() == list(BUILTIN)


# -- the queue table ------------------------------------------------------------------------------------

def _row(**changes):
    from trainer.queue.store import JobRow
    base = dict(id=7, position=1, name="style<1>", mode="standard", state="running", created=0.0, started=0.0,
                finished=None, error=None, outputs=[], resume=False, request=None, step=250, total=1000, loss=0.1,
                smoothed_loss=0.12345, lr=1e-4, it_per_s=2.0, eta_s=375.0, phase="")
    return JobRow(**{**base, **changes})


def test_queue_table_shows_progress_loss_and_eta_of_each_job():
    assert queue_view.format_eta(375) == "6:15" and queue_view.format_eta(3725) == "1:02:05"
    assert queue_view.format_eta(None) == "-"
    assert queue_view.percent_done(_row()) == 25
    assert queue_view.percent_done(_row(state="done", step=1000)) == 100
    assert queue_view.percent_done(_row(state="done", step=400)) == 40      # stopped and saved early
    table = queue_view.queue_table_html([_row()], selected=7)
    assert 'data-job-id="7"' in table and "loraq-selected" in table
    assert 'aria-valuenow="25"' in table and "0.1235" in table and "6:15" in table
    assert "style&lt;1&gt;" in table                                          # names are escaped


# -- the LoRA list and merge inputs ------------------------------------------------------------------------

def test_lora_list_filters_by_words_and_resolves_names(tmp_path):
    for name in ("red_to_blue", "red_to_blue_copier", "styles/ink"):
        (tmp_path / f"{name}.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")
    assert loras.list_loras(tmp_path) == ["red_to_blue", "red_to_blue_copier", "styles/ink"]
    assert loras.list_loras(tmp_path, "BLUE cop") == ["red_to_blue_copier"]
    assert 'data-name="styles/ink"' in loras.lora_list_html(loras.list_loras(tmp_path))
    inputs = loras.resolve_inputs("red_to_blue:1.0\n\nstyles/ink:0.5:OUTD\n", tmp_path)
    assert [(Path(i.path).name, i.ratio, i.blocks) for i in inputs] == [
        ("red_to_blue.safetensors", 1.0, None), ("ink.safetensors", 0.5, "OUTD")]
    with pytest.raises(MergeError, match="'nothere': no such LoRA"):
        loras.resolve_inputs("nothere:1", tmp_path)


def test_a_merge_tells_the_host_so_the_webui_lists_the_new_lora(tmp_path):
    import torch

    from trainer.lora.network import LoraNetwork, NetworkShape
    from trainer.merge.svd_merge import RankPolicy
    from trainer.models.diffusers_model import DiffusersHandle
    from trainer.models.handle import TargetOptions
    from tiny import sd1_pipeline

    handle = DiffusersHandle(sd1_pipeline(tmp_path / "model"))
    for name, seed in (("a", 1), ("b", 2)):
        net = LoraNetwork(handle.lora_targets(TargetOptions("attn")), NetworkShape(2, 2.0), seed=seed)
        for lora in net.lora.values():
            torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
        net.save(tmp_path / f"{name}.safetensors")
    written = []
    report = loras.merge_into_folder("a:0.5\nb:0.5", RankPolicy(rank=2), "ab", "fp16", False, tmp_path,
                                     written.append)
    assert written == [tmp_path / "ab.safetensors"] and "merged 2 LoRAs" in report
    with pytest.raises(MergeError, match="already exists"):
        loras.merge_into_folder("a:1", RankPolicy(rank=2), "ab", "fp16", False, tmp_path, written.append)
    assert len(written) == 1, "a refused merge writes nothing and tells nobody"
    # what the panel lists and reports: rank and size per LoRA, the rank actually kept, the tab's words
    listing = loras.lora_list_html(loras.list_loras(tmp_path), tmp_path)
    assert "r2 · " in listing and " MB" in listing
    big = loras.merge_into_folder("a:0.5\nb:0.5", RankPolicy(rank=100000), "huge", "fp16", False, tmp_path)
    assert "rank 4 (asked 100000" in big and "rank 100000" not in big.splitlines()[0].split("(asked")[0]
    assert "--verbose" not in big
    with pytest.raises(MergeError, match="'abc' is not a number"):
        loras.merge_into_folder("a:abc", RankPolicy(rank=2), "bad", "fp16", False, tmp_path)
    # SuperMerger's semantics from the panel's choice: the report says how far it is from "applied together"
    mode = loras.supermerger_mode("SuperMerger: no (same rank)", 8, False)
    sm = loras.merge_into_folder("a:0.5\nb:0.5", RankPolicy(rank=2), "sm", "fp16", False, tmp_path, supermerger=mode)
    assert "SuperMerger semantics, remake dimension no" in sm and "applied together" in sm
    assert loras.supermerger_mode("SuperMerger: rank box", 4.0, True).dimension == 4
    assert loras.supermerger_mode("linear (ours)", 4, False) is None
    with pytest.raises(MergeError, match="whole number >= 1 in the rank box"):
        loras.supermerger_mode("SuperMerger: rank box", 0, False)


def test_lora_tools_resize_extract_and_bake_write_their_files_with_reports(tmp_path):
    import torch

    from test_single_file import tiny_pipeline, write_checkpoint
    from tiny import sd1_pipeline
    from trainer.lora.network import LoraNetwork, NetworkShape
    from trainer.merge.svd_merge import RankPolicy
    from trainer.models.diffusers_model import DiffusersHandle
    from trainer.models.handle import TargetOptions

    # resize: a name from the LoRA folder, to rank 1, reported per module
    pipe = tiny_pipeline("sd1")
    net = LoraNetwork(DiffusersHandle(pipe).lora_targets(TargetOptions("attn")), NetworkShape(4, 4.0), seed=1)
    for lora in net.lora.values():
        torch.nn.init.normal_(lora.lora_up.weight, std=0.1)
    net.save(tmp_path / "a.safetensors")
    written = []
    report = loras.resize_into_folder("a", RankPolicy(rank=1), "a_r1", "fp16", False, tmp_path, written.append)
    assert report.startswith("resized a.safetensors") and "rank 1" in report and "total:" in report
    assert written == [tmp_path / "a_r1.safetensors"]
    # bake: into a checkpoint file, saved beside it as a new checkpoint
    base = write_checkpoint(pipe, "sd1", tmp_path / "base.safetensors")
    report = loras.bake_into_folder(str(base), "a:0.5", "baked", False, tmp_path / "ckpt", library=tmp_path)
    assert report.startswith("baked 1 LoRAs into base.safetensors") and (tmp_path / "ckpt" / "baked.safetensors").is_file()
    # a checkpoint linked into the WebUI's model folder from elsewhere (the real Forge run refused it) is a base
    # like any other; a path that leaves the folder by ".." is not
    (tmp_path / "sd").mkdir()
    os.symlink(base, tmp_path / "sd" / "linked.safetensors")
    report = loras.bake_into_folder(str(tmp_path / "sd" / "linked.safetensors"), "a:0.5", "baked_linked", False,
                                    tmp_path / "ckpt", library=tmp_path, roots=(tmp_path / "sd",))
    assert (tmp_path / "ckpt" / "baked_linked.safetensors").is_file(), report
    with pytest.raises(MergeError, match="outside the folders LoRA Queue may read"):
        loras.bake_into_folder(str(tmp_path / "sd" / ".." / "base.safetensors"), "a:0.5", "escaped", False,
                               tmp_path / "ckpt", library=tmp_path, roots=(tmp_path / "sd",))
    # extract: tuned - base of two model folders, only inside the folders the host lets the tab read
    models = tmp_path / "models"
    sd1_pipeline(models).save_pretrained(models / "base")
    tuned = sd1_pipeline(models)
    with torch.no_grad():
        q = tuned.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        q.weight += 0.3 * torch.randn(q.weight.shape[0], 1) @ torch.randn(1, q.weight.shape[1])
    tuned.save_pretrained(models / "tuned")
    with pytest.raises(MergeError, match="outside the folders LoRA Queue may read"):
        loras.extract_into_folder(str(models / "tuned"), str(models / "base"), RankPolicy(rank=2), "x", "fp16",
                                  False, tmp_path, roots=(tmp_path / "data",))
    report = loras.extract_into_folder(str(models / "tuned"), str(models / "base"), RankPolicy(rank=2), "ex",
                                       "fp16", False, tmp_path, roots=(models,), text_encoder=False)
    assert report.startswith("extracted 1 modules of tuned - base") and "total:" in report, report
    assert (tmp_path / "ex.safetensors").is_file() and not (tmp_path / "x.safetensors").exists()


def test_results_list_final_then_checkpoints_by_step(tmp_path):
    job = jobs.StandardJob(name="style")
    for name in ("style", "style-000200", "style-000100", "style_other"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"x")
    files = results.checkpoints([str(tmp_path / "style.safetensors")], job, tmp_path)
    assert [Path(f).name for f in files] == ["style.safetensors", "style-000100.safetensors",
                                             "style-000200.safetensors"]
    assert results.parse_seeds("1, 2 3") == [1, 2, 3]
    with pytest.raises(ValueError, match="'x'"):
        results.parse_seeds("1, x")


def test_the_gallery_lists_a_jobs_previews_in_step_order_the_final_last(tmp_path):
    job = jobs.StandardJob(name="style", output_dir="night")
    work, loras = tmp_path / "jobs" / "3", tmp_path / "loras"
    (loras / "night").mkdir(parents=True)
    work.mkdir(parents=True)
    for name in ("style-000100", "style-000020", "other-000010"):
        (work / f"{name}.preview.png").write_bytes(b"png")
    assert [c for _, c in results.gallery_items(job, loras, work)] == ["step 20", "step 100"]
    (loras / "night" / "style.preview.png").write_bytes(b"png")
    items = results.gallery_items(job, loras, work)
    assert [c for _, c in items] == ["step 20", "step 100", "final"]
    assert results.relative(items[-1][0], loras, tmp_path) == "night/style.preview.png"
    assert results.relative(items[0][0], loras, tmp_path) == "jobs/3/style-000020.preview.png"


def test_grid_defaults_follow_the_job_prompts_and_sampling():
    lcm = jobs.LcmJob(name="l", prompts=["a cat"], sample_prompts=[])
    assert results.default_prompts(lcm) == ["a cat"]
    assert results.grid_defaults(lcm) == ("lcm", 4, 1.5)          # LCM sampler, 4 steps, CFG within 1-2
    standard = jobs.StandardJob(name="s", sample_prompts=["one", "two"])
    assert results.default_prompt(standard) == "one\ntwo" and results.grid_defaults(standard)[0] == "ddim"
    assert results.default_prompts(jobs.StandardJob(name="s")) == ["a picture"], "never an empty prompt"
    assert results.parse_strengths("-1, 0 0.5") == [-1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="'x'"):
        results.parse_strengths("1, x")


# -- the Blocks under both gradio versions ------------------------------------------------------------------

@pytest.mark.parametrize("version", sorted(UI_ENVS))
def test_tab_builds_and_serves_under_webui_gradio(version, tmp_path):
    python = UI_ENVS[version]
    assert python.is_file(), f"{python} is missing: run ./dev setup (it builds the gradio {version} env)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.run([str(python), __file__, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])

    assert found["gradio"] == version
    assert found["missing_elem_ids"] == []               # every field's control and error line is on the page
    assert found["field_controls"] == len(form.controls())
    assert found["unprefixed_elem_ids"] == []
    assert "The queue is empty" in found["queue_table_answer"]
    assert found["loss_plot_lines"] == 2 * 3             # two phases x (raw loss, smoothed loss, lr)
    assert found["build_seconds"] < 60
    labels = found["tab_labels"]
    assert "LoRA tools" in labels, labels
    tools = labels.index("LoRA tools")
    assert labels[tools + 1:tools + 5] == ["Merge", "Resize", "Extract", "Bake"], labels


def build_and_serve(out: Path) -> dict:
    """Runs under .venv-gradio3 / .venv-gradio4: build the standalone app, serve it, ask it for the table."""
    import urllib.request

    import gradio as gr

    from trainer.queue.store import ProgressRow
    from trainer.ui.app import standalone_app
    from trainer.ui.services import standalone_services

    started = time.perf_counter()
    services = standalone_services("demo", out / "data", start_worker=False)   # no model is loaded to build
    app = standalone_app(services)
    build_seconds = time.perf_counter() - started
    config = app.get_config_file()
    ids = [c.get("props", {}).get("elem_id") for c in config["components"]]
    ids = [i for i in ids if i]
    wanted = [c.elem_id for c in form.controls()] + ["loraq_err_" + c.key.replace(".", "__") for c in form.controls()]
    wanted += ["loraq_mode", "loraq_add", "loraq_queue_table", "loraq_loss_plot", "loraq_grid", "loraq_merge_inputs",
               "loraq_merge_report", "loraq_lora_list", "loraq_dataset_check"]
    # the LoRA tools tab: its four sections, each with its button and report, and the merge preview
    wanted += ["loraq_tab_tools", "loraq_preview_run", "loraq_preview_image", "loraq_preview_report"]
    wanted += [f"loraq_{tool}_{part}" for tool in ("merge", "resize", "extract", "bake") for part in ("run", "report")]
    wanted += ["loraq_resize_input", "loraq_extract_tuned", "loraq_extract_base", "loraq_bake_base", "loraq_bake_inputs"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        answer = None
        for path in ("/run/queue_table", "/api/queue_table"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b'{"data": ["", "all"]}',
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    answer = json.loads(r.read())["data"][0]
                    break
            except OSError:
                continue
    finally:
        app.close()
    figure = queue_view.loss_svg([ProgressRow(phase, step, 0.1, 0.1, 1e-4, float(step))
                                  for phase in ("pass 1 of 2", "pass 2 of 2") for step in range(1, 5)])
    tab_labels = [c.get("props", {}).get("label") for c in config["components"] if c.get("type") in ("tabitem", "tab")]
    return {"gradio": gr.__version__, "build_seconds": round(build_seconds, 2), "tab_labels": tab_labels,
            "missing_elem_ids": sorted(set(wanted) - set(ids)),
            "unprefixed_elem_ids": sorted(i for i in ids if not i.startswith("loraq_")),
            "field_controls": sum(1 for c in form.controls() if c.elem_id in ids),
            "queue_table_answer": answer if isinstance(answer, str) else json.dumps(answer),
            "loss_plot_lines": figure.count("<polyline")}


if __name__ == "__main__":
    print(json.dumps(build_and_serve(Path(sys.argv[1]))))


def test_mode_defaults_do_not_depend_on_the_path_taken_and_edited_values_stay():
    controls = {c.key: c for c in form.controls()}
    start = {k: c.default("standard") for k, c in controls.items() if "standard" in c.modes}

    def switch(values: dict, mode: str) -> dict:
        return {**values, **form.defaults_for_mode(controls, mode, values)}

    direct = switch(dict(start), "lcm")
    detour = switch(switch(dict(start), "copier"), "lcm")
    keys = [k for k, c in controls.items() if "lcm" in c.modes and k in start]
    assert {k: direct[k] for k in keys} == {k: detour[k] for k in keys}
    assert direct["network_dim"] == controls["network_dim"].default("lcm")
    edited = switch({**start, "network_dim": 7}, "lcm")
    assert edited["network_dim"] == 7, "a value the user typed survives a mode change"


def test_a_night_queue_pauses_after_the_current_job_clears_finished_and_totals_the_queued_time(tmp_path):
    from trainer.queue.admission import Admission
    from trainer.queue.store import JobQueue

    (tmp_path / "data").mkdir()
    draw("red", "circle", "white", 64).save(tmp_path / "data" / "a.png")
    queue = JobQueue(tmp_path / "q.sqlite")
    ids = [queue.add(jobs.StandardJob(name=f"j{i}", dataset_dir=str(tmp_path / "data"), steps=300), tmp_path,
                     Admission(tmp_path / "out")) for i in range(4)]
    assert queue.estimated_seconds_left() is None, "no job ran yet: no speed to estimate from"
    first = queue.claim_next()
    import sqlite3
    with sqlite3.connect(queue.db_path) as db:     # as the worker records it: 150 of 300 steps at 2 it/s
        db.execute("UPDATE jobs SET step = 150, total = 300, it_per_s = 2.0, eta_s = 75 WHERE id = ?", (first.id,))
    assert queue.estimated_seconds_left() == pytest.approx(75 + 3 * 300 / 2.0)
    queue.set_paused(True)
    assert queue.claim_next() is None and queue.paused()
    queue.finish(first.id, "done")
    queue.set_paused(False)
    second = queue.claim_next()
    assert second.id == ids[1]
    queue.finish(second.id, "stopped")
    line = queue_view.queue_summary(queue.list(), queue.estimated_seconds_left(), True)
    assert "1 done" in line and "1 stopped" in line and "2 queued" in line and "paused" in line
    assert "about 5:00" in line, line                     # 2 queued x 300 steps at 2 it/s
    assert queue.clear_finished() == 1 and {r.id for r in queue.list()} == set(ids[1:])
    html_table = queue_view.queue_table_html(queue.list())
    assert "<th>started</th>" in html_table and "<th>took</th>" in html_table


def test_presets_ship_the_recipes_people_use_are_always_current_and_the_form_survives_a_reload(tmp_path):
    from trainer.ui.presets import BUILTIN, PresetError, PresetStore

    store = PresetStore(tmp_path / "presets")
    for name in BUILTIN:
        jobs.job_from_dict(store.load(name))           # every shipped recipe is a valid job
    sdxl = jobs.job_from_dict(store.load("built-in SDXL copier two-pass"))
    first, second = sdxl.passes()
    assert (first.network_dim, first.network_alpha, first.conv_dim, first.lr, first.optimizer, first.steps) == \
        (16, 16.0, 8, 5e-5, "Lion", 1000)
    assert (second.network_dim, second.conv_dim, second.lr_scheduler) == (4, 0, "cosine")
    store.save("mine", jobs.template("standard"))
    assert PresetStore(tmp_path / "presets").names()[0] == "mine", "read at each call, saved ones first"
    with pytest.raises(PresetError, match="built in"):
        store.save("built-in LCM-LoRA SD1.5", jobs.template("lcm"))
    with pytest.raises(PresetError) as bad:
        store.path("a/b")
    assert "output_dir" not in str(bad.value) and "⚠" not in str(bad.value)
    assert store.last_form() is None
    store.remember({**jobs.template("lcm"), "name": "kept"})
    assert store.last_form()["name"] == "kept" and "kept" not in store.names()


def test_add_to_queue_says_when_a_job_will_render_previews():
    """The preview prompts sit in a closed group and the form comes back as last queued: in A1111 a standard job
    carried an LCM job's preview prompt and rendered 5 previews (12 min instead of 2) without a word."""
    job = jobs.job_from_dict({"mode": "standard", "name": "x", "dataset_dir": "/tmp", "save_every_n_steps": 7,
                              "sample_every_n_steps": 5, "sample_prompts": ["a cat", " "]})
    assert form.preview_note(job) == ("\n- previews of 1 prompt(s) every 5 steps, at each save and at the end "
                                      "(group *Previews*; empty its prompts for none)")
    assert form.preview_note(dataclasses.replace(job, sample_prompts=[])) == ""
