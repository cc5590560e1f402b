"""The SVD merge: exact in factor space, true to diffusers, careful with bad input."""
from __future__ import annotations

import math
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.lora.formats import Geometry, LowRankDelta
from trainer.merge.svd_merge import MergeError, MergeInput, RankPolicy, block_weights, builtin_presets, merge_files, merge_loras, merge_module, parse_input_spec

REPO = Path(__file__).resolve().parents[1]

LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"          # IN04
POINTWISE = "lora_unet_up_blocks_1_attentions_2_proj_out"                                # OUT05, 1x1 conv
SPATIAL = "lora_unet_down_blocks_0_resnets_0_conv1"                                      # IN01, 3x3 conv
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"                            # BASE
SHAPES = {LINEAR: (40, 24, None), POINTWISE: (32, 20, 1), SPATIAL: (18, 7, 3), TEXT: (16, 16, None)}


# --- helpers -------------------------------------------------------------------------------------

def kohya_tensors(shapes: dict, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp, k) in shapes.items():
        if k is None:
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g)
            sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=g)
        else:
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, inp, k, k, generator=g)
            sd[f"{name}.lora_up.weight"] = torch.randn(out, rank, 1, 1, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def write_kohya(path: Path, shapes: dict, rank: int, alpha: float, seed: int, version: str | None = "sd_v1") -> Path:
    save_file(kohya_tensors(shapes, rank, alpha, seed), str(path), {"ss_base_model_version": version} if version else None)
    return path


def delta_of(sd: dict, name: str) -> torch.Tensor:
    """kohya's delta W = alpha / rank * up @ down, flattened to [out, in*k*k], in float64."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    return scale * up.flatten(1) @ down.flatten(1)


def read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def optimal_error(exact: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(exact)
    return float(torch.sqrt((s[rank:] ** 2).sum()))


@pytest.fixture
def three_loras(tmp_path):
    """Three SD1 LoRAs of ranks 3, 5, 7 (alphas 1.5, 5, 2) over linear, 1x1 and 3x3 conv modules."""
    specs = [(3, 1.5, 11), (5, 5.0, 12), (7, 2.0, 13)]
    paths, sds = [], []
    for i, (rank, alpha, seed) in enumerate(specs):
        sds.append(kohya_tensors(SHAPES, rank, alpha, seed))
        paths.append(tmp_path / f"in{i}.safetensors")
        save_file(sds[-1], str(paths[-1]), {"ss_base_model_version": "sd_v1"})
    return paths, sds


# --- exactness -----------------------------------------------------------------------------------

BLOCKS_26 = ",".join(["1"] + ["0.5"] * 12 + ["1"] + ["0.25"] * 12)   # BASE 1, IN 0.5, M 1, OUT 0.25


@pytest.mark.parametrize("rank", [2, 4, 9])
def test_merged_delta_error_equals_the_optimal_truncation_error_within_1e_6(three_loras, tmp_path, rank):
    paths, sds = three_loras
    ratios = [0.6, -0.4, 0.35]
    inputs = [MergeInput(str(paths[0]), ratios[0]), MergeInput(str(paths[1]), ratios[1], BLOCKS_26),
              MergeInput(str(paths[2]), ratios[2], "OUTALL")]
    result = merge_loras(inputs, RankPolicy(rank=rank), dtype="fp64", precision="fp64")
    presets = builtin_presets("sd1")
    weights = [None, block_weights(BLOCKS_26, "sd1", presets, "t"), block_weights("OUTALL", "sd1", presets, "t")]
    blocks = {LINEAR: "IN04", POINTWISE: "OUT05", SPATIAL: "IN01", TEXT: "BASE"}
    for name in SHAPES:
        exact = sum(r * (1.0 if w is None else w[blocks[name]]) * delta_of(sd, name)
                    for sd, r, w in zip(sds, ratios, weights))
        merged = delta_of(result.tensors, name)
        error = float(torch.linalg.norm(merged - exact))
        kept = min(rank, *exact.shape)
        assert abs(error - optimal_error(exact, kept)) <= 1e-6 * float(torch.linalg.norm(exact)), name
        report = next(m for m in result.modules if m.name == name)
        assert report.relative_error == pytest.approx(error / float(torch.linalg.norm(exact)), abs=1e-6)


def test_concat_reproduces_the_sum_within_1e_6_at_rank_equal_to_the_sum_of_ranks(three_loras):
    paths, sds = three_loras
    ratios = [0.5, -0.6, 0.4]
    result = merge_loras([MergeInput(str(p), r) for p, r in zip(paths, ratios)], RankPolicy(rank=None, concat=True),
                         dtype="fp64", precision="fp64")
    for name, (out, inp, k) in SHAPES.items():
        exact = sum(r * delta_of(sd, name) for sd, r in zip(sds, ratios))
        merged = delta_of(result.tensors, name)
        assert float(torch.linalg.norm(merged - exact)) <= 1e-6 * float(torch.linalg.norm(exact))
        assert result.tensors[f"{name}.lora_down.weight"].shape[0] == min(3 + 5 + 7, out, inp * (k or 1) ** 2)


def test_default_fp32_arithmetic_lands_within_1e_5_of_the_fp64_result(three_loras):
    paths, _ = three_loras
    inputs = [MergeInput(str(p), r) for p, r in zip(paths, [0.6, -0.4, 0.35])]
    fp64 = merge_loras(inputs, RankPolicy(rank=4), dtype="fp64", precision="fp64")
    fp32 = merge_loras(inputs, RankPolicy(rank=4), dtype="fp64")
    for name in SHAPES:
        reference = delta_of(fp64.tensors, name)
        assert float(torch.linalg.norm(delta_of(fp32.tensors, name) - reference)) <= 1e-5 * float(
            torch.linalg.norm(reference))


def test_auto_rank_is_the_smallest_rank_keeping_99_percent_of_each_modules_energy(three_loras):
    paths, sds = three_loras
    result = merge_loras([MergeInput(str(p), 0.5) for p in paths], RankPolicy(rank=None, energy=0.99), dtype="fp64", precision="fp64")
    for name in SHAPES:
        s = torch.linalg.svdvals(sum(0.5 * delta_of(sd, name) for sd in sds))
        kept = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        expected = int((kept < 0.99).sum()) + 1
        report = next(m for m in result.modules if m.name == name)
        assert report.rank == expected
        assert report.retained_energy >= 0.99


def test_rank_is_capped_at_min_of_out_in_times_k_squared_and_the_sum_of_input_ranks(three_loras):
    paths, _ = three_loras
    result = merge_loras([MergeInput(str(paths[0]), 1.0), MergeInput(str(paths[1]), 1.0)], RankPolicy(rank=64))
    ranks = {m.name: m.rank for m in result.modules}
    assert ranks[LINEAR] == 3 + 5            # sum of input ranks
    assert ranks[TEXT] == 3 + 5
    assert ranks[SPATIAL] == 8               # out 18, in*k*k 63
    assert result.metadata["ss_network_dim"] == "8"


def test_conv_rank_applies_to_3x3_convs_only_and_is_recorded_as_conv_dim(three_loras):
    paths, _ = three_loras
    result = merge_loras([MergeInput(str(p), 0.5) for p in paths], RankPolicy(rank=4, conv_rank=2))
    ranks = {m.name: m.rank for m in result.modules}
    assert ranks == {LINEAR: 4, POINTWISE: 4, SPATIAL: 2, TEXT: 4}
    assert result.tensors[f"{SPATIAL}.lora_down.weight"].shape == (2, 7, 3, 3)
    assert result.tensors[f"{SPATIAL}.lora_up.weight"].shape == (18, 2, 1, 1)
    assert result.tensors[f"{POINTWISE}.lora_down.weight"].shape == (4, 20, 1, 1)
    assert json.loads(result.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert result.metadata["ss_network_dim"] == "4" and result.metadata["ss_network_alpha"] == "4"


def test_alpha_defaults_to_the_rank_and_an_asked_alpha_keeps_the_same_delta(three_loras):
    paths, _ = three_loras
    inputs = [MergeInput(str(p), 0.5) for p in paths]
    plain = merge_loras(inputs, RankPolicy(rank=4), dtype="fp64", precision="fp64")
    halved = merge_loras(inputs, RankPolicy(rank=4), dtype="fp64", precision="fp64", alpha=2.0)
    assert float(plain.tensors[f"{LINEAR}.alpha"]) == 4.0 and float(halved.tensors[f"{LINEAR}.alpha"]) == 2.0
    assert torch.allclose(delta_of(plain.tensors, LINEAR), delta_of(halved.tensors, LINEAR), rtol=1e-9, atol=1e-12)


def test_a_module_present_in_only_one_input_is_that_input_times_its_ratio(tmp_path):
    a = write_kohya(tmp_path / "a.safetensors", {LINEAR: (40, 24, None)}, 4, 4, 1)
    b = write_kohya(tmp_path / "b.safetensors", {TEXT: (16, 16, None)}, 4, 2, 2)
    result = merge_loras([MergeInput(str(a), 0.7), MergeInput(str(b), -0.3)], RankPolicy(rank=8), dtype="fp64", precision="fp64")
    sa, sb = read(a)[0], read(b)[0]
    assert torch.allclose(delta_of(result.tensors, LINEAR), 0.7 * delta_of(sa, LINEAR), atol=1e-10)
    assert torch.allclose(delta_of(result.tensors, TEXT), -0.3 * delta_of(sb, TEXT), atol=1e-10)


def test_blocks_a_17_value_list_does_not_address_get_weight_0_and_modules_outside_blocks_base_as_in_supermerger(
        tmp_path):
    shapes = {SPATIAL: (18, 7, 3),                                                    # IN01: listed
              "lora_unet_down_blocks_0_downsamplers_0_conv": (8, 8, 3),              # IN03: not in 17
              "lora_unet_conv_in": (8, 4, 3),                                         # IN00: not in 17
              "lora_unet_time_embedding_linear_1": (12, 8, None)}                    # no block at all
    a = write_kohya(tmp_path / "locon.safetensors", shapes, 2, 2, 3)
    every = merge_loras([MergeInput(str(a), 0.5)], RankPolicy(rank=2))
    assert {m.name for m in every.modules} == set(shapes)
    listed = merge_loras([MergeInput(str(a), 0.5, "ALL")], RankPolicy(rank=None, concat=True), dtype="fp64", precision="fp64")
    assert {m.name for m in listed.modules} == {SPATIAL, "lora_unet_time_embedding_linear_1"}
    assert torch.allclose(delta_of(listed.tensors, SPATIAL), 0.5 * delta_of(read(a)[0], SPATIAL), atol=1e-10)
    with_26 = merge_loras([MergeInput(str(a), 0.5, ",".join(["0"] + ["1"] * 25))], RankPolicy(rank=2))
    assert {m.name for m in with_26.modules} == set(shapes) - {"lora_unet_time_embedding_linear_1"}


def test_sdxl_12_value_block_list_weights_ldm_named_modules(tmp_path):
    shapes = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (20, 20, None),      # IN04
              "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": (20, 12, None),     # OUT00
              "lora_te2_text_model_encoder_layers_0_mlp_fc1": (24, 12, None)}                     # BASE
    a = write_kohya(tmp_path / "xl.safetensors", shapes, 4, 4, 5, version="sdxl_base_v1-0")
    blocks = "0.5,1,0,0,0,0,-2,0,0,0,0,0"     # BASE 0.5, IN04 1, OUT00 -2
    result = merge_loras([MergeInput(str(a), 0.5, blocks)], RankPolicy(rank=None, concat=True), dtype="fp64", precision="fp64")
    sd = read(a)[0]
    factors = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 0.5,
               "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": -1.0,
               "lora_te2_text_model_encoder_layers_0_mlp_fc1": 0.25}
    for name, factor in factors.items():
        assert torch.allclose(delta_of(result.tensors, name), factor * delta_of(sd, name), atol=1e-10)
    assert result.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    with pytest.raises(MergeError, match="17 values; SDXL takes 12 or 20"):
        merge_loras([MergeInput(str(a), 0.5, ",".join(["1"] * 17))], RankPolicy(rank=4))


def test_preset_file_in_lora_block_weight_format_adds_named_presets(three_loras):
    paths, sds = three_loras
    text = "# my presets\nTEXTONLY:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n\nHALF:" + ",".join(["0.5"] * 26) + "\n"
    result = merge_loras([MergeInput(str(paths[0]), 1.0, "TEXTONLY"), MergeInput(str(paths[1]), 1.0, "HALF")],
                         RankPolicy(rank=None, concat=True), presets_text=text, dtype="fp64", precision="fp64")
    expected = delta_of(sds[0], TEXT) + 0.5 * delta_of(sds[1], TEXT)
    assert torch.allclose(delta_of(result.tensors, TEXT), expected, atol=1e-10)
    assert torch.allclose(delta_of(result.tensors, LINEAR), 0.5 * delta_of(sds[1], LINEAR), atol=1e-10)


# --- other formats ---------------------------------------------------------------------------------

def test_peft_lora_A_B_keys_merge_like_kohya_keys_and_come_out_kohya_named(tmp_path):
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 24, generator=g), torch.randn(40, 4, generator=g)
    tdown, tup = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    peft = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": tdown,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": tup}
    save_file(peft, str(tmp_path / "peft.safetensors"))
    result = merge_loras([MergeInput(str(tmp_path / "peft.safetensors"), 0.5)], RankPolicy(rank=4), dtype="fp64", precision="fp64")
    assert set(result.tensors) == {f"{n}.{s}" for n in (LINEAR, TEXT) for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    # no alpha in a PEFT file means scale 1, as diffusers reads it
    assert torch.allclose(delta_of(result.tensors, LINEAR), 0.5 * up.double() @ down.double(), atol=1e-10)
    assert torch.allclose(delta_of(result.tensors, TEXT), 0.5 * tup.double() @ tdown.double(), atol=1e-10)


def test_loha_and_lokr_merge_through_their_dense_delta_losslessly_with_concat(tmp_path):
    g = torch.Generator().manual_seed(4)
    r = 2
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in [(18, r), (r, 63), (18, r), (r, 63)])
    loha = {f"{SPATIAL}.hada_w1_a": w1a, f"{SPATIAL}.hada_w1_b": w1b, f"{SPATIAL}.hada_w2_a": w2a,
            f"{SPATIAL}.hada_w2_b": w2b, f"{SPATIAL}.alpha": torch.tensor(1.0)}
    k1, k2a, k2b = torch.randn(4, 4, generator=g), torch.randn(10, 2, generator=g), torch.randn(2, 6, generator=g)
    lokr = {f"{LINEAR}.lokr_w1": k1, f"{LINEAR}.lokr_w2_a": k2a, f"{LINEAR}.lokr_w2_b": k2b,
            f"{LINEAR}.alpha": torch.tensor(1.0)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    result = merge_loras([MergeInput(str(tmp_path / "loha.safetensors"), 0.5),
                          MergeInput(str(tmp_path / "lokr.safetensors"), -1.0)], RankPolicy(rank=None, concat=True),
                         dtype="fp64", precision="fp64")
    loha_delta = (w1a @ w1b).double() * (w2a @ w2b).double() * (1.0 / r)
    lokr_delta = torch.kron(k1.double(), (k2a @ k2b).double()) * (1.0 / 2)
    assert torch.allclose(delta_of(result.tensors, SPATIAL), 0.5 * loha_delta, atol=1e-9)
    assert torch.allclose(delta_of(result.tensors, LINEAR), -lokr_delta, atol=1e-9)
    # LoHa stores in*k*k only: the 3x3 kernel comes from the module's name
    assert result.tensors[f"{SPATIAL}.lora_down.weight"].shape == (18, 7, 3, 3)


@pytest.mark.parametrize("suffix, reason", [("dora_scale", "DoRA"), ("diff", "unknown LoRA type")])
def test_dora_and_unknown_types_are_refused_naming_the_file_and_key(tmp_path, suffix, reason):
    sd = kohya_tensors({LINEAR: (40, 24, None)}, 4, 4, 1)
    sd[f"{LINEAR}.{suffix}"] = torch.ones(40, 1)
    path = tmp_path / "odd.safetensors"
    save_file(sd, str(path))
    with pytest.raises(MergeError) as e:
        merge_files([MergeInput(str(path), 1.0)], tmp_path / "out.safetensors", RankPolicy(rank=4))
    assert reason in str(e.value) and "odd.safetensors" in str(e.value) and f"{LINEAR}.{suffix}" in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


# --- memory --------------------------------------------------------------------------------------

def test_no_tensor_of_out_by_in_size_is_built_for_a_4096_square_module():
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    g = torch.Generator().manual_seed(0)
    geometry = Geometry(4096, 4096, None)
    deltas = [LowRankDelta(torch.randn(4096, 32, generator=g), torch.randn(32, 4096, generator=g), 1 / 32, geometry,
                           "LoRA") for _ in range(3)]
    with LargestTensor():
        merged = merge_module(LINEAR, "sd1", [("x", d, 0.5) for d in deltas], RankPolicy(rank=8))
    assert merged.up.shape == (4096, 8) and merged.down.shape == (8, 4096)
    assert LargestTensor.largest <= 4096 * 96          # the stacked factors; out x in would be 16.8M
    assert merged.report.relative_error < 1.0


# --- the written file ------------------------------------------------------------------------------

def test_written_file_has_metadata_true_to_its_tensors_and_hashes_of_its_bytes(three_loras, tmp_path):
    paths, _ = three_loras
    out = tmp_path / "merged.safetensors"
    merge_files([MergeInput(str(paths[0]), 0.6), MergeInput(str(paths[1]), 0.4, "OUTD")], out, RankPolicy(rank=4))
    tensors, meta = read(out)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    ranks = {k[: -len(".lora_down.weight")]: t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")}
    # OUTD leaves the IN04 and BASE modules to in0 alone: rank 3 there, 4 elsewhere -> kohya's "Dynamic"
    assert ranks == {LINEAR: 3, TEXT: 4, POINTWISE: 4, SPATIAL: 3}
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert all(float(tensors[f"{n}.alpha"]) == r for n, r in ranks.items())
    assert meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["merged_from"]) == [
        {"file": "in0.safetensors", "ratio": 0.6, "blocks": None, "ss_network_dim": None, "sshs_model_hash": None},
        {"file": "in1.safetensors", "ratio": 0.4, "blocks": "OUTD", "ss_network_dim": None, "sshs_model_hash": None}]
    report = json.loads(meta["ss_merge_report"])
    assert report["modules"] == 4 and 0.0 < report["retained_energy"] <= 1.0
    data = out.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_input_spec_splits_ratio_and_blocks_from_the_right_so_windows_paths_survive():
    assert parse_input_spec(r"C:\loras\a.safetensors:0.6:OUTD") == MergeInput(r"C:\loras\a.safetensors", 0.6, "OUTD")
    assert parse_input_spec(r"C:\loras\a.safetensors:-0.5") == MergeInput(r"C:\loras\a.safetensors", -0.5)
    assert parse_input_spec(r"C:\loras\a.safetensors") == MergeInput(r"C:\loras\a.safetensors", 1.0)
    assert parse_input_spec("b.safetensors:0.3:1,0,1") == MergeInput("b.safetensors", 0.3, "1,0,1")


def test_quantile_clamp_is_off_by_default_and_clamps_both_factors_when_on(three_loras):
    paths, _ = three_loras
    inputs = [MergeInput(str(p), 0.5) for p in paths]
    plain = merge_loras(inputs, RankPolicy(rank=4), dtype="fp64", precision="fp64")
    clamped = merge_loras(inputs, RankPolicy(rank=4), dtype="fp64", precision="fp64", clamp_quantile=0.9)
    assert "ss_merge_clamp_quantile" not in plain.metadata and clamped.metadata["ss_merge_clamp_quantile"] == "0.9"
    up, down = clamped.tensors[f"{LINEAR}.lora_up.weight"], clamped.tensors[f"{LINEAR}.lora_down.weight"]
    values = torch.cat([up.flatten(), down.flatten()])
    high = values.abs().max()
    # kohya clamps to +-(0.9 quantile of the values): the top 10 % sit exactly on the bound
    assert float((values >= high - 1e-12).double().mean()) >= 0.09
    worse = next(m for m in clamped.modules if m.name == LINEAR).relative_error
    assert worse > next(m for m in plain.modules if m.name == LINEAR).relative_error


# --- bad input -------------------------------------------------------------------------------------

def _truncated(tmp_path: Path) -> Path:
    good = write_kohya(tmp_path / "good.safetensors", SHAPES, 4, 4, 1)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    return bad


def _pickled(tmp_path: Path) -> Path:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    return bad


@pytest.mark.parametrize("case, message", [
    ("truncated", "cut.safetensors.*truncated"),
    ("pickle", "model.safetensors.*is a pickle"),
    ("mixed", "different base models"),
    ("wrong length", "block list has 5 values; SD1 takes 17 or 26"),
    ("unknown preset", "unknown block preset 'OUTDD'"),
    ("rank 0", "rank must be a whole number >= 1, got 0"),
])
def test_bad_input_is_a_merge_error_naming_the_culprit_and_leaves_no_file(tmp_path, case, message):
    sd1 = write_kohya(tmp_path / "sd1.safetensors", SHAPES, 4, 4, 1)
    policy = RankPolicy(rank=4)
    inputs = [MergeInput(str(sd1), 0.5)]
    if case == "truncated":
        inputs.append(MergeInput(str(_truncated(tmp_path)), 0.5))
    elif case == "pickle":
        inputs.append(MergeInput(str(_pickled(tmp_path)), 0.5))
    elif case == "mixed":
        xl = write_kohya(tmp_path / "xl.safetensors", {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                                                       (16, 16, None)}, 4, 4, 2, version=None)
        inputs.append(MergeInput(str(xl), 0.5))
    elif case == "wrong length":
        inputs = [MergeInput(str(sd1), 0.5, "1,1,1,1,1")]
    elif case == "unknown preset":
        inputs = [MergeInput(str(sd1), 0.5, "OUTDD")]
    else:
        policy = RankPolicy(rank=0)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=message.replace("(", r"\(")):
        merge_files(inputs, out, policy)
    assert not out.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_cli_prints_the_report_and_exits_0_or_names_the_error_and_exits_2(three_loras, tmp_path, capsys):
    paths, _ = three_loras
    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run([sys.executable, "-m", "trainer", "merge", f"{paths[0]}:0.6", f"{paths[1]}:-0.3:OUTD",
                         "--out", str(out), "--rank", "4", "--conv-rank", "2"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "total: 4 modules, energy kept" in ok.stdout and out.exists()
    from trainer.cli import main

    assert main(["merge", f"{paths[0]}:0.6:NOPE", "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "unknown block preset 'NOPE'" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


# --- diffusers ------------------------------------------------------------------------------------

def tiny_sd1_pipeline(folder: Path):
    """SD1-architecture pipeline (4 blocks, 2 layers each, cross-attention in 3) at toy widths."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(16, 16, 32, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=16, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(list(letters) + [c + "</w>" for c in letters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_kohya_for(pipe, path: Path, rank: int, seed: int) -> None:
    """A kohya LoRA/LoCon on every attention projection, resnet conv1 and text-encoder layer."""
    from trainer.models.naming import text_encoder_kohya_key

    unet_ends = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1")
    te_ends = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    shapes = {"lora_unet_" + n.replace(".", "_"): m.weight.shape
              for n, m in pipe.unet.named_modules() if n.endswith(unet_ends)}
    shapes.update({text_encoder_kohya_key(n, "lora_te_"): m.weight.shape
                   for n, m in pipe.text_encoder.named_modules() if n.endswith(te_ends)})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g) * 0.2
        sd[f"{key}.lora_up.weight"] = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.2
        sd[f"{key}.alpha"] = torch.tensor(rank / 2)
    save_file(sd, str(path), {"ss_base_model_version": "sd_v1"})


