"""``python -m trainer COMMAND``: the command line of LoRA Queue."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from trainer.cli import merge as merge_cli
    from trainer.cli import queue as queue_cli
    from trainer.cli import template as template_cli
    from trainer.cli import train as train_cli
    from trainer.cli import ui as ui_cli

    parser = argparse.ArgumentParser(prog="python -m trainer", description="LoRA Queue: train, queue and merge LoRAs")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train_cli, queue_cli, template_cli, merge_cli, ui_cli):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
