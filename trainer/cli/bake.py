"""``python -m trainer bake --out CKPT --model MODEL a.safetensors:0.6 ...``: LoRAs merged into a single-file
checkpoint at their ratios (and block weights), saved as a new checkpoint the WebUIs load."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = "Bake LoRAs into a checkpoint (.safetensors, the layout A1111, Forge and ComfyUI load)."


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bake", help=DESCRIPTION, description=DESCRIPTION,
                                   epilog="inputs: FILE[:RATIO[:BLOCKS]] as for merge (e.g. style.safetensors:0.6:OUTD)")
    parser.add_argument("inputs", nargs="+", metavar="FILE[:RATIO[:BLOCKS]]", help="LoRAs to bake in")
    parser.add_argument("--out", required=True, help="the new checkpoint (.safetensors, written atomically)")
    parser.add_argument("--model", required=True, help="the base checkpoint (single-file .safetensors)")
    parser.add_argument("--presets", type=Path, default=None, help="block-weight preset file (NAME:v1,...)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from trainer.merge.bake import bake_loras
    from trainer.merge.svd_merge import MergeError, parse_input_spec, parse_presets
    from trainer.models.handle import ModelError

    try:
        presets = None
        if args.presets is not None:
            try:
                presets = parse_presets(args.presets.read_text(encoding="utf-8"), str(args.presets))
            except OSError as e:
                raise MergeError(f"preset file '{args.presets}': {e.strerror}") from None
        inputs = [parse_input_spec(s) for s in args.inputs]
        baked = bake_loras(args.model, inputs, args.out, presets=presets)
    except (MergeError, ModelError) as e:
        print(f"bake: error: {e}", file=sys.stderr)
        return 2
    parts = ", ".join(f"{name}: {n} modules" for name, n in baked.per_input.items())
    print(f"baked {len(inputs)} LoRAs into {args.model} ({baked.arch.upper()}; {parts}; "
          f"{baked.tensors_changed} weights changed) -> {args.out}")
    return 0
