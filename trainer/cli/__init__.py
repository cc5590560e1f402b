"""The command line: one module per subcommand, registered here once.

Each module's ``add_parser(subparsers)`` declares its arguments and sets ``func``; ``python -m trainer``
only dispatches. Command modules import torch only inside the commands that train or sample, so
``template``, ``queue list`` and every ``--help`` start without it.
"""
from __future__ import annotations

import argparse
import importlib
import os

#: Subcommand modules of this package, in the order ``--help`` lists them.
COMMANDS = ("train", "queue", "morning", "template", "budget", "merge", "resize", "extract", "bake", "ui", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="LoRA Queue: train, queue and merge LoRAs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"trainer.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Process-wide settings belong to entry points: models load from local files only, never from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    return args.func(args)