def test_merged_file_in_diffusers_matches_the_inputs_loaded_together_at_their_ratios(tmp_path):
    pipe = tiny_sd1_pipeline(tmp_path)
    specs = [(3, 0.6), (4, -0.4), (5, 0.35)]
    paths = [tmp_path / f"view{i}.safetensors" for i in range(len(specs))]
    for i, (path, (rank, _)) in enumerate(zip(paths, specs)):
        write_kohya_for(pipe, path, rank, seed=20 + i)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def unet_output() -> torch.Tensor:
        with torch.no_grad():
            embeds = pipe.encode_prompt("a cat", "cpu", 1, False)[0]   # through the (LoRA'd) text encoder
            return pipe.unet(latents, 10, encoder_hidden_states=embeds).sample

    base = unet_output()
    for i, path in enumerate(paths):
        pipe.load_lora_weights(str(path), adapter_name=f"view{i}")
    pipe.set_adapters([f"view{i}" for i in range(len(paths))], adapter_weights=[r for _, r in specs])
    together = unet_output()
    pipe.unload_lora_weights()
    effect = float(torch.linalg.norm(together - base))
    assert effect > 0.1 * float(torch.linalg.norm(base))       # the LoRAs do change the output

    inputs = [MergeInput(str(p), ratio) for p, (_, ratio) in zip(paths, specs)]
    results = {}
    for label, policy in [("concat", RankPolicy(rank=None, concat=True)), ("rank 6", RankPolicy(rank=6))]:
        out = tmp_path / f"merged_{label.replace(' ', '')}.safetensors"
        results[label] = merge_files(inputs, out, policy, dtype="fp32")
        pipe.load_lora_weights(str(out), adapter_name="merged")
        pipe.set_adapters(["merged"], adapter_weights=[1.0])
        merged = unet_output()
        pipe.unload_lora_weights()
        results[label] = (float(torch.linalg.norm(merged - together)) / effect, results[label].totals)

    concat_gap, _ = results["concat"]
    assert concat_gap < 1e-4                                     # lossless
    rank6_gap, totals = results["rank 6"]
    assert totals["relative_error"] > 0.05                       # rank 6 < 12 does truncate
    assert rank6_gap < 2.0 * totals["relative_error"]            # ... and the output moves by about that much


