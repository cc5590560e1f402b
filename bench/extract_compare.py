"""Bench: `python -m trainer extract` against kohya's `networks/extract_lora_from_models.py` on the same pair of
full-size SD1.5-architecture single-file checkpoints (random weights), one CPU thread each: time, peak RSS
and the error of each LoRA against the true difference.

The pair is built here (cached in the work folder): base = every tensor of SD1.5's shapes (UNet, VAE, CLIP-L,
taken from diffusers/transformers models built on the ``meta`` device and renamed to the ldm layout by
tests/ldm_convert.py) drawn N(0, 0.02^2) in fp16; tuned = base plus, in every module a LoRA of target set
"all" covers (attention, feed-forward, projections, ResNet convs, CLIP's linear layers), a rank-32 change
with singular values 0.85^i scaled to 20 % of the weight's norm, plus iid noise at 1 % of it (a
fine-tune's difference is mostly low rank, not only). Both tools extract rank 8, conv rank 8 (kohya:
``--dim 8 --conv_dim 8``, so both cover the same modules).

sd-scripts is fetched at run time (``--kohya DIR``: a checkout, never committed; e.g. ``git --git-dir=MIRROR
archive HEAD networks library | tar -x``). Under transformers 5 and without torchvision/cv2 it needs
stand-ins, applied by a small runner and nothing else: empty ``torchvision``/``cv2`` modules (imported at
the top of ``library/utils.py``, unused by extraction; installed after diffusers has looked for them),
``CLIPTextModel.load_state_dict`` accepting the ``text_model.`` level transformers 5 dropped, and, for saving
(``library/train_util.py``, imported for the metadata hashes), empty ``toml``/``imagesize`` modules, no-op
``torchvision.transforms`` constructors and empty prompt-weighting pipeline modules. Each tool runs
in its own child process; its peak RSS is that child's ``ru_maxrss`` (``os.wait4``).

    flock /tmp/loraq-heavy.lock python bench/extract_compare.py --kohya /tmp/sd-scripts [--work DIR]

The error of a LoRA is measured here, the same way for both files: per module
``||delta W - scale * up @ down||_F / ||delta W||_F`` (delta W read from the two checkpoints), and the
energy-weighted total over the modules; the optimal rank-8 error of each module is computed on a sample of
modules (every ``--exact-every``-th) by a full SVD, to show how close each tool comes to it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

RANK = 8

KOHYA_RUNNER = r'''
import runpy, sys, types
import torch
torch.set_num_threads(1)
# diffusers and transformers first, so their checks for torchvision see that it is absent; then stand-ins for
# the imports sd-scripts' library/utils.py makes at its top and extraction never uses
import diffusers, transformers
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline
tv = types.ModuleType("torchvision"); tv.transforms = types.ModuleType("torchvision.transforms")
sys.modules["torchvision"] = tv; sys.modules["torchvision.transforms"] = tv.transforms
sys.modules["cv2"] = types.ModuleType("cv2")
# saving: networks/lora.py's save_weights imports library/train_util.py for precalculate_safetensors_hashes
# (metadata hashes); its top imports toml, imagesize, torchvision.transforms.Compose/ToTensor/Normalize (called
# at import) and two prompt-weighting pipelines that transformers 5 cannot import (CLIPFeatureExtractor);
# none is used by extraction or the hashes. Without these the 2026-12-02 run did all 350 SVDs, then failed.
tv.transforms.Compose = tv.transforms.ToTensor = tv.transforms.Normalize = lambda *a, **k: None
for name in ("toml", "imagesize"):
    sys.modules[name] = types.ModuleType(name)
for name, cls in (("library.lpw_stable_diffusion", "StableDiffusionLongPromptWeightingPipeline"),
                  ("library.sdxl_lpw_stable_diffusion", "SdxlStableDiffusionLongPromptWeightingPipeline")):
    stand_in = types.ModuleType(name); setattr(stand_in, cls, None); sys.modules[name] = stand_in
# transformers 5 dropped CLIPTextModel's "text_model." level; sd-scripts' converted state dict keeps it
from transformers import CLIPTextModel
_load = CLIPTextModel.load_state_dict
def load_state_dict(self, state, *args, **kwargs):
    if not any(k.startswith("text_model.") for k in self.state_dict()):
        state = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
    return _load(self, state, *args, **kwargs)
CLIPTextModel.load_state_dict = load_state_dict
script = sys.argv[1]
sys.path[:0] = [str(__import__("pathlib").Path(script).parent.parent), str(__import__("pathlib").Path(script).parent)]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''

OURS_RUNNER = r'''
import sys
import torch
torch.set_num_threads(1)
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
'''


# --- the pair of checkpoints ------------------------------------------------------------------------------

def sd15_shapes() -> dict[str, tuple[torch.Size, torch.dtype]]:
    """ldm key -> shape of every tensor of an SD1.5 single-file checkpoint (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_convert import pipeline_to_ldm

    configs = ROOT / "trainer" / "models" / "configs" / "sd15"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    state = pipeline_to_ldm(SimpleNamespace(unet=unet, vae=vae, text_encoder=text), "sd1")
    return {k: v.shape for k, v in state.items()}


def build_pair(work: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from trainer.merge.extract import checkpoint_targets

    base, tuned = work / "sd15_random_base.safetensors", work / "sd15_random_tuned.safetensors"
    if base.is_file() and tuned.is_file():
        return base, tuned
    g = torch.Generator().manual_seed(0)
    shapes = sd15_shapes()
    weights = {k: (torch.randn(s, generator=g) * 0.02).half() for k, s in sorted(shapes.items())}
    save_file(weights, str(base))
    targets = checkpoint_targets(weights, "sd1", True)
    decay = 0.85 ** torch.arange(32, dtype=torch.float32)
    for ref in sorted({t.key for t in targets.values()}):
        w = weights[ref]
        flat = w.reshape(w.shape[0], -1).float()
        u = torch.randn(flat.shape[0], 32, generator=g) * decay
        change = u @ torch.randn(32, flat.shape[1], generator=g)
        change *= 0.2 * float(flat.norm()) / float(change.norm())
        noise = torch.randn(flat.shape, generator=g)
        change += noise * (0.01 * float(flat.norm()) / float(noise.norm()))
        weights[ref] = (flat + change).reshape(w.shape).half()
    save_file(weights, str(tuned))
    return base, tuned


# --- running each tool --------------------------------------------------------------------------------------

def run_measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; wall time, the child's CPU time and its own peak RSS."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    # CPU seconds too: on a shared 2-core machine the wall time also counts whatever else ran
    return {"seconds": round(seconds, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2), "exit": os.waitstatus_to_exitcode(status),
            "log": str(log), "load_before": round(load, 2)}


def single_thread_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT)}


