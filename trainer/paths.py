"""Where LoRA Queue keeps its files when the caller does not say (standalone and CLI), and the one way
it writes a file: atomically, so a crash never leaves a half-written file under its real name."""
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


def write_atomic(path: str | Path, blob: bytes) -> Path:
    """Write ``blob`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
