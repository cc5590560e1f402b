"""Loading a model by name for the commands and the standalone app, keeping the last one loaded."""
from __future__ import annotations

from trainer import jobs
from trainer.device import free_memory
from trainer.models.diffusers_model import load_handle
from trainer.models.handle import ModelHandle


class ModelCache:
    """A handle provider for the CLI: loads ``override`` or the job's model, keeping the last one loaded."""

    def __init__(self, override: str | None = None):
        self.override = override
        self._key: str | None = None
        self._handle: ModelHandle | None = None

    def __call__(self, job: jobs.Job) -> ModelHandle:

        model = self.override or job.model
        if not model:
            raise jobs.JobError("no model: set \"model\" in the job or run the queue with --model demo|PATH",
                                field="model")
        if model != self._key:
            self._handle, self._key = None, None
            free_memory()
            self._handle, self._key = load_handle(model), model
        return self._handle
