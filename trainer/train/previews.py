"""Preview images while a job trains: the job's preview prompts with the LoRA as it is now, every N steps, with
each save and at the end, sampled the way the mode's LoRA is used (guided DDIM, or LCM at 4 steps and CFG 1).

Files: the final preview beside the LoRA as ``NAME.preview.png`` (the WebUI shows it as the LoRA's card);
earlier ones in the job's folder as ``NAME-000500.preview.png``. A preview never stops a training. A finished
LCM job also leaves ``NAME.comparison.png`` beside its LoRA (:func:`render_lcm_comparison`).
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer.jobs.vocabulary import Phase
from trainer.lora.network import LoraNetwork, attached_file
from trainer.models.handle import ModelHandle
from trainer.paths import write_atomic
from trainer.sampling import lcm as lcm_sampling
from trainer.sampling.grids import grid_image
from trainer.sampling.guided import sample
from trainer.train.loop import EventSink, Outputs, Progress

PREVIEW_SEEDS_FROM = 1
#: Guided previews (standard, copier): the sampling a user would try first.
PREVIEW_STEPS, PREVIEW_CFG = 20, 7.0


def preview_path(outputs: Outputs, step: int, final: bool) -> Path:
    return outputs.dir / f"{outputs.name}.preview.png" if final else outputs.work / f"{outputs.name}-{step:06d}.preview.png"


def preview_files(lora_folder: Path, work_folder: Path | None, name: str) -> list[Path]:
    """A job's previews as they exist now, in step order, the final one (beside the LoRA) last: what the tab's
    gallery shows while the job trains and what its outputs list afterwards."""
    pattern = re.compile(re.escape(name) + r"-(\d+)\.preview\.png\Z")
    found = []
    if work_folder is not None and Path(work_folder).is_dir():
        found = sorted((int(m.group(1)), p) for p in Path(work_folder).glob(f"{name}-*.preview.png")
                       if (m := pattern.match(p.name)))
    final = Path(lora_folder) / f"{name}.preview.png"
    return [p for _, p in found] + ([final] if final.is_file() else [])


def preview_step(path: Path) -> int | None:
    """The step a preview file shows (None: the final one)."""
    m = re.search(r"-(\d+)\.preview\.png\Z", Path(path).name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Sampling:
    """How a mode's LoRA is looked at: the sampler, steps and CFG its previews, grids and sheets use."""

    sampler: str      # "ddim" (guided) or "lcm"
    steps: int
    cfg: float


#: LCM-LoRAs are used at 4 LCM steps and CFG 1-2 (the middle of that range); with guided DDIM at 20 steps every
#: strength of an LCM-LoRA draws the same blur, so a grid would show nothing.
LCM_SAMPLING = Sampling("lcm", 4, 1.5)


def job_prompts(job) -> list[str]:
    """What a job's LoRA is looked at with: its preview prompts; else the copier's prompt, the LCM job's first
    prompt, the trigger word; never nothing (an empty prompt shows only the model's average image)."""
    if job.sample_prompts:
        return list(job.sample_prompts)
    for candidate in (getattr(job, "prompt", ""), getattr(job, "source_prompt", ""),
                      (list(getattr(job, "prompts", []) or []) or [""])[0], getattr(job, "trigger_word", "")):
        if candidate and candidate.strip():
            return [candidate.strip()]
    return ["a picture"]


def sampling_for(job) -> Sampling:
    """The job's own sampling settings: what its previews use (LCM jobs: the LCM sampler at 4 steps)."""
    return LCM_SAMPLING if job.mode == "lcm" else Sampling("ddim", PREVIEW_STEPS, PREVIEW_CFG)


def preview_steps(job) -> Callable[[int, int], bool]:
    """Whether a step renders previews: every sample_every_n_steps, with every save, and at the end."""
    def due(step: int, total: int) -> bool:
        return bool(job.sample_prompts) and (
            step == total or any(n and step % n == 0 for n in (job.sample_every_n_steps, job.save_every_n_steps)))
    return due


def _write_png(image, path: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())


def render_lcm_preview(handle: ModelHandle, network: LoraNetwork, prompts: list[str], size: tuple[int, int],
                       path: Path) -> Path:
    """A grid of the prompts, sampled in 4 LCM steps at CFG 1 with the LoRA as it is now: the plain LCM
    sampler and the LCM alternative (first step re-noised with the model's own removed noise)."""
    seeds = list(range(PREVIEW_SEEDS_FROM, PREVIEW_SEEDS_FROM + len(prompts)))
    rows = [lcm_sampling.sample_lcm(handle, prompts, seeds, steps=4, size=size, network=network),
            lcm_sampling.sample_lcm(handle, prompts, seeds, steps=4, size=size, sampler="lcm_alternative",
                                    euler_steps=1, network=network)]
    return _write_png(grid_image(rows, [p[:24] for p in prompts], ["LCM 4", "LCM alt 4"]), path)


