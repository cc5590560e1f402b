"""What the UI needs from its host: the WebUI and the standalone app each build one :class:`UiServices`.

The UI never loads a model or opens a store by itself: the host decides which model a job trains
on (``handle_for``: the WebUI's loaded model, or the standalone app's ``--model``), where LoRAs and
the data folder live, and whether a worker runs in this process. The lock that keeps generation and
training apart is the handle's own (``ModelHandle.lock()``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainer import paths
from trainer import jobs
from trainer.models.handle import ModelHandle
from trainer.train.context import JobContext
from trainer.queue.admission import Admission
from trainer.queue.store import JobQueue, JobRow
from trainer.models.loading import ModelCache
from trainer.queue.worker import Worker


@dataclass
class UiServices:
    queue: JobQueue
    handle_for: Callable[[jobs.Job], ModelHandle]   # the model a job trains on and its results render with
    lora_dir: Path                                   # where jobs write by default (and merges)
    data_dir: Path                                   # presets, uploads
    cache_dir: Path                                  # latent cache
    worker: Worker | None = None                     # None when the host runs the worker elsewhere
    model_label: str = ""                            # shown in the header: which model jobs train on
    root: Path = field(default_factory=Path.cwd)     # relative paths in a job are taken from here
    lora_written: Callable[[Path], None] = lambda path: None   # a merge wrote a LoRA (the WebUI re-lists them)
    #: Folders a job may read from (the WebUI's settings; uploads and the data folder always); None: anywhere.
    input_roots: tuple[Path, ...] | None = None
    #: (arch, cross-attention width) of the model jobs train, when the host knows it without loading anything.
    model_facts: Callable[[], tuple[str | None, int | None]] = lambda: (None, None)
    #: The WebUI: the checkpoint a job queued without one names (the one loaded when it is queued); the
    #: worker loads it when the job's turn comes. "" (standalone): the job keeps its own model field.
    default_model: Callable[[], str] = lambda: ""
    #: The folder of every LoRA the host knows (the WebUI's LoRA folder, downloads included), which the merge
    #: panel lists; None: ``lora_dir``.
    lora_library: Path | None = None
    #: Values a fresh form starts with on this host (the demo model: its 64 px resolution, not 512).
    form_start: dict = field(default_factory=dict)
    #: The WebUI on CUDA: (GPU bytes free beyond the loaded model, bytes per weight of the model); None: no check.
    gpu_memory: Callable[[], tuple[int, int] | None] = lambda: None
    #: The single-file checkpoint of the loaded model ("" when there is none: the demo model, a diffusers
    #: folder): the LoRA tools' default base for bake and extract.
    base_checkpoint: Callable[[], str] = lambda: ""

    @property
    def checkpoint_dir(self) -> Path:
        """Where the LoRA tools write baked checkpoints: beside the loaded one (the WebUI's checkpoint folder),
        else the data folder's ``checkpoints``."""
        base = self.base_checkpoint()
        return Path(base).parent if base else self.data_dir / "checkpoints"

    def loaded_model(self) -> ModelHandle:
        """The model the host has loaded (the WebUI's, or the standalone app's ``--model``), for previews."""
        return self.handle_for(None)

    @property
    def library(self) -> Path:
        return self.lora_library or self.lora_dir

    def admission(self) -> Admission:
        """What a job queued from the tab is checked against (see :mod:`trainer.queue.admission`)."""
        roots = None if self.input_roots is None else tuple(dict.fromkeys((*self.input_roots, self.data_dir)))
        arch, context_dim = self.model_facts()
        gpu = self.gpu_memory()
        return Admission(self.lora_dir, roots, arch, context_dim, model_given=True,
                         gpu_free=gpu[0] if gpu else None, gpu_weight_bytes=gpu[1] if gpu else 2)

    @property
    def presets_dir(self) -> Path:
        return self.data_dir / "presets"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    def job_context(self, row: JobRow) -> JobContext:
        return JobContext(output_dir=self.lora_dir, cache_dir=self.cache_dir)

    def keep_upload(self, path: str) -> str:
        """Copy an uploaded file (gradio's temp folder may be emptied) into the data folder, named by content."""
        source = Path(path)
        if self.uploads_dir in source.parents:
            return str(source)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        target = self.uploads_dir / f"{digest}_{source.name}"
        if not target.exists():
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        return str(target)


#: The demo model draws at 64 px: at the 512 px default a job would take hours on a CPU.
DEMO_FORM = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}


def standalone_services(model: str = "demo", data_dir: str | os.PathLike | None = None,
                        lora_dir: str | os.PathLike | None = None, start_worker: bool = True) -> UiServices:
    """The standalone app's services: a store in the data folder, every job on ``model``, a worker thread."""
    data = Path(data_dir) if data_dir is not None else paths.data_dir()
    queue = JobQueue(data / "queue.sqlite")
    models = _one_at_a_time(ModelCache(override=model))
    services = UiServices(queue=queue, handle_for=models, lora_dir=Path(lora_dir) if lora_dir else data / "loras",
                          data_dir=data, cache_dir=data / "cache", model_label=model,
                          form_start=DEMO_FORM if model == "demo" else {},
                          base_checkpoint=lambda: str(Path(model).resolve()) if model.endswith(".safetensors") else "")
    services.lora_dir.mkdir(parents=True, exist_ok=True)
    if start_worker:
        services.worker = Worker(queue, models, services.job_context)
        services.worker.start()
    return services


def _one_at_a_time(provider: Callable[[jobs.Job], ModelHandle]) -> Callable[[jobs.Job], ModelHandle]:
    """The worker and the results panel may ask at once: load a model only once."""
    lock = threading.Lock()

    def handle_for(job: jobs.Job) -> ModelHandle:
        with lock:
            return provider(job)
    return handle_for
