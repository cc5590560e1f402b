"""Single-file checkpoints: header-only detection, offline loading, refusal of bad files.

Tiny SD1 / SD2 / SDXL pipelines with random weights are written as ldm/sgm ``.safetensors``
(``ldm_convert``) and loaded back with ``load_single_file``; every component must match the
original within 1e-5. Real-size layouts are checked through ``detect_from_header`` with the real
key names and shapes, and the shipped configs are instantiated on the meta device.
"""
from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_convert import pipeline_to_ldm
from trainer.models import clip_vocab
from trainer.models.handle import ModelError
from trainer.models.single_file import (CONFIGS_DIR, detect_checkpoint, detect_from_header, load_single_file,
                                        probe_v_prediction, read_header, v_prediction_from_probe)

TOL = 1e-5


# ------------------------------------------------------------------ tiny models


def _text_config(hidden: int, act: str, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act=act, bos_token_id=0,
                          eos_token_id=2, pad_token_id=1, **kw)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                         layers_per_block=1, sample_size=32)


def tiny_pipeline(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=64,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32)
        return StableDiffusionXLPipeline(
            vae=_vae(), unet=unet, text_encoder=CLIPTextModel(_text_config(32, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(32, "gelu", projection_dim=32)),
            tokenizer=None, tokenizer_2=None,
            scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    sd2 = arch == "sd2"
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8, cross_attention_dim=32,
        use_linear_projection=sd2, upcast_attention=sd2)
    return StableDiffusionPipeline(
        vae=_vae(), unet=unet, text_encoder=CLIPTextModel(_text_config(32, "gelu" if sd2 else "quick_gelu")),
        tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1))


def write_config_dir(pipe, folder: Path) -> Path:
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).config.save_pretrained(folder / name)
    return folder


def write_checkpoint(pipe, arch: str, path: Path, extra: dict | None = None, metadata=None, **kw) -> Path:
    save_file({**pipeline_to_ldm(pipe, arch, **kw), **(extra or {})}, str(path), metadata=metadata)
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (a model hub) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("single-file loading tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip_tok")


# ------------------------------------------------------------------ equality of components


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str):
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what} differs by {diff}"


