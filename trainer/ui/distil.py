""""Distil the loaded checkpoint": one click queues an LCM job for the model the tab trains on.

The job is the LCM default (the LCM-LoRA recipe) on the prompts shipped in ``trainer/train/resources``
(a few hundred varied subjects, scenes and styles written for this project), one teacher image per prompt,
with the comparison sheet on: when it finishes, ``NAME.comparison.png`` beside the LoRA shows the teacher at
25 steps and CFG 7 against the LoRA at 2, 4 and 8 LCM steps and CFG 1 on the same seeds.

The job and its queueing are plain functions (tested without gradio); :class:`DistilButton` is the thin
Gradio part the train panel places.
"""
from __future__ import annotations

import re
from pathlib import Path

from trainer import jobs
from trainer.ui.services import UiServices

SHIPPED_PROMPTS = Path(__file__).resolve().parent.parent / "train" / "resources" / "lcm_prompts.txt"
#: Resolution by architecture when the host gives the form none (the demo model's form starts at 64 px).
RESOLUTION = {"sdxl": 1024}
DEFAULT_RESOLUTION = 512


def prompt_lines(path: Path) -> list[str]:
    """The prompts of a prompts file as an LCM job reads them (one per line, # comments skipped)."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:80] or "model"


def _free_name(services: UiServices, base: str) -> str:
    """``base``, or ``base_2``, ``base_3``...: neither a LoRA in the folder nor a job waiting to write it."""
    waiting = {r.name for r in services.queue.list(limit=10_000, states=["queued", "running", "interrupted"])}
    name, n = base, 1
    while name in waiting or (services.lora_dir / f"{name}.safetensors").exists():
        n += 1
        name = f"{base}_{n}"
    return name


def distil_job(services: UiServices) -> jobs.LcmJob:
    """The LCM job the button queues: the loaded model, the shipped prompts (copied into the data folder, which
    a job from the tab may always read), one teacher image per prompt, the comparison sheet on."""
    prompts_file = services.keep_upload(str(SHIPPED_PROMPTS))
    count = len(prompt_lines(Path(prompts_file)))
    model = services.default_model()
    arch, _ = services.model_facts()
    resolution = services.form_start.get("resolution") or RESOLUTION.get(arch or "", DEFAULT_RESOLUTION)
    base = "lcm_" + _slug(Path(model).stem if model else services.model_label or "model")
    return jobs.LcmJob(name=_free_name(services, base), model=model, prompts_file=prompts_file,
                       num_generated_images=count, resolution=resolution, comparison_sheet=True)


def queue_distil(services: UiServices) -> str:
    """Queue :func:`distil_job`; the message the tab shows (what was queued and where it writes, or why not)."""
    try:
        job = distil_job(services)
        job_id = services.queue.add(job, root=services.root, admission=services.admission())
    except jobs.JobError as e:
        return f"⚠ not queued: {e.message}"
    if services.worker is not None:
        services.worker.wake()
    folder = services.lora_dir / job.output_dir
    model = Path(job.model).name if job.model else services.model_label or "the loaded model"
    return (f"✔ queued **{job.name}** as job {job_id}: an LCM-LoRA of {model} from {job.num_generated_images} "
            f"prompts at {job.resolution} px, {job.steps} steps → `{folder / (job.name + '.safetensors')}`; "
            f"when it finishes, `{job.name}.comparison.png` beside it compares the model at 25 steps with the LoRA "
            "at 2, 4 and 8 LCM steps")


class DistilButton:
    """The button and its message, built inside the current gradio context."""

    def __init__(self, services: UiServices):
        import gradio as gr   # here, not at the top: the job and its queueing are used and tested without gradio

        with gr.Row(elem_id="loraq_distil_row"):
            self.button = gr.Button("Distil the loaded checkpoint", elem_id="loraq_distil", scale=1)
            self.status = gr.Markdown(
                f"One click: an LCM-LoRA (4-step sampling at CFG 1) of the model jobs train on, from "
                f"{len(prompt_lines(SHIPPED_PROMPTS))} built-in prompts, with the LCM defaults and a comparison "
                "sheet when it is done.", elem_id="loraq_distil_status")
        self.button.click(lambda: queue_distil(services), None, [self.status])
