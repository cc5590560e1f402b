"""Standard-mode step time against a plain reference loop, on the full-size SD1.5 UNet (random weights).

Both sides in one process, one CPU thread, batch 1 at 256 px (32x32 latents), LoRA rank 16 on the same
modules (kohya's default set: attention projections, proj_in/out, feed-forward), AdamW:

- ours: ``train_standard`` end to end (dataset, cached latents, text-embedding cache, LoRA hooks, loop,
  CSV log, progress events); the step time is the spacing of its progress events;
- reference: a bare loop written plainly here, LoRA via peft on the same UNet.

Also: the time from job start to the first step with a warm latent cache.

    python bench/train_step.py [--steps 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def build_pipeline(tmp: Path):
    """SD1.5 UNet from the shipped config; a small VAE (8x down) and a 1-layer 768-wide text encoder, so
    the step cost is the UNet's, as in real training with cached latents and embeddings."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import char_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ROOT / "trainer/models/configs/sd15/unet"))
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=16, bos_token_id=512,
                                        eos_token_id=513, pad_token_id=513))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=char_tokenizer(tmp / "tok"), unet=unet,
                                   scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def ours(pipe, tmp: Path, steps: int) -> tuple[list[float], float]:
    from PIL import Image

    from trainer import jobs
    from trainer.models.diffusers_model import DiffusersHandle
    from trainer.modes.standard import JobContext
    from trainer.runner import run_job

    data = tmp / "data"
    data.mkdir()
    Image.new("RGB", (256, 256), (200, 40, 40)).save(data / "a.png")
    (data / "a.txt").write_text("a red square")
    handle = DiffusersHandle(pipe)
    common = dict(dataset_dir=str(data), resolution=256, min_bucket_reso=256, max_bucket_reso=256, network_dim=16,
                  network_alpha=16.0, target_set="attn_mlp", optimizer="AdamW", lr=1e-4, batch_size=1,
                  mixed_precision="no", output_dir=str(tmp / "out"), overwrite=True)
    ctx = lambda events: JobContext(output_dir=tmp / "out", cache_dir=tmp / "cache", events=events, log=lambda m: None)
    run_job(jobs.StandardJob(name="warm", steps=1, **common), handle, ctx(None))  # warms the latent cache
    stamps: list[float] = []
    start = time.perf_counter()
    run_job(jobs.StandardJob(name="bench", steps=steps, **common), handle, ctx(lambda p: stamps.append(time.perf_counter())))
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    to_first_step = stamps[0] - start - statistics.median(step_times)
    return step_times, to_first_step


def reference(pipe, steps: int) -> list[float]:
    """The plain loop: peft LoRA, fixed latents and text embedding, eps loss, AdamW."""
    from peft import LoraConfig

    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    latents = torch.randn(1, 4, 32, 32)
    cond = torch.randn(1, 16, 768)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp))
        pipe.unet.requires_grad_(False)
        ours_times, first = ours(pipe, Path(tmp), args.steps)
        ref_times = reference(pipe, args.steps)
    o, r = statistics.median(ours_times), statistics.median(ref_times)
    print(f"ours      median {o:.3f} s/step over {len(ours_times)} steps: {[round(x, 3) for x in ours_times]}")
    print(f"reference median {r:.3f} s/step over {len(ref_times)} steps: {[round(x, 3) for x in ref_times]}")
    print(f"ratio ours/reference = {o / r:.3f}")
    print(f"job start -> first step (warm latent cache): {first:.2f} s")


if __name__ == "__main__":
    main()
