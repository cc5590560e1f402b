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
          not address get weight 0, as in SuperMerger (a 17-value list drops the LoCon-only blocks);
          modules outside the blocks (time embedding, conv_out) take BASE's weight, as there.
  presets built in: NONE ALL INS IND INALL MIDD OUTD OUTS OUTALL ALL0.5; more with --presets FILE
          (lines NAME:v1,v2,... as in LoRA Block Weight's lbwpresets.txt).
rank:    --rank N (default 8), --conv-rank N for 3x3 convs, --rank auto or --auto FRACTION (keep that
          fraction of each module's energy; --rank N then caps it), --concat (lossless, rank = sum).
The result at strength 1 equals the inputs applied together at their ratios, up to the truncation
the rank asks for; the report gives, per module, the energy kept and the relative error.
--supermerger no|auto|N: SuperMerger's semantics instead (docs/merge-semantics.md), so its recipes
          give the same LoRA: no = same-rank sum of the factors scaled by the ratios (a ratio acts
          squared, LoRAs mix with cross terms, -1 does not subtract); N = SVD of the linear sum to rank
          N with the 0.99-quantile clamp; auto = no when every input has the same rank, else N = the
          largest. --same-to-strength is SuperMerger's "same to Strength" setting. The report then
          measures the result against the inputs applied together at their ratios.
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
    parser.add_argument("--supermerger", default=None, metavar="no|auto|N",
                        help="SuperMerger's ratio semantics and its 'remake dimension' (see below)")
    parser.add_argument("--same-to-strength", action="store_true",
                        help="with --supermerger: its 'same to Strength' setting")


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


def supermerger_mode_from_args(args: argparse.Namespace):
    """The SuperMerger mode, refusing the options it has no equivalent for; None without --supermerger."""
    from trainer.merge.supermerger import SuperMergerMode, parse_dimension
    from trainer.merge.svd_merge import MergeError

    if args.supermerger is None:
        if args.same_to_strength:
            raise MergeError("--same-to-strength is a SuperMerger setting: give --supermerger no|auto|N too")
        return None
    given = [flag for flag, value in (("--rank", args.rank), ("--conv-rank", args.conv_rank), ("--auto", args.auto),
                                      ("--alpha", args.alpha), ("--clamp-quantile", args.clamp_quantile))
             if value is not None] + (["--concat"] if args.concat else [])
    if given:
        raise MergeError(f"--supermerger sets the rank, alpha and clamp as SuperMerger does: leave out "
                         f"{', '.join(given)} (--supermerger N is rank N)")
    return SuperMergerMode(parse_dimension(args.supermerger), args.same_to_strength)


def run(args: argparse.Namespace) -> int:
    from trainer.merge.supermerger import supermerger_files
    from trainer.merge.svd_merge import MergeError, format_report, merge_files, parse_input_spec

    try:
        mode = supermerger_mode_from_args(args)
        policy = policy_from_args(args) if mode is None else None
        presets_text = None
        if args.presets is not None:
            try:
                presets_text = args.presets.read_text(encoding="utf-8")
            except OSError as e:
                raise MergeError(f"preset file '{args.presets}': {e.strerror}") from None
        inputs = [parse_input_spec(s) for s in args.inputs]
        if mode is not None:
            result = supermerger_files(inputs, args.out, mode, presets_text=presets_text, dtype=args.dtype)
        else:
            result = merge_files(inputs, args.out, policy, presets_text=presets_text, alpha=args.alpha,
                                 dtype=args.dtype, clamp_quantile=args.clamp_quantile)
    except MergeError as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    how = policy.describe() if mode is None else mode.describe()
    print(f"merged {len(inputs)} LoRAs ({result.arch.upper()}, {how}) -> {args.out}")
    print(format_report(result, worst=None if args.verbose else 10))
    if mode is not None:
        print("(relative error: distance from the inputs applied together at their ratios, our linear semantics)")
    write_report_json(result, args.report_json)
    return 0
