"""``python -m trainer extract --out L.safetensors --rank 8 TUNED BASE``: a LoRA (LoCon for 3x3 convolutions) from
the difference of two checkpoints of the same architecture, with the per-module error report."""
from __future__ import annotations

import argparse
import sys

from trainer.cli.merge import add_rank_arguments, policy_from_args, write_report_json

DESCRIPTION = ("Extract a LoRA from two models (tuned - base): diffusers folders, single-file .safetensors "
               "checkpoints or 'demo'; --rank N (--conv-rank N for 3x3 convs) or --auto FRACTION.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("extract", help=DESCRIPTION, description=DESCRIPTION)
    parser.add_argument("tuned", metavar="TUNED", help="the fine-tuned model")
    parser.add_argument("base", metavar="BASE", help="the model it was tuned from")
    add_rank_arguments(parser)
    parser.add_argument("--no-text-encoder", action="store_true", help="leave the text encoders out")
    parser.add_argument("--svd", choices=("lowrank", "gram", "exact"), default="lowrank",
                        help="how two single-file checkpoints' differences are factored: randomized (default, "
                             "fixed ranks), Gram eigendecomposition, or LAPACK's full SVD (the reference)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from trainer.merge.extract import extract_models, save_extracted
    from trainer.merge.svd_merge import MergeError, format_report
    from trainer.models.handle import ModelError

    torch.set_grad_enabled(False)
    try:
        policy = policy_from_args(args)
        result = extract_models(args.tuned, args.base, policy, dtype=args.dtype, text_encoder=not args.no_text_encoder,
                                title=args.out.rsplit("/", 1)[-1].rsplit(".", 1)[0], method=args.svd)
        save_extracted(result, args.out)
    except (MergeError, ModelError) as e:
        print(f"extract: error: {e}", file=sys.stderr)
        return 2
    print(f"extracted {len(result.modules)} modules ({result.arch.upper()}, {policy.describe()}; "
          f"{len(result.unchanged)} unchanged) -> {args.out}")
    print(format_report(result, worst=None if args.verbose else 10))
    write_report_json(result, args.report_json)
    return 0
