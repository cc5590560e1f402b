"""``python -m trainer budget JOB.json [--arch sd1|sdxl] [--weights fp16|fp32] [--free-gib N]``: a job's GPU memory.

Computed from the model's shapes and the job's settings (``trainer.train.budget``); nothing is loaded.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer import jobs
from trainer.cli.common import load_job, print_job_error

DESCRIPTION = ("Estimate the GPU memory a job needs on SD1.5 or SDXL (base weights, LoRA, gradients, optimizer "
               "state, activations, caches, CUDA context), for the training and the latent-caching phase; with "
               "--free-gib, whether it fits and which setting would make it fit. See docs/vram-budget.md.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("budget", help="estimate a job's GPU memory", description=DESCRIPTION)
    parser.add_argument("job", help="job file (JSON)")
    parser.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1", help="model architecture (default sd1)")
    parser.add_argument("--weights", choices=("fp16", "fp32"), default="fp16",
                        help="how the host holds the model's weights (the WebUIs on a GPU: fp16)")
    parser.add_argument("--free-gib", type=float, metavar="N",
                        help="GPU memory free for the whole job (model included), in GiB")
    parser.set_defaults(func=run)
    return parser


def _captions(job) -> int:
    folder = Path(os.path.expanduser(getattr(job, "dataset_dir", "") or ""))
    if not folder.is_dir():
        return 1
    return max(1, sum(1 for p in folder.rglob(f"*{getattr(job, 'caption_extension', '.txt')}")))


def run(args: argparse.Namespace) -> int:
    from trainer.train import budget

    try:
        job = load_job(args.job)
    except jobs.JobError as e:
        print_job_error(e)
        return 2
    settings = budget.settings_for(job, _captions(job))
    weight_bytes = 2 if args.weights == "fp16" else 4
    host = budget.Host(weight_bytes=weight_bytes, vae_bytes=weight_bytes,
                       vae_upcast=args.arch == "sdxl" and weight_bytes == 2)
    estimate = budget.estimate(args.arch, settings, host)
    print(f"{args.arch}, {settings.resolution} px, batch {settings.batch_size}, gradient checkpointing "
          f"{'on' if settings.gradient_checkpointing else 'off'}, {settings.optimizer}, weights {args.weights}")
    for title, parts, total in (("training", estimate.training, estimate.training_peak),
                                ("caching latents", estimate.caching, estimate.caching_peak)):
        print(f"{title}: {budget.gib(total)}")
        for name, size in parts.items():
            if size:
                print(f"  {name:<26}{budget.gib(size):>12}")
    print(f"peak: {budget.gib(estimate.peak)} ({estimate.peak_phase})")
    if args.free_gib is not None:
        free = int(args.free_gib * budget.GIB)
        warning = budget.fit_warning(args.arch, settings, host, free, model_resident=False)
        print(f"fits in {args.free_gib:g} GiB" if warning is None else f"warning: {warning}")
    return 0
