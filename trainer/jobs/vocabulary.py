"""The words jobs are made of: modes, scopes, choices. Plain data, no torch, imported by every layer.

Each choice list is a ``Literal`` type (for type checkers) and the tuple of its values (for validation,
forms and docs), written once here; the models, the optimizer factory and the device code import them.
"""
from __future__ import annotations

from enum import Enum
from typing import Literal, get_args

Mode = Literal["standard", "copier", "lcm", "addift", "ileco"]
Scope = Literal["standard", "copier", "lcm", "addift", "ileco", "copier_pass", "difference_pass"]
TargetSet = Literal["attn", "attn_mlp", "all"]
OptimizerName = Literal["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGD"]
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
MixedPrecision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["fp32", "fp16", "bf16"]
PredictionChoice = Literal["auto", "eps", "v"]
Prediction = Literal["eps", "v"]
LossType = Literal["huber", "l2"]
#: What a mask does outside its region (copier pass 2, ADDifT): trained toward no change, or not trained.
OutsideMask = Literal["keep", "ignore"]
Arch = Literal["sd1", "sd2", "sdxl"]

MODES: tuple[Mode, ...] = get_args(Mode)
#: Where a field's value lives: the job modes plus the copier's two passes.
SCOPES: tuple[Scope, ...] = get_args(Scope)
TARGET_SETS: tuple[TargetSet, ...] = get_args(TargetSet)
OPTIMIZERS: tuple[OptimizerName, ...] = get_args(OptimizerName)
LR_SCHEDULES: tuple[LrSchedule, ...] = get_args(LrSchedule)
MIXED_PRECISIONS: tuple[MixedPrecision, ...] = get_args(MixedPrecision)
SAVE_PRECISIONS: tuple[SavePrecision, ...] = get_args(SavePrecision)
PREDICTIONS: tuple[PredictionChoice, ...] = get_args(PredictionChoice)
LOSS_TYPES: tuple[LossType, ...] = get_args(LossType)
OUTSIDE_MASK: tuple[OutsideMask, ...] = get_args(OutsideMask)

#: The 26 block slots of the LoRA Block Weight convention.
BLOCK_IDS: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)

#: The two LCM samplers of previews and sheets: plain LCM, and the "LCM alternative" (first steps re-noised
#: with the noise the model removed).
LcmSampler = Literal["lcm", "lcm_alternative"]
#: kohya key prefixes: the UNet, SD1/SD2's text encoder, SDXL's two text encoders.
KeyPrefix = Literal["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"]


class Phase(str, Enum):
    """What part of a job a progress event belongs to (stored as its text; "" for one-pass jobs)."""

    WHOLE = ""
    COPIER_PASS = "pass 1 of 2"
    DIFFERENCE_PASS = "pass 2 of 2"
    COMPARISON_SHEET = "comparison sheet"   # after the last step: the LCM job's sheet (minutes on a CPU)
    PREVIEW = "preview"                     # a preview renders (at its steps, the saves and the end; minutes on a CPU)

    def __str__(self) -> str:
        return self.value
