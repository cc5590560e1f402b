"""'Distil the loaded checkpoint' (issue 18.5): the shipped prompts, the job the button queues, and the button in
the tab under both WebUI gradio versions (run as a script in .venv-gradio3 / .venv-gradio4, like test_ui_build)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import jobs  # noqa: E402
from trainer.queue.store import JobQueue  # noqa: E402
from trainer.ui import distil  # noqa: E402
from trainer.ui.services import DEMO_FORM, UiServices  # noqa: E402

UI_ENVS = {"3.41.2": ROOT / ".venv-gradio3" / "bin" / "python", "4.40.0": ROOT / ".venv-gradio4" / "bin" / "python"}


def _services(tmp_path: Path, **kw) -> UiServices:
    data = tmp_path / "data"
    return UiServices(queue=JobQueue(data / "queue.sqlite"), handle_for=lambda job: None, lora_dir=tmp_path / "loras",
                      data_dir=data, cache_dir=data / "cache", root=tmp_path, **kw)


def test_a_few_hundred_varied_prompts_ship_with_the_package():
    prompts = distil.prompt_lines(distil.SHIPPED_PROMPTS)
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts), (len(prompts), len(set(prompts)))
    assert len({p.split()[1] for p in prompts if len(p.split()) > 1}) >= 150, "varied subjects, not one template"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["trainer"]
    shipped = distil.SHIPPED_PROMPTS.relative_to(ROOT / "trainer")
    assert any(shipped in set(p.relative_to(ROOT / "trainer") for p in (ROOT / "trainer").glob(g)) for g in patterns), \
        "the prompts file is package data (pip installs it with the package)"


def test_the_button_queues_a_valid_lcm_job_of_the_loaded_checkpoint_from_the_shipped_prompts(tmp_path):
    from trainer.train.modes.lcm import read_prompts

    checkpoint = tmp_path / "models" / "dreamy v2.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"stand-in: the WebUI's loaded checkpoint is named, never opened, at queueing")
    services = _services(tmp_path, default_model=lambda: str(checkpoint), model_facts=lambda: ("sdxl", 2048),
                         model_label="dreamy v2")
    message = distil.queue_distil(services)
    assert message.startswith("✔ queued **lcm_dreamy_v2** as job 1"), message
    row = services.queue.get(1)
    job = row.job
    assert isinstance(job, jobs.LcmJob) and job.model == str(checkpoint) and job.resolution == 1024
    jobs.check_job(jobs.job_from_dict(jobs.job_to_dict(job)), model_given=True)      # valid as stored
    # the shipped prompts, copied into the data folder (which a job from the tab may always read), one image each
    assert Path(job.prompts_file).parent.parent == services.data_dir
    assert read_prompts(job) == distil.prompt_lines(distil.SHIPPED_PROMPTS)
    assert job.num_generated_images == len(read_prompts(job)) >= 300 and job.comparison_sheet
    # otherwise the LCM defaults (the LCM-LoRA recipe)
    defaults = jobs.LcmJob()
    assert (job.steps, job.network_dim, job.lr, job.guidance_scale, job.guidance_scale_max) == \
        (defaults.steps, defaults.network_dim, defaults.lr, defaults.guidance_scale, defaults.guidance_scale_max)
    assert "lcm_dreamy_v2.comparison.png" in message
    # a second click while the first waits: a new name, never the same output twice
    assert distil.queue_distil(services).startswith("✔ queued **lcm_dreamy_v2_2** as job 2")


def test_on_the_demo_model_standalone_the_job_takes_the_demo_form_and_a_refusal_is_shown(tmp_path):
    services = _services(tmp_path, model_label="demo", form_start=DEMO_FORM)
    assert distil.queue_distil(services).startswith("✔ queued **lcm_demo** as job 1")
    assert services.queue.get(1).job.resolution == 64 and services.queue.get(1).job.model == ""
    services.lora_dir.mkdir(parents=True, exist_ok=True)
    (services.lora_dir / "lcm_demo_2.safetensors").write_bytes(b"x")
    assert "**lcm_demo_3**" in distil.queue_distil(services), "an existing LoRA's name is skipped"
    locked = _services(tmp_path / "other", model_label="demo", input_roots=(tmp_path / "nowhere",))
    assert distil.queue_distil(locked).startswith("✔ queued"), "the data folder is always readable"


@pytest.mark.parametrize("version", sorted(UI_ENVS))
def test_the_tab_has_the_button_and_it_queues_the_job_under_webui_gradio(version, tmp_path):
    python = UI_ENVS[version]
    assert python.is_file(), f"{python} is missing: run ./dev setup (it builds the gradio {version} env)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.run([str(python), __file__, str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["gradio"] == version
    assert found["label"] == "Distil the loaded checkpoint"
    assert found["message"].startswith("✔ queued **lcm_demo** as job 1"), found["message"]
    assert found["queued"] == [["lcm_demo", "lcm", 64]]


def click_in_the_tab(out: Path) -> dict:
    """Under .venv-gradio3 / -4: build the standalone app, find the button and run the function wired to its click."""
    import gradio as gr

    from trainer.ui.app import standalone_app
    from trainer.ui.services import standalone_services

    services = standalone_services("demo", out / "data", start_worker=False)
    app = standalone_app(services)
    config = app.get_config_file()
    button = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "loraq_distil")
    label = button["props"].get("value") or button["props"].get("label")
    wired = [i for i, d in enumerate(config["dependencies"])
             if any((t[0] if isinstance(t, (list, tuple)) else t) == button["id"] for t in d["targets"])]
    assert len(wired) == 1, wired
    message = app.fns[wired[0]].fn()
    queued = [[r.name, r.mode, services.queue.get(r.id).job.resolution] for r in services.queue.list()]
    return {"gradio": gr.__version__, "label": label, "message": message, "queued": queued}


if __name__ == "__main__":
    print(json.dumps(click_in_the_tab(Path(sys.argv[1]))))
