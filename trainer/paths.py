"""Where LoRA Queue keeps its files when the caller does not say (standalone and CLI)."""
from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """``$LORAQ_HOME`` or ``~/.lora_queue``: queue database, latent cache, default outputs."""
    return Path(os.environ.get("LORAQ_HOME", Path.home() / ".lora_queue")).expanduser()


def default_output_dir() -> Path:
    return data_dir() / "outputs"


def cache_dir() -> Path:
    return data_dir() / "cache"
