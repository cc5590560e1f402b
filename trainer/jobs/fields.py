"""Job fields: every training parameter declared once (:data:`FIELDS`), with its checks.

A :class:`Field` declares one parameter: type, default (per scope), range or choices, help text, group,
the modes that use it, UI hint and kohya's name. Everything else is derived from it: the typed job
classes (``job_types.py``, generated), validation, JSON, the tab's form, ``docs/parameters.md`` and
the ``ss_*`` metadata names.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from trainer.jobs.vocabulary import (
    BLOCK_IDS, LOSS_TYPES, LR_SCHEDULES, MIXED_PRECISIONS, MODES, OPTIMIZERS, OUTSIDE_MASK, PREDICTIONS,
    SAVE_PRECISIONS, SCOPES, TARGET_SETS,
)

_SCOPE_PARENT = {"copier_pass": "copier", "difference_pass": "copier_pass"}

#: Groups in display order (UI sections, sections of docs/parameters.md).
GROUPS = {
    "saving": "Output", "model": "Model", "network": "Network", "data": "Data", "training": "Training",
    "copier": "Image pair (copier, ADDifT)", "pass2": "Copier pass 2", "lcm": "LCM distillation",
    "addift": "ADDifT", "ileco": "iLECO (slider from prompts)", "preview": "Previews",
}


class JobError(Exception):
    """A job a user must fix before it can run.

    ``errors`` maps each offending field to a message (``copier_pass.lr`` inside a copier pass);
    ``field`` is the first of them, or None when the problem is the document as a whole.
    """

    def __init__(self, message: str | None = None, field: str | None = None,
                 errors: Mapping[str, str] | None = None):
        errors = dict(errors or {})
        if field is not None and message is not None and not errors:
            errors[field] = message
        if field is None and errors:
            field = next(iter(errors))
        if message is None:
            message = "; ".join(f"{name}: {text}" for name, text in errors.items()) or "invalid job"
        super().__init__(message)
        self.message, self.field, self.errors = message, field, errors


# ---------------------------------------------------------------------------------------------
# Field: one parameter's declaration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Field:
    """One job parameter. Everything about it that anything else needs is here."""

    name: str
    type: Any                                 # int, float, str, bool or list[str]
    default: Any
    label: str                                # short name for UI labels and error messages
    help: str                                 # what it does, units, typical values
    group: str                                # a key of GROUPS
    modes: tuple[str, ...] = MODES
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False               # value > min instead of value >= min
    max_exclusive: bool = False
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None    # of the value, or of each item of a list[str]
    check: Callable[[Any], str | None] | None = None   # extra rule: returns a message or None
    path: str = ""                            # "" | "dir" | "file" | "model" | "output_dir" (empty value = not set)
    required_in: tuple[str, ...] = ()         # modes in which a path must be set (see validate_paths)
    in_copier: str = "job"                    # "job" | "passes" (set per pass) | "difference_pass"
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # scope -> default
    kohya: str = ""                           # kohya sd-scripts' name for it, where different
    metadata: str | bool = False              # written to a LoRA as ss_<kohya or name> (True) or this ss_* key
    ui: str = ""                              # "slider" | "folder" | "file" | "image" | "lines" | "checkboxes"
    advanced: bool = False                    # UI: shown under "advanced"
    essential: bool = False                   # UI: at the top of the form (what a job needs, what people change)

    def default_for(self, scope: str) -> Any:
        """The default in a scope (a mode or a copier pass); pass 2 falls back to pass 1, then copier."""
        s: str | None = scope
        while s is not None:
            if s in self.defaults:
                return _copy(self.defaults[s])
            s = _SCOPE_PARENT.get(s)
        return _copy(self.default)

    def validate(self, value: Any) -> Any:
        """The value in its canonical type, or ValueError with a message a user can act on."""
        value = _coerce(self, value)
        items = value if self.type == list[str] else [value]
        if self.choices is not None:
            for item in items:
                if item not in self.choices:
                    raise ValueError(_choice_message(self, item))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            problem = _range_problem(self, value)
            if problem:
                raise ValueError(problem)
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise ValueError(problem)
        return value

    @property
    def metadata_key(self) -> str | None:
        """The ``ss_*`` key kohya's train_network.py writes this setting under, or None."""
        if self.metadata is True:
            return "ss_" + (self.kohya or self.name)
        return self.metadata or None

    @property
    def type_name(self) -> str:
        if self.path:
            return "path list" if self.type == list[str] else "path"
        return {int: "int", float: "float", str: "text", bool: "bool"}.get(self.type, "list of text")


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _coerce(f: Field, value: Any) -> Any:
    what = f"{f.label} must be"
    if value is None and f.type in (int, float):      # a number field the user emptied (JSON null too)
        raise ValueError(f"{f.label} is empty: enter a {'whole ' if f.type is int else ''}number "
                         f"(default {_fmt(f.default)})")
    if f.type is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{what} true or false (got {_fmt(value)})")
    if f.type is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{what} a whole number (got {_fmt(value)})")
    if f.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{what} a finite number (got {_fmt(value)})")
            return float(value)
        raise ValueError(f"{what} a number (got {_fmt(value)})")
    if f.type is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{what} text (got {_fmt(value)})")
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{what} a list of text items (got {_fmt(value)})")


