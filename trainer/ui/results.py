"""Results of the selected job: its live preview gallery, the LoRA strength x seed comparison grid of one or more
of its checkpoints, and the morning sheet.

The grid renders on the job's own model, which the worker may be training at the same moment
(``sampling.grids`` keeps the LoRA off outside the model lock, so a training step never sees it).
The pure helpers come first; :class:`ResultsPanel` is the Gradio glue the queue panel places under its plot.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Sequence

from PIL import Image

from trainer import jobs
from trainer.models.handle import ModelHandle
from trainer.queue import morning
from trainer.queue.store import QueueError
from trainer.queue.worker import work_folder
from trainer.sampling.grids import lora_file_grid
from trainer.sampling.sheets import stack
from trainer.train.previews import job_prompts, preview_files, preview_step, sampling_for

from trainer.train.morning import SEEDS, STRENGTHS   # the strengths (-1 ... 2) and seeds people plot a LoRA with

GALLERY_EVERY_S = 2.0


def checkpoints(row_outputs: Sequence[str], job: jobs.Job, lora_dir: Path) -> list[str]:
    """The job's LoRA files, final first, then the intermediate ``NAME-000500`` checkpoints by step."""
    folder = Path(lora_dir) / job.output_dir
    final = [p for p in row_outputs if Path(p).name == f"{job.name}.safetensors" and Path(p).is_file()]
    if not final and (folder / f"{job.name}.safetensors").is_file():
        final = [str(folder / f"{job.name}.safetensors")]
    pattern = re.compile(re.escape(job.name) + r"-(\d+)\.safetensors\Z")
    found = sorted((int(m.group(1)), str(p)) for p in folder.glob(f"{job.name}-*.safetensors")
                   if (m := pattern.match(p.name)))
    rest = [p for p in row_outputs if p not in final and Path(p).is_file() and p.endswith(".safetensors")]
    return list(dict.fromkeys(final + [p for _, p in found] + rest))


def relative(path: str | Path, *roots: Path) -> str:
    """``path`` as the user finds it: relative to the first of ``roots`` (the LoRA folder, the data folder) it is
    inside, else in full."""
    p = Path(path)
    for root in roots:
        try:
            return p.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return str(p)


def default_prompts(job: jobs.Job) -> list[str]:
    """What a grid of the job is sampled with first: its preview prompts (see ``previews.job_prompts``)."""
    return job_prompts(job)


def default_prompt(job: jobs.Job) -> str:
    """The prompt box's text: one prompt a line."""
    return "\n".join(default_prompts(job))


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one prompt (one a line): an empty prompt shows only the model's average image")
    return prompts


def parse_seeds(text: str) -> list[int]:
    """``"1, 2 3"`` -> ``[1, 2, 3]``; ValueError naming the bad entry."""
    seeds = []
    for token in re.split(r"[,\s]+", (text or "").strip()):
        if not token:
            continue
        if not token.isdigit():
            raise ValueError(f"seeds must be whole numbers separated by commas (got {token!r})")
        seeds.append(int(token))
    if not seeds:
        raise ValueError("give at least one seed, e.g. 1111, 2222, 3333")
    return seeds


def parse_strengths(text: str) -> list[float]:
    """``"-1, 0, 0.5"`` -> ``[-1.0, 0.0, 0.5]``; ValueError naming the bad entry."""
    strengths = []
    for token in re.split(r"[,\s]+", (text or "").strip()):
        if not token:
            continue
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"strengths must be numbers separated by commas, e.g. -1, 0, 0.5, 1 (got {token!r})") from None
        if not -10 <= value <= 10:
            raise ValueError(f"strength {token} is outside -10 .. 10")
        strengths.append(value)
    if not strengths:
        raise ValueError("give at least one strength, e.g. 0, 0.5, 1")
    return strengths


def format_numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def strength_grid(handle: ModelHandle, lora_paths: Sequence[str] | str, prompts: Sequence[str] | str,
                  strengths: Sequence[float] = STRENGTHS, seeds: Sequence[int] = SEEDS, *, sampler: str = "ddim",
                  steps: int = 20, cfg: float = 5.0, size: tuple[int, int] = (512, 512)) -> Image.Image:
    """One block per checkpoint: rows = prompt x seed, columns = LoRA strengths; sampled between training steps
    if a job runs."""
    paths = [lora_paths] if isinstance(lora_paths, (str, os.PathLike)) else list(lora_paths)
    return stack([lora_file_grid(handle, path, prompts, strengths, seeds, sampler=sampler, steps=steps, cfg=cfg,
                                 size=size) for path in paths])


