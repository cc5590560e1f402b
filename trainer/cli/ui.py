"""``python -m trainer ui [--model demo|PATH] [--port N] [--host 127.0.0.1]``: the standalone app."""
from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("ui", help="the LoRA Queue web app (train, queue, merge) on this machine",
                                   description="Serve the LoRA Queue app; jobs train on --model in a background worker.")
    parser.add_argument("--model", default="demo", help="model every job trains on: 'demo', a checkpoint file or "
                                                        "a diffusers folder (default: demo)")
    parser.add_argument("--port", type=int, default=7870, help="port (default 7870)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--data", default=None, help="data folder: queue, presets, cache (default $LORAQ_HOME or "
                                                     "~/.lora_queue)")
    parser.add_argument("--loras", default=None, help="LoRA folder: outputs and merge inputs (default DATA/loras)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from trainer.ui.app import standalone_app
    from trainer.ui.services import standalone_services

    # The worker thread trains in this process: hand the GIL over every 1 ms (not 5) so that a page
    # request waiting for it answers in tens of milliseconds while a small model trains.
    sys.setswitchinterval(0.001)
    services = standalone_services(args.model, args.data, args.loras)
    app = standalone_app(services)
    print(f"LoRA Queue: jobs train on {args.model}; LoRAs in {services.lora_dir}", file=sys.stderr)
    print(f"LoRA Queue: open http://{args.host}:{args.port}/ in a browser", file=sys.stderr, flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, inbrowser=False, show_api=False, quiet=True)
    finally:
        if services.worker is not None:
            services.worker.stop(timeout=5)
    return 0
