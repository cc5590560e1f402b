"""A LoRA Queue job's step inside a real AUTOMATIC1111 against a bare LoRA loop on the same frozen model.

The WebUI issue asks for a job's step within 1.05x of "a bare loop on the frozen model": what the job costs
beyond the arithmetic (the WebUI's lock, yielding to generations, suspending the host's networks, progress
and loss logs, our LoRA hooks). This runs in one process started from the WebUI's folder with its venv: A1111
is initialised as ``webui.py`` does it (its ``shared.sd_model``, its hijacks and optimisations), without the
server. Then, alternately (ABAB), in the same worker thread:

- **job**: a standard job through our WebUI glue (``WebUIHost``: the worker, the handle over ``shared.sd_model``,
  the queue in SQLite), target set ``attn_mlp``;
- **bare**: a loop written here from nothing of ours: forward hooks adding ``up(down(x)) * alpha/rank`` on the same
  192 Linear layers of the UNet's transformer blocks, the UNet called as A1111 samples it
  (``sd_model.apply_model``), MSE to the noise, AdamW, gradient clipping — on the job's own images (encoded by
  A1111's VAE) and captions (A1111's ``get_learned_conditioning``), the UNet frozen.

Both: rank 4 / alpha 4, AdamW lr 1e-3, clip 1.0, fp32, batch 1, the job's resolution. A step is the spacing of
``torch.optim.AdamW.step`` calls; the first two of each block are dropped (warm-up, caches); the ratio is the
median of the job's steps over the median of the bare steps, and per block pair.

    cd /work/webui/a1111 && HF_HOME=/work/webui/hf_home HF_HUB_OFFLINE=1 \\
        /work/webui/venv-a1111/bin/python /work/main/bench/webui_step.py \\
        --ckpt models/Stable-diffusion/rand_sd15.safetensors [--steps 14] [--rounds 3] [--resolution 64]

Run it with no WebUI or other heavy work on the machine (it takes ``/tmp/loraq-heavy.lock`` for its runs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from heavy_lock import DEFAULT as LOCK_FILE, HeavyLock  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_a1111(ckpt: Path):
    """A1111 initialised as webui.py does (no server, no extensions' UI): returns ``modules.shared``."""
    sys.argv = ["webui.py", "--skip-torch-cuda-test", "--skip-version-check", "--use-cpu", "all", "--no-half",
                "--precision", "full", "--disable-nan-check", "--no-download-sd-model", "--ckpt", str(ckpt),
                "--skip-load-model-at-start"]
    sys.path.insert(0, os.getcwd())
    from modules import initialize
    initialize.imports()
    initialize.initialize()
    from modules import shared
    shared.sd_model  # noqa: B018  (loads it, as the WebUI's own start thread does)
    from modules import sd_hijack
    if sd_hijack.current_optimizer is None:
        sd_hijack.apply_optimizations()
    return shared


class Stamps:
    """Times of every AdamW step in this process (both sides use torch.optim.AdamW)."""

    def __init__(self):
        import torch
        self.times: list[float] = []
        original = torch.optim.AdamW.step
        stamps = self

        def step(optimizer, *args, **kwargs):
            out = original(optimizer, *args, **kwargs)
            stamps.times.append(time.perf_counter())
            return out

        torch.optim.AdamW.step = step

    def take(self) -> list[float]:
        times, self.times = self.times, []
        return [b - a for a, b in zip(times, times[1:])]


def make_dataset(folder: Path, resolution: int) -> list[tuple[Path, str]]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = ["a red square on a white background", "a blue circle in a garden", "a green triangle at night",
                "a yellow star over the sea"]
    items = []
    for i, caption in enumerate(captions):
        pixels = (rng.random((resolution, resolution, 3)) * 255).astype("uint8")
        q = resolution // 4
        pixels[q:3 * q, q:3 * q] = [(200, 40, 40), (40, 40, 200), (40, 200, 40), (220, 220, 40)][i]
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
        items.append((folder / f"{i}.png", caption))
    return items


def transformer_layers(unet) -> list:
    """The ``attn_mlp`` target set as kohya counts it: every Linear of the UNet's transformers (attention and
    MLP) and their proj_in / proj_out (1x1 convolutions in SD1.5): 192 layers in SD1.5."""
    import torch
    from ldm.modules.attention import SpatialTransformer

    layers = []
    for block in unet.modules():
        if isinstance(block, SpatialTransformer):
            layers += [m for m in block.modules() if isinstance(m, torch.nn.Linear)
                       or (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1))]
    return layers


