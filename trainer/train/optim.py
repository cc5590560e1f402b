"""Optimizers and learning-rate schedules by name.

The schedules are our own pure functions with the formulas of ``diffusers.optimization`` (a test checks
they agree), because the WebUI's environment may carry an old diffusers or none.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from trainer.jobs.vocabulary import LR_SCHEDULES, OPTIMIZERS


class OptimizerError(ValueError):
    """Unknown or unavailable optimizer / schedule; the message says what to choose instead."""

    def __init__(self, message: str, field: str = "optimizer"):
        super().__init__(message)
        self.field = field


def make_optimizer(name: str, param_groups: list[dict], lr: float, args: dict[str, Any] | None = None,
                   device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """``param_groups`` as torch expects (each may carry its own ``lr``); ``args`` are extra keyword arguments."""
    args = dict(args or {})
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, **{"weight_decay": 0.01, **args})
    if name == "AdamW8bit":
        if torch.device(device).type != "cuda":
            raise OptimizerError("AdamW8bit needs a CUDA GPU (bitsandbytes); on this machine choose AdamW")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise OptimizerError("AdamW8bit needs the bitsandbytes package: pip install bitsandbytes, "
                                 "or choose AdamW") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr, **{"weight_decay": 0.01, **args})
    if name == "Lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise OptimizerError("Lion needs the lion-pytorch package: pip install lion-pytorch") from None
        return Lion(param_groups, lr=lr, **{"weight_decay": 0.01, **args})
    if name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerError("Prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy(param_groups, lr=lr, **{"weight_decay": 0.01, "safeguard_warmup": True,
                                               "use_bias_correction": True, **args})
    if name == "Adafactor":
        from transformers.optimization import Adafactor
        # kohya's setting for a fixed learning rate: no relative step, no parameter scaling.
        return Adafactor(param_groups, lr=lr, **{"relative_step": False, "scale_parameter": False,
                                                 "warmup_init": False, **args})
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, **{"momentum": 0.9, **args})
    raise OptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def check_optimizer(name: str, lr: float, args: dict[str, Any] | None) -> None:
    """Build the optimizer on a tiny parameter and take one step: refuses, when a job is queued, the
    arguments it would refuse hours later (unknown keywords, a text where a number goes, a tuple's shape)."""
    param = torch.nn.Parameter(torch.zeros(2, 2))
    try:
        optimizer = make_optimizer(name, [{"params": [param]}], lr, args)
        param.grad = torch.full_like(param, 1e-3)
        optimizer.step()
    except OptimizerError:
        raise
    except Exception as e:  # each optimizer reports bad arguments in its own way (TypeError, ValueError, ...)
        given = " ".join(f"{k}={v}" for k, v in (args or {}).items())
        raise OptimizerError(f"{name} does not accept the optimizer arguments '{given}': {e}",
                             field="optimizer_args") from None


# -- schedules: multiplier of the base lr at a step ---------------------------------------------------

def constant(step: int, warmup: int, total: int) -> float:
    return 1.0


def constant_with_warmup(step: int, warmup: int, total: int) -> float:
    return step / max(1, warmup) if step < warmup else 1.0


def linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def cosine(step: int, warmup: int, total: int, cycles: float = 0.5) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))


def cosine_with_restarts(step: int, warmup: int, total: int, cycles: int = 1) -> float:
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def polynomial(step: int, warmup: int, total: int, power: float = 1.0, lr_end_ratio: float = 1e-3) -> float:
    """Polynomial decay with ``power`` down to ``lr_end_ratio`` times the base lr."""
    if step < warmup:
        return step / max(1, warmup)
    if step > total:
        return lr_end_ratio
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return (1 - lr_end_ratio) * remaining ** power + lr_end_ratio


def schedule_fn(name: str, warmup: int, total: int, cycles: int = 1, power: float = 1.0,
                base_lr: float = 1e-4) -> Callable[[int], float]:
    """lr multiplier as a function of the optimizer step."""
    if name not in LR_SCHEDULES:
        raise OptimizerError(f"unknown lr schedule {name!r}; choose one of {', '.join(LR_SCHEDULES)}", "lr_scheduler")
    if name == "constant":
        return lambda s: 1.0
    if name == "cosine_with_restarts":
        return lambda s: cosine_with_restarts(s, warmup, total, cycles)
    if name == "polynomial":
        lr_end_ratio = min(1.0, 1e-7 / base_lr)  # diffusers decays to an absolute 1e-7
        return lambda s: polynomial(s, warmup, total, power, lr_end_ratio)
    fn = {"constant_with_warmup": constant_with_warmup, "linear": linear, "cosine": cosine}[name]
    return lambda s: fn(s, warmup, total)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total: int, cycles: int = 1,
                   power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    base_lr = max(g["lr"] for g in optimizer.param_groups)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(name, warmup, total, cycles, power, base_lr))
