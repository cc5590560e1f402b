"""Standard-mode step time against a plain reference loop, on the full-size SD1.5 UNet (random weights).

Both sides in one process, one CPU thread, batch 1 at 256 px (32x32 latents), LoRA rank 16 on the same
modules (kohya's default set: attention projections, proj_in/out, feed-forward), AdamW:

- ours: ``train_standard`` end to end (dataset, cached latents, text-embedding cache, LoRA hooks, loop,
  CSV log, progress events); the step time is the spacing of its progress events;
- reference: a bare loop written plainly here, LoRA via peft on the same UNet.

Also: the time from job start to the first step with a warm latent cache.

    python bench/train_step.py [--steps 3] [--rounds 3]
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


class OurSide:
    """Runs standard-mode jobs on the pipeline; times each step from the loop's start and its events."""

    def __init__(self, pipe, tmp: Path):
        from PIL import Image

        from trainer.models.diffusers_model import DiffusersHandle
        from trainer.train.modes import loop

        data = tmp / "data"
        data.mkdir()
        Image.new("RGB", (256, 256), (200, 40, 40)).save(data / "a.png")
        (data / "a.txt").write_text("a red square")
        self.tmp, self.handle = tmp, DiffusersHandle(pipe)
        self.common = dict(dataset_dir=str(data), resolution=256, min_bucket_reso=256, max_bucket_reso=256,
                           network_dim=16, network_alpha=16.0, target_set="attn_mlp", optimizer="AdamW", lr=1e-4,
                           batch_size=1, mixed_precision="no", overwrite=True)
        self.loop_started: list[float] = []
        original_run = loop.TrainingLoop.run

        def timed_run(this, compute_loss):
            self.loop_started.append(time.perf_counter())
            return original_run(this, compute_loss)

        loop.TrainingLoop.run = timed_run

    def job(self, steps: int) -> tuple[list[float], float]:
        """(step times, seconds from job start to the first step)."""
        from trainer import jobs
        from trainer.train.context import JobContext
        from trainer.train.runner import run_job

        stamps: list[float] = []
        ctx = JobContext(output_dir=self.tmp / "out", cache_dir=self.tmp / "cache",
                         events=lambda p: stamps.append(time.perf_counter()), log=lambda m: None)
        start = time.perf_counter()
        run_job(jobs.StandardJob(name="bench", steps=steps, **self.common), self.handle, ctx)
        begin = self.loop_started[-1]
        return [b - a for a, b in zip([begin] + stamps, stamps)], begin - start


class ReferenceSide:
    """The plain loop: peft LoRA on the same modules, fixed latents and text embedding, eps loss, AdamW.

    It trains a copy of the same UNet (same weights), because peft replaces the modules it wraps."""

    def __init__(self, pipe):
        import copy

        from peft import LoraConfig

        self.unet = copy.deepcopy(pipe.unet)
        self.unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
        self.latents, self.cond = torch.randn(1, 4, 32, 32), torch.randn(1, 16, 768)
        self.g = torch.Generator().manual_seed(0)

    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            noise = torch.randn(self.latents.shape, generator=self.g)
            t = torch.randint(0, 1000, (1,), generator=self.g)
            a = self.abar[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * self.latents + (1 - a).sqrt() * noise
            pred = self.unet(noisy, t, encoder_hidden_states=self.cond).sample
            loss = torch.nn.functional.mse_loss(pred, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="steps per block (the first of each is not counted)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved blocks per side")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ours_times, ref_times, to_first = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp))
        pipe.unet.requires_grad_(False)
        our_side = OurSide(pipe, Path(tmp))
        our_side.job(1)  # warms the latent cache
        reference_side = ReferenceSide(pipe)
        reference_side.steps(1)  # warm-up
        for _ in range(args.rounds):  # interleaved, so machine noise hits both sides alike
            times, first = our_side.job(args.steps)
            ours_times += times[1:]
            to_first.append(first)
            ref_times += reference_side.steps(args.steps)[1:]
    o, r = statistics.median(ours_times), statistics.median(ref_times)
    print(f"ours      median {o:.3f} s/step over {len(ours_times)} steps: {[round(x, 2) for x in ours_times]}")
    print(f"reference median {r:.3f} s/step over {len(ref_times)} steps: {[round(x, 2) for x in ref_times]}")
    print(f"ratio ours/reference = {o / r:.3f}")
    print(f"job start -> first step (warm latent cache): median {statistics.median(to_first):.2f} s "
          f"{[round(x, 2) for x in to_first]}")


if __name__ == "__main__":
    main()
