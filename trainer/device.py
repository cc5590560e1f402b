"""Every device and dtype decision, in one place.

CPU (tests, CI) trains in fp32. CUDA users get fp16 autocast with a GradScaler or bf16 autocast;
frozen weights may be fp16/bf16 while the LoRA parameters stay fp32.
"""
from __future__ import annotations

import contextlib
import gc

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
    """Release what a finished job held (between jobs, not between steps)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
