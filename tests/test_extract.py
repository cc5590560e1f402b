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


# --- single-file checkpoints, streamed ------------------------------------------------------------------------

def _tuned_checkpoint(base: Path, out: Path, changes: dict[str, tuple[int, int | None]], seed: int = 7) -> dict:
    """``base`` with a low-rank change of the given rank in each named tensor (a row block of 3 for a fused
    q/k/v weight); returns the changes by (tensor key, row)."""
    from safetensors.torch import save_file

    weights = load_file(str(base))
    g = torch.Generator().manual_seed(seed)
    made = {}
    for key, (rank, row) in changes.items():
        w = weights[key]
        rows = w.shape[0] // 3 if row is not None else w.shape[0]
        flat = w[0].numel()
        delta = torch.randn(rows, rank, generator=g) @ torch.randn(rank, flat, generator=g)
        target = w if row is None else w[row * rows:(row + 1) * rows]
        delta *= 0.3 * float(target.float().norm()) / float(delta.norm())
        target += delta.reshape(target.shape).to(w.dtype)
        made[(key, row)] = delta
    save_file(weights, str(out))
    return made


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_streamed_extract_of_two_checkpoints_bakes_back_into_the_tuned_weights(tmp_path, arch):
    """Extract (rank 2) from two single files, bake the LoRA into the base: the changed tensors come back as the
    tuned ones (rank-2 changes: 1e-3 of the change, fp16 factors), untouched ones stay bit for bit; the three
    SVD methods agree. SDXL's OpenCLIP encoder keeps q, k, v in one tensor: its k rows are changed here."""
    from test_single_file import tiny_pipeline, write_checkpoint
    from trainer.merge.bake import bake_loras
    from trainer.merge.extract import extract_checkpoints, save_extracted
    from trainer.merge.svd_merge import MergeInput

    base = write_checkpoint(tiny_pipeline(arch), arch, tmp_path / "base.safetensors")
    te = "conditioner.embedders.0.transformer." if arch == "sdxl" else "cond_stage_model.transformer."
    changes = {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (2, None),           # 3x3 conv
               te + "text_model.encoder.layers.0.self_attn.q_proj.weight": (1, None)}
    changes["model.diffusion_model." + ("input_blocks.4.1" if arch == "sdxl" else "input_blocks.1.1")
            + ".transformer_blocks.0.attn1.to_q.weight"] = (2, None)
    if arch == "sdxl":
        changes["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = (2, 1)
    _tuned_checkpoint(base, tmp_path / "tuned.safetensors", changes)
    results = {m: extract_checkpoints(tmp_path / "tuned.safetensors", base, RankPolicy(rank=2, conv_rank=2),
                                      method=m, dtype=torch.float32) for m in ("lowrank", "gram", "exact")}
    for method, result in results.items():
        assert len(result.modules) == len(changes), (method, [m.name for m in result.modules])
        assert result.totals["max_relative_error"] < 1e-5, method
    save_extracted(results["lowrank"], tmp_path / "x.safetensors")
    bake_loras(base, [MergeInput(str(tmp_path / "x.safetensors"), 1.0)], tmp_path / "back.safetensors")
    tuned, back, original = (load_file(str(p)) for p in (tmp_path / "tuned.safetensors", tmp_path / "back.safetensors",
                                                          base))
    for key in original:
        if key in changes:
            change = (tuned[key].double() - original[key].double()).norm()
            assert float((back[key].double() - tuned[key].double()).norm()) <= 1e-3 * float(change), key
        else:
            assert torch.equal(back[key], original[key]), key


def test_the_three_svd_methods_keep_the_optimal_error_on_a_decaying_spectrum():
    """A 320 x 2880 difference (an SD1.5 3x3 conv's shape) with singular values 0.8^i: rank 8 by each method
    lands within 1e-3 (relative) of the optimal truncation error; an energy fraction needs every value (gram)."""
    from trainer.merge.extract import low_rank_factors

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(320, 320, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(2880, 320, generator=g, dtype=torch.float64))
    s = 0.8 ** torch.arange(320, dtype=torch.float64)
    delta = ((u * s) @ v.T).float()
    optimal = float(torch.sqrt((s[8:] ** 2).sum() / (s ** 2).sum()))
    for method in ("lowrank", "gram", "exact"):
        found = low_rank_factors(delta, RankPolicy(rank=8), True, method, torch.float32)
        assert found.up.shape[1] == 8 and abs(found.error - optimal) <= 1e-3 * optimal, (method, found.error, optimal)
    auto = low_rank_factors(delta, RankPolicy(rank=None, energy=0.99), True, "lowrank", torch.float32)
    needed = int(torch.searchsorted(torch.cumsum(s ** 2, 0) / (s ** 2).sum(), 0.99)) + 1
    assert auto.up.shape[1] == needed and auto.kept >= 0.99
