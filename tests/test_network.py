"""LoRA network: files load everywhere numerically, attach/detach/merge are exact, bad input is named."""
from __future__ import annotations

import re

import pytest
import torch

from trainer.jobs import JobError, StandardJob
from safetensors.torch import load_file, save_file

from tiny import sd1_pipeline, sdxl_pipeline
from trainer.lora import files as lora_files
from trainer.lora.metadata import TrainingFacts, lora_metadata
from trainer.models.diffusers_model import DiffusersHandle
from trainer.models.handle import TargetOptions
from trainer.lora.network import LoraNetwork, NetworkError, NetworkShape


def _randomize(net: LoraNetwork, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.lora.values():
            for p in (lora.lora_down.weight, lora.lora_up.weight):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _unet_out(handle: DiffusersHandle, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond = handle.encode_prompts(["a red circle", "blue"], (64, 64))
    with torch.no_grad():
        return handle.predict(latents, torch.tensor([10, 700]), cond), cond.crossattn


def _text_out(pipe, encoder_name: str = "text_encoder"):
    ids = torch.tensor([[512, 1, 2, 3, 513] + [513] * 11])
    with torch.no_grad():
        return getattr(pipe, encoder_name)(ids, output_hidden_states=True).hidden_states[-1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _roundtrip(build, tmp_path, options: TargetOptions, shape: NetworkShape, encoders: list[str]):
    pipe = build(tmp_path)
    handle = DiffusersHandle(pipe)
    base_unet, _ = _unet_out(handle)
    net = LoraNetwork(handle.lora_targets(options), shape).attach()
    _randomize(net)
    ours_unet, ours_cond = _unet_out(handle)
    ours_text = {n: _text_out(pipe, n) for n in encoders}
    assert _rel(ours_unet, base_unet) > 1e-2, "the random LoRA must change the output for the test to mean anything"
    path = net.save(tmp_path / "lora.safetensors", lora_metadata(TrainingFacts(arch=handle.arch, network_dim=shape.network_dim,
                                                                               network_alpha=shape.network_alpha)))
    fresh = build(tmp_path)
    fresh.load_lora_weights(str(path))
    fresh_handle = DiffusersHandle(fresh)
    theirs_unet, theirs_cond = _unet_out(fresh_handle)
    assert _rel(theirs_cond, ours_cond) < 1e-4
    assert _rel(theirs_unet, ours_unet) < 1e-4
    for name in encoders:
        assert _rel(_text_out(fresh, name), ours_text[name]) < 1e-4
    return path, net


def test_sd1_lora_loads_in_diffusers_with_same_unet_and_text_encoder_outputs(tmp_path):
    path, net = _roundtrip(sd1_pipeline, tmp_path, TargetOptions("attn_mlp", text_encoder=True),
                           NetworkShape(4, 2.0), ["text_encoder"])
    keys = load_file(str(path)).keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in keys


def test_sdxl_lora_loads_in_diffusers_with_ldm_key_names(tmp_path):
    path, _ = _roundtrip(sdxl_pipeline, tmp_path, TargetOptions("attn_mlp", text_encoder=True),
                         NetworkShape(4, 4.0), ["text_encoder", "text_encoder_2"])
    names = {k.split(".")[0] for k in load_file(str(path))}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2" in names
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)


def test_locon_3x3_convolutions_load_in_diffusers(tmp_path):
    path, net = _roundtrip(sd1_pipeline, tmp_path, TargetOptions("all"), NetworkShape(4, 4.0, conv_dim=3, conv_alpha=1.5),
                           [])
    tensors = load_file(str(path))
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[1:] == (16, 3, 3)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (16, 3, 1, 1)
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight" in tensors
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"]) == 4.0
    assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.5


def test_sdxl_locon_loads_in_diffusers(tmp_path):
    path, _ = _roundtrip(sdxl_pipeline, tmp_path, TargetOptions("all"), NetworkShape(4, 4.0, conv_dim=2, conv_alpha=2),
                         [])
    names = {k.split(".")[0] for k in load_file(str(path))}
    assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
            "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_3_0_op",
            "lora_unet_input_blocks_4_0_skip_connection"} <= names


def test_detach_and_unmerge_restore_the_model_bit_for_bit(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    before, _ = _unet_out(handle)
    net = LoraNetwork(handle.lora_targets(TargetOptions("all", text_encoder=True)),
                      NetworkShape(4, 4.0, conv_dim=2, conv_alpha=2)).attach()
    _randomize(net, scale=0.05)  # small enough for the output to respond linearly to the multiplier
    attached, _ = _unet_out(handle)
    net.disable()
    assert torch.equal(_unet_out(handle)[0], before)
    net.enable()
    net.multiplier = 0.5
    half, _ = _unet_out(handle)
    assert 0.3 < _rel(half, before) / _rel(attached, before) < 0.7
    net.multiplier = 1.0
    net.merge()
    merged, _ = _unet_out(handle)
    assert _rel(merged, attached) < 1e-4
    net.unmerge()
    assert torch.equal(_unet_out(handle)[0], before)
    net.attach()
    net.detach()
    assert torch.equal(_unet_out(handle)[0], before)


def test_metadata_and_hashes_describe_the_bytes_written(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    net = LoraNetwork(handle.lora_targets(TargetOptions("all")), NetworkShape(8, 4.0, conv_dim=4, conv_alpha=2))
    facts = TrainingFacts(arch="sd1", network_dim=8, network_alpha=4.0, conv_dim=4, conv_alpha=2.0, resolution=64,
                          steps=10, settings={"ss_learning_rate": "0.0001", "ss_optimizer": "AdamW", "ss_seed": "7"},
                          output_name="x")
    path = net.save(tmp_path / "x.safetensors", lora_metadata(facts), dtype=torch.float16)
    meta = lora_files.read_metadata(path)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_args"] == '{"conv_dim": "4", "conv_alpha": "2.0"}'
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    blob = path.read_bytes()
    assert meta["sshs_model_hash"] == lora_files.safetensors_data_hash(blob)
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert all(t.dtype == torch.float16 for t in load_file(str(path)).values())
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_key_spellings_follow_the_design_table(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    keys = [t.key for t in handle.lora_targets(TargetOptions("all", text_encoder=True))]
    family = re.compile(
        r"lora_unet_(down_blocks_\d_(attentions_\d_(proj_in|proj_out|transformer_blocks_\d_(attn[12]_(to_q|to_k|to_v|to_out_0)"
        r"|ff_net_0_proj|ff_net_2))|resnets_\d_(conv1|conv2|time_emb_proj|conv_shortcut)|downsamplers_0_conv)"
        r"|mid_block_(attentions|resnets)_\d_\w+|up_blocks_\d_(attentions_\d_\w+|resnets_\d_(conv1|conv2|time_emb_proj|conv_shortcut)"
        r"|upsamplers_0_conv))"
        r"|lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")
    bad = [k for k in keys if not family.fullmatch(k)]
    assert not bad, bad[:5]


def test_start_from_a_file_of_another_rank_resizes_by_svd(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    targets = handle.lora_targets(TargetOptions("attn"))
    source = LoraNetwork(targets, NetworkShape(4, 4.0))
    _randomize(source)
    path = source.save(tmp_path / "r4.safetensors")
    same = LoraNetwork(targets, NetworkShape(4, 1.0))
    assert same.load_weights(path, "sd1") == []
    bigger = LoraNetwork(targets, NetworkShape(6, 3.0))
    bigger.load_weights(path, "sd1")
    smaller = LoraNetwork(targets, NetworkShape(2, 2.0))
    smaller.load_weights(path, "sd1")
    for key, lora in source.lora.items():
        exact = lora.delta_weight().detach().double()
        assert _rel(same.lora[key].delta_weight().double(), exact) < 1e-6
        assert _rel(bigger.lora[key].delta_weight().double(), exact) < 1e-6
        s = torch.linalg.svdvals(exact.flatten(1))
        optimal = float(s[2:].norm() / s.norm())
        assert abs(_rel(smaller.lora[key].delta_weight().double(), exact) - optimal) < 1e-6


@pytest.mark.parametrize("dim,alpha", [(0, 1.0), (-4, 1.0), (4, 0.0), (4, float("nan"))])
def test_bad_dim_or_alpha_is_refused(dim, alpha):
    # validated once, where the fields are declared: a job with such a shape never reaches the network
    with pytest.raises(JobError, match="rank|alpha"):
        StandardJob(network_dim=dim, network_alpha=alpha)


def test_alpha_far_above_dim_warns():
    assert "more than 4x the rank" in StandardJob(network_dim=4, network_alpha=64.0).warnings["network_alpha"]


def test_unknown_block_id_is_refused():
    with pytest.raises(ValueError, match="IN99"):
        TargetOptions(blocks=("IN01", "IN99"))


def test_bad_files_are_refused_with_clear_errors(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    net = LoraNetwork(handle.lora_targets(TargetOptions("attn")), NetworkShape(4, 4.0))
    good = net.save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(2)}, pickle)
    text = tmp_path / "text.safetensors"
    text.write_text("hello, this is not a model")
    for path, message in ((truncated, "truncated"), (pickle, "pickle"), (text, "not a safetensors")):
        with pytest.raises(lora_files.LoraFileError, match=message):
            net.load_weights(path, "sd1")
    other = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4)}, other)
    with pytest.raises(lora_files.LoraFileError, match="SDXL"):
        net.load_weights(other, "sd1")
    wrong_shape = tmp_path / "wrong.safetensors"
    key = next(iter(net.lora))
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 7), f"{key}.lora_up.weight": torch.zeros(7, 4)}, wrong_shape)
    with pytest.raises(NetworkError, match="another architecture"):
        net.load_weights(wrong_shape, "sd1")