@pytest.mark.parametrize("tail", [1e-6, 3e-4])
def test_the_reported_error_is_right_in_fp32_against_fp64(tail):
    from trainer.lora.svd import factor_space_svd, frobenius_error_of_factors, split_singular_values

    g = torch.Generator().manual_seed(0)
    out_dim, in_dim, rank, keep = 320, 768, 16, 8
    u = torch.linalg.qr(torch.randn(out_dim, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_dim, rank, generator=g, dtype=torch.float64))[0]
    s = torch.cat([torch.linspace(1.0, 0.5, keep, dtype=torch.float64), torch.full((rank - keep,), tail, dtype=torch.float64)])
    U, V = u * s, v                                        # delta = U V^T, its tail known exactly
    exact = float(torch.linalg.matrix_norm(U @ V.T - (u[:, :keep] * s[:keep]) @ v[:, :keep].T))
    svd = factor_space_svd(U.float(), V.float())
    up, down = split_singular_values(svd, keep, 1.0)
    reported = frobenius_error_of_factors(svd, up, down, 1.0)
    assert exact == pytest.approx(tail * math.sqrt(rank - keep), rel=1e-9)
    assert reported == pytest.approx(exact, rel=0.05), f"fp32 report {reported:.3g} for a true {exact:.3g}"


