"""SuperMerger's LoRA merge semantics as an option: a recipe gives the LoRA SuperMerger gives (its formula
re-implemented here as the reference, on raw state dicts the way pluslora.py walks them), the worked example
of docs/merge-semantics.md holds, and modules outside the UNet blocks take BASE's block weight."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from test_merge import delta_of, kohya_tensors, read
from trainer.jobs.vocabulary import BLOCK_IDS
from trainer.merge.supermerger import SuperMergerMode, supermerger_merge
from trainer.merge.svd_merge import MergeError, MergeInput, RankPolicy, builtin_presets, merge_loras

ROOT = Path(__file__).resolve().parents[1]

# one module per kind of place, with the SuperMerger block it falls in
MODULES = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ((40, 24, None), "IN04"),
    "lora_unet_up_blocks_1_attentions_2_proj_out": ((32, 20, 1), "OUT05"),
    "lora_unet_down_blocks_0_resnets_0_conv1": ((18, 7, 3), "IN01"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((16, 16, None), "BASE"),
    "lora_unet_time_embedding_linear_1": ((24, 12, None), "BASE"),      # outside the blocks: BASE there
}
SHAPES = {name: shape for name, (shape, _) in MODULES.items()}


# --- the reference: SuperMerger's formulas, written from its code's description ----------------------------

def sm_ratios(ratio: float, blocks: str | None) -> list[float]:
    """lmerge: [ratio] * 26, or ratio * each preset value placed in the 26 slots (to26), 0 in the others."""
    if blocks is None:
        return [ratio] * 26
    values = builtin_presets("sd1")[blocks]
    slots = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"] if len(values) == 17 else list(BLOCK_IDS)
    out = [0.0] * 26
    for slot, v in zip(slots, values):
        out[BLOCK_IDS.index(slot)] = v * ratio
    return out


def sm_same_rank(sds: list[dict], ratios: list[list[float]], same_to_strength: bool = False) -> dict:
    """merge_lora_models: every up and down tensor summed, times sqrt(alpha / first alpha) * block ratio."""
    merged, base_alpha = {}, {}
    for sd, rat in zip(sds, ratios):
        for key, tensor in sd.items():
            if key.endswith(".alpha"):
                continue
            module = key[:key.rfind(".lora_")]
            alpha = float(sd[module + ".alpha"])
            base_alpha.setdefault(module, alpha)
            r, sign = rat[BLOCK_IDS.index(MODULES[module][1])], 1.0
            if same_to_strength:
                r, sign = (r ** 0.5, 1.0) if r > 0 else (abs(r) ** 0.5, -1.0)
            if "lora_down" in key:
                r *= sign
            scale = math.sqrt(alpha / base_alpha[module]) * r
            merged[key] = merged[key] + tensor.double() * scale if key in merged else tensor.double() * scale
    for module, alpha in base_alpha.items():
        merged[module + ".alpha"] = torch.tensor(alpha)
    return merged


def sm_rank_n(sds: list[dict], ratios: list[list[float]], rank: int) -> dict:
    """merge_lora_models_dim: the dense sum, a full fp32 SVD, U*S and Vh cut to the rank, both clamped to the
    0.99 quantile of their values, alpha = the rank."""
    out = {}
    for module, ((o, i, k), block) in MODULES.items():
        mat = None
        for sd, rat in zip(sds, ratios):
            down, up = sd[module + ".lora_down.weight"].float(), sd[module + ".lora_up.weight"].float()
            scale = float(sd[module + ".alpha"]) / down.shape[0]
            diff = up.flatten(1) @ down.flatten(1)
            term = rat[BLOCK_IDS.index(block)] * diff * scale
            mat = term if mat is None else mat + term
        U, S, Vh = torch.linalg.svd(mat)
        U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), 0.99)
        out[module + ".lora_up.weight"] = U.clamp(-hi, hi)
        out[module + ".lora_down.weight"] = Vh.clamp(-hi, hi)
        out[module + ".alpha"] = torch.tensor(float(rank))
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture
def recipe(tmp_path):
    """Three SD1 LoRAs of rank 4 (alphas 4, 2, 1) and a recipe with a negative ratio and block presets."""
    sds, specs = [], []
    for i, (alpha, ratio, blocks) in enumerate([(4.0, 0.7, None), (2.0, -0.5, "OUTALL"), (1.0, 1.3, "MIDD")]):
        sds.append(kohya_tensors(SHAPES, 4, alpha, 30 + i))
        path = tmp_path / f"l{i}.safetensors"
        save_file(sds[-1], str(path), {"ss_base_model_version": "sd_v1"})
        specs.append(MergeInput(str(path), ratio, blocks))
    return sds, specs


@pytest.mark.parametrize("same_to_strength", [False, True])
def test_same_rank_merge_reproduces_supermerger_within_1e_9(recipe, same_to_strength):
    sds, specs = recipe
    ratios = [sm_ratios(s.ratio, s.blocks) for s in specs]
    theirs = sm_same_rank(sds, ratios, same_to_strength)
    for dimension in ("no", "auto"):      # auto with one rank everywhere is the same-rank path
        ours = supermerger_merge(specs, SuperMergerMode(dimension, same_to_strength), dtype="fp64")
        for name in MODULES:
            assert relative(delta_of(ours.tensors, name), delta_of(theirs, name)) < 1e-9, (dimension, name)
    # and it is not ours: the ratio acts squared and LoRAs mix with cross terms (every module > 10 % away);
    # "same to Strength" takes the square away, so a module only one input reaches is ours exactly
    linear = merge_loras(specs, RankPolicy(rank=None, concat=True), dtype="fp64", precision="fp64")
    for name in MODULES:
        gap = relative(delta_of(theirs, name), delta_of(linear.tensors, name))
        reached = sum(r[BLOCK_IDS.index(MODULES[name][1])] != 0 for r in ratios)
        if same_to_strength and reached == 1:
            assert gap < 1e-12, name
        else:
            assert gap > 0.1, name
        report = next(m for m in ours.modules if m.name == name)
        assert report.relative_error == pytest.approx(gap, rel=1e-6)


def test_rank_n_merge_reproduces_supermerger_within_1e_5_clamp_included(recipe):
    sds, specs = recipe
    ratios = [sm_ratios(s.ratio, s.blocks) for s in specs]
    theirs = sm_rank_n(sds, ratios, 3)
    ours = supermerger_merge(specs, SuperMergerMode(3), dtype="fp32")
    unclamped = merge_loras(specs, RankPolicy(rank=3), dtype="fp32")
    for name in MODULES:
        assert relative(delta_of(ours.tensors, name), delta_of(theirs, name)) < 1e-5, name
        # the clamp is part of their result: without it the LoRA differs by more than the tolerance
        assert relative(delta_of(unclamped.tensors, name), delta_of(theirs, name)) > 1e-4, name


def test_auto_with_different_ranks_is_rank_n_at_the_largest_rank(tmp_path):
    small = kohya_tensors(SHAPES, 2, 2.0, 40)
    large = kohya_tensors(SHAPES, 5, 3.0, 41)
    paths = [tmp_path / "r2.safetensors", tmp_path / "r5.safetensors"]
    for sd, path in zip((small, large), paths):
        save_file(sd, str(path))
    specs = [MergeInput(str(paths[0]), 0.8), MergeInput(str(paths[1]), -0.6)]
    theirs = sm_rank_n([small, large], [sm_ratios(0.8, None), sm_ratios(-0.6, None)], 5)
    ours = supermerger_merge(specs, SuperMergerMode("auto"), dtype="fp32")
    for name in MODULES:
        assert ours.tensors[f"{name}.lora_down.weight"].shape[0] == 5
        assert relative(delta_of(ours.tensors, name), delta_of(theirs, name)) < 1e-5, name
    with pytest.raises(MergeError, match="needs one rank in every input.*rank 2.*rank 5"):
        supermerger_merge(specs, SuperMergerMode("no"))


def test_worked_example_of_the_semantics_page(tmp_path):
    """docs/merge-semantics.md: A = e1 e1^T and B = e2 e2^T (rank 1, alpha 1), recipe A:0.6, B:-0.4."""
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    e1, e2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    for label, v in (("a", e1), ("b", e2)):
        save_file({f"{name}.lora_up.weight": v.clone(), f"{name}.lora_down.weight": v.T.clone(),
                   f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / f"{label}.safetensors"))
    specs = [MergeInput(str(tmp_path / "a.safetensors"), 0.6), MergeInput(str(tmp_path / "b.safetensors"), -0.4)]
    ours = merge_loras(specs, RankPolicy(rank=2), dtype="fp64", precision="fp64")
    no = supermerger_merge(specs, SuperMergerMode("no"), dtype="fp64")
    strength = supermerger_merge(specs, SuperMergerMode("no", same_to_strength=True), dtype="fp64")
    rank1 = supermerger_merge(specs, SuperMergerMode(1), dtype="fp64")
    r = math.sqrt(0.24)
    table = {"ours": (ours, [[0.6, 0.0], [0.0, -0.4]]), "no": (no, [[0.36, -0.24], [-0.24, 0.16]]),
             "same to Strength": (strength, [[0.6, -r], [r, -0.4]]), "1": (rank1, [[0.6 * 0.988, 0.0], [0.0, 0.0]])}
    for label, (result, expected) in table.items():
        assert torch.allclose(delta_of(result.tensors, name), torch.tensor(expected, dtype=torch.float64),
                              atol=1e-6), label
    assert no.modules[0].relative_error == pytest.approx(0.967, abs=1e-3)     # the page's report number
    text = (ROOT / "docs" / "merge-semantics.md").read_text(encoding="utf-8")
    for row in ("[[0.6, 0], [0, -0.4]]", "[[0.36, -0.24], [-0.24, 0.16]]", "[[0.6, -0.49], [0.49, -0.4]]",
                "[[0.593, 0], [0, 0]]"):
        assert row in text, row


def test_modules_outside_the_blocks_take_the_base_weight_in_our_merge_too(tmp_path):
    sd = kohya_tensors(SHAPES, 3, 3.0, 50)
    save_file(sd, str(tmp_path / "l.safetensors"))
    blocks = ",".join(["0.3"] + ["1"] * 25)      # BASE 0.3, every block 1
    merged = merge_loras([MergeInput(str(tmp_path / "l.safetensors"), 0.5, blocks)],
                         RankPolicy(rank=None, concat=True), dtype="fp64", precision="fp64")
    for name in ("lora_unet_time_embedding_linear_1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        assert relative(delta_of(merged.tensors, name), 0.15 * delta_of(sd, name)) < 1e-9, name
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert relative(delta_of(merged.tensors, name), 0.5 * delta_of(sd, name)) < 1e-9


def test_merge_cli_supermerger_as_typed(recipe, tmp_path):
    sds, specs = recipe
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    args = [f"{Path(s.path).name}:{s.ratio}" + (f":{s.blocks}" if s.blocks else "") for s in specs]
    run = subprocess.run([sys.executable, "-m", "trainer", "merge", "--out", "sm.safetensors", "--supermerger", "no",
                          "--dtype", "fp32", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "SuperMerger semantics, remake dimension no" in run.stdout
    theirs = sm_same_rank(sds, [sm_ratios(s.ratio, s.blocks) for s in specs])
    tensors, metadata = read(tmp_path / "sm.safetensors")
    for name in MODULES:
        assert relative(delta_of(tensors, name), delta_of(theirs, name)) < 1e-6, name
    assert metadata["ss_merge_rank_policy"] == "SuperMerger semantics, remake dimension no"
    refused = subprocess.run([sys.executable, "-m", "trainer", "merge", "--out", "x.safetensors", "--supermerger", "8",
                              "--rank", "4", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "leave out --rank" in refused.stderr
    assert not (tmp_path / "x.safetensors").exists()
