"""Extract a LoRA from two models: the file, applied to the base, gives the tuned model's outputs (where the
difference has at most the asked rank), and otherwise keeps exactly what the optimal truncation keeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from trainer.lora.network import network_for_file
from trainer.merge.extract import extract_lora
from trainer.merge.svd_merge import MergeError, RankPolicy
from trainer.models.diffusers_model import load_handle

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def _tuned_from(base_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The base model with known low-rank changes in three modules (attention, a 3x3 ResNet conv, the text
    encoder); returns the deltas by module path."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(3)
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    named = dict(pipe.text_encoder.named_modules())        # transformers 5 dropped the text_model level
    te = named.get("text_model.encoder.layers.0.self_attn.q_proj") or named["encoder.layers.0.self_attn.q_proj"]
    deltas = {
        "attn": torch.randn(attn.weight.shape[0], 2, generator=g) @ torch.randn(2, attn.weight.shape[1], generator=g),
        "conv": (torch.randn(conv.weight.shape[0], 1, generator=g)
                 @ torch.randn(1, conv.weight[0].numel(), generator=g)).reshape(conv.weight.shape),
        "te": torch.randn(te.weight.shape[0], 1, generator=g) @ torch.randn(1, te.weight.shape[1], generator=g),
    }
    with torch.no_grad():
        for module, name in ((attn, "attn"), (conv, "conv"), (te, "te")):
            deltas[name] *= 0.2 * float(module.weight.norm()) / float(deltas[name].norm())
            module.weight += deltas[name]
    pipe.save_pretrained(out)
    return deltas


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    tiny.sd1_pipeline(tmp).save_pretrained(tmp / "base")
    deltas = _tuned_from(tmp / "base", tmp / "tuned")
    return tmp, deltas


def test_extract_as_typed_reproduces_the_tuned_model_when_the_rank_suffices(models):
    tmp, _ = models
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "trainer", "extract", "--out", "x.safetensors", "--rank", "2",
                          "--dtype", "fp32", "--report-json", "report.json", "tuned", "base"], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "extracted 3 modules" in run.stdout, run.stdout
    keys = {k.rsplit(".", 2)[0] for k in load_file(tmp / "x.safetensors")}
    assert keys == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                    "lora_unet_down_blocks_0_resnets_0_conv1",
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
    assert json.loads((tmp / "report.json").read_text())["totals"]["max_relative_error"] < 1e-5

    base, tuned = load_handle(str(tmp / "base")), load_handle(str(tmp / "tuned"))
    network = network_for_file(base, tmp / "x.safetensors")
    network.attach()
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():
        cond_base, cond_tuned = base.encode_prompts(["a red circle"], (64, 64)), tuned.encode_prompts(["a red circle"], (64, 64))
        out_base, out_tuned = base.predict(z, t, cond_base), tuned.predict(z, t, cond_tuned)
        network.detach()
        plain = base.predict(z, t, base.encode_prompts(["a red circle"], (64, 64)))
    assert float((out_base - out_tuned).abs().max()) < 1e-4 * float(out_tuned.abs().max())
    assert float((plain - out_tuned).abs().max()) > 1e-2 * float(out_tuned.abs().max()), "the change must matter"


def test_a_lower_rank_keeps_exactly_the_optimal_truncation_and_says_so(models):
    tmp, deltas = models
    base, tuned = load_handle(str(tmp / "base")), load_handle(str(tmp / "tuned"))
    result = extract_lora(tuned, base, RankPolicy(rank=1), dtype=torch.float64)
    report = next(m for m in result.modules if m.name.endswith("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"))
    s = torch.linalg.svdvals(deltas["attn"].double())
    assert report.rank == 1
    assert report.relative_error == pytest.approx(float(s[1] / torch.linalg.norm(s)), rel=1e-6)
    changed = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert len(result.unchanged) > 50 and changed not in result.unchanged and report.name == changed


def test_two_models_of_different_architectures_are_refused(models, tmp_path):
    tmp, _ = models
    tiny.sdxl_pipeline(tmp_path).save_pretrained(tmp_path / "xl")
    with pytest.raises(MergeError, match="different architectures"):
        extract_lora(load_handle(str(tmp_path / "xl")), load_handle(str(tmp / "base")), RankPolicy(rank=2))
