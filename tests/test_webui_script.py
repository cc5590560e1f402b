"""scripts/lora_queue.py wires the WebUI's callbacks to trainer/ (with stand-ins for the WebUI's modules)."""
from __future__ import annotations

import runpy
import sys
import threading
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_webui(tmp_path, monkeypatch):
    registered = {}
    callbacks = types.ModuleType("modules.script_callbacks")
    for name in ("on_ui_settings", "on_ui_tabs", "on_app_started", "on_before_ui"):
        setattr(callbacks, name, lambda fn, _n=name: registered.setdefault(_n, fn))
    xyz_module = types.SimpleNamespace(axis_options=[], AxisOption=lambda label, type, apply, choices=None:
                                       types.SimpleNamespace(label=label, apply=apply, choices=choices))
    scripts = types.ModuleType("modules.scripts")
    scripts.scripts_data = [types.SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}),
                                                  module=xyz_module)]
    options = []
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(lora_dir=str(tmp_path / "Lora"))
    shared.models_path = str(tmp_path / "models")
    shared.sd_model = None

    class OptionInfo:
        def __init__(self, default, label, section=None):
            self.default, self.label, self.section = default, label, section

        def needs_reload_ui(self):
            return self

    shared.OptionInfo = OptionInfo
    shared.opts = types.SimpleNamespace(data={"loraq_data_dir": str(tmp_path / "data")},
                                        add_option=lambda key, info: options.append(key))
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()
    samplers = types.ModuleType("modules.sd_samplers")
    samplers.all_samplers, samplers.all_samplers_map = [], {}
    samplers.set_samplers = lambda: None
    common = types.ModuleType("modules.sd_samplers_common")
    common.SamplerData = lambda name, constructor, aliases, options: types.SimpleNamespace(name=name)
    kdiffusion = types.ModuleType("modules.sd_samplers_kdiffusion")
    kdiffusion.KDiffusionSampler = object
    package = types.ModuleType("modules")
    for name, module in (("script_callbacks", callbacks), ("scripts", scripts), ("shared", shared),
                         ("call_queue", call_queue), ("sd_samplers", samplers), ("sd_samplers_common", common),
                         ("sd_samplers_kdiffusion", kdiffusion)):
        setattr(package, name, module)
        monkeypatch.setitem(sys.modules, f"modules.{name}", module)
    monkeypatch.setitem(sys.modules, "modules", package)
    return registered, options, xyz_module, samplers


def test_script_registers_tab_settings_worker_and_xyz_axes(tmp_path, monkeypatch):
    registered, options, xyz_module, samplers = _fake_webui(tmp_path, monkeypatch)
    glue = runpy.run_path(str(ROOT / "scripts" / "lora_queue.py"))
    assert set(registered) == {"on_ui_settings", "on_ui_tabs", "on_app_started", "on_before_ui"}
    registered["on_ui_settings"]()
    assert options == ["loraq_data_dir", "loraq_output_subdir", "loraq_allowed_input_dirs", "loraq_resume_interrupted"]
    registered["on_before_ui"]()
    registered["on_before_ui"]()
    assert [o.label for o in xyz_module.axis_options] == ["[LoRA Queue] LoRA", "[LoRA Queue] Strength"]
    assert any("LCM" in name for name in samplers.all_samplers_map), "the LCM samplers join the WebUI's list"
    assert len(samplers.all_samplers) == len(samplers.all_samplers_map), "registered once"
    host = glue["host"]()
    try:
        registered["on_app_started"](None, None)
        registered["on_app_started"](None, None)
        assert host.output_dir == tmp_path / "Lora" / "lora_queue"
        assert (tmp_path / "data" / "queue.sqlite").exists()
        assert xyz_module.axis_options[0].choices() == []
        assert host.input_roots == (tmp_path / "models", tmp_path / "data")
        _tab_refuses_inputs_outside_the_allowed_folders(host, tmp_path)
    finally:
        host.stop()