def test_resize_as_typed_gives_the_optimal_truncation_and_keeps_the_training_metadata(three_loras, tmp_path):
    paths, sds = three_loras
    source = paths[0]
    meta = dict(read(source)[1])
    meta.update({"ss_tag_frequency": json.dumps({"data": {"red": 3}}), "ss_steps": "1234"})
    save_file(sds[0], str(tmp_path / "trained.safetensors"), metadata=meta)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "trainer", "resize", "--out", "small.safetensors", "--rank", "2",
                          "--dtype", "fp32", "trained.safetensors"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "resized trained.safetensors" in run.stdout and "total:" in run.stdout
    small, small_meta = read(tmp_path / "small.safetensors")
    for name in SHAPES:
        exact = delta_of(sds[0], name)
        error = float(torch.linalg.norm(delta_of(small, name) - exact))
        assert abs(error - optimal_error(exact, min(2, *exact.shape))) <= 1e-5 * float(torch.linalg.norm(exact)), name
    assert small_meta["ss_network_dim"] == "2" and small_meta["ss_steps"] == "1234"
    assert json.loads(small_meta["ss_tag_frequency"]) == {"data": {"red": 3}}
    assert json.loads(small_meta["ss_resized_from"])["file"] == "trained.safetensors"
    assert small_meta["sshs_model_hash"] != meta.get("sshs_model_hash")
    again = subprocess.run([sys.executable, "-m", "trainer", "resize", "--out", "trained.safetensors", "--rank", "2",
                            "trained.safetensors"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert again.returncode == 2 and "another file" in again.stderr
