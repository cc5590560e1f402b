"""Where LoRA Queue keeps its files when the caller does not say (standalone and CLI), and the one way
it writes a file: atomically, so a crash never leaves a half-written file under its real name."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator


def data_dir() -> Path:
    """``$LORAQ_HOME`` or ``~/.lora_queue``: queue database, latent cache, default outputs."""
    return Path(os.environ.get("LORAQ_HOME", Path.home() / ".lora_queue")).expanduser()


def default_output_dir() -> Path:
    return data_dir() / "outputs"


def cache_dir() -> Path:
    return data_dir() / "cache"


def output_folder(output_root: str | Path, output_dir: str) -> Path:
    """The folder a job writes to, ``output_dir`` below ``output_root``; raises ValueError when a link
    (or anything the field check let through) leads outside the root."""
    root = Path(output_root)
    if not output_dir:
        return root
    target = root / output_dir
    real_root, real = root.resolve(), target.resolve()
    if os.path.isabs(output_dir) or (real != real_root and real_root not in real.parents):
        raise ValueError(f"output folder '{output_dir}' leads outside {root}; choose a folder inside it")
    return target


def inside_any(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether ``path`` lies in one of ``roots``, judged by its path as given (``..`` resolved, links not) or by
    where its links lead. Inputs only: a link inside an allowed folder was made by whoever owns the machine (the
    tab cannot make one), and the WebUIs load linked checkpoints and LoRAs from their folders the same way."""
    given, real = Path(os.path.abspath(path)), Path(path).resolve()
    for root in roots:
        for candidate, base in ((given, Path(os.path.abspath(root))), (real, Path(root).resolve())):
            if candidate == base or base in candidate.parents:
                return True
    return False


def write_atomic(path: str | Path, blob: bytes) -> Path:
    """Write ``blob`` to ``path`` through a temporary file in the same folder."""
    with atomic_writer(path) as f:
        f.write(blob)
    return Path(path)


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A file to write ``path`` piece by piece (a checkpoint too large to hold twice): it appears under its name
    only complete, through a temporary file in the same folder, and nothing is left when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` lives on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what :func:`write_atomic` left under ``folder`` when its process was killed mid-write
    (``.NAME.PID.tmp`` whose process is gone); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for tmp in folder.rglob(".*.tmp"):
        pid = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
