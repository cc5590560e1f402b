"""``python -m trainer template MODE``: print a complete default job as JSON, to edit and queue.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.jobs import MODES, json_schema, template

DESCRIPTION = ("Print a complete default job of MODE as JSON (every field with its default). "
               "Edit it and queue it; missing fields take their defaults, so you may delete lines you keep.")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=MODES, help="training mode")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of MODE jobs instead")
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``template`` subcommand on an ``ArgumentParser.add_subparsers()`` object."""
    parser = subparsers.add_parser("template", help="print a complete default job as JSON",
                                   description=DESCRIPTION)
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    document = json_schema(args.mode) if args.schema else template(args.mode)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