def _tab_refuses_inputs_outside_the_allowed_folders(host, tmp_path):
    """With --listen or --share anyone reaching the tab could read any file: jobs read only allowed folders."""
    import pytest

    from trainer import jobs
    from trainer.models.demo.shapes import draw

    services = host.services()
    for folder in (tmp_path / "elsewhere", tmp_path / "models" / "datasets" / "mine"):
        folder.mkdir(parents=True)
        draw("red", "circle", "white", 64).save(folder / "a.png")
    outside = jobs.StandardJob(name="x", dataset_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(jobs.JobError) as refused:
        services.queue.add(outside, services.root, services.admission())
    assert "outside the folders" in refused.value.errors["dataset_dir"]
    inside = jobs.StandardJob(name="x", dataset_dir=str(tmp_path / "models" / "datasets" / "mine"))
    assert services.queue.add(inside, services.root, services.admission())


def test_a_job_names_its_checkpoint_and_the_worker_switches_the_webui_to_it(tmp_path, monkeypatch):
    """A1111's way: the sd_model_checkpoint setting, whose onchange reloads under the queue lock."""
    import pytest

    from trainer import jobs
    from trainer.models.handle import ModelError

    registered, options, xyz_module, samplers = _fake_webui(tmp_path, monkeypatch)
    shared = sys.modules["modules.shared"]
    infos = {name: types.SimpleNamespace(title=f"{name} [0123abcd]", filename=f"/models/{name}")
             for name in ("a.safetensors", "b.safetensors")}
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.get_closet_checkpoint_match = lambda s: next((i for n, i in infos.items() if s and (s in i.title)), None)
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    shared.sd_model = types.SimpleNamespace(sd_checkpoint_info=infos["a.safetensors"])
    set_calls = []

    def opts_set(key, value):      # A1111 reloads the model in the option's onchange
        set_calls.append((key, value))
        shared.sd_model = types.SimpleNamespace(sd_checkpoint_info=next(i for i in infos.values() if i.title == value))
        return True
    shared.opts.set = opts_set
    glue = runpy.run_path(str(ROOT / "scripts" / "lora_queue.py"))
    host = glue["host"]()
    try:
        services = host.services()
        assert services.default_model() == "a.safetensors [0123abcd]"      # what a job queued now names
        assert host.switch_checkpoint("a.safetensors") is None and set_calls == []
        with pytest.raises(ModelError, match="not among the WebUI's checkpoints"):
            host.switch_checkpoint("missing.safetensors")
        host._worker.stop()                                                  # run the job's switch by hand
        (tmp_path / "data" / "d").mkdir(parents=True, exist_ok=True)
        from trainer.models.demo.shapes import draw
        draw("red", "circle", "white", 64).save(tmp_path / "data" / "d" / "x.png")
        job = jobs.StandardJob(name="on_b", model="b.safetensors [0123abcd]", dataset_dir=str(tmp_path / "data" / "d"))
        job_id = services.queue.add(job, services.root, services.admission())
        host._worker.current = job_id
        host.ensure_checkpoint(services.queue.get(job_id).job)
        assert set_calls == [("sd_model_checkpoint", "b.safetensors [0123abcd]")]
        assert shared.sd_model.sd_checkpoint_info is infos["b.safetensors"]
        assert any("switched from a.safetensors [0123abcd] to b.safetensors [0123abcd]" in w
                   for w in services.queue.get(job_id).warnings)
    finally:
        host.stop()


def _checkpoint_host(tmp_path, monkeypatch, host, loaded, option, broken=False):
    """A1111's or Forge's checkpoint machinery as each really behaves (modules/sd_models.py, options.py,
    modules_forge/main_entry.py): the option and the loaded model are separate, and each loader only reloads
    when what it compares changed. ``loaded`` None is Forge's placeholder before its first generation;
    ``broken``: the loader returns without loading anything."""
    _fake_webui(tmp_path, monkeypatch)
    shared, call_queue = sys.modules["modules.shared"], sys.modules["modules.call_queue"]
    infos = {name: types.SimpleNamespace(title=f"{name} [0123abcd]", filename=f"/models/{name}")
             for name in ("a.safetensors", "b.safetensors")}
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.get_closet_checkpoint_match = lambda s: next((i for i in infos.values() if s and s in i.title), None)
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    sys.modules["modules"].sd_models = sd_models
    shared.opts.data["sd_model_checkpoint"] = infos[option].title
    placeholder = type("FakeInitialModel", (), {})()
    shared.sd_model = placeholder if loaded is None else types.SimpleNamespace(sd_checkpoint_info=infos[loaded])
    loads = []

    def load(info):
        assert call_queue.queue_lock.locked(), "the WebUI loads models under the queue lock, as a generation"
        if not broken:
            loads.append(info.title)
            shared.sd_model = types.SimpleNamespace(sd_checkpoint_info=info)

    if host == "a1111":
        def reload_model_weights(sd_model=None, info=None, forced_reload=False):
            info = info or sd_models.get_closet_checkpoint_match(shared.opts.data["sd_model_checkpoint"])
            if shared.sd_model.sd_checkpoint_info.filename != info.filename:   # A1111 returns early otherwise
                load(info)
        sd_models.reload_model_weights = reload_model_weights

        def opts_set(key, value):      # options.py: False when unchanged; else the onchange, wrap_queued_call'ed
            if shared.opts.data.get(key) == value:
                return False
            shared.opts.data[key] = value
            with call_queue.queue_lock:
                reload_model_weights()
            return True
        shared.opts.set = opts_set
    else:
        state = {"params": infos[loaded or option], "loaded_params": infos[loaded] if loaded else None}

        def refresh_model_loading_parameters():     # select_checkpoint() reads the option
            state["params"] = sd_models.get_closet_checkpoint_match(shared.opts.data["sd_model_checkpoint"])

        def checkpoint_change(ckpt_name, save=True, refresh=True):   # compares with the option, not the model
            if sd_models.get_closet_checkpoint_match(ckpt_name) is sd_models.get_closet_checkpoint_match(
                    shared.opts.data.get("sd_model_checkpoint", "")):
                return False
            shared.opts.data["sd_model_checkpoint"] = ckpt_name
            if refresh:
                refresh_model_loading_parameters()
            return True

        def forge_model_reload():     # reloads only when the loading parameters changed (forge_hash)
            if state["params"] is state["loaded_params"]:
                return
            load(state["params"])
            if not broken:
                state["loaded_params"] = state["params"]
        sd_models.forge_model_reload = forge_model_reload
        main_entry = types.ModuleType("modules_forge.main_entry")
        main_entry.checkpoint_change = checkpoint_change
        main_entry.refresh_model_loading_parameters = refresh_model_loading_parameters
        forge = types.ModuleType("modules_forge")
        forge.main_entry = main_entry
        monkeypatch.setitem(sys.modules, "modules_forge", forge)
        monkeypatch.setitem(sys.modules, "modules_forge.main_entry", main_entry)
    glue = runpy.run_path(str(ROOT / "scripts" / "lora_queue.py"))
    return glue, shared, loads


A, B = "a.safetensors [0123abcd]", "b.safetensors [0123abcd]"


@pytest.mark.parametrize("host, loaded, option, switched, loads", [
    ("a1111", "a.safetensors", "a.safetensors", (A, B), [B]),   # the option's onchange loads B
    # the option already names B while A is loaded: the onchange would not run, so B is loaded directly
    ("a1111", "a.safetensors", "b.safetensors", (A, B), [B]),
    ("a1111", "b.safetensors", "a.safetensors", None, []),      # B is loaded: the option's disagreement is moot
    ("forge", "a.safetensors", "a.safetensors", (A, B), [B]),
    # a page load reset Forge's option to B without loading it (the real failure): loading params refreshed
    ("forge", "a.safetensors", "b.safetensors", (A, B), [B]),
    ("forge", "b.safetensors", "a.safetensors", None, []),
    ("forge", None, "b.safetensors", None, [B]),                # placeholder: Forge loads its chosen B, no switch
    ("forge", None, "a.safetensors", (A, B), [B]),              # placeholder, A chosen: the choice changes to B
])
def test_the_switch_compares_with_the_loaded_model_and_loads_the_jobs_checkpoint(
        tmp_path, monkeypatch, host, loaded, option, switched, loads):
    glue, shared, done = _checkpoint_host(tmp_path, monkeypatch, host, loaded, option)
    assert glue["_switch_checkpoint"]("b.safetensors") == switched
    assert done == loads
    assert shared.sd_model.sd_checkpoint_info.title == B, "the job trains on the checkpoint it names"
    assert glue["_switch_checkpoint"]("b.safetensors") is None and done == loads, "loaded once"


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_a_switch_that_leaves_another_model_loaded_is_a_clear_error(tmp_path, monkeypatch, host):
    from trainer.models.handle import ModelError

    glue, shared, done = _checkpoint_host(tmp_path, monkeypatch, host, "a.safetensors", "a.safetensors",
                                          broken=True)
    with pytest.raises(ModelError, match=r"did not load the job's checkpoint b\.safetensors \[0123abcd\]: "
                                         r"a\.safetensors \[0123abcd\] is loaded"):
        glue["_switch_checkpoint"]("b.safetensors")
