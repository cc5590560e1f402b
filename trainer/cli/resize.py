"""``python -m trainer resize --out L.safetensors --rank 4 IN.safetensors``: a LoRA to another rank or energy
fraction (the optimal truncation of its own delta), with the per-module error report."""
from __future__ import annotations

import argparse
import sys

from trainer.cli.merge import add_rank_arguments, policy_from_args, write_report_json

DESCRIPTION = "Resize a LoRA to a rank (--rank N) or to the smallest rank keeping an energy fraction (--auto F)."


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("resize", help=DESCRIPTION, description=DESCRIPTION)
    parser.add_argument("input", metavar="IN.safetensors", help="the LoRA to resize (LoRA, LoCon, LoHa, LoKr)")
    add_rank_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from trainer.merge.svd_merge import MergeError, format_report, resize_file

    try:
        policy = policy_from_args(args)
        result = resize_file(args.input, args.out, policy, dtype=args.dtype, alpha=args.alpha)
    except MergeError as e:
        print(f"resize: error: {e}", file=sys.stderr)
        return 2
    print(f"resized {args.input} ({result.arch.upper()}, {policy.describe()}) -> {args.out}")
    print(format_report(result, worst=None if args.verbose else 10))
    write_report_json(result, args.report_json)
    return 0