def test_legacy_hash_covers_the_file_as_written(tmp_path):
    import hashlib
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    net = LoraNetwork(handle.lora_targets(TargetOptions("all")), NetworkShape(64, 64.0, conv_dim=32, conv_alpha=1))
    path = net.save(tmp_path / "big.safetensors")
    blob = path.read_bytes()
    assert len(blob) > 0x110000, "the file must reach past 1 MiB for the legacy hash to cover tensor bytes"
    assert lora_files.read_metadata(path)["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_conditioning_equals_what_the_diffusers_pipelines_feed_their_unet(tmp_path):
    """SD1: last hidden state; SDXL: penultimate CLIP-L ++ penultimate OpenCLIP-G, pooled G, size ids."""
    sd1 = sd1_pipeline(tmp_path)
    ours = DiffusersHandle(sd1).encode_prompts(["a red circle", "blue"], (64, 64))
    theirs, _ = sd1.encode_prompt(["a red circle", "blue"], "cpu", 1, False)
    assert torch.equal(ours.crossattn, theirs)
    xl = sdxl_pipeline(tmp_path)
    ours = DiffusersHandle(xl).encode_prompts(["a red circle"], (64, 96))
    embeds, _, pooled, _ = xl.encode_prompt(["a red circle"], device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.crossattn, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.time_ids.tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]


def test_long_prompts_are_chunked_like_the_webui(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    cond = handle.encode_prompts([" ".join("a" * 20), "short"], (64, 64))  # 20 tokens = 2 chunks of 14
    assert cond.crossattn.shape[1] == 2 * 16
    first_chunk = handle.encode_prompts([" ".join("a" * 14)], (64, 64))
    assert torch.equal(cond.crossattn[:1, :16], first_chunk.crossattn)



def test_a_lower_rank_file_grown_to_the_network_rank_trains_every_rank(tmp_path):
    handle = DiffusersHandle(sd1_pipeline(tmp_path))
    targets = handle.lora_targets(TargetOptions("attn"))
    small = LoraNetwork(targets, NetworkShape(1, 1.0), seed=3)
    for lora in small.lora.values():
        torch.nn.init.normal_(lora.lora_up.weight, std=0.5)
    small.save(tmp_path / "r1.safetensors")
    grown = LoraNetwork(targets, NetworkShape(8, 8.0), seed=4)
    grown.load_weights(tmp_path / "r1.safetensors", "sd1")
    key = next(iter(grown.lora))
    assert torch.allclose(grown.lora[key].delta_weight(), small.lora[key].delta_weight(), atol=1e-6), \
        "the delta is unchanged by growing"
    grown.attach()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = handle.encode_prompts(["a"], (32, 32))
    handle.predict(x, t, cond).square().mean().backward()
    grown.detach()
    per_rank = torch.stack([m.lora_up.weight.grad.abs().sum(0) for m in grown.lora.values()]).sum(0)
    assert per_rank.shape == (8,) and bool((per_rank > 0).all()), f"gradient per rank: {per_rank.tolist()}"