def _lora_hook(down, up, scale: float):
    """``out + up(down(x)) * scale`` for a Linear (features last) or a 1x1 Conv2d (channels first)."""
    import torch.nn.functional as F

    def hook(module, inputs, out):
        x = inputs[0]
        if x.dim() == 4:   # a 1x1 convolution: down then up over the channels, as kohya's LoRA module does
            return out + F.conv2d(F.conv2d(x, down[:, :, None, None]), up[:, :, None, None]) * scale
        return out + (x @ down.t() @ up.t()) * scale
    return hook


class BareLoop:
    """The reference: a plain LoRA by forward hooks, a plain step; nothing of LoRA Queue's."""

    def __init__(self, shared, items, rank: int, alpha: float, lr: float, seed: int):
        import numpy as np
        import torch
        from PIL import Image

        self.shared, self.model = shared, shared.sd_model
        unet = self.model.model.diffusion_model
        self.frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        torch.manual_seed(seed)
        self.pairs, self.hooks, params = [], [], []
        for layer in transformer_layers(unet):
            n_in, n_out = (layer.in_features, layer.out_features) if isinstance(layer, torch.nn.Linear) else \
                (layer.in_channels, layer.out_channels)
            down = torch.nn.Parameter(torch.randn(rank, n_in) / rank)
            up = torch.nn.Parameter(torch.zeros(n_out, rank))
            self.pairs.append((down, up))
            params += [down, up]
            self.hooks.append(layer.register_forward_hook(_lora_hook(down, up, alpha / rank)))
        self.layers = len(self.pairs)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr)
        with torch.no_grad():
            latents = []
            for path, _ in items:
                image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
                pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
                posterior = self.model.encode_first_stage(pixels)
                latents.append(self.model.get_first_stage_encoding(posterior))
            self.latents = latents
            self.conds = [self.model.get_learned_conditioning([caption]) for _, caption in items]
        self.generator = torch.Generator().manual_seed(seed)
        self.n = 0

    def step(self) -> None:
        import torch

        i = self.n % len(self.latents)
        self.n += 1
        for p, _ in self.frozen:
            p.requires_grad_(False)
        x0, cond = self.latents[i], self.conds[i]
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(0, 1000, (1,), generator=self.generator)
        alphas = self.model.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        noisy = alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise
        pred = self.model.apply_model(noisy, t, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for p, flag in self.frozen:
            p.requires_grad_(flag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint A1111 loads (single file)")
    parser.add_argument("--steps", type=int, default=14, help="steps per block (the first two are not counted)")
    parser.add_argument("--rounds", type=int, default=3, help="job-bare block pairs (alternating order)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    parser.add_argument("--json", type=Path, help="write every step time here")
    parser.add_argument("--lock", default=LOCK_FILE, help="the file locked around each round (others' heavy work waits)")
    args = parser.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    log(f"initialising A1111 in {os.getcwd()} with {args.ckpt}")
    shared = start_a1111(args.ckpt.resolve())
    from modules import call_queue
    torch.set_num_threads(args.threads)   # A1111's start may have changed it

    sys.path.insert(0, str(ROOT))
    from trainer import jobs
    from trainer.host.webui import WebUIHost

    work = Path(tempfile.mkdtemp(prefix="webui-step-"))
    items = make_dataset(work / "img", args.resolution)
    host = WebUIHost(get_sd_model=lambda: shared.sd_model, queue_lock=call_queue.queue_lock,
                     lora_dir=work / "loras", data_dir=work / "data")
    worker = host.start()
    stamps = Stamps()
    bare_box: dict = {}

    def job_block(n: int) -> list[float]:
        job = jobs.job_from_dict({
            "mode": "standard", "name": f"bench_{n}", "dataset_dir": str(work / "img"), "resolution": args.resolution,
            "enable_buckets": False, "network_dim": 4, "network_alpha": 4.0, "target_set": "attn_mlp",
            "optimizer": "AdamW", "lr": 1e-3, "lr_scheduler": "constant", "batch_size": 1, "steps": args.steps,
            "mixed_precision": "no", "save_precision": "fp32", "max_grad_norm": 1.0, "seed": 42,
            "sample_every_n_steps": 0, "save_every_n_steps": 0})
        job_id = worker.queue.add(job)
        while worker.queue.get(job_id).state not in ("done", "failed", "cancelled", "stopped"):
            time.sleep(0.2)
        row = worker.queue.get(job_id)
        if row.state != "done":
            raise RuntimeError(f"job {job_id} {row.state}: {row.error}")
        return stamps.take()

    def bare_block() -> list[float]:
        """The bare steps inside a thread of their own, as the worker's (never at the same time as a job)."""
        done = threading.Event()

        def run():
            try:
                loop = bare_box.get("loop")
                if loop is None:
                    loop = bare_box["loop"] = BareLoop(shared, items, rank=4, alpha=4.0, lr=1e-3, seed=42)
                    stamps.take()
                for _ in range(args.steps):
                    with call_queue.queue_lock:   # the job takes the WebUI's lock for each step too
                        loop.step()
            except BaseException as e:  # reported below
                bare_box["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        done.wait()
        if "error" in bare_box:
            raise bare_box["error"]
        return stamps.take()

    blocks = []
    try:
        for r in range(args.rounds):
            order = ("job", "bare") if r % 2 == 0 else ("bare", "job")
            with HeavyLock(args.lock):
                for side in order:
                    steps = job_block(r) if side == "job" else bare_block()
                    steady = steps[2:] if len(steps) > 3 else steps
                    blocks.append({"side": side, "round": r, "steps": steps, "median": statistics.median(steady)})
                    log(f"round {r} {side}: median step {blocks[-1]['median']:.3f} s ({len(steps)} spacings)")
    finally:
        if "loop" in bare_box:
            bare_box["loop"].close()
        worker.stop()
    job_steps = [s for b in blocks if b["side"] == "job" for s in b["steps"][2:]]
    bare_steps = [s for b in blocks if b["side"] == "bare" for s in b["steps"][2:]]
    ratios = [j["median"] / b["median"] for j, b in zip([b for b in blocks if b["side"] == "job"],
                                                          [b for b in blocks if b["side"] == "bare"])]
    layers = bare_box["loop"].layers if "loop" in bare_box else 0
    grads = sum(1 for p in shared.sd_model.parameters() if p.grad is not None)
    print(f"\nA1111 at {os.getcwd()}, {args.resolution} px, rank 4, {layers} layers, {args.steps} steps x "
          f"{args.rounds} rounds, {args.threads} thread(s)")
    print(f"job median {statistics.median(job_steps):.3f} s, bare median {statistics.median(bare_steps):.3f} s, "
          f"ratio {statistics.median(job_steps) / statistics.median(bare_steps):.3f}x; "
          f"per round pair {', '.join(f'{r:.3f}' for r in ratios)}; base parameters with .grad after: {grads}")
    if args.json:
        args.json.write_text(json.dumps({"blocks": blocks, "ratios": ratios, "layers": layers}, indent=1))


if __name__ == "__main__":
    main()
