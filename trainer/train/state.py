"""A run's resumable state as one ``.safetensors`` file: the tensors as tensors, everything else as JSON.

No pickle is written or read. A1111 replaces ``torch.load`` with a "safe" unpickler that rejects what
current torch writes, so a pickled state made resume fail inside the WebUI; safetensors has no code to run.
The nested state (optimizer state keyed by ints, RNG tuples, floats such as inf) goes through
:func:`encode` / :func:`decode`, which keep every type the loop puts in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from trainer.paths import write_atomic

FORMAT = "lora-queue-state/1"
_META_KEY = "lq_state"


class StateError(RuntimeError):
    """A saved state that cannot be read; the message names the file and what to do."""


def encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of ``value``; its tensors move into ``tensors`` under generated names."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: encode(v, tensors) for k, v in value.items()}}
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a training state")


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(decode(v, tensors) for v in value["__tuple__"])
        if "__items__" in value:
            return {decode(k, tensors): decode(v, tensors) for k, v in value["__items__"]}
        return {k: decode(v, tensors) for k, v in value["__dict__"].items()}
    return value


def write_state(path: Path, state: dict) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    document = json.dumps({"format": FORMAT, "state": encode(state, tensors)})
    return write_atomic(path, save(tensors, metadata={_META_KEY: document}))


def read_state(path: Path) -> dict:
    """The state :func:`write_state` wrote; StateError naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no saved state at {path}: the job has nothing to resume from; retry it to start again")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
        document = json.loads(metadata[_META_KEY])
        if document.get("format") != FORMAT:
            raise ValueError(f"unknown format {document.get('format')!r}")
        return decode(document["state"], tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise StateError(f"the saved state {path} is damaged ({type(e).__name__}: {e}); "
                         "retry the job to start again from step 0") from None