# --- measuring the files -------------------------------------------------------------------------------------

def kohya_to_ours(name: str) -> str:
    """kohya under transformers 5 names text-encoder modules without ``text_model_`` (the module tree lost it)."""
    if name.startswith("lora_te_") and not name.startswith("lora_te_text_model_"):
        return "lora_te_text_model_" + name[len("lora_te_"):]
    return name


def lora_errors(lora: Path, base: Path, tuned: Path, rename=lambda n: n, exact_every: int = 0) -> dict:
    """Per-module relative error of ``lora`` against tuned - base, the energy-weighted total, and on every
    ``exact_every``-th module the optimal rank-8 error (full SVD)."""
    from safetensors import safe_open

    from trainer.merge.extract import checkpoint_targets
    from trainer.merge.tensor_file import TensorFile

    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    names = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys})
    total_energy, total_error, optimal_sq, sampled_sq, per = 0.0, 0.0, 0.0, 0.0, {}
    with TensorFile(base) as b, TensorFile(tuned) as t:
        targets = checkpoint_targets(b.entries, "sd1", True)
        unmatched = []
        for i, name in enumerate(names):
            ref = targets.get(rename(name))
            if ref is None:
                unmatched.append(name)
                continue
            delta = (t.get(ref.key, ref.row).float() - b.get(ref.key, ref.row).float()).reshape(
                b.shape(ref.key)[0], -1).double()
            down = tensors[f"{name}.lora_down.weight"].double().flatten(1)
            up = tensors[f"{name}.lora_up.weight"].double().flatten(1)
            alpha = float(tensors.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))))
            stored = (alpha / down.shape[0]) * up @ down
            energy = float((delta ** 2).sum())
            error_sq = float(((delta - stored) ** 2).sum())
            total_energy += energy
            total_error += error_sq
            per[rename(name)] = math.sqrt(error_sq / energy)
            if exact_every and i % exact_every == 0:
                s = torch.linalg.svdvals(delta)
                optimal_sq += float((s[RANK:] ** 2).sum())
                sampled_sq += error_sq
    out = {"modules": len(names) - len(unmatched), "unmatched": unmatched[:5], "relative_error":
           math.sqrt(total_error / total_energy), "per_module": per}
    if exact_every:
        out["sampled_error_over_optimal"] = math.sqrt(sampled_sq / optimal_sq) if optimal_sq else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kohya", type=Path, required=True, help="an sd-scripts checkout (not committed)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "loraq-extract-bench")
    parser.add_argument("--only", choices=("ours", "kohya", "both", "build", "measure"), default="both",
                        help="build: only write the pair (~3.7 GB RSS, no lock needed); measure: only the errors "
                             "of the files an earlier run left in the work folder (no tool is run)")
    parser.add_argument("--svd", default="lowrank", help="our --svd method")
    parser.add_argument("--exact-every", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.only == "build":
        base, tuned = build_pair(args.work)
    else:
        # The pair is built in a child: Linux carries a parent's peak RSS at fork into the child's ru_maxrss
        # (exec keeps the larger), so a parent that built the pair (~3.7 GB) would floor both tools' peaks.
        subprocess.run([sys.executable, __file__, "--kohya", str(args.kohya), "--work", str(args.work),
                        "--only", "build"], check=True, stdout=subprocess.DEVNULL)
        base, tuned = build_pair(args.work)     # both files exist now: only their paths
    print(f"pair ready in {time.perf_counter() - started:.0f} s: {base} ({base.stat().st_size / 2**30:.2f} GB), {tuned}")
    if args.only == "build":
        return
    env = single_thread_env()
    results = {}
    if args.only == "measure":
        for tool, out, rename in (("kohya", args.work / "kohya.safetensors", kohya_to_ours),
                                  ("ours", args.work / f"ours_{args.svd}.safetensors", lambda n: n)):
            if out.is_file():
                results[tool] = lora_errors(out, base, tuned, rename, exact_every=args.exact_every)
                print(f"{tool}:", {k: v for k, v in results[tool].items() if k != "per_module"})

    def save(found: dict) -> None:     # after each tool: a run cut short keeps what it measured
        summary = {k: ({kk: vv for kk, vv in v.items() if kk != "per_module"} if isinstance(v, dict) else v)
                   for k, v in found.items()}
        (args.work / f"results_{args.only}_{args.svd}.json").write_text(json.dumps(summary, indent=1))

    if args.only in ("kohya", "both"):
        out = args.work / "kohya.safetensors"
        script = args.kohya / "networks" / "extract_lora_from_models.py"
        cmd = [sys.executable, "-c", KOHYA_RUNNER, str(script), "--model_org", str(base), "--model_tuned", str(tuned),
               "--save_to", str(out), "--dim", str(RANK), "--conv_dim", str(RANK), "--save_precision", "fp16",
               "--device", "cpu"]
        results["kohya"] = run_measured(cmd, env, args.work / "kohya.log")
        if results["kohya"]["exit"] == 0:
            results["kohya"].update(lora_errors(out, base, tuned, kohya_to_ours, exact_every=args.exact_every))
        print("kohya:", {k: v for k, v in results["kohya"].items() if k != "per_module"})
        save(results)
    if args.only in ("ours", "both"):
        out = args.work / f"ours_{args.svd}.safetensors"
        cmd = [sys.executable, "-c", OURS_RUNNER, "extract", "--out", str(out), "--rank", str(RANK), "--conv-rank",
               str(RANK), "--svd", args.svd, str(tuned), str(base)]
        results["ours"] = run_measured(cmd, env, args.work / f"ours_{args.svd}.log")
        if results["ours"]["exit"] == 0:
            results["ours"].update(lora_errors(out, base, tuned, exact_every=args.exact_every))
        print("ours:", {k: v for k, v in results["ours"].items() if k != "per_module"})
        save(results)
    if "ours" in results and "kohya" in results and "per_module" in results["ours"] and "per_module" in results["kohya"]:
        common = sorted(set(results["ours"]["per_module"]) & set(results["kohya"]["per_module"]))
        ratio = [results["ours"]["per_module"][n] / results["kohya"]["per_module"][n] for n in common]
        results["common_modules"] = len(common)
        results["error_ratio_ours_over_kohya"] = {"min": min(ratio), "median": sorted(ratio)[len(ratio) // 2],
                                                  "max": max(ratio)}
        if "seconds" in results["kohya"] and "seconds" in results["ours"]:
            results["time_ratio_kohya_over_ours"] = results["kohya"]["seconds"] / results["ours"]["seconds"]
        print({k: v for k, v in results.items() if k.startswith(("common", "error_ratio", "time_ratio"))})
    save(results)
    print((args.work / f"results_{args.only}_{args.svd}.json").read_text())


if __name__ == "__main__":
    main()
