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


# The peak of this process's own memory (VmHWM: ru_maxrss would carry the forking pytest's peak over)
BAKE_PEAK = '''
import sys
from trainer.merge.bake import bake_loras
from trainer.merge.svd_merge import MergeInput
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
before = peak()
bake_loras(sys.argv[1], [MergeInput(sys.argv[2], 0.7)], sys.argv[3])
print(before, peak() - before)
'''


def test_a_bake_streams_the_checkpoint_untouched_tensors_are_copied_and_memory_stays_below_one_big_tensor(tmp_path):
    """Inside A1111 a bake of a 2 GB SD1.5 file took the WebUI from 5.5 to 15.8 GB (every tensor, their float64
    sums and the file's bytes at once); an SDXL file would not fit a 32 GB machine. The bake now holds one weight
    at a time: with a 256 MB tensor it does not touch (an EMA copy, as many checkpoints carry), the process's
    peak grows by less than half of it. Every untouched tensor and the metadata come out bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    pipe = tiny_pipeline("sd1")
    big = torch.randn(64, 1024, 1024).to(torch.float16)          # 128 M values, 256 MB
    extra = {"model_ema.big": big, "model_ema.decay": torch.tensor(0.9999), "model_ema.bf": torch.randn(7).bfloat16()}
    base = write_checkpoint(pipe, "sd1", tmp_path / "base.safetensors", extra=extra, metadata={"note": "kept"})
    cfg = write_config_dir(pipe, tmp_path / "cfg")
    handle = DiffusersHandle(load_single_file(base, config_dir=cfg, tokenizer_cache_dir=tmp_path / "tok"))
    lora = _random_lora(handle, tmp_path / "a.safetensors", 1)
    del big, extra
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", BAKE_PEAK, str(base), str(lora), str(tmp_path / "baked.safetensors")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.split()[-1])
    assert growth < 128 * 2**20, f"the bake's peak grew by {growth / 2**20:.0f} MB with a 256 MB tensor it never changes"
    before, after = load_file(str(base)), load_file(str(tmp_path / "baked.safetensors"))
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in changed)
    assert all(before[k].dtype == after[k].dtype for k in before)
    for key in ("model_ema.big", "model_ema.decay", "model_ema.bf"):
        assert torch.equal(before[key], after[key])
    with safe_open(str(tmp_path / "baked.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["note"] == "kept" and meta["loraq_baked"] == "a.safetensors:0.7"
