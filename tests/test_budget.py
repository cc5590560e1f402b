"""The GPU memory budget: our shapes are diffusers' and transformers' shapes, the estimate matches the memory
a real training step takes (measured on CPU), and a job that will not fit is warned about with the setting
that makes it fit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trainer import jobs
from trainer.models import shapes
from trainer.queue.admission import Admission, admit
from trainer.train import budget

ROOT = Path(__file__).resolve().parent.parent
GIB = budget.GIB


def test_shapes_from_our_configs_are_the_libraries_shapes_name_for_name():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    for arch in ("sd1", "sdxl"):
        ours = shapes.model_shapes(arch)
        folder = shapes.CONFIGS / shapes.ARCH_CONFIGS[arch]
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            texts = []
            for part, text in zip(("text_encoder", "text_encoder_2"), ours.text_encoders):
                config = CLIPTextConfig.from_json_file(folder / part / "config.json")
                cls = CLIPTextModelWithProjection if "text_projection.weight" in text.params else CLIPTextModel
                texts.append(cls(config))
        assert {k: tuple(p.shape) for k, p in unet.named_parameters()} == ours.unet.params
        assert {k: tuple(p.shape) for k, p in vae.named_parameters()} == ours.vae.params
        for model, text in zip(texts, ours.text_encoders):
            # transformers 5 dropped the text_model. level; the names are otherwise the same
            theirs = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": tuple(p.shape)
                      for k, p in model.named_parameters()}
            assert theirs == text.params
    assert round(shapes.model_shapes("sd1").unet.count() / 1e6) == 860
    assert round(shapes.model_shapes("sdxl").unet.count() / 1e6) == 2567


# One real training step (our LoRA hooks on the attention/MLP layers, AdamW, clipping) on a UNet of the SD1.5
# layout at 0.4x its width, with and without gradient checkpointing; the peak RSS beyond the state
# before the step. glibc keeps freed heap chunks otherwise (RSS up to 2x the live bytes on this allocator, not
# CUDA's), so large allocations are mmapped and returned at once: RSS then follows the live tensors.
MEASURE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from diffusers import UNet2DConditionModel
from trainer.models import shapes
from trainer.models.handle import LoraTarget, unet_path_in_target_set
from trainer.lora.network import LoraNetwork, NetworkShape
from trainer.train.optim import make_optimizer
config = json.loads(sys.argv[1]); res, batch = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
def trained(config):
    unet = UNet2DConditionModel.from_config(config).requires_grad_(False)
    targets = [LoraTarget(n.replace(".", "_"), m, None) for n, m in unet.named_modules()
               if unet_path_in_target_set(n, "attn_mlp") and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    network = LoraNetwork(targets, NetworkShape(16, 8.0)).attach()
    params = [p for p in network.parameters() if p.requires_grad]
    return unet, params, make_optimizer("AdamW", [{"params": params}], 1e-4)
def step(unet, params, optimizer, x, context):
    out = unet(x, torch.tensor([500] * len(x)), encoder_hidden_states=context).sample
    torch.nn.functional.mse_loss(out, x).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
unet, params, optimizer = trained(config)
x, context = torch.randn(batch, 4, res // 8, res // 8), torch.randn(batch, 77, config["cross_attention_dim"])
# The first step pages in libtorch's and oneDNN's code for these kernels (tens of MiB of RSS, more on some
# machines) and creates the autograd engine's buffers: steps of the same layout at 1/8 the width take that first.
tiny = trained(dict(config, block_out_channels=[c // 8 for c in config["block_out_channels"]], norm_num_groups=8))
tiny[0].train()
for checkpointing in (True, False):
    tiny[0].enable_gradient_checkpointing() if checkpointing else tiny[0].disable_gradient_checkpointing()
    step(*tiny, x[:, :, :8, :8], context)
del tiny
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
unet.enable_gradient_checkpointing(); unet.train()
step(unet, params, optimizer, x, context)
on = peak() - base          # the lower peak first: ru_maxrss only grows
unet.disable_gradient_checkpointing()
step(unet, params, optimizer, x, context)
print(json.dumps({"on": on, "off": peak() - base, "lora": sum(p.numel() for p in params)}))
"""


@pytest.fixture(scope="module")
def measured_step():
    config = dict(shapes.read_config(shapes.CONFIGS / "sd15", "unet"))
    config["block_out_channels"] = [128, 256, 512, 512]
    res, batch = 256, 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "262144"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config), str(res), str(batch)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    model = replace(shapes.model_shapes("sd1"), unet=shapes.unet_shapes(config))
    return model, budget.Settings(resolution=res, batch_size=batch, mixed_precision="no"), json.loads(out.stdout)


def test_lora_parameter_count_is_our_networks(measured_step):
    model, settings, measured = measured_step
    assert budget.lora_parameters(model, settings) == measured["lora"]