@torch.no_grad()
def assert_same_pipeline(original, loaded, arch: str):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    ids = loaded.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ctx = original.text_encoder(ids, output_hidden_states=True)
    ctx2 = loaded.text_encoder(ids, output_hidden_states=True)
    _assert_close(ctx.last_hidden_state, ctx2.last_hidden_state, "text encoder")
    _assert_close(ctx.hidden_states[-2], ctx2.hidden_states[-2], "text encoder penultimate layer")
    if arch == "sdxl":
        e1 = original.text_encoder_2(ids, output_hidden_states=True)
        e2 = loaded.text_encoder_2(ids, output_hidden_states=True)
        _assert_close(e1.text_embeds, e2.text_embeds, "text encoder 2 pooled projection")
        _assert_close(e1.hidden_states[-2], e2.hidden_states[-2], "text encoder 2 penultimate layer")
        context = torch.cat([ctx.hidden_states[-2], e1.hidden_states[-2]], dim=-1)
        added = {"text_embeds": e1.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    else:
        context, added = ctx.last_hidden_state, None
    out = original.unet(latents, t, context, added_cond_kwargs=added).sample
    _assert_close(out, loaded.unet(latents, t, context, added_cond_kwargs=added).sample, "UNet")
    pixels = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    encoded = original.vae.encode(pixels).latent_dist.mean
    _assert_close(encoded, loaded.vae.encode(pixels).latent_dist.mean, "VAE encoder")
    _assert_close(original.vae.decode(latents).sample, loaded.vae.decode(latents).sample, "VAE decoder")


# ------------------------------------------------------------------ tokenizer


def test_clip_tokenizer_built_offline_gives_openai_ids(tok_cache):
    tok = clip_vocab.clip_tokenizer(cache_dir=tok_cache)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407                                  # SD1 / SDXL tokenizer: <|endoftext|>
    open_clip = clip_vocab.clip_tokenizer(clip_vocab.PAD_OPEN_CLIP, cache_dir=tok_cache)
    assert open_clip.pad_token_id == 0                                # SD2 / SDXL tokenizer_2: "!"
    assert open_clip("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


# ------------------------------------------------------------------ round trips


def test_sd1_single_file_loads_with_identical_outputs(tmp_path, tok_cache, no_network):
    pipe = tiny_pipeline("sd1")
    path = write_checkpoint(pipe, "sd1", tmp_path / "sd1.safetensors")
    info = detect_checkpoint(path)
    assert (info.arch, info.prediction, info.dtype) == ("sd1", "eps", torch.float32)
    loaded = load_single_file(path, config_dir=write_config_dir(pipe, tmp_path / "cfg"), tokenizer_cache_dir=tok_cache)
    assert isinstance(loaded, StableDiffusionPipeline)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert loaded.tokenizer.pad_token == "<|endoftext|>"
    assert_same_pipeline(pipe, loaded, "sd1")


def test_sd2_v_single_file_with_openclip_extra_layer_loads_identically(tmp_path, tok_cache, no_network):
    pipe = tiny_pipeline("sd2")
    # Real SD2 files carry OpenCLIP-H's 24th layer and text projection; diffusers' encoder stops at 23.
    path = write_checkpoint(pipe, "sd2", tmp_path / "sd2v.safetensors", extra_open_clip_layers=1,
                            metadata={"modelspec.prediction_type": "v"})
    info = detect_checkpoint(path)
    assert (info.arch, info.prediction, info.prediction_source) == ("sd2", "v", "metadata modelspec.prediction_type")
    cfg = write_config_dir(pipe, tmp_path / "cfg")
    loaded = load_single_file(path, config_dir=cfg, tokenizer_cache_dir=tok_cache)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.tokenizer.pad_token == "!"
    assert_same_pipeline(pipe, loaded, "sd2")
    override = load_single_file(path, prediction="eps", config_dir=cfg, tokenizer_cache_dir=tok_cache)
    assert override.scheduler.config.prediction_type == "epsilon"


def test_sdxl_single_file_with_v_pred_key_loads_identically(tmp_path, tok_cache, no_network):
    pipe = tiny_pipeline("sdxl")
    path = write_checkpoint(pipe, "sdxl", tmp_path / "sdxl.safetensors", extra={"v_pred": torch.tensor([])})
    info = detect_checkpoint(path)
    assert (info.arch, info.prediction, info.prediction_source) == ("sdxl", "v", "v_pred key")
    loaded = load_single_file(path, config_dir=write_config_dir(pipe, tmp_path / "cfg"), tokenizer_cache_dir=tok_cache)
    assert isinstance(loaded, StableDiffusionXLPipeline)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert (loaded.tokenizer.pad_token, loaded.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert_same_pipeline(pipe, loaded, "sdxl")
    image = loaded(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_fp16_file_reports_its_dtype_and_loads_as_asked(tmp_path, tok_cache):
    pipe = tiny_pipeline("sd1")
    state = {k: v.half() for k, v in pipeline_to_ldm(pipe, "sd1").items()}
    save_file(state, str(tmp_path / "half.safetensors"))
    assert detect_checkpoint(tmp_path / "half.safetensors").dtype == torch.float16
    loaded = load_single_file(tmp_path / "half.safetensors", config_dir=write_config_dir(pipe, tmp_path / "cfg"),
                              tokenizer_cache_dir=tok_cache, dtype=torch.float32)
    assert loaded.unet.dtype == torch.float32 and loaded.text_encoder.dtype == torch.float32


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tok_cache):
    pipe = tiny_pipeline("sd1")
    path = write_checkpoint(pipe, "sd1", tmp_path / "sd1.safetensors")
    other = tiny_pipeline("sd2")                                       # different head layout / projections
    with pytest.raises(ModelError, match="UNet weights do not"):
        load_single_file(path, config_dir=write_config_dir(other, tmp_path / "cfg"), tokenizer_cache_dir=tok_cache)


# ------------------------------------------------------------------ v-prediction probe (A1111's method)


def test_probe_tells_v_from_eps_by_the_mean_output_at_t999():
    sample = torch.full((1, 4, 8, 8), 0.5)
    assert not v_prediction_from_probe(sample + 0.1, sample)          # eps model: predicts ~ its input
    assert v_prediction_from_probe(sample - 1.5, sample)              # v model: ~ -x0, far below
    assert probe_v_prediction(lambda x, t, encoder_hidden_states: x - 2.0, context_dim=16)
    assert not probe_v_prediction(lambda x, t, encoder_hidden_states: x * 0.9, context_dim=16)


# ------------------------------------------------------------------ detection on real-size layouts

_U = "model.diffusion_model."
SD1_HEADER = {
    _U + "input_blocks.0.0.weight": (320, 4, 3, 3),
    _U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    _U + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
}
SD2_HEADER = {
    _U + "input_blocks.0.0.weight": (320, 4, 3, 3),
    _U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
}
SDXL_HEADER = {
    _U + "input_blocks.0.0.weight": (320, 4, 3, 3),
    _U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
    _U + "label_emb.0.0.weight": (1280, 2816),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
}


@pytest.mark.parametrize("header, arch, prediction, context", [
    (SD1_HEADER, "sd1", "eps", 768), (SD2_HEADER, "sd2", None, 1024), (SDXL_HEADER, "sdxl", "eps", 2048)])
def test_real_layouts_are_told_apart_from_their_keys(header, arch, prediction, context):
    info = detect_from_header(header, {}, {_U + "input_blocks.0.0.weight": "F16"})
    assert (info.arch, info.prediction, info.context_dim, info.dtype) == (arch, prediction, context, torch.float16)
    assert info.has_vae and info.has_text_encoders


def test_prediction_markers():
    assert detect_from_header({**SD2_HEADER, "v_pred": (0,)}).prediction == "v"
    assert detect_from_header(SD2_HEADER, {"modelspec.prediction_type": "epsilon"}).prediction == "eps"
    assert detect_from_header(SD2_HEADER, {"ss_v_parameterization": "True"}).prediction == "v"
    assert detect_from_header(SDXL_HEADER, {"modelspec.prediction_type": "v"}).prediction == "v"
    assert detect_from_header(SD2_HEADER).config_name == "sd21"


def test_unet_only_files_fall_back_to_the_cross_attention_width():
    unet_only = {k: v for k, v in SD2_HEADER.items() if k.startswith(_U)}
    info = detect_from_header(unet_only)
    assert info.arch == "sd2" and not info.has_vae and not info.has_text_encoders


@pytest.mark.parametrize("change, message", [
    ({_U + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting model"),
    ({_U + "input_blocks.0.0.weight": (320, 8, 3, 3)}, "instruct-pix2pix"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    ({"embedder.model.ln_final.weight": (1024,)}, "unCLIP"),
])
def test_variants_we_cannot_train_are_named(change, message):
    with pytest.raises(ModelError, match=message):
        detect_from_header({**SD1_HEADER, **change})


def test_refiner_and_unknown_layouts_are_named():
    refiner = {_U + "input_blocks.0.0.weight": (384, 4, 3, 3),
               "conditioner.embedders.0.model.ln_final.weight": (1280,)}
    with pytest.raises(ModelError, match="SDXL refiner"):
        detect_from_header(refiner)
    with pytest.raises(ModelError, match=r"no Stable Diffusion UNet.*double_blocks.0"):
        detect_from_header({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)})
    with pytest.raises(ModelError, match="diffusers component"):
        detect_from_header({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)})


# ------------------------------------------------------------------ bad files


class _Tripwire:
    """Unpickling this creates a file: proof that a refused pickle was never unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["model.ckpt", "renamed.safetensors"])
def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path, name):
    marker = tmp_path / "unpickled"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "trap": _Tripwire(marker)}, tmp_path / name)
    with pytest.raises(ModelError, match=r"we load \.safetensors only; convert"):
        detect_checkpoint(tmp_path / name)
    with pytest.raises(ModelError, match=r"\.safetensors only"):
        load_single_file(tmp_path / name)
    assert not marker.exists()


def test_broken_files_get_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(1000)}, str(good))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (tmp_path / "cut_header.safetensors").write_bytes(data[:20])
    (tmp_path / "text.safetensors").write_text("this is a text file, not a model\n" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "bad_json.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    for name, message in [("cut", "truncated: its tensors need"), ("cut_header", "truncated: its header says"),
                          ("text", "not a safetensors file"), ("empty", "is empty"),
                          ("bad_json", "header is not JSON")]:
        with pytest.raises(ModelError, match=message):
            read_header(tmp_path / f"{name}.safetensors")
    with pytest.raises(ModelError, match="does not exist"):
        detect_checkpoint(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("name, unet_params, text_params", [
    ("sd15", 859_520_964, {"text_encoder": 123_060_480}),
    ("sd21", 865_910_724, {"text_encoder": 340_387_840}),
    ("sd21-base", 865_910_724, {"text_encoder": 340_387_840}),
    ("sdxl", 2_567_463_684, {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
])
def test_shipped_configs_build_the_official_architectures(name, unet_params, text_params):
    folder = CONFIGS_DIR / name
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        assert count(unet) == unet_params
        assert count(vae) == 83_653_863
        for component, expected in text_params.items():
            config = json.loads((folder / component / "config.json").read_text())
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
            assert count(model) == expected
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler.get("prediction_type", "epsilon") == ("v_prediction" if name == "sd21" else "epsilon")
