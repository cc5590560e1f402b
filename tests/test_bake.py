"""Bake LoRAs into a single-file checkpoint: the baked model's UNet and text encoders give what the base gives
with the LoRAs applied at their ratios (1e-4 relative), SD1 and SDXL (whose second text encoder is OpenCLIP
with fused q/k/v); run as typed on the command line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_single_file import tiny_pipeline, write_checkpoint, write_config_dir
from trainer.lora.network import LoraNetwork, NetworkShape
from trainer.merge.bake import bake_loras
from trainer.merge.svd_merge import MergeError, MergeInput
from trainer.models.diffusers_model import DiffusersHandle
from trainer.models.handle import TargetOptions
from trainer.models.single_file import load_single_file

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _random_lora(handle, path: Path, seed: int) -> Path:
    network = LoraNetwork(handle.lora_targets(TargetOptions("all", True)), NetworkShape(4, 2.0, 2, 1.0), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.05)
    network.save(path, {}, torch.float32)
    return path


@torch.no_grad()
def _outputs(pipe, arch: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 90, (1, 77), generator=g)
    h1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    outs = [h1]
    if arch == "sdxl":
        e = pipe.text_encoder_2(ids, output_hidden_states=True)
        outs += [e.hidden_states[-2], e.text_embeds]
        context = torch.cat([h1, e.hidden_states[-2]], dim=-1)
        added = {"text_embeds": e.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    else:
        context, added = h1, None
    latents = torch.randn(1, 4, 8, 8, generator=g)
    outs.append(pipe.unet(latents, torch.tensor([500]), context, added_cond_kwargs=added).sample)
    return outs


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_baked_checkpoint_equals_the_base_with_the_loras_applied(tmp_path, arch):
    pipe = tiny_pipeline(arch)
    base = write_checkpoint(pipe, arch, tmp_path / "base.safetensors")
    cfg = write_config_dir(pipe, tmp_path / "cfg")
    loaded = load_single_file(base, config_dir=cfg, tokenizer_cache_dir=tmp_path / "tok")
    handle = DiffusersHandle(loaded)
    a, b = _random_lora(handle, tmp_path / "a.safetensors", 1), _random_lora(handle, tmp_path / "b.safetensors", 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "trainer", "bake", "--out", "baked.safetensors", "--model",
                          "base.safetensors", "a.safetensors:0.6", "b.safetensors:-0.3"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "baked 2 LoRAs" in run.stdout

    expected = []
    networks = []
    for path, ratio in ((a, 0.6), (b, -0.3)):
        from trainer.lora.network import network_for_file
        net = network_for_file(handle, path)
        net.multiplier = ratio
        net.attach()
        networks.append(net)
    expected = _outputs(loaded, arch)
    for net in networks:
        net.detach()
    plain = _outputs(loaded, arch)
    baked = load_single_file(tmp_path / "baked.safetensors", config_dir=cfg, tokenizer_cache_dir=tmp_path / "tok")
    got = _outputs(baked, arch)
    for want, have, before in zip(expected, got, plain):
        scale = float(want.abs().max())
        assert float((want - have).abs().max()) <= 1e-4 * scale
        assert float((want - before).abs().max()) > 1e-3 * scale, "the LoRAs must change this output"


def test_a_lora_for_another_model_is_refused_and_nothing_is_written(tmp_path):
    pipe = tiny_pipeline("sd1")
    base = write_checkpoint(pipe, "sd1", tmp_path / "base.safetensors")
    xl = tiny_pipeline("sdxl")
    xl_base = write_checkpoint(xl, "sdxl", tmp_path / "xl.safetensors")
    handle = DiffusersHandle(load_single_file(xl_base, config_dir=write_config_dir(xl, tmp_path / "cfg"),
                                              tokenizer_cache_dir=tmp_path / "tok"))
    lora = _random_lora(handle, tmp_path / "xl_lora.safetensors", 1)
    with pytest.raises(MergeError, match="SDXL"):
        bake_loras(base, [MergeInput(str(lora), 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_modules_outside_the_unet_blocks_are_baked_at_the_base_block_weight(tmp_path):
    """As in SuperMerger: the time embedding is in no block, so a block list gives it BASE's weight (0.5 here)
    while a block the list sets to 0 is left alone."""
    from safetensors.torch import load_file, save_file

    base = write_checkpoint(tiny_pipeline("sd1"), "sd1", tmp_path / "base.safetensors")
    weights = load_file(str(base))
    time_key, block_key = "model.diffusion_model.time_embed.0.weight", "model.diffusion_model.out.2.weight"
    g = torch.Generator().manual_seed(5)
    out, inp = weights[time_key].shape
    up, down = torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g)
    conv_in = weights["model.diffusion_model.input_blocks.0.0.weight"]
    cup, cdown = torch.randn(conv_in.shape[0], 2, 1, 1, generator=g), torch.randn(2, *conv_in.shape[1:], generator=g)
    save_file({"lora_unet_time_embedding_linear_1.lora_up.weight": up,
               "lora_unet_time_embedding_linear_1.lora_down.weight": down,
               "lora_unet_time_embedding_linear_1.alpha": torch.tensor(2.0),
               "lora_unet_conv_in.lora_up.weight": cup, "lora_unet_conv_in.lora_down.weight": cdown,
               "lora_unet_conv_in.alpha": torch.tensor(2.0)}, str(tmp_path / "lora.safetensors"))
    blocks = ",".join(["0.5"] + ["0"] * 25)      # BASE 0.5; IN00 (conv_in) 0
    bake_loras(base, [MergeInput(str(tmp_path / "lora.safetensors"), 0.8, blocks)], tmp_path / "baked.safetensors")
    baked = load_file(str(tmp_path / "baked.safetensors"))
    expected = weights[time_key].double() + 0.8 * 0.5 * (up.double() @ down.double())
    assert float((baked[time_key].double() - expected).abs().max()) <= 1e-6 * float(expected.abs().max())
    assert torch.equal(baked["model.diffusion_model.input_blocks.0.0.weight"], conv_in)
    assert torch.equal(baked[block_key], weights[block_key])