def _choice_message(f: Field, item: str) -> str:
    assert f.choices is not None
    by_lower = {c.lower(): c for c in f.choices}
    guess = by_lower.get(item.lower()) or next(iter(difflib.get_close_matches(item, f.choices, 1)), None)
    hint = f"; did you mean {guess!r}?" if guess else ""
    if f.type == list[str]:
        return f"unknown {f.label} entry {item!r}{hint} (valid: {', '.join(f.choices)})"
    return f"{f.label} must be one of {', '.join(f.choices)} (got {item!r}){hint}"


def _range_problem(f: Field, value: float) -> str | None:
    if f.min is not None and (value <= f.min if f.min_exclusive else value < f.min):
        return f"{f.label} must be {'>' if f.min_exclusive else '>='} {_fmt(f.min)} (got {_fmt(value)})"
    if f.max is not None and (value >= f.max if f.max_exclusive else value > f.max):
        return f"{f.label} must be {'<' if f.max_exclusive else '<='} {_fmt(f.max)} (got {_fmt(value)})"
    if f.multiple_of and value % f.multiple_of:
        nearest = max(f.multiple_of, round(value / f.multiple_of) * f.multiple_of)
        return f"{f.label} must be a multiple of {f.multiple_of} (got {_fmt(value)}; nearest {nearest})"
    return None


