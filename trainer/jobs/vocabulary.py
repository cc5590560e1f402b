"""The words jobs are made of: modes, scopes, choices. Plain data, no torch, imported by every layer.

Each choice list is a ``Literal`` type (for type checkers) and the tuple of its values (for validation,
forms and docs), written once here; the models, the optimizer factory and the device code import them.
"""
from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["standard", "copier", "lcm"]
Scope = Literal["standard", "copier", "lcm", "copier_pass", "difference_pass"]
TargetSet = Literal["attn", "attn_mlp", "all"]
OptimizerName = Literal["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGD"]
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
MixedPrecision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["fp32", "fp16", "bf16"]
PredictionChoice = Literal["auto", "eps", "v"]
Prediction = Literal["eps", "v"]
LossType = Literal["huber", "l2"]
Arch = Literal["sd1", "sd2", "sdxl"]

MODES: tuple[Mode, ...] = get_args(Mode)
#: Where a field's value lives: the three job modes plus the copier's two passes.
SCOPES: tuple[Scope, ...] = get_args(Scope)
TARGET_SETS: tuple[TargetSet, ...] = get_args(TargetSet)
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)
MIXED_PRECISIONS: tuple[MixedPrecision, ...] = get_args(MixedPrecision)
SAVE_PRECISIONS: tuple[SavePrecision, ...] = get_args(SavePrecision)
PREDICTIONS: tuple[PredictionChoice, ...] = get_args(PredictionChoice)
LOSS_TYPES: tuple[LossType, ...] = get_args(LossType)
ARCHES: tuple[Arch, ...] = get_args(Arch)

#: The 26 block slots of the LoRA Block Weight convention.
BLOCK_IDS: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)