def test_budget_matches_the_measured_cpu_peak_of_a_training_step_within_40_percent(measured_step):
    model, settings, measured = measured_step
    cpu = budget.Host(weight_bytes=4, vae_bytes=4, cuda=False)
    for checkpointing, key in ((False, "off"), (True, "on")):
        parts = budget.estimate(model, replace(settings, gradient_checkpointing=checkpointing), cpu).training
        predicted = parts["gradients"] + parts["optimizer state"] + parts["UNet activations"]
        ratio = measured[key] / predicted
        print(f"checkpointing {key}: measured {measured[key] / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB")
        # 0.99-1.00 / 1.01-1.04 (off / on) here after the warm-up (docs/vram-budget.md); the CPU's RSS carries
        # allocator slack the estimate leaves to the CUDA context's 0.5 GiB
        assert 0.7 < ratio < 1.4, (key, measured[key], predicted)
    assert measured["off"] > 1.8 * measured["on"]      # what checkpointing buys, measured


def test_sdxl_numbers_users_know():
    sdxl = budget.Settings(resolution=1024, batch_size=1, optimizer="AdamW8bit")
    plain = budget.estimate("sdxl", sdxl)
    checkpointed = budget.estimate("sdxl", replace(sdxl, gradient_checkpointing=True))
    assert 6.3 * GIB < plain.training["base weights"] < 6.6 * GIB            # 3.47 G parameters at fp16
    assert plain.peak > 12 * GIB and checkpointed.peak < 10 * GIB            # kohya: 1024 px LoRA fits 12 GB with it
    # Caching encodes no more images at once than the batch: at batch 4 the VAE encoder sets the peak
    # unless the UNet's activations are larger.
    four = replace(sdxl, batch_size=4, gradient_checkpointing=True)
    assert budget.estimate("sdxl", four).caching_peak > budget.estimate("sdxl", replace(four, batch_size=1)).caching_peak
    for optimizer, ratio in (("AdamW", 2), ("Lion", 1), ("Prodigy", 4)):
        state = budget.estimate("sd1", replace(sdxl, optimizer=optimizer)).training
        assert state["optimizer state"] == ratio * state["LoRA parameters"]
    adafactor = budget.estimate("sd1", replace(sdxl, optimizer="Adafactor")).training
    assert 0 < adafactor["optimizer state"] < 0.2 * adafactor["LoRA parameters"]
    te = budget.estimate("sdxl", replace(sdxl, train_text_encoder=True)).training
    assert te["LoRA parameters"] > plain.training["LoRA parameters"] and te["text-encoder activations"] > 0


def test_a_job_that_will_not_fit_names_the_setting_that_makes_it_fit():
    host = budget.Host(weight_bytes=2, vae_bytes=2, vae_upcast=True)
    job = budget.Settings(resolution=1024, batch_size=1)
    need = budget.estimate("sdxl", job, host).beyond_the_model()
    assert budget.fit_warning("sdxl", job, host, free=need + 1) is None
    warning = budget.fit_warning("sdxl", job, host, free=4 * GIB)
    assert "with gradient_checkpointing on it needs about" in warning, warning
    warning = budget.fit_warning("sdxl", replace(job, batch_size=4, gradient_checkpointing=True), host, free=3 * GIB)
    assert "while caching latents" in warning and \
        "with batch_size 1 (gradient_accumulation 4 keeps the effective batch)" in warning, warning
    assert "no single setting" in budget.fit_warning("sdxl", job, host, free=10 ** 6)


def test_enqueue_on_a_gpu_warns_with_a_faked_free_memory(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    job = jobs.StandardJob(name="big", dataset_dir=str(data), resolution=1024, batch_size=2)
    gpu = dict(output_root=tmp_path / "out", model_arch="sdxl", model_given=True, gpu_weight_bytes=2)
    errors, warnings = admit(job, tmp_path, Admission(**gpu, gpu_free=3 * GIB))
    assert not errors
    memory = [w for w in warnings if "GPU memory" in w]
    assert memory and "gradient_checkpointing on" in memory[0], warnings
    errors, warnings = admit(job, tmp_path, Admission(**gpu, gpu_free=40 * GIB))
    assert not errors and not [w for w in warnings if "GPU memory" in w]
    errors, warnings = admit(job, tmp_path, Admission(tmp_path / "out", model_arch="sdxl", model_given=True))
    assert not [w for w in warnings if "GPU memory" in w]          # no GPU: no estimate


def test_the_card_tables_in_the_docs_are_what_the_estimate_gives_today():
    import runpy

    cards = runpy.run_path(str(ROOT / "bench" / "vram_cards.py"))
    doc = (ROOT / "docs" / "vram-budget.md").read_text()
    for arch in ("sd1", "sdxl"):
        assert cards["table"](arch) in doc, f"docs/vram-budget.md is out of date: run python bench/vram_cards.py"
