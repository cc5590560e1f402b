"""Bench: factor-space SVD merge vs the dense reference (rebuild delta W, SVD), one CPU thread.

Three rank-32 kohya LoRAs (fp16, alpha 16) on the real module sets, merged at ratios 0.6/0.5/-0.4 to
rank 8:

- SD1.5: 264 modules (16 Transformer2D blocks x 12 projections + CLIP-L 12 layers x 6), shapes from
  a diffusers ``UNet2DConditionModel`` with SD1.5's config built on the ``meta`` device;
- SDXL: UNet attention (ldm key names) + CLIP-L (te1) + OpenCLIP-G (te2), same way.

The dense reference does what kohya's ``svd_merge_lora.py`` does per module (sum of ratio * alpha/r *
up @ down in float32, ``torch.linalg.svd``, truncate) but with ``full_matrices=False`` (kohya keeps the
default True, which is slower still). Both read the same files. The factor merge runs in a child
process so that its peak RSS is its own.

    python bench/merge.py [--arch sd15|sdxl|both] [--dense-every N]

``--dense-every N`` times the dense reference on every N-th module only and scales the time up
(for SDXL on a small machine); the difference is then measured on those modules.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.merge.svd_merge import MergeInput, RankPolicy, merge_loras
from trainer.models.naming import SDXL_LAYOUT, text_encoder_kohya_key, unet_kohya_key  # noqa: E402

RANK, ALPHA, TARGET = 32, 16.0, 8
RATIOS = (0.6, 0.5, -0.4)
ATTENTION_ENDS = ("proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def clip_shapes(prefix: str, width: int, mlp: int, layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(layers):
        base = f"encoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            shapes[text_encoder_kohya_key(base + name, prefix)] = (width, width)
        shapes[text_encoder_kohya_key(base + "mlp.fc1", prefix)] = (mlp, width)
        shapes[text_encoder_kohya_key(base + "mlp.fc2", prefix)] = (width, mlp)
    return shapes


def unet_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    if arch == "sd15":
        config = dict(cross_attention_dim=768)          # everything else is the SD1.x default config
    else:
        config = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                      use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = {}
    for path, module in unet.named_modules():
        if "attentions" in path and path.endswith(ATTENTION_ENDS):
            key = unet_kohya_key(path, "sdxl", SDXL_LAYOUT) if arch == "sdxl" else "lora_unet_" + path.replace(".", "_")
            shapes[key] = tuple(module.weight.shape)
    return shapes


def module_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    shapes = unet_shapes(arch)
    if arch == "sd15":
        shapes.update(clip_shapes("lora_te_", 768, 3072, 12))
    else:
        shapes.update(clip_shapes("lora_te1_", 768, 3072, 12))
        shapes.update(clip_shapes("lora_te2_", 1280, 5120, 32))
    return shapes


def write_loras(shapes: dict, folder: Path, version: str) -> list[Path]:
    """Three "views" of one concept: a shared rank-32 component with a decaying spectrum plus
    per-file noise (random independent LoRAs would have a flat spectrum no merge could compress)."""
    from safetensors.torch import save_file

    decay = 0.85 ** torch.arange(RANK, dtype=torch.float32)
    shared = {}
    for n, (key, shape) in enumerate(sorted(shapes.items())):
        g = torch.Generator().manual_seed(n)
        shared[key] = (torch.randn(shape[0], RANK, generator=g) * decay * 0.05,
                       torch.randn(RANK, int(torch.tensor(shape[1:]).prod()), generator=g) * 0.05)
    paths = []
    for i in range(len(RATIOS)):
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        for key, shape in shapes.items():
            up, down = shared[key]
            up = up + 0.3 * torch.randn(up.shape, generator=g) * 0.05 * decay
            down = down + 0.3 * torch.randn(down.shape, generator=g) * 0.05
            conv = len(shape) == 4
            sd[f"{key}.lora_down.weight"] = down.reshape(RANK, *shape[1:]).half()
            sd[f"{key}.lora_up.weight"] = up.reshape(shape[0], RANK, *([1, 1] if conv else [])).half()
            sd[f"{key}.alpha"] = torch.tensor(ALPHA).half()
        paths.append(folder / f"lora{i}.safetensors")
        save_file(sd, str(paths[-1]), {"ss_base_model_version": version})
    return paths


def dense_reference(paths: list[Path], names: list[str]) -> tuple[dict, float]:
    """kohya-style: per module, dense sum in float32, SVD, keep TARGET; returns (up, down) and seconds."""
    from safetensors import safe_open

    handles = [safe_open(str(p), "pt") for p in paths]
    results = {}
    start = time.perf_counter()
    for name in names:
        weight = None
        for handle, ratio in zip(handles, RATIOS):
            down = handle.get_tensor(f"{name}.lora_down.weight").float()
            up = handle.get_tensor(f"{name}.lora_up.weight").float()
            scale = float(handle.get_tensor(f"{name}.alpha")) / down.shape[0]
            term = ratio * scale * (up.flatten(1) @ down.flatten(1))
            weight = term if weight is None else weight + term
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        results[name] = (U[:, :TARGET] * S[:TARGET], Vh[:TARGET])
    return results, time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_factor_merge(paths: list[str], out_json: str) -> None:
    """Runs in its own process: time of merge_loras alone and its peak RSS above the idle process
    (sampled every 2 ms; the inputs are memory-mapped, so pages read count too)."""
    import threading

    torch.set_num_threads(1)
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    result = merge_loras([MergeInput(p, r) for p, r in zip(paths, RATIOS)], RankPolicy(rank=TARGET), dtype="fp32")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], rss_bytes())
    from safetensors.torch import save_file
    save_file(result.tensors, out_json + ".safetensors")
    Path(out_json).write_text(json.dumps({"seconds": seconds, "peak_extra_bytes": peak[0] - base,
                                          "totals": result.totals}))


def run(arch: str, dense_every: int) -> dict:
    torch.set_num_threads(1)
    shapes = module_shapes(arch)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = write_loras(shapes, folder, "sd_v1" if arch == "sd15" else "sdxl_base_v1-0")
        input_bytes = sum(p.stat().st_size for p in paths)
        report = folder / "factor.json"
        subprocess.run([sys.executable, __file__, "--child", str(report), *map(str, paths)], check=True)
        factor = json.loads(report.read_text())
        from safetensors.torch import load_file
        merged = load_file(str(report) + ".safetensors")

        names = sorted(shapes)[::dense_every]
        dense, dense_seconds = dense_reference(paths, names)
        dense_seconds_all = dense_seconds * len(shapes) / len(names)

        worst = 0.0
        for name in names:
            up_ref, down_ref = dense[name]
            ref = up_ref.double() @ down_ref.double()
            ours = (merged[f"{name}.lora_up.weight"].double().flatten(1) @ merged[f"{name}.lora_down.weight"].double().flatten(1))
            ours *= float(merged[f"{name}.alpha"]) / merged[f"{name}.lora_down.weight"].shape[0]
            worst = max(worst, float(torch.linalg.norm(ours - ref) / torch.linalg.norm(ref)))
    return {
        "arch": arch, "modules": len(shapes), "inputs_mb": input_bytes / 2**20,
        "factor_s": factor["seconds"], "dense_s": dense_seconds_all,
        "dense_measured_modules": len(names), "speedup": dense_seconds_all / factor["seconds"],
        "peak_extra_mb": factor["peak_extra_bytes"] / 2**20, "max_rel_diff": worst,
        "retained_energy": factor["totals"]["retained_energy"],
        "relative_error": factor["totals"]["relative_error"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_factor_merge(sys.argv[3:], sys.argv[2])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=("sd15", "sdxl", "both"), default="both")
    parser.add_argument("--dense-every", type=int, default=None,
                        help="dense reference on every N-th module (default: 1 for SD1.5, 8 for SDXL)")
    args = parser.parse_args()
    for arch in (["sd15", "sdxl"] if args.arch == "both" else [args.arch]):
        every = args.dense_every or (1 if arch == "sd15" else 8)
        r = run(arch, every)
        print(f"{r['arch']}: {r['modules']} modules, 3 x rank {RANK} -> rank {TARGET}, inputs {r['inputs_mb']:.1f} MB")
        measured = "all modules" if every == 1 else f"{r['dense_measured_modules']} modules measured, scaled"
        print(f"  factor-space merge {r['factor_s']:.2f} s, dense reference {r['dense_s']:.1f} s ({measured}) "
              f"-> {r['speedup']:.0f}x")
        print(f"  peak extra RSS of the merge {r['peak_extra_mb']:.1f} MB ({r['peak_extra_mb'] / r['inputs_mb']:.2f}x inputs)")
        print(f"  max relative difference to the dense result {r['max_rel_diff']:.2e}; energy kept "
              f"{r['retained_energy']:.4f}, relative error {r['relative_error']:.4f}")


if __name__ == "__main__":
    main()