def _range_text(f: Field) -> str:
    """The allowed values, for docs/parameters.md."""
    if f.choices is not None:
        return ("any of " if f.type == list[str] else "") + ", ".join(f"`{c}`" for c in f.choices)
    parts = []
    if f.min is not None:
        parts.append(f"{'>' if f.min_exclusive else '≥'} {_fmt(f.min)}")
    if f.max is not None:
        parts.append(f"{'<' if f.max_exclusive else '≤'} {_fmt(f.max)}")
    if f.multiple_of:
        parts.append(f"multiple of {f.multiple_of}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Checks of single values that need more than a range
# ---------------------------------------------------------------------------------------------

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an output file name on Windows, macOS or Linux, or None."""
    if not name.strip():
        return "output name is empty; choose a file name such as 'my_style'"
    if len(name) > 128:
        return f"output name is {len(name)} characters long; use at most 128"
    if "/" in name or "\\" in name:
        return "output name must be a file name, not a path: remove / and \\ (choose the folder with output_dir)"
    if ".." in name:
        return "output name must not contain '..'"
    reserved = sorted({c for c in name if c in '<>:"|?*'})
    if reserved:
        return f"output name must not contain {' '.join(reserved)} (reserved in file names)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "output name must not contain control characters (tabs, line breaks)"
    if name != name.strip() or name.startswith(".") or name.endswith("."):
        return "output name must not start or end with a space, start with a dot or end with a dot"
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        return f"{name.split('.')[0]!r} is a reserved device name on Windows; choose another name"
    if name.lower().endswith((".safetensors", ".ckpt", ".pt")):
        return "leave out the file extension: .safetensors is added when saving"
    return None


_ARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """``"weight_decay=0.01 betas=0.9,0.999 decouple=True"`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.999), ...}``.

    Values are numbers, ``true``/``false``, comma-separated numbers (a tuple) or else text.
    Raises ValueError naming the bad token.
    """
    def value_of(raw: str) -> Any:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        if raw.lower() in ("none", "null"):
            return None
        if "," in raw:
            return tuple(value_of(part) for part in raw.split(","))
        for number in (int, float):
            try:
                return number(raw)
            except ValueError:
                pass
        return raw

    out: dict[str, Any] = {}
    for token in text.split():
        key, sep, raw = token.partition("=")
        if not sep or not _ARG_KEY.match(key) or not raw:
            raise ValueError(f"optimizer argument {token!r} must look like key=value (e.g. weight_decay=0.01)")
        if key in out:
            raise ValueError(f"optimizer argument {key!r} is given twice")
        out[key] = value_of(raw)
    return out


def output_dir_problem(value: str) -> str | None:
    """Outputs stay inside the output folder: ``output_dir`` is a relative folder without ``..``."""
    if not value:
        return None
    if value.startswith(("/", "\\", "~")) or re.match(r"[A-Za-z]:", value):
        return (f"output folder '{value}' must be a folder inside the host's LoRA folder (a relative name such as "
                "'styles/v2'), not an absolute path")
    parts = re.split(r"[/\\]", value)
    if ".." in parts:
        return f"output folder '{value}' must not contain '..': outputs stay inside the host's LoRA folder"
    longest = max(parts, key=len)
    if len(longest) > 128 or len(value) > 1024:
        return (f"output folder '{value[:40]}...' is too long for file systems ({len(longest)} characters in one "
                "folder name); use at most 128 per folder")
    return None


def _optimizer_args_problem(text: str) -> str | None:
    try:
        parse_optimizer_args(text)
    except ValueError as e:
        return str(e)
    return None


def _caption_extension_problem(ext: str) -> str | None:
    if not re.fullmatch(r"\.[A-Za-z0-9_.-]{1,16}", ext):
        return f"caption extension must start with a dot and be a plain extension, e.g. .txt (got {ext!r})"
    return None


def _paths_not_empty(paths: list[str]) -> str | None:
    return "image list has an empty entry" if any(not p.strip() for p in paths) else None


# ---------------------------------------------------------------------------------------------
# The registry: every job parameter, once
# ---------------------------------------------------------------------------------------------

def _registry(*declared: Field) -> dict[str, Field]:
    registry: dict[str, Field] = {}
    for f in declared:
        if f.name in registry:
            raise ValueError(f"job field {f.name!r} is declared twice")
        unknown = set(f.modes) - set(MODES) | set(f.defaults) - set(SCOPES) | {f.group} - set(GROUPS)
        if unknown:
            raise ValueError(f"job field {f.name!r} names unknown modes, scopes or groups: {sorted(unknown)}")
        registry[f.name] = f
    return registry


_STD_COPIER = ("standard", "copier")
_DIFFERENCE = ("copier", "addift")
_RATE_VS_BATCH = ("A bigger batch gives a smoother gradient and tolerates a higher learning rate; "
                  "a lower learning rate needs more steps.")

FIELDS: dict[str, Field] = _registry(
    # --- output -------------------------------------------------------------------------------
    Field("name", str, "my_lora", "output name",
          "File name of the LoRA without folder or extension: saved as NAME.safetensors, checkpoints as "
          "NAME-000500.safetensors. Letters, digits, - and _ are safest; at most 128 characters.",
          "saving", check=output_name_problem, defaults={"copier": "my_difference", "lcm": "my_lcm_lora", "addift": "my_addift",
                                                         "ileco": "my_slider"},
          kohya="output_name", essential=True),
    Field("output_dir", str, "", "output folder",
          "Sub-folder of the host's LoRA folder the LoRA is written to (e.g. styles/v2); created if missing. "
          "Empty = the LoRA folder itself (WebUI: models/Lora/lora_queue; standalone: $LORAQ_HOME/outputs "
          "or queue run --out). Outputs never leave that folder.", "saving", path="output_dir",
          check=output_dir_problem, ui="folder"),
    Field("overwrite", bool, False, "overwrite",
          "Replace an existing file of the same name. Off: the job fails before training if NAME.safetensors exists.",
          "saving"),
    Field("save_every_n_steps", int, 0, "save every N steps",
          "Also save a checkpoint every N steps (NAME-000500.safetensors); 0 = save only at the end. "
          "Typical: steps / 5.", "saving", min=0),
    Field("save_precision", str, "fp16", "save precision",
          "Precision of the weights in the saved file. fp16 halves the size with no visible difference; "
          "fp32 to keep full precision for further training or merging.", "saving", choices=SAVE_PRECISIONS),
    # --- model --------------------------------------------------------------------------------
    Field("model", str, "", "base model",
          "Model to train on: a checkpoint file (.safetensors/.ckpt), a diffusers folder, or 'demo' (the "
          "built-in tiny model). Empty = the model the WebUI has loaded (standalone runs need a value).",
          "model", path="model", ui="file", kohya="pretrained_model_name_or_path", essential=True),
    Field("prediction", str, "auto", "prediction type",
          "What the model predicts: auto = read it from the model (v for SD2-768 and v-pred checkpoints), "
          "eps = noise, v = velocity. Override only when auto is wrong for your checkpoint.",
          "model", choices=PREDICTIONS, advanced=True),
    Field("mixed_precision", str, "bf16", "mixed precision",
          "Compute precision of the frozen model while training: bf16 (GPUs since RTX 30xx), fp16 (older "
          "GPUs), no = fp32. The LoRA weights stay fp32. On CPU the trainer always computes in fp32.",
          "model", choices=MIXED_PRECISIONS, metadata=True),
    Field("gradient_checkpointing", bool, False, "gradient checkpointing",
          "Recompute activations during the backward pass: roughly a third less memory, about 20% slower. "
          "Turn on when a higher resolution or batch does not fit.", "model", metadata=True),
    # --- network ------------------------------------------------------------------------------
    Field("network_dim", int, 16, "rank (dim)",
          "LoRA rank: the size of each low-rank update; capacity and file size grow with it. Typical 4-32 "
          "for a character or style, 64 for LCM. Copier: 16 for pass 1, 4-32 for the difference (pass 2). "
          "iLECO: 4, as traintrain's preset (a slider is a small change).",
          "network", min=1, max=1024, in_copier="passes", ui="slider",
          defaults={"lcm": 64, "copier_pass": 16, "difference_pass": 8, "addift": 4, "ileco": 4}, essential=True),
    Field("network_alpha", float, 8.0, "alpha",
          "Scales the LoRA's output by alpha / rank, so at the same learning rate a smaller alpha takes "
          "smaller steps. Usual: rank/2 to rank (keep alpha <= rank; far above 4x rank warns). Learning "
          "rates only transfer between setups with the same alpha/rank. LCM: 64 at rank 64 (scale 1) with lr 1e-4, "
          "as diffusers' LCM-LoRA script today; its first version left peft's alpha 8 (scale 1/8), so "
          "learning rates quoted from that time are 8x too high for alpha 64. iLECO: 8 at rank 4, as traintrain's "
          "preset (its README: above the rank may be better for iLECO).",
          "network", min=0, min_exclusive=True, max=4096, in_copier="passes",
          defaults={"lcm": 64.0, "copier_pass": 16.0, "difference_pass": 8.0, "addift": 4.0, "ileco": 8.0}, essential=True),
    Field("conv_dim", int, 0, "conv rank",
          "Rank for the 3x3 convolutions of the ResNet blocks (LoCon); 0 = plain LoRA without them. "
          "Needs target set 'all'. Typical 4-16; helps textures and styles. LCM: 64, as the LCM-LoRA "
          "recipe puts its rank-64 LoRA on every conv and linear layer.",
          "network", min=0, max=1024, in_copier="passes", ui="slider", defaults={"lcm": 64}),
    Field("conv_alpha", float, 1.0, "conv alpha",
          "Alpha of the convolution layers (scale conv_alpha / conv_dim); typical 1 to conv_dim. "
          "Unused when conv_dim is 0. LCM: 64 (scale 1 at conv rank 64, as the LCM-LoRA recipe; alpha 1 "
          "would scale the convs by 1/64).", "network", min=0, min_exclusive=True, max=4096, in_copier="passes",
          defaults={"lcm": 64.0}),
    Field("target_set", str, "attn_mlp", "target layers",
          "Which layers get a LoRA: attn = attention projections only; attn_mlp = every linear layer of the "
          "transformer blocks (kohya's default); all = that plus the ResNets and down/up-samplers (needed "
          "for conv_dim > 0). LCM: all, as the LCM-LoRA recipe (every conv and linear layer of the UNet).",
          "network", choices=TARGET_SETS, defaults={"lcm": "all"}),
    Field("train_text_encoder", bool, False, "train text encoder",
          "Also train the text encoder(s) (block BASE) at text_encoder_lr. Helps a trigger word bind; costs "
          "memory and overfits sooner.", "network", modes=_STD_COPIER),
    Field("blocks", list[str], [], "block",
          "Blocks to train, as LoRA Block Weight ids: BASE (text encoder), IN00-IN11, M00, OUT00-OUT11 "
          "(SDXL: IN00-IN08, OUT00-OUT08). Empty = all blocks. Example for style only: OUT03 OUT04 OUT05.",
          "network", choices=BLOCK_IDS, in_copier="passes", ui="checkboxes", advanced=True),
    Field("init_lora", str, "", "start from LoRA",
          "Start from this LoRA file instead of a fresh one (continue a training). LCM: an existing "
          "(LCM-)LoRA. A file of another rank is resized to network_dim with an SVD. Empty = start fresh.",
          "network", modes=("standard", "lcm"), path="file", ui="file", advanced=True, kohya="network_weights"),
    # --- data ---------------------------------------------------------------------------------
    Field("dataset_dir", str, "", "dataset folder",
          "Folder of training images (.png .jpg .webp), each with a caption file of the same name "
          "(image.png + image.txt); subfolders included. LCM: optional, empty = train on images the "
          "teacher generates from the prompts.",
          "data", modes=("standard", "lcm"), path="dir", required_in=("standard",), ui="folder",
          kohya="train_data_dir", essential=True),
    Field("trigger_word", str, "", "trigger word",
          "Word put in front of every caption (e.g. 'sks_style'); write it in a prompt to call up the LoRA. "
          "Empty = captions as they are.", "data", modes=("standard",)),
    Field("caption_extension", str, ".txt", "caption extension",
          "Extension of the caption files next to the images.", "data", modes=("standard",),
          check=_caption_extension_problem, advanced=True),
    Field("shuffle_captions", bool, False, "shuffle captions",
          "Shuffle the comma-separated tags of each caption every time it is used (for tag-style captions). "
          "The trigger word and the first keep_tokens tags stay in front.", "data", modes=("standard",),
          kohya="shuffle_caption", metadata=True),
    Field("keep_tokens", int, 0, "keep tokens",
          "Number of leading comma-separated tags that shuffling leaves in place (the trigger word is always "
          "kept). Typical 0-2.", "data", modes=("standard",), min=0, max=255, advanced=True, metadata=True),
    Field("caption_dropout", float, 0.0, "caption dropout",
          "Probability (0-1) of training a step with an empty caption. 0.05-0.1 helps the LoRA work at low "
          "CFG and without its trigger word; 0 = off.", "data", modes=("standard",), min=0, max=1, ui="slider",
          kohya="caption_dropout_rate", metadata=True),
    Field("flip_horizontal", bool, False, "flip horizontally",
          "Randomly mirror images left-right: more variety from few images. Keep off for asymmetric "
          "subjects (text, logos, a side parting).", "data", modes=("standard",), kohya="flip_aug", metadata=True),
    Field("resolution", int, 512, "resolution",
          "Training size in pixels: images are resized so their area is about resolution x resolution "
          "(buckets keep the aspect ratio). 512 for SD1.x, 768 for SD2-768, 1024 for SDXL; multiple of 64.",
          "data", min=64, max=4096, multiple_of=64, ui="slider", essential=True),
    Field("enable_buckets", bool, True, "aspect-ratio buckets",
          "Train each image near its own aspect ratio instead of centre-cropping it to a square.",
          "data", modes=("standard",), kohya="enable_bucket", metadata=True),
    Field("bucket_no_upscale", bool, False, "don't upscale into buckets",
          "Never enlarge a small image to reach the training size; it goes to a smaller bucket instead.",
          "data", modes=("standard",), advanced=True, metadata=True),
    Field("min_bucket_reso", int, 256, "smallest bucket side",
          "Shortest side a bucket may have, in pixels (multiple of 64).", "data", modes=("standard",),
          min=64, max=4096, multiple_of=64, advanced=True, metadata=True),
    Field("max_bucket_reso", int, 1024, "largest bucket side",
          "Longest side a bucket may have, in pixels (multiple of 64); at least the resolution.",
          "data", modes=("standard",), min=64, max=8192, multiple_of=64, advanced=True, metadata=True),
    # --- training -----------------------------------------------------------------------------
    Field("steps", int, 1000, "steps",
          "Optimizer steps to train; each step sees batch_size x gradient_accumulation images. Typical "
          "1000-3000 for 20-50 images, 300-1000 per copier pass, 1000-4000 for LCM, 300-500 for iLECO. A lower "
          "learning rate needs more steps.", "training", min=1, max=1_000_000, in_copier="passes",
          defaults={"copier_pass": 500, "addift": 100, "ileco": 300}, kohya="max_train_steps", metadata=True, essential=True),
    Field("batch_size", int, 1, "batch size",
          "Images per step. " + _RATE_VS_BATCH + " Roughly: doubling the batch allows up to about 1.4-2x "
          "the learning rate, and the same number of images seen takes half the steps; memory grows with it. "
          "Copier (reported on SD1.5 and SDXL): batch 1 with lr 5e-5 to 1e-4, batch 2 (the default) with up to 5e-4, "
          "batch 4-8 with up to 1e-3; when the copier does not converge, raise steps first, then lr with the batch. "
          "iLECO: noise latents per step (no images), 2 as traintrain's preset.",
          "training", min=1, max=256, in_copier="passes", defaults={"copier_pass": 2, "lcm": 4, "addift": 1, "ileco": 2},
          kohya="train_batch_size", metadata="ss_batch_size_per_device", essential=True),
    Field("gradient_accumulation", int, 1, "gradient accumulation",
          "Add up the gradients of N batches before each optimizer step: an effective batch of "
          "batch_size x N in the memory of one batch, each step taking N times longer.",
          "training", modes=("standard", "lcm"), min=1, max=256, advanced=True, kohya="gradient_accumulation_steps", metadata=True),
    Field("lr", float, 1e-4, "learning rate",
          "Learning rate of the LoRA (UNet). Typical 1e-4 for AdamW at alpha = rank/2; Lion 3-10x lower; "
          "Prodigy: 1.0 (it finds the step size itself). Too high burns colours and breaks images; too low "
          "learns nothing in the given steps. " + _RATE_VS_BATCH + " LCM-LoRA (SD1.5, rank 64): 1e-4. iLECO: "
          "5e-4 (traintrain's preset; its README: 1e-4 to 1e-3).",
          "training", min=0, min_exclusive=True, max=10, in_copier="passes",
          defaults={"copier_pass": 5e-4, "difference_pass": 1e-4, "addift": 1e-3, "ileco": 5e-4}, kohya="learning_rate",
          metadata=True, essential=True),
    Field("text_encoder_lr", float, 5e-5, "text encoder learning rate",
          "Learning rate of the text encoder when train_text_encoder is on; 0 = same as lr. Usually 1/2 to "
          "1/10 of lr.", "training", modes=_STD_COPIER, min=0, max=10, advanced=True, metadata=True),
    Field("optimizer", str, "AdamW", "optimizer",
          "AdamW: the reliable default. AdamW8bit: the same in less memory (needs bitsandbytes and CUDA). "
          "Lion: use a 3-10x lower lr. Prodigy: adapts the step size, set lr 1.0. Adafactor: least memory. "
          "SGD: plain, needs a much higher lr.", "training", choices=OPTIMIZERS, in_copier="passes",
          kohya="optimizer_type", metadata="ss_optimizer", essential=True),
    Field("optimizer_args", str, "", "optimizer arguments",
          "Extra optimizer settings as space-separated key=value pairs, e.g. 'weight_decay=0.01 "
          "betas=0.9,0.999', or for Prodigy 'd_coef=1 safeguard_warmup=True'. Empty = the optimizer's defaults.",
          "training", check=_optimizer_args_problem, in_copier="passes", advanced=True),
    Field("lr_scheduler", str, "constant", "learning-rate schedule",
          "How the lr changes over the steps: constant; constant_with_warmup (ramps up over lr_warmup_steps); "
          "linear and cosine (decay to 0 at the end); cosine_with_restarts (lr_scheduler_num_cycles decays); "
          "polynomial (decay with exponent lr_scheduler_power).",
          "training", choices=LR_SCHEDULES, in_copier="passes", defaults={"copier_pass": "cosine", "ileco": "cosine"},
          metadata=True),
    Field("lr_warmup_steps", int, 0, "warm-up steps",
          "Steps over which the lr ramps up from 0 at the start (every schedule except constant). "
          "Typical 0-10% of the steps.", "training", min=0, in_copier="passes", advanced=True, metadata=True),
    Field("lr_scheduler_num_cycles", int, 1, "schedule cycles",
          "cosine_with_restarts: number of cosine decays over the training.",
          "training", min=1, max=1000, in_copier="passes", advanced=True),
    Field("lr_scheduler_power", float, 1.0, "schedule power",
          "polynomial: exponent of the decay; 1 = linear, 2 = faster drop early.",
          "training", min=0, min_exclusive=True, max=100, in_copier="passes", advanced=True),
    Field("max_grad_norm", float, 1.0, "gradient clipping",
          "Clip the gradient's norm to this before each step; 0 = no clipping. 1.0 is standard and guards "
          "against loss spikes.", "training", min=0, max=1000, advanced=True, metadata=True),
    Field("min_snr_gamma", float, 0.0, "min-SNR gamma",
          "Min-SNR loss weighting (Hang et al. 2023): evens out learning across noise levels and usually "
          "converges faster. 0 = off, typical 5.", "training", modes=_STD_COPIER + ("addift",), min=0, max=100,
          metadata=True),
    Field("noise_offset", float, 0.0, "noise offset",
          "Add a random per-channel constant to the noise so the LoRA can learn very dark and very bright "
          "images. 0 = off, typical 0.03-0.1; high values shift all colours.",
          "training", modes=_STD_COPIER, min=0, max=1, advanced=True, metadata=True),
    Field("timestep_min", int, 0, "lowest timestep",
          "Training timesteps are drawn from [timestep_min, timestep_max), out of 0-1000. Raise the lowest "
          "(e.g. 200) to learn composition and colour but not fine detail. ADDifT: 500 (traintrain's range for "
          "actions and decorations such as closed eyes; 200-400 for a style).",
          "training", modes=_STD_COPIER + ("addift",), min=0, max=999, in_copier="passes", advanced=True,
          defaults={"addift": 500}, kohya="min_timestep", metadata=True),
    Field("timestep_max", int, 1000, "highest timestep",
          "Upper end (exclusive) of the training timesteps; 1000 = up to pure noise. Lower it (e.g. 600) to "
          "learn detail and texture but not layout.",
          "training", modes=_STD_COPIER + ("addift",), min=1, max=1000, in_copier="passes", advanced=True,
          kohya="max_timestep", metadata=True),
    Field("seed", int, 42, "seed",
          "Random seed for LoRA initialisation, noise, timesteps and shuffling: the same seed and settings "
          "give the same LoRA on the same hardware.", "training", min=0, max=2**32 - 1, in_copier="passes", metadata=True),
    # --- copier -------------------------------------------------------------------------------
    Field("image_a", list[str], [], "image A",
          "Image(s) A, the 'before'. Copier: pass 1 trains a copier LoRA until it reproduces them. Several "
          "images make several pairs (e.g. front, left and right views; ADDifT with several pairs is "
          "traintrain's Multi-ADDifT): image_a[i] pairs with image_b[i]. Not needed when copier_file is set.",
          "copier", modes=_DIFFERENCE, path="file", required_in=("addift",), check=_paths_not_empty, ui="image", essential=True),
    Field("image_b", list[str], [], "image B",
          "Image(s) B, the 'after', in the same order and number as image_a and at the same size: the LoRA "
          "learns only what changes from A to B.", "copier", modes=_DIFFERENCE, path="file",
          required_in=_DIFFERENCE, check=_paths_not_empty, ui="image", essential=True),
    Field("prompt", str, "", "prompt",
          "Caption of A and B (in both passes of a copier), e.g. 'a photo of a woman'. Empty = no caption. The "
          "difference works best with prompts like those you will use it with.", "copier", modes=_DIFFERENCE),
    Field("copier_file", str, "", "saved copier",
          "A copier LoRA saved by an earlier job on the same image(s) A (save_copier): pass 1 is skipped "
          "and image_a is not needed.", "copier", modes=("copier",), path="file", ui="file"),
    Field("save_copier", bool, False, "save copier",
          "Also save pass 1's copier as NAME_copier.safetensors, so that later jobs on the same image A can "
          "skip pass 1 with copier_file.", "copier", modes=("copier",)),
    Field("swap_ab", bool, False, "swap A and B",
          "Learn B -> A instead of A -> B: the difference then removes the change.", "copier", modes=_DIFFERENCE),
    Field("train_opposite", bool, True, "train -1 too",
          "Pass 2: every other step trains the difference at strength -1 to turn B back into A (ADDifT's "
          "differential loss, over the frozen copier), so that at -1 the LoRA goes the other way (and, on the "
          "demo model, +1 gets nearer B). Off: the copier method as traintrain has it, which learns only "
          "A -> B: at -1 it barely moves. Needs images A; about 20 % more time.", "copier", modes=("copier",)),
    Field("use_mask", bool, False, "mask from alpha",
          "Use the images' alpha channels as the region that changes: where B (and A, if it has alpha) is "
          "opaque (e.g. only the eyes). What happens outside it is outside_mask. Copier pass 1 counts the "
          "loss only where A is opaque. Images without alpha count everywhere.",
          "copier", modes=_DIFFERENCE),
    Field("difference_mask", bool, False, "mask from the A/B difference",
          "Compute the region that changes from the pixels that differ between A and B (their summed RGB "
          "difference above difference_threshold, widened by difference_dilate pixels), as traintrain's "
          "difference mask. With mask from alpha as well, the region is where both say so.",
          "copier", modes=_DIFFERENCE),
    Field("difference_threshold", int, 10, "difference threshold",
          "Difference mask: a pixel belongs to the change when |R_A-R_B| + |G_A-G_B| + |B_A-B_B| (0-765) is "
          "above this. 10 as traintrain; raise it for JPEG noise.", "copier", modes=_DIFFERENCE, min=0, max=764,
          advanced=True),
    Field("difference_dilate", int, 8, "difference mask widening",
          "Difference mask: pixels the region is widened by on every side, so that the edges of the change "
          "train too (a latent cell is 8 pixels in SD).", "copier", modes=_DIFFERENCE, min=0, max=512,
          advanced=True),
    Field("outside_mask", str, "keep", "outside the mask",
          "What a mask (from alpha or the difference) does outside its region. keep: trained toward no change "
          "(the prediction without the LoRA there), so the LoRA changes only the region. ignore: not trained "
          "at all (the LoRA may change it anyway: before this option the whole picture changed). Copier: pass 2.",
          "copier", modes=_DIFFERENCE, choices=OUTSIDE_MASK),
    Field("pair_prompts", list[str], [], "prompt of each pair",
          "ADDifT with several pairs (Multi-ADDifT): one caption per pair, one per line in the order of image_a "
          "(e.g. 'a red circle on a white background', 'a red circle on a gray background'), as traintrain "
          "reads each image's caption. Empty = the prompt for every pair. A caption that describes a pair well "
          "matters: a shorter prompt shared by different pairs learned almost nothing on the demo model.",
          "addift", modes=("addift",), ui="lines"),
    Field("addift_strength", float, 1.0, "training strength",
          "ADDifT: the LoRA strength at which it learns the pair's change, so that at this strength it "
          "reproduces A -> B (1: strength 1 is the change of the pairs). traintrain trains at 0.25, so its "
          "LoRA at 1 gives up to 4x the change.", "addift", modes=("addift",), min=0, min_exclusive=True,
          max=10, advanced=True),
    Field("same_as_pass1", bool, True, "training settings as pass 1",
          "Pass 2 trains with pass 1's training settings (steps, batch, lr, optimizer, schedule, seed, "
          "timestep range); its network (rank, alpha, conv, blocks) is always its own. Turn off to set "
          "pass 2's training settings separately.", "pass2", modes=("copier",), in_copier="difference_pass", essential=True),
    # --- lcm ----------------------------------------------------------------------------------
    Field("prompts_file", str, "", "prompts file",
          "Text file with one prompt per line; the teacher generates training images from them when "
          "dataset_dir is empty. Combined with prompts.", "lcm", modes=("lcm",), path="file", ui="file"),
    Field("prompts", list[str], [], "prompts",
          "Prompts typed in, one per line; combined with prompts_file.", "lcm", modes=("lcm",), ui="lines"),
    Field("num_generated_images", int, 200, "images to generate",
          "How many images the teacher generates from the prompts before training (when dataset_dir is "
          "empty). About 200 to check a style; thousands for a general-purpose LCM-LoRA.",
          "lcm", modes=("lcm",), min=1, max=1_000_000),
    Field("num_ddim_timesteps", int, 50, "solver steps",
          "The 1000 training timesteps are split into this many DDIM solver steps; the teacher jumps one "
          "step of 1000/N timesteps. 50 as in the LCM paper; fewer = bigger jumps.",
          "lcm", modes=("lcm",), min=1, max=1000),
    Field("guidance_scale", float, 3.0, "guidance w",
          "Guidance the LoRA learns to bake in, in the LCM paper's form "
          "eps = eps_uncond + (1 + w)(eps_cond - eps_uncond): WebUI CFG scale = w + 1. With "
          "guidance_scale_max above it, the lower end of the range w is drawn from. Default 3 to 15 "
          "(CFG 4 to 16), diffusers' LCM-LoRA w_min / w_max (its SD1.5 script starts at 5).",
          "lcm", modes=("lcm",), min=0, max=50, ui="slider"),
    Field("guidance_scale_max", float, 15.0, "guidance w (max)",
          "Upper end of the guidance range: w is drawn uniformly from [guidance_scale, guidance_scale_max] "
          "for each sample, so the LoRA learns a range of guidance (15 = CFG 16, as LCM-LoRA). "
          "0 (or equal to guidance_scale) = always guidance_scale. Teacher images generated from prompts "
          "use the middle of the range.",
          "lcm", modes=("lcm",), min=0, max=50, advanced=True),
    Field("loss_type", str, "huber", "loss",
          "Distance between student and target: huber (pseudo-Huber, robust to outliers; LCM-LoRA's choice) "
          "or l2 (mean squared error).", "lcm", modes=("lcm",), choices=LOSS_TYPES),
    Field("huber_c", float, 0.001, "Huber c",
          "Pseudo-Huber parameter c: the loss is quadratic below c and linear above. 0.001 as in LCM-LoRA; "
          "only used with loss huber.", "lcm", modes=("lcm",), min=0, min_exclusive=True, max=1, advanced=True),
    Field("use_ema_target", bool, False, "EMA target",
          "Compute the consistency target with an EMA copy of the LoRA instead of the current student "
          "(without gradient). Off = the LCM-LoRA recipe; on = the original LCM (more memory).",
          "lcm", modes=("lcm",), advanced=True),
    Field("ema_decay", float, 0.95, "EMA decay",
          "Per-step decay of the EMA target (use_ema_target); 0.95 as in LCM.",
          "lcm", modes=("lcm",), min=0, max=1, max_exclusive=True, advanced=True),
    # --- ileco --------------------------------------------------------------------------------
    Field("source_prompt", str, "", "source prompt",
          "What the slider changes, e.g. 'a red circle' or 'red': the LoRA is trained on this prompt, so it acts "
          "where the picture shows it. Required.", "ileco", modes=("ileco",), metadata="ss_ileco_source_prompt", essential=True),
    Field("target_prompt", str, "", "target prompt",
          "What strength 1 turns the source into, e.g. 'a blue circle'. Empty = erase the source concept "
          "(toward the empty prompt, as traintrain's iLECO). Must differ from the source prompt.",
          "ileco", modes=("ileco",), metadata="ss_ileco_target_prompt", essential=True),
    Field("slider_scale", float, 1.0, "slider scale",
          "How far strength 1 goes: the LoRA learns prediction(source) + scale x (prediction(target) - "
          "prediction(source)) on the source prompt. 1 = the target itself; above 1 overshoots (stronger "
          "sliders), below 1 moves part of the way.", "ileco", modes=("ileco",), min=0, min_exclusive=True,
          max=10, ui="slider", metadata="ss_ileco_slider_scale"),
    Field("both_directions", bool, True, "train both directions",
          "Also train strength -1 toward the opposite, prediction(source) - scale x (prediction(target) - "
          "prediction(source)), so negative strengths are a trained slider and not an extrapolation (on the demo "
          "model, without it strength -1 to -0.5 was not monotone). Each step runs the LoRA twice (1.1x the "
          "time on the demo model).", "ileco", modes=("ileco",),
          metadata="ss_ileco_both_directions"),
    Field("denoise_steps", int, 20, "denoise steps",
          "The training latents: noise the base model denoises on the source prompt (DDIM, CFG 5) for a "
          "random 0 to N-1 of N steps, and the LoRA is trained at the timestep reached. 1 = always pure noise "
          "at t=999. More = more timesteps covered, and N/2 base-model passes per step on average.",
          "ileco", modes=("ileco",), min=1, max=200, advanced=True, metadata="ss_ileco_denoise_steps"),
    # --- previews -----------------------------------------------------------------------------
    Field("sample_prompts", list[str], [], "preview prompts",
          "Prompts for preview images, one per line, rendered with the LoRA at strength 1 whenever a file is "
          "saved. Empty = no previews.", "preview", ui="lines"),
    Field("sample_every_n_steps", int, 0, "preview every N steps",
          "Also render previews every N steps; 0 = only with each saved file.", "preview", min=0),
    Field("comparison_sheet", bool, True, "comparison sheet",
          "When the job finishes, save NAME.comparison.png beside the LoRA: the teacher (the model without "
          "the LoRA) at 25 DDIM steps and CFG 7 against the LoRA at 2, 4 and 8 LCM steps and CFG 1, from the "
          "same seeds, for the preview prompts (or up to 4 of the training prompts).",
          "preview", modes=("lcm",)),
)


def fields_for(scope: str) -> tuple[Field, ...]:
    """The fields of one scope, in registry order: a mode's job, or a copier pass."""
    if scope in MODES and scope != "copier":      # one-part jobs: every field of the mode, at the top level
        return tuple(f for f in FIELDS.values() if scope in f.modes)
    places = {"copier": ("job",), "copier_pass": ("passes",), "difference_pass": ("passes", "difference_pass")}
    if scope not in places:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    return tuple(f for f in FIELDS.values() if "copier" in f.modes and f.in_copier in places[scope])

