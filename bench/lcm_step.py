"""Our LCM distillation step against a reference step written plainly from the diffusers script's algorithm.

Reference (``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``, as the script does it):
a separate teacher UNet (a deep copy of the base), the student = the base UNet with the LoRA, the
conditional and unconditional teacher passes as two separate calls. Ours (``trainer.train.modes.lcm``): one
UNet, the teacher = the LoRA switched off, cond + uncond batched in one forward.

Same model, batch, draws and LoRA weights; one run each after a warm-up. Time is wall clock of forward +
backward of the step (optimizer excluded, identical in both); peak memory is the peak extra RSS above
the process's idle RSS, sampled every 2 ms, with the reference's teacher copy counted (it is the point).

    python bench/lcm_step.py [--model demo] [--batch 4] [--size 64]
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from trainer.models.diffusers_model import load_handle
from trainer.models.handle import TargetOptions
from trainer.train.modes import lcm
from trainer.lora.network import LoraNetwork, NetworkShape


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the RSS at entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


# -- the reference, written plainly from the diffusers script ---------------------------------------

def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    scaled_timestep = timestep_scaling * timestep
    c_skip = sigma_data ** 2 / (scaled_timestep ** 2 + sigma_data ** 2)
    c_out = scaled_timestep / (scaled_timestep ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


def get_predicted_original_sample(model_output, timesteps, sample, alphas, sigmas):
    return (sample - sigmas[timesteps].view(-1, 1, 1, 1) * model_output) / alphas[timesteps].view(-1, 1, 1, 1)


def reference_step(unet, teacher_unet, latents, noise, index, w, prompt_embeds, uncond_prompt_embeds,
                   alpha_cumprod, num_ddim_timesteps=50, huber_c=0.001):
    alpha_schedule, sigma_schedule = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
    topk = 1000 // num_ddim_timesteps
    ddim_timesteps = torch.arange(1, num_ddim_timesteps + 1) * topk - 1
    ddim_alpha_cumprods_prev = torch.cat([alpha_cumprod[:1], alpha_cumprod[ddim_timesteps[:-1]]])
    # 1. timesteps
    start_timesteps = ddim_timesteps[index]
    timesteps = (start_timesteps - topk).clamp(min=0)
    # 3. boundary scalings
    c_skip_start, c_out_start = [x.view(-1, 1, 1, 1) for x in scalings_for_boundary_conditions(start_timesteps)]
    c_skip, c_out = [x.view(-1, 1, 1, 1) for x in scalings_for_boundary_conditions(timesteps)]
    # 4. noise
    noisy_model_input = (alpha_schedule[start_timesteps].view(-1, 1, 1, 1) * latents
                         + sigma_schedule[start_timesteps].view(-1, 1, 1, 1) * noise)
    w = w.view(-1, 1, 1, 1)
    # 7. online student
    noise_pred = unet(noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds).sample
    pred_x_0 = get_predicted_original_sample(noise_pred, start_timesteps, noisy_model_input, alpha_schedule,
                                             sigma_schedule)
    model_pred = c_skip_start * noisy_model_input + c_out_start * pred_x_0
    # 8. teacher: cond and uncond as separate calls, LCM-paper guidance, one DDIM step
    with torch.no_grad():
        cond_teacher_output = teacher_unet(noisy_model_input, start_timesteps,
                                           encoder_hidden_states=prompt_embeds).sample
        cond_pred_x0 = get_predicted_original_sample(cond_teacher_output, start_timesteps, noisy_model_input,
                                                     alpha_schedule, sigma_schedule)
        uncond_teacher_output = teacher_unet(noisy_model_input, start_timesteps,
                                             encoder_hidden_states=uncond_prompt_embeds).sample
        uncond_pred_x0 = get_predicted_original_sample(uncond_teacher_output, start_timesteps, noisy_model_input,
                                                       alpha_schedule, sigma_schedule)
        pred_x0 = cond_pred_x0 + w * (cond_pred_x0 - uncond_pred_x0)
        pred_noise = cond_teacher_output + w * (cond_teacher_output - uncond_teacher_output)
        alpha_prev = ddim_alpha_cumprods_prev[index].view(-1, 1, 1, 1)
        x_prev = alpha_prev.sqrt() * pred_x0 + (1 - alpha_prev).sqrt() * pred_noise
    # 9. target: the online student at t_n without gradient
    with torch.no_grad():
        target_noise_pred = unet(x_prev, timesteps, encoder_hidden_states=prompt_embeds).sample
        pred_x_0 = get_predicted_original_sample(target_noise_pred, timesteps, x_prev, alpha_schedule, sigma_schedule)
        target = c_skip * x_prev + c_out * pred_x_0
    # 10. loss
    return torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + huber_c ** 2) - huber_c)


def compare(argv: list[str]) -> int:
    import subprocess

    results = {}
    for variant in ("ours", "reference"):
        out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True,
                             check=True).stdout
        _, _, loss, seconds, mb = next(line for line in out.splitlines() if line.startswith("RESULT")).split()
        results[variant] = (float(loss), float(seconds), float(mb))
        print(f"{variant:10s} loss {float(loss):.6f}  step {float(seconds) * 1000:.0f} ms  peak extra RSS {float(mb):.1f} MB")
    (l1, t1, m1), (l2, t2, m2) = results["ours"], results["reference"]
    print(f"time ratio ours/reference {t1 / t2:.2f}; peak memory ratio ours/reference {m1 / max(m2, 1e-9):.2f}; "
          f"same loss: {abs(l1 - l2) <= 1e-5 * max(1.0, abs(l2))}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--variant", choices=("ours", "reference"), help="run one variant (the bench runs each "
                        "in its own process, so that one's freed memory cannot hide the other's peak)")
    args = parser.parse_args(argv)
    if args.variant is None:
        return compare(sys.argv[1:] if argv is None else argv)   # the variants get the same options
    torch.set_num_threads(1)

    handle = load_handle(args.model, device="cpu")
    if handle.arch == "sdxl" or handle.prediction != "eps":
        raise SystemExit("the plain reference handles SD1/SD2 eps models only")
    network = LoraNetwork(handle.lora_targets(TargetOptions("attn_mlp")), NetworkShape(args.rank, args.rank), seed=0)
    torch.manual_seed(0)                      # the same LoRA weights in both processes
    with torch.no_grad():
        for module in network.lora.values():
            module.lora_up.weight.normal_(0, 0.01)
    network.attach()
    b, f, size = args.batch, handle.vae_scale, (args.size, args.size)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, args.size // f, args.size // f, generator=g)
    with torch.no_grad():
        cond = handle.encode_prompts(["a red circle on a white background"] * b, size)
        uncond = handle.uncond(b, size)
    settings = lcm.LcmSettings()
    draw = lcm.draw_step(latents, settings, g)
    abar = handle.alphas_cumprod

    def ours():
        loss = lcm.consistency_distillation_loss(handle, network, latents, cond, uncond, settings, draw)
        loss.backward()
        return float(loss)

    teacher_holder = {}

    def reference():
        # The script's separate teacher: a full copy of the base UNet, made once before training.
        if "unet" not in teacher_holder:
            network.detach()
            teacher_holder["unet"] = copy.deepcopy(handle.unet).requires_grad_(False)
            network.attach()
        loss = reference_step(handle.unet, teacher_holder["unet"], latents, draw.noise, draw.index, draw.w,
                              cond.crossattn, uncond.crossattn, abar)
        loss.backward()
        return float(loss)

    fn = ours if args.variant == "ours" else reference
    with PeakRss() as mem:
        loss = fn()                          # warm-up; the reference makes its teacher copy here
        times = []
        for _ in range(args.repeats):
            network.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    print(f"RESULT {args.variant} {loss:.8f} {sorted(times)[len(times) // 2]:.6f} {mem.extra_mb:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