def gallery_items(job: jobs.Job, lora_dir: Path, work_folder: Path) -> list[tuple[str, str]]:
    """(file, caption) of each preview the job has rendered so far, in step order, the final one last."""
    folder = Path(lora_dir) / job.output_dir
    return [(str(p), "final" if preview_step(p) is None else f"step {preview_step(p)}")
            for p in preview_files(folder, work_folder, job.name)]


def grid_defaults(job: jobs.Job) -> tuple[str, int, float]:
    """(sampler, steps, CFG) a grid of the job starts with: its own sampling (LCM: 4 LCM steps, CFG 1.5)."""
    sampling = sampling_for(job)
    return sampling.sampler, sampling.steps, sampling.cfg


# -- the Gradio part ---------------------------------------------------------------------------------

def _gradio():
    """gradio, only for the panel: the helpers above are used (and tested) where gradio is not installed."""
    import gradio as gr

    return gr


def _job_id(text) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


class ResultsPanel:
    """Previews, comparison grid and morning sheet of the job whose id is in ``selected`` (a Textbox)."""

    def __init__(self, services, blocks, selected):
        gr = _gradio()
        from trainer.ui.compat import no_progress, poll
        self.services, self.queue, self.selected = services, services.queue, selected
        self.gallery = gr.Gallery(label="previews (the job's preview prompts, as it trains)", elem_id="loraq_previews",
                                  columns=4, height="auto", allow_preview=True, object_fit="contain")
        self.gallery_key = gr.State(None)
        with gr.Accordion("Results: LoRA strength x seed grid", open=True, elem_id="loraq_results"):
            with gr.Row():
                self.checkpoint = gr.Dropdown([], label="LoRA files (one grid block each; final or checkpoints)",
                                              multiselect=True, elem_id="loraq_checkpoint", scale=2)
                self.prompt = gr.Textbox(label="prompts (one a line; default: the job's preview prompts)", lines=2,
                                         elem_id="loraq_grid_prompt", scale=3)
            with gr.Row():
                self.strengths = gr.Textbox(format_numbers(STRENGTHS), label="strengths (columns)",
                                            elem_id="loraq_grid_strengths")
                self.seeds = gr.Textbox(", ".join(map(str, SEEDS)), label="seeds (rows)", elem_id="loraq_grid_seeds")
                self.sampler = gr.Dropdown(["ddim", "lcm"], value="ddim", label="sampler", elem_id="loraq_grid_sampler")
                self.steps = gr.Number(20, label="sampling steps", precision=0, elem_id="loraq_grid_steps")
                self.cfg = gr.Number(7.0, label="CFG scale", elem_id="loraq_grid_cfg")
            with gr.Row():
                self.generate = gr.Button("Generate comparison grid", variant="primary", elem_id="loraq_grid_generate")
                self.morning = gr.Button("Morning sheet (checkpoints x strength x seed, held-out loss)",
                                         elem_id="loraq_morning_generate")
                self.group = gr.Checkbox(False, label="its whole sweep group", elem_id="loraq_morning_group")
            self.grid_status = gr.Markdown("", elem_id="loraq_grid_status")
            self.grid = gr.Image(label="comparison grid", type="pil", interactive=False, elem_id="loraq_grid")
            self.morning_status = gr.Markdown("", elem_id="loraq_morning_status")
            self.morning_image = gr.Image(label="morning sheet", type="pil", interactive=False, elem_id="loraq_morning")
        # one poll for what a training job adds: its previews, and its checkpoints to the grid's choices
        poll(blocks, self.gallery_tick, [selected, self.gallery_key], [self.gallery, self.checkpoint, self.gallery_key],
             GALLERY_EVERY_S)
        selected.change(self.choose, [selected],
                        [self.checkpoint, self.prompt, self.sampler, self.steps, self.cfg, self.grid,
                         self.grid_status, self.morning_image, self.morning_status, self.gallery, self.gallery_key],
                        **no_progress())
        self.generate.click(self.make_grid, [selected, self.checkpoint, self.prompt, self.strengths, self.seeds,
                                             self.sampler, self.steps, self.cfg], [self.grid, self.grid_status])
        self.morning.click(self.make_morning, [selected, self.strengths, self.seeds, self.group],
                           [self.morning_image, self.morning_status])

    # -- the selected job --------------------------------------------------------------------------

    def _row_and_job(self, selected):
        job_id = _job_id(selected)
        if job_id is None:
            return None, None
        try:
            row = self.queue.get(job_id)
            return row, row.job
        except (QueueError, jobs.JobError):
            return None, None

    def _relative(self, path) -> str:
        return relative(path, self.services.lora_dir, self.services.data_dir)

    def _files(self, row, job) -> list[str]:
        return [self._relative(p) for p in checkpoints(row.outputs, job, self.services.lora_dir)]

    def _absolute(self, name: str) -> str:
        p = Path(name)
        if p.is_absolute():
            return str(p)
        for root in (self.services.lora_dir, self.services.data_dir):
            if (Path(root) / p).is_file():
                return str(Path(root) / p)
        return str(Path(self.services.lora_dir) / p)

    def gallery_tick(self, selected, last_key):
        """The previews and LoRA files the selected job has now; nothing is sent while they are unchanged."""
        gr = _gradio()
        row, job = self._row_and_job(selected)
        if job is None:
            return ([] if last_key else gr.update()), gr.update(), None
        items = gallery_items(job, self.services.lora_dir, work_folder(self.queue, row.id))
        files = self._files(row, job)
        key = [row.id, files] + [[p, os.path.getmtime(p)] for p, _ in items if os.path.exists(p)]
        if key == last_key:
            return gr.update(), gr.update(), key
        # the choices only: what the user picked stays picked (a grid of no file takes the final LoRA)
        return items, gr.update(choices=files), key

    def choose(self, selected):
        """A newly selected job: its files and sampling in the grid's fields, the previous job's grid cleared."""
        gr = _gradio()
        row, job = self._row_and_job(selected)
        cleared = [None, "", None, ""]
        if job is None:
            return [gr.update(choices=[], value=[]), gr.update(), gr.update(), gr.update(), gr.update()] + cleared \
                + [[], None]
        files = self._files(row, job)
        sampler, steps, cfg = grid_defaults(job)
        gallery, _, key = self.gallery_tick(selected, None)
        return [gr.update(choices=files, value=files[:1]), gr.update(value=default_prompt(job)), gr.update(value=sampler),
                gr.update(value=steps), gr.update(value=cfg)] + cleared + [gallery, key]

    def make_grid(self, selected, chosen, prompt_text, strengths_text, seeds_text, sampler, steps, cfg):
        row, job = self._row_and_job(selected)
        chosen = [chosen] if isinstance(chosen, str) else list(chosen or [])
        if job is None:
            return None, "⚠ select a job first: click a row of the table"
        chosen = chosen or self._files(row, job)[:1]      # none picked: the final LoRA (or the latest save)
        if not chosen:
            return None, f"⚠ job {row.id} has no LoRA file yet: a grid needs its first save"
        try:
            prompts = parse_prompts(prompt_text)
            strengths = parse_strengths(strengths_text)
            seeds = parse_seeds(seeds_text)
            handle = self.services.handle_for(job)
            started = time.perf_counter()
            files = [self._absolute(name) for name in chosen]
            grid = strength_grid(handle, files, prompts, strengths, seeds, sampler=sampler or "ddim",
                                 steps=int(steps or 20), cfg=float(cfg if cfg is not None else 7.0),
                                 size=(job.resolution, job.resolution))
        except (ValueError, OSError, RuntimeError, QueueError, jobs.JobError) as e:
            return None, f"⚠ {getattr(e, 'message', e)}"
        out = Path(files[0]).with_name(Path(files[0]).stem + "_grid.png")
        grid.save(out)
        count = len(files) * len(prompts) * len(seeds) * len(strengths)
        return grid, (f"✔ {count} images ({len(files)} file(s) x {len(prompts) * len(seeds)} rows x {len(strengths)} "
                      f"strengths, {sampler} {int(steps or 20)} steps, CFG {float(cfg or 0):g}) in "
                      f"{time.perf_counter() - started:.1f} s; saved `{self._relative(out)}`; files: "
                      + ", ".join(f"`{self._relative(f)}`" for f in files))

    def make_morning(self, selected, strengths_text, seeds_text, whole_group=False):
        """The selected job's (or its sweep group's) morning sheet, saved beside its LoRA."""
        row, job = self._row_and_job(selected)
        if job is None:
            return None, "⚠ select a finished job first: click a row of the table"
        try:
            strengths, seeds = parse_strengths(strengths_text), parse_seeds(seeds_text)
            ids = self.queue.group_of(row.id) if whole_group else [row.id]
            started = time.perf_counter()
            result = morning.morning(self.queue, ids, self.services.handle_for, self.services.lora_dir,
                                     self.services.cache_dir, strengths, seeds)
        except (ValueError, OSError, RuntimeError, QueueError, jobs.JobError) as e:
            return None, f"⚠ {getattr(e, 'message', e)}"
        lines = "".join(f"\n- {line}" for line in result.summary().splitlines())
        return result.image, (f"✔ {len(result.sheets)} sheet(s) in {time.perf_counter() - started:.1f} s; saved "
                              f"`{self._relative(result.path)}`" + lines)