def render_guided_preview(handle: ModelHandle, network: LoraNetwork, prompts: list[str], size: tuple[int, int],
                          path: Path) -> Path:
    """A grid of the prompts, guided DDIM, same seeds: the base model above, the LoRA at strength 1 below,
    so what the LoRA changes is what differs between the rows."""
    seeds = list(range(PREVIEW_SEEDS_FROM, PREVIEW_SEEDS_FROM + len(prompts)))
    rows = [sample(handle, prompts, seeds, steps=PREVIEW_STEPS, cfg=PREVIEW_CFG, size=size),
            sample(handle, prompts, seeds, steps=PREVIEW_STEPS, cfg=PREVIEW_CFG, size=size, network=network)]
    return _write_png(grid_image(rows, [p[:24] for p in prompts], ["base", "LoRA 1.0"]), path)


def previewer(job, handle: ModelHandle, network: LoraNetwork, outputs: Outputs, render, log: Callable[[str], None],
              size: tuple[int, int], events: EventSink | None = None) -> Callable[[Progress], Path | None]:
    """``at(progress)`` after a step: renders when due (see :func:`preview_steps`); returns the file or None.

    While it renders, ``events`` hears the step again in the phase "preview" and without a loss (so no point is
    plotted): on a CPU a preview takes minutes, and the final one comes at 100 %, where a job with no phase
    looked hung."""
    due = preview_steps(job)

    def at(progress: Progress) -> Path | None:
        step, total = progress.step, progress.total
        if not due(step, total):
            return None
        if events:
            events(dataclasses.replace(progress, loss=math.nan, smoothed_loss=math.nan, phase=Phase.PREVIEW.value,
                                       message=f"preview at step {step}"))
        try:
            return render(handle, network, list(job.sample_prompts), size, preview_path(outputs, step, step == total))
        except Exception as e:  # a preview never stops a training
            log(f"warning: preview at step {step} failed: {e}")
            return None
    return at


# -- the LCM comparison sheet ---------------------------------------------------------------------

#: The teacher as people sample the model without the LoRA, against the LoRA at the LCM step counts, CFG 1.
SHEET_TEACHER_STEPS, SHEET_TEACHER_CFG = 25, 7.0
SHEET_LCM_STEPS = (2, 4, 8)
SHEET_SEEDS = (1, 2)
SHEET_MAX_PROMPTS = 4


def comparison_path(outputs: Outputs) -> Path:
    return outputs.dir / f"{outputs.name}.comparison.png"


def sheet_prompts(sample_prompts: list[str], training_prompts: list[str]) -> list[str]:
    """The job's preview prompts, or up to SHEET_MAX_PROMPTS of its training prompts spread over the list."""
    if sample_prompts:
        return list(sample_prompts)[:SHEET_MAX_PROMPTS]
    distinct = list(dict.fromkeys(p for p in training_prompts if p.strip()))
    n = min(SHEET_MAX_PROMPTS, len(distinct))
    return [distinct[i * len(distinct) // n] for i in range(n)]


def render_lcm_comparison(handle: ModelHandle, lora_file: Path, prompts: list[str], size: tuple[int, int],
                          path: Path) -> Path:
    """Columns: each prompt at each of SHEET_SEEDS; rows: the teacher (the model alone, guided DDIM at
    SHEET_TEACHER_STEPS / SHEET_TEACHER_CFG), then the LoRA file as saved at each of SHEET_LCM_STEPS LCM steps,
    CFG 1, from the same starting noise."""
    rows: list[list] = [[] for _ in range(1 + len(SHEET_LCM_STEPS))]
    with attached_file(handle, lora_file) as network:   # on only while its own rows sample
        for prompt in prompts:   # one prompt at a time: a batch of len(SHEET_SEEDS) at full resolution
            batch, seeds = [prompt] * len(SHEET_SEEDS), list(SHEET_SEEDS)
            rows[0] += sample(handle, batch, seeds, steps=SHEET_TEACHER_STEPS, cfg=SHEET_TEACHER_CFG, size=size)
            for row, steps in zip(rows[1:], SHEET_LCM_STEPS):
                row += lcm_sampling.sample_lcm(handle, batch, seeds, steps=steps, size=size, network=network)
    columns = [f"{p[:18]} s{s}" for p in prompts for s in SHEET_SEEDS]
    labels = [f"teacher {SHEET_TEACHER_STEPS}"] + [f"LCM {n}" for n in SHEET_LCM_STEPS]
    title = (f"teacher: {SHEET_TEACHER_STEPS} DDIM steps, CFG {SHEET_TEACHER_CFG:g}; "
             f"{lora_file.stem}: LCM steps, CFG 1; same seeds")
    return _write_png(grid_image(rows, columns, labels, title), path)
