"""``python -m trainer merge``: fold several LoRAs into one (factor-space SVD) and print the error report.

"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.jobs.vocabulary import SAVE_PRECISIONS


DESCRIPTION = "Merge LoRAs at their ratios (and block weights) into one LoRA of a chosen rank."

EPILOG = """\
inputs: FILE[:RATIO[:BLOCKS]] (SuperMerger syntax), e.g. a.safetensors:0.6 b.safetensors:-0.3:OUTD
  RATIO   default 1; negative subtracts.
  BLOCKS  a preset name or a comma list of 17 or 26 values (SD1/SD2) / 12 or 20 values (SDXL),
          in the LoRA Block Weight order (BASE,IN01,IN02,IN04,... for 17). Blocks the list does
          not address get weight 0, as in SuperMerger (a 17-value list drops the LoCon-only blocks
          and modules outside the blocks).
  presets built in: NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL ALL0.5; more with --presets FILE
          (lines NAME:v1,v2,... as in LoRA Block Weight's lbwpresets.txt).
rank:    --rank N (default 8), --conv-rank N for 3x3 convs, --rank auto or --auto FRACTION (keep that
          fraction of each module's energy; --rank N then caps it), --concat (lossless, rank = sum).
The result at strength 1 equals the inputs applied together at their ratios, up to the truncation
the rank asks for; the report gives, per module, the energy kept and the relative error.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("merge", help=DESCRIPTION, description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _rank(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be a whole number or 'auto', got {text!r}") from None


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    """The output's rank, alpha and precision (merge, resize)."""
    parser.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    parser.add_argument("--rank", type=_rank, default=None, help="output rank, or 'auto' (default 8)")
    parser.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 conv modules (default: --rank)")
    parser.add_argument("--auto", type=float, nargs="?", const=0.99, default=None, metavar="FRACTION",
                        help="smallest rank keeping FRACTION of each module's energy (default 0.99)")
    parser.add_argument("--alpha", type=float, default=None, help="output alpha (default: = rank, scale 1)")
    parser.add_argument("--dtype", choices=SAVE_PRECISIONS, default="fp16", help="saved precision")
    parser.add_argument("--report-json", type=Path, default=None, help="also write the per-module report as JSON")
    parser.add_argument("--verbose", action="store_true", help="print every module, not the 10 worst")


def write_report_json(result, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps({"totals": result.totals, "modules": [m.as_dict() for m in result.modules]},
                                   indent=1))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="FILE[:RATIO[:BLOCKS]]", help="input LoRAs")
    add_rank_arguments(parser)
    parser.add_argument("--concat", action="store_true", help="lossless: rank = sum of the input ranks")
    parser.add_argument("--presets", type=Path, default=None, help="block-weight preset file (NAME:v1,...)")
    parser.add_argument("--clamp-quantile", type=float, nargs="?", const=0.99, default=None, metavar="Q",
                        help="kohya svd_merge_lora clamp of the factors at quantile Q (off by default; 0.99)")


def policy_from_args(args: argparse.Namespace):
    from trainer.merge.svd_merge import MergeError, RankPolicy

    if getattr(args, "concat", False) and (args.auto is not None or args.rank == "auto"):
        raise MergeError("--concat and --auto exclude each other")
    energy = args.auto if args.auto is not None else (0.99 if args.rank == "auto" else None)
    if getattr(args, "concat", False):
        return RankPolicy(rank=None, conv_rank=None, concat=True)
    rank = args.rank if isinstance(args.rank, int) else None
    if rank is None and energy is None:
        rank = 8
    return RankPolicy(rank=rank, conv_rank=args.conv_rank, energy=energy)


def run(args: argparse.Namespace) -> int:
    from trainer.merge.svd_merge import MergeError, format_report, merge_files, parse_input_spec

    try:
        policy = policy_from_args(args)
        presets_text = None
        if args.presets is not None:
            try:
                presets_text = args.presets.read_text(encoding="utf-8")
            except OSError as e:
                raise MergeError(f"preset file '{args.presets}': {e.strerror}") from None
        inputs = [parse_input_spec(s) for s in args.inputs]
        result = merge_files(inputs, args.out, policy, presets_text=presets_text, alpha=args.alpha,
                             dtype=args.dtype, clamp_quantile=args.clamp_quantile)
    except MergeError as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(inputs)} LoRAs ({result.arch.upper()}, {policy.describe()}) -> {args.out}")
    print(format_report(result, worst=None if args.verbose else 10))
    write_report_json(result, args.report_json)
    return 0
