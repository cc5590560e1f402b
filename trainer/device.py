"""Every device and dtype decision, in one place.

CPU (tests, CI) trains in fp32. CUDA users get fp16 autocast with a GradScaler or bf16 autocast;
frozen weights may be fp16/bf16 while the LoRA parameters stay fp32.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import sys

import torch

from trainer.jobs.vocabulary import MIXED_PRECISIONS, SAVE_PRECISIONS

#: The dtype of each precision name (the names are the vocabulary's SAVE_PRECISIONS).
SAVE_PRECISION: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
assert tuple(SAVE_PRECISION) == SAVE_PRECISIONS


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def effective_precision(mixed_precision: str, device: torch.device) -> str:
    """Mixed precision only where it helps: CUDA. On CPU everything is fp32."""
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed precision must be one of {', '.join(MIXED_PRECISIONS)}, got {mixed_precision!r}")
    if torch.device(device).type != "cuda":
        return "no"
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return mixed_precision


def autocast(mixed_precision: str, device: torch.device):
    """Autocast context for the forward pass (a no-op when fp32)."""
    precision = effective_precision(mixed_precision, device)
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(mixed_precision: str, device: torch.device):
    """A GradScaler for fp16 (disabled, i.e. pass-through, otherwise)."""
    enabled = effective_precision(mixed_precision, device) == "fp16"
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


def free_memory() -> None:
    """Release what a finished job held (between jobs, not between steps).

    A job's network, optimizer and caches are freed by reference counting when it returns (a test holds
    every mode to that), so only the young generations are collected: a full ``gc.collect()`` walks the
    WebUI's whole heap, 1.3-1.6 s per job inside A1111. Then the memory goes back to where it came from:
    CUDA's cache, and on Linux glibc's heap (CPU training keeps its freed arenas otherwise, +0.2 GB RSS)."""
    gc.collect(1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_c_heap()


def _trim_c_heap() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):      # musl or another libc: nothing to trim with
        pass
