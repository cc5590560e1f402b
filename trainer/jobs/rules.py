"""Rules across fields: checks that need several values at once (errors and warnings)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from trainer.jobs.fields import _fmt

Finding = tuple[str, str]     # (field, message)


@dataclass(frozen=True)
class _Rule:
    needs: tuple[str, ...]
    warning: bool
    check: Callable[[Mapping[str, Any]], Finding | None]


_RULES: list[_Rule] = []


def _rule(*needs: str, warning: bool = False):
    """Register a check that runs when every field in ``needs`` is present and individually valid."""
    def register(check):
        _RULES.append(_Rule(needs, warning, check))
        return check
    return register


@_rule("timestep_min", "timestep_max")
def _timestep_range_not_empty(v):
    if v["timestep_min"] >= v["timestep_max"]:
        return "timestep_min", (f"lowest timestep ({v['timestep_min']}) must be below the highest "
                                f"({v['timestep_max']}); timesteps are drawn from [min, max)")


@_rule("network_dim", "network_alpha", warning=True)
def _alpha_far_above_dim(v):
    if v["network_alpha"] > 4 * v["network_dim"]:
        scale = v["network_alpha"] / v["network_dim"]
        return "network_alpha", (f"alpha {_fmt(v['network_alpha'])} is more than 4x the rank {v['network_dim']} "
                                 f"(scale {_fmt(scale)}): steps are {_fmt(scale)}x those of alpha = rank; "
                                 "lower alpha or the learning rate if training burns")


@_rule("conv_dim", "conv_alpha", warning=True)
def _conv_alpha_far_above_conv_dim(v):
    if v["conv_dim"] and v["conv_alpha"] > 4 * v["conv_dim"]:
        return "conv_alpha", (f"conv alpha {_fmt(v['conv_alpha'])} is more than 4x the conv rank "
                              f"{v['conv_dim']}; usual is 1 to conv_dim")


@_rule("conv_dim", "target_set")
def _conv_dim_needs_resnets(v):
    if v["conv_dim"] and v["target_set"] != "all":
        return "conv_dim", (f"conv rank {v['conv_dim']} trains the ResNet convolutions, which only target set "
                            f"'all' includes (got {v['target_set']!r}); choose 'all' or set conv rank to 0")


@_rule("lr_warmup_steps", "steps")
def _warmup_shorter_than_training(v):
    if v["lr_warmup_steps"] >= v["steps"]:
        return "lr_warmup_steps", (f"warm-up ({v['lr_warmup_steps']} steps) must be shorter than the "
                                   f"training ({v['steps']} steps)")


@_rule("lr_warmup_steps", "lr_scheduler", warning=True)
def _constant_ignores_warmup(v):
    if v["lr_warmup_steps"] and v["lr_scheduler"] == "constant":
        return "lr_warmup_steps", "the constant schedule has no warm-up; choose constant_with_warmup to use it"


@_rule("optimizer", "lr", warning=True)
def _prodigy_wants_lr_one(v):
    if v["optimizer"] == "Prodigy" and v["lr"] < 0.1:
        return "lr", f"Prodigy finds the step size itself and expects lr around 1.0 (got {_fmt(v['lr'])})"


@_rule("min_bucket_reso", "max_bucket_reso")
def _bucket_range_not_empty(v):
    if v["min_bucket_reso"] > v["max_bucket_reso"]:
        return "min_bucket_reso", (f"smallest bucket side ({v['min_bucket_reso']}) must not exceed the largest "
                                   f"({v['max_bucket_reso']})")


@_rule("resolution", "max_bucket_reso", "enable_buckets")
def _resolution_fits_buckets(v):
    if v["enable_buckets"] and v["resolution"] > v["max_bucket_reso"]:
        return "max_bucket_reso", (f"largest bucket side ({v['max_bucket_reso']}) must be at least the "
                                   f"resolution ({v['resolution']})")


@_rule("train_text_encoder", "blocks")
def _text_encoder_block_selected(v):
    if v["train_text_encoder"] and v["blocks"] and "BASE" not in v["blocks"]:
        return "blocks", ("train text encoder is on but blocks leaves out BASE (the text encoder); "
                          "add BASE or turn train text encoder off")


@_rule("guidance_scale", "guidance_scale_max")
def _guidance_range_not_reversed(v):
    if v["guidance_scale_max"] and v["guidance_scale_max"] < v["guidance_scale"]:
        return "guidance_scale_max", (f"guidance w (max) {_fmt(v['guidance_scale_max'])} is below guidance w "
                                      f"{_fmt(v['guidance_scale'])}; raise it or set 0 for a fixed w")


@_rule("source_prompt", "target_prompt")
def _slider_prompts_differ(v):
    if v["source_prompt"].strip() and v["source_prompt"].strip() == v["target_prompt"].strip():
        return "target_prompt", (f"target prompt is the source prompt ({v['source_prompt'].strip()!r}): the slider "
                                 "would learn no change; write what strength 1 should turn it into, or leave it "
                                 "empty to erase the concept")


def check_rules(values: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(errors, warnings) of the cross-field rules over individually valid ``values``."""
    errors: dict[str, str] = {}
    warnings: dict[str, str] = {}
    for rule in _RULES:
        if all(name in values for name in rule.needs):
            found = rule.check(values)
            if found:
                (warnings if rule.warning else errors).setdefault(found[0], found[1])
    return errors, warnings

