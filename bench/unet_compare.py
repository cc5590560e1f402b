"""diffusers' UNet (what our standard mode trains through) against kohya's own SD1.5 UNet (``library/original_unet.py``,
what its ``train_network.py`` trains through), alone: the same random weights, frozen, one thread, SDPA attention on
both, forward and backward from a latent that needs a gradient, alternately. Separates the UNet implementation from
everything else a training step does (LoRA hooks, loss, optimizer, data) when our step and kohya's differ.

    flock /tmp/loraq-heavy.lock python bench/unet_compare.py --kohya /tmp/sd-scripts [--rounds 7] [--resolution 256]

kohya's file is read from an sd-scripts checkout (never committed); its only project import (``library.utils``'s
``setup_logging``) is stood in for, so neither its pinned packages nor torchvision are needed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SD15_UNET = ROOT / "trainer" / "models" / "configs" / "sd15" / "unet" / "config.json"


def kohya_unet_module(sd_scripts: Path) -> types.ModuleType:
    library = types.ModuleType("library")
    library.__path__ = []
    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *args, **kwargs: None
    sys.modules.setdefault("library", library)
    sys.modules.setdefault("library.utils", utils)
    spec = importlib.util.spec_from_file_location("kohya_original_unet", sd_scripts / "library" / "original_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(sd_scripts: Path, latent: int, first: str = "diffusers") -> tuple[torch.nn.Module, torch.nn.Module]:
    """Both UNets, ``first`` allocated first: on this VM the model allocated first computes up to ~20 % slower on
    the same ops and shapes (its weights' memory reads slower), so the order is a setting and both are recorded."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    config = {k: v for k, v in json.loads(SD15_UNET.read_text()).items() if not k.startswith("_")}
    kohya_class = kohya_unet_module(sd_scripts).UNet2DConditionModel

    def kohya() -> torch.nn.Module:
        return kohya_class(sample_size=latent, attention_head_dim=8, cross_attention_dim=768,
                           use_linear_projection=False)

    if first == "kohya":
        theirs = kohya()
        ours = UNet2DConditionModel(**config)
    else:
        ours = UNet2DConditionModel(**config)
        theirs = kohya()
    ours.eval().requires_grad_(False)
    ours.set_attn_processor(AttnProcessor2_0())
    theirs.load_state_dict(ours.state_dict(), strict=True)     # kohya kept diffusers' key names on purpose
    theirs.set_use_sdpa(True)
    theirs.eval().requires_grad_(False)
    return ours, theirs


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def one_step(unet: torch.nn.Module, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict:
    before, start = usage(), time.perf_counter()
    x = latent.clone().requires_grad_(True)
    unet(x, t, context).sample.pow(2).mean().backward()
    after = usage()
    return {"wall": time.perf_counter() - start, "user": after[0] - before[0], "system": after[1] - before[1],
            "faults": after[2] - before[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kohya", type=Path, required=True, help="an sd-scripts checkout (not committed)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (the first is not counted)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--first", choices=("diffusers", "kohya"), default="diffusers",
                        help="which UNet is allocated first (see build)")
    parser.add_argument("--json", type=Path, help="write every step here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = args.resolution // 8
    ours, theirs = build(args.kohya, size, args.first)
    latent, t, context = torch.randn(1, 4, size, size), torch.tensor([500]), torch.randn(1, 77, 768)
    with torch.no_grad():
        difference = (ours(latent, t, context).sample - theirs(latent, t, context).sample).abs().max().item()
    print(f"same weights, same input: max |diffusers - kohya| = {difference:.3g}", flush=True)
    steps: dict[str, list[dict]] = {"diffusers": [], "kohya": []}
    for round_ in range(args.rounds):
        order = [("diffusers", ours), ("kohya", theirs)]
        for name, unet in order if round_ % 2 == 0 else order[::-1]:
            steps[name].append(one_step(unet, latent, t, context))
    summary = {name: {k: statistics.median(s[k] for s in rows[1:]) for k in rows[0]} for name, rows in steps.items()}
    for name, s in summary.items():
        print(f"{name:9s} forward+backward {s['wall']:.3f} s (user {s['user']:.3f}, system {s['system']:.3f}), "
              f"{s['faults']:.0f} page faults")
    print(f"diffusers / kohya: {summary['diffusers']['wall'] / summary['kohya']['wall']:.3f}x wall, "
          f"{(summary['diffusers']['user'] + summary['diffusers']['system']) / (summary['kohya']['user'] + summary['kohya']['system']):.3f}x CPU")
    if args.json:
        args.json.write_text(json.dumps({"max_abs_difference": difference, "steps": steps, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
