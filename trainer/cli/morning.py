"""``python -m trainer morning ID [ID ...] [--group] --model demo``: the morning sheet of finished queued jobs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import jobs, paths
from trainer.cli.common import print_job_error


def _numbers(kind):
    def parse(text: str):
        try:
            return [kind(t) for t in text.replace(",", " ").split()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}s separated by commas, got {text!r}") from None
    return parse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "morning", help="one sheet per finished job: checkpoints x strength x seed, loss curves, held-out loss",
        description="For each finished job (or, with --group, every finished job queued with it in one sweep): "
                    "grids of its checkpoints x LoRA strength x seed sampled with its own prompts and sampling, "
                    "its loss curves and each checkpoint's held-out loss (fixed noise and timesteps) with the best "
                    "marked; saved as NAME.morning.png beside the LoRA (a group also as PREFIX.sweep.morning.png).")
    parser.add_argument("ids", nargs="+", type=int, metavar="ID", help="job ids (see `queue list`)")
    parser.add_argument("--group", action="store_true", help="every job of each ID's sweep group")
    parser.add_argument("--model", help="'demo', a diffusers folder or a checkpoint (default: each job's model)")
    parser.add_argument("--db", help=f"queue database (default {paths.data_dir() / 'queue.sqlite'})")
    parser.add_argument("--out", help=f"the output root the jobs ran with (default {paths.default_output_dir()})")
    parser.add_argument("--strengths", type=_numbers(float), default=None,
                        help="LoRA strengths, the columns (default -1,-0.5,0,0.5,1,1.5,2)")
    parser.add_argument("--seeds", type=_numbers(int), default=None, help="seeds, the rows (default 1111,2222,3333)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from trainer.lora.files import LoraFileError
    from trainer.lora.network import NetworkError
    from trainer.models.handle import ModelError
    from trainer.models.loading import ModelCache
    from trainer.queue import morning
    from trainer.queue.store import JobQueue, QueueError

    queue = JobQueue(Path(args.db) if args.db else None)
    try:
        ids = [i for job_id in args.ids for i in (queue.group_of(job_id) if args.group else [job_id])]
        result = morning.morning(queue, list(dict.fromkeys(ids)), ModelCache(args.model),
                                 Path(args.out) if args.out else paths.default_output_dir(), paths.cache_dir(),
                                 args.strengths or morning.STRENGTHS, args.seeds or morning.SEEDS)
    except jobs.JobError as e:
        print_job_error(e)
        return 2
    except (QueueError, ModelError, LoraFileError, NetworkError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        queue.close()
    print(result.summary(), file=sys.stderr)
    for sheet in result.sheets:
        print(sheet.path)
    if len(result.sheets) > 1:
        print(result.path)
    return 0
