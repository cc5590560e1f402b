"""What LoRA Queue needs from a running WebUI, built from objects the glue passes in.

``scripts/lora_queue.py`` imports the WebUI's ``modules`` and hands the pieces over; this file never
imports them, so it is tested with stand-ins. One ``WebUIHost`` per process: the worker starts once
(UI reloads call ``start`` again and nothing happens), and jobs train on whatever model the WebUI has
loaded when the job starts.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer import jobs
from trainer.models.handle import ModelError, ModelHandle
from trainer.train.context import JobContext
from trainer.queue.store import JobQueue, QueueEvent
from trainer.queue.worker import Worker
from trainer.ui.services import UiServices


@dataclass
class WebUIHost:
    get_sd_model: Callable[[], Any]      # returns shared.sd_model (the model loaded right now)
    queue_lock: Any                      # modules.call_queue.queue_lock (non-reentrant)
    lora_dir: Path                       # the WebUI's LoRA folder (--lora-dir)
    data_dir: Path                       # our data folder (queue, presets, uploads)
    refresh_loras: Callable[[], None] = lambda: None   # re-list the WebUI's LoRAs after a job
    output_subdir: str = ""              # default output folder inside the LoRA folder
    forge_load_model_gpu: Callable[[Any], None] | None = None   # Forge: backend.memory_management.load_model_gpu
    resume_interrupted: bool = False     # at start, resume jobs a crash or kill of the WebUI interrupted
    #: Forge: ``modules.sd_models.forge_model_reload``. Forge loads the checkpoint at the first generation; until
    #: then ``shared.sd_model`` is a placeholder (``FakeInitialModel``) and a job loads the model through this.
    load_model: Callable[[], Any] | None = None
    #: Folders a job queued from the tab may read (the WebUI's models folder, our data folder, the settings'
    #: additions); None: anywhere.
    input_roots: tuple[Path, ...] | None = None
    #: The WebUI's own checkpoint switch (the glue's, through A1111's setting or Forge's checkpoint_change):
    #: ``switch_checkpoint(name)`` loads the named checkpoint and returns (from, to) titles, or None when it is
    #: already loaded; raises ModelError for a name the WebUI does not know. None: jobs train on what is loaded.
    switch_checkpoint: Callable[[str], tuple[str, str] | None] | None = None
    #: The title of the checkpoint loaded now ("" when none): what a job queued from the tab names by default.
    loaded_checkpoint: Callable[[], str] = lambda: ""
    _worker: Worker | None = field(default=None, init=False, repr=False)
    _handles: dict = field(default_factory=dict, init=False, repr=False)
    _start_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def output_dir(self) -> Path:
        return self.lora_dir / self.output_subdir if self.output_subdir else self.lora_dir

    def handle_for(self, job: jobs.Job | None = None) -> ModelHandle:
        """The loaded model as a ModelHandle (Forge's or A1111's); one handle per loaded model object.

        A job that names a checkpoint gets it: when another one is loaded, the WebUI is switched to it first,
        through its own model loading (the WebUI's checkpoint choice changes with it, as with traintrain)."""
        if job is not None:
            self.ensure_checkpoint(job)
        sd_model = self.get_sd_model()
        if self.load_model is not None and _is_placeholder(sd_model):
            with self.queue_lock:                 # Forge's own loading, as its first generation does it
                self.load_model()
            sd_model = self.get_sd_model()
        if sd_model is None or _is_placeholder(sd_model):
            raise ModelError("no model is loaded in the WebUI: choose a checkpoint at the top of the page")
        handle = self._handles.get(id(sd_model))
        if handle is None or handle.sd_model is not sd_model:
            if hasattr(sd_model, "forge_objects"):
                from trainer.models.forge_model import ForgeHandle
                handle = ForgeHandle(sd_model, lock=self.queue_lock, load_model_gpu=self.forge_load_model_gpu)
            else:
                from trainer.models.webui_model import WebUIHandle
                handle = WebUIHandle(sd_model, lock=self.queue_lock)
            self._handles = {id(sd_model): handle}  # keep no stale model alive
        return handle

    def ensure_checkpoint(self, job: jobs.Job) -> None:
        """Load the job's checkpoint when another one is loaded, and say so with the job."""
        wanted = getattr(job, "model", "")
        if not wanted or wanted == "demo" or self.switch_checkpoint is None:
            return
        switched = self.switch_checkpoint(wanted)
        if switched and self._worker is not None and self._worker.current is not None:
            self._worker.queue.add_warning(self._worker.current, f"the WebUI's checkpoint was switched from "
                                           f"{switched[0]} to {switched[1]} for this job (and stays so)")

    def job_context(self, row) -> JobContext:
        return JobContext(output_dir=self.output_dir, cache_dir=self.data_dir / "cache")

    def services(self) -> UiServices:
        self.start()
        label = getattr(self.get_sd_model(), "sd_checkpoint_info", None)
        return UiServices(queue=self._worker.queue, handle_for=self.handle_for, lora_dir=self.output_dir,
                          data_dir=self.data_dir, cache_dir=self.data_dir / "cache", worker=self._worker,
                          model_label=getattr(label, "name", "") or "the WebUI's loaded model",
                          lora_written=lambda path: self.refresh_loras(), input_roots=self.input_roots,
                          model_facts=self.model_facts, default_model=self.loaded_checkpoint,
                          lora_library=self.lora_dir, base_checkpoint=self.loaded_checkpoint_file,
                          gpu_memory=self.gpu_memory)

    def loaded_checkpoint_file(self) -> str:
        """The file of the loaded checkpoint ("" before one is loaded): the LoRA tools' default base."""
        info = getattr(self.get_sd_model(), "sd_checkpoint_info", None)
        return str(getattr(info, "filename", "") or "")

    def gpu_memory(self) -> tuple[int, int] | None:
        """(GPU bytes a job may still take, bytes per weight of the loaded model), or None without CUDA.

        Free is the driver's free memory plus what torch's cache holds unused in this process (the WebUI's
        own generations leave some there, and our job allocates from the same cache)."""
        import torch

        sd_model = self.get_sd_model()
        if not torch.cuda.is_available() or sd_model is None or _is_placeholder(sd_model):
            return None
        free, _ = torch.cuda.mem_get_info()
        free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        weight = next((p for p in sd_model.parameters()), None) if hasattr(sd_model, "parameters") else None
        return free, (weight.element_size() if weight is not None else 2)

    def model_facts(self) -> tuple[str | None, int | None]:
        """(arch, cross-attention width) of the loaded model from its flags, without loading anything
        (Forge before its first generation: unknown)."""
        sd_model = self.get_sd_model()
        if sd_model is None or _is_placeholder(sd_model):
            return None, None
        for flag, arch, width in (("is_sdxl", "sdxl", 2048), ("is_sd2", "sd2", 1024), ("is_sd1", "sd1", 768)):
            if getattr(sd_model, flag, False) is True:
                return arch, width
        return None, None

    def start(self) -> Worker:
        """Start the worker once per process (idempotent across UI reloads)."""
        with self._start_lock:
            if self._worker is None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                queue = JobQueue(self.data_dir / "queue.sqlite")
                if self.resume_interrupted:
                    queue.resume_interrupted()
                worker = Worker(queue, self.handle_for, self.job_context)
                worker.subscribe(self._on_event)
                worker.start()
                self._worker = worker
        return self._worker

    def _on_event(self, event: QueueEvent) -> None:
        if event.kind == "state" and event.state in ("done", "stopped"):   # a stopped job saved its LoRA too
            self.refresh_loras()

    def list_loras(self) -> list[str]:
        """Names for the x/y/z LoRA axis: our outputs (final files and checkpoints), newest first."""
        files = sorted(self.output_dir.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.stem for p in files]

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


def _is_placeholder(sd_model) -> bool:
    """Forge's stand-in before the first load (``modules.sd_models.FakeInitialModel``)."""
    return sd_model is not None and type(sd_model).__name__ == "FakeInitialModel"
