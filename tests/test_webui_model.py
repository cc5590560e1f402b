"""WebUI backend on a real ldm ``LatentDiffusion`` (the object A1111 holds): host conditioning, kohya keys
shared with the diffusers backend, files that load in diffusers with the same outputs, training, and the
WebUI's merged LoRAs kept out of training.

The ``ldm`` package comes from PyPI (``stable-diffusion-sdkit``, installed with ``--no-deps``).
"""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

pytest.importorskip("pytorch_lightning", reason="the ldm package needs pytorch_lightning==1.9.4")
pytest.importorskip("ldm", reason="pip install --no-deps stable-diffusion-sdkit")

from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from test_standard import _dataset, _job  # noqa: E402
from tiny import _scheduler, _text_config, char_tokenizer  # noqa: E402
from trainer.lora.metadata import TrainingFacts, lora_metadata
from trainer.models.diffusers_model import DiffusersHandle  # noqa: E402
from trainer.models.handle import TargetOptions  # noqa: E402
from trainer.models.webui_model import WebUIHandle, text_encoder_lora_targets  # noqa: E402
from trainer.train.context import JobContext
from trainer.lora.network import LoraNetwork, NetworkShape
from trainer.train.runner import run_job


def _import_ldm():
    """ldm imports torchvision (``make_grid``, for logging) and open_clip (SD2's text encoder) at module
    level. Where torchvision is absent (CPU torch with no matching torchvision wheel) both get an empty
    stand-in for the import only: the tiny SD1 model below uses neither."""
    import pytorch_lightning  # noqa: F401  (first, so that it probes the real torchvision)
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        stand_ins = {"torchvision": types.ModuleType("torchvision"),
                     "torchvision.utils": types.ModuleType("torchvision.utils"),
                     "open_clip": types.ModuleType("open_clip")}
        stand_ins["torchvision.utils"].make_grid = None
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        from ldm.models.diffusion.ddpm import LatentDiffusion
        import ldm.models.autoencoder  # noqa: F401
        import ldm.modules.encoders.modules  # noqa: F401
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return LatentDiffusion, UNetModel


LatentDiffusion, LdmUNetModel = _import_ldm()

#: ldm's GroupNorm uses 32 groups: 32 is the smallest channel count.
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, num_heads=2,
            use_spatial_transformer=True, transformer_depth=1, context_dim=32, legacy=False)
SD1_UNET = dict(UNET, attention_resolutions=[1], channel_mult=[1, 2])
SD1_DIFFUSERS_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                          attention_head_dim=2, norm_num_groups=32)
VAE = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
           attn_resolutions=[], dropout=0.0)


def _ldm_sd1(clip_folder, parameterization: str = "eps"):
    """A tiny SD1 ``LatentDiffusion`` as ldm's own configs build it (``FrozenCLIPEmbedder`` from a local folder)."""
    torch.manual_seed(0)
    config = OmegaConf.create(dict(
        linear_start=0.00085, linear_end=0.012, timesteps=1000, image_size=8, channels=4, scale_factor=0.18215,
        use_ema=False, conditioning_key="crossattn", cond_stage_key="txt", first_stage_key="jpg",
        parameterization=parameterization,
        unet_config=dict(target="ldm.modules.diffusionmodules.openaimodel.UNetModel", params=SD1_UNET),
        first_stage_config=dict(target="ldm.models.autoencoder.AutoencoderKL", params=dict(
            embed_dim=4, lossconfig=dict(target="torch.nn.Identity"), ddconfig=VAE)),
        cond_stage_config=dict(target="ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                               params=dict(version=str(clip_folder), device="cpu", max_length=16))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LatentDiffusion(**config).eval()
    _unzero(model.model)
    return model


def _unzero(module: nn.Module) -> None:
    """ldm zero-initialises the last layer of each block (and the UNet's output): a zero UNet output would
    make every comparison vacuous."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    char_tokenizer(folder).save_pretrained(folder)
    torch.manual_seed(1)
    CLIPTextModel(_text_config(32)).save_pretrained(folder)
    return folder


@pytest.fixture()
def sd_model(clip_folder):
    return _ldm_sd1(clip_folder)


def _diffusers_twin(sd_model, tmp_path) -> StableDiffusionPipeline:
    """The same UNet and text encoder as a diffusers pipeline (UNet converted by diffusers' own converter)."""
    unet = UNet2DConditionModel(**SD1_DIFFUSERS_UNET)
    ldm_state = {"model.diffusion_model." + k: v for k, v in sd_model.model.diffusion_model.state_dict().items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm_state, dict(unet.config)))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(sd_model.cond_stage_model.transformer),
                                   tokenizer=char_tokenizer(tmp_path / "tok"), unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _inputs(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])


def _randomize(net: LoraNetwork, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# -- the host's own conditioning, latents and UNet --------------------------------------------------------

def test_handle_reads_schedule_prediction_and_conditioning_from_the_host_object(sd_model, clip_folder):
    handle = WebUIHandle(sd_model)
    assert (handle.arch, handle.prediction, handle.vae_scale) == ("sd1", "eps", 2)
    assert torch.equal(handle.alphas_cumprod, sd_model.alphas_cumprod.float())
    cond = handle.encode_prompts(["a red circle", "blue"], (32, 32))
    assert torch.equal(cond.crossattn, sd_model.get_learned_conditioning(["a red circle", "blue"]))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = handle.encode_images(pixels)
    assert latents.shape == (2, 4, 16, 16)
    mean = sd_model.encode_first_stage(pixels).mode()
    assert torch.allclose(latents, mean * 0.18215)
    x, t = _inputs()
    with torch.no_grad():
        ours = handle.predict(x, t, cond)
        ldm = sd_model.apply_model(x, t, cond.crossattn)
    assert torch.equal(ours, ldm)
    assert handle.decode_latents(latents).shape == (2, 3, 32, 32)
    assert WebUIHandle(_ldm_sd1(clip_folder, "v")).prediction == "v"


# -- the same kohya keys as the diffusers backend ---------------------------------------------------------

@pytest.mark.parametrize("target_set", ["attn", "attn_mlp", "all"])
def test_sd1_keys_and_block_ids_equal_the_diffusers_backends(sd_model, tmp_path, target_set):
    options = TargetOptions(target_set, text_encoder=True)
    ours = {t.key: t.block_id for t in WebUIHandle(sd_model).lora_targets(options)}
    theirs = {t.key: t.block_id for t in DiffusersHandle(_diffusers_twin(sd_model, tmp_path)).lora_targets(options)}
    assert ours == theirs
    # 6 transformer blocks (2 down, 1 mid, 3 up) x 8 attention projections + 2 CLIP layers x 4;
    # attn_mlp adds 2 feed-forward Linears a block, proj_in/proj_out, 2 CLIP MLP Linears a layer;
    # all adds 45 resnet convs/time projections/shortcuts and the 2 samplers
    assert len(ours) == {"attn": 6 * 8 + 2 * 4, "attn_mlp": 6 * 12 + 2 * 6, "all": 6 * 12 + 2 * 6 + 45}[target_set]
    assert ours["lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"] == "IN02"
    assert ours["lora_te_text_model_encoder_layers_1_self_attn_q_proj"] == "BASE"
    if target_set == "all":
        assert ours["lora_unet_up_blocks_0_upsamplers_0_conv"] == "OUT02"
        assert ours["lora_unet_down_blocks_0_downsamplers_0_conv"] == "IN03"
        assert ours["lora_unet_mid_block_resnets_1_time_emb_proj"] == "M00"


def _peft_layers(module: nn.Module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def test_lora_trained_on_the_ldm_model_loads_in_diffusers_with_the_same_outputs(sd_model, tmp_path):
    handle = WebUIHandle(sd_model)
    pipe = _diffusers_twin(sd_model, tmp_path)
    x, t = _inputs()
    ids = torch.tensor([[512, 1, 2, 3, 513] + [513] * 11])
    with torch.no_grad():
        context = sd_model.get_learned_conditioning(["a red circle", "blue"])
        base = sd_model.model.diffusion_model(x, t, context=context)
        assert _rel(pipe.unet(x, t, encoder_hidden_states=context).sample, base) < 1e-5   # the twin is exact
    net = LoraNetwork(handle.lora_targets(TargetOptions("all", text_encoder=True)),
                      NetworkShape(4, 2.0, conv_dim=2, conv_alpha=1.0)).attach()
    _randomize(net)
    with torch.no_grad():
        ours = sd_model.model.diffusion_model(x, t, context=context)
        ours_text = sd_model.cond_stage_model.transformer(ids).last_hidden_state
    assert _rel(ours, base) > 1e-2, "the random LoRA must change the output for the comparison to mean anything"
    path = net.save(tmp_path / "lora.safetensors", lora_metadata(TrainingFacts(arch="sd1", network_dim=4, network_alpha=2.0)))
    net.detach()

    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
        theirs_text = pipe.text_encoder(ids).last_hidden_state
    assert _rel(theirs, ours) < 1e-4
    assert _rel(theirs_text, ours_text) < 1e-4
    # every module of the file found its place in diffusers: none dropped
    assert _peft_layers(pipe.unet) + _peft_layers(pipe.text_encoder) == len(net.lora) == 6 * 12 + 2 * 6 + 45


# -- training on the host object ----------------------------------------------------------------------------

def test_standard_training_runs_on_the_ldm_model_with_finite_loss(sd_model, tmp_path):
    torch.set_num_threads(1)
    _dataset(tmp_path / "data", n=4)
    job = _job(tmp_path, steps=3, train_text_encoder=True, text_encoder_lr=1e-4)
    result = run_job(job, WebUIHandle(sd_model),
                     JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None))
    assert result.steps_done == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    keys = load_file(str(result.final)).keys()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight" in keys


def test_a_job_computes_no_gradient_for_the_hosts_weights_and_leaves_their_flags_as_they_were(sd_model, tmp_path):
    # A1111 leaves most of the UNet with requires_grad on; each step would keep a second UNet of gradients
    for i, p in enumerate(sd_model.parameters()):
        p.requires_grad_(i % 3 != 0)
    flags = [p.requires_grad for p in sd_model.parameters()]
    accumulated = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.shape))
             for p in sd_model.parameters() if p.requires_grad]
    _dataset(tmp_path / "data", n=2)
    job = _job(tmp_path, steps=2, train_text_encoder=True, text_encoder_lr=1e-4)
    try:
        run_job(job, WebUIHandle(sd_model), JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                                                       log=lambda m: None))
    finally:
        for h in hooks:
            h.remove()
    assert accumulated == [], f"{len(accumulated)} gradients of host weights were computed"
    assert all(p.grad is None for p in sd_model.parameters())
    assert [p.requires_grad for p in sd_model.parameters()] == flags


# -- the WebUI's own LoRAs stay out of training ------------------------------------------------------------

def _emulate_a1111_lora(model: nn.Module, module: nn.Module, delta: torch.Tensor):
    """What A1111's Lora extension leaves behind after a generation with ``<lora:x:1>``: every module named,
    ``module`` merged with ``delta`` and backed up, and a patched forward that re-merges on demand."""
    wanted = (("x", 1.0, 1.0, None),)
    for name, m in model.named_modules():
        m.network_layer_name = name.replace(".", "_")

    def network_apply_weights(m, inputs):     # A1111: called at the top of the patched Linear.forward
        if getattr(m, "network_layer_name", None) is None or getattr(m, "network_current_names", ()) == wanted:
            return
        with torch.no_grad():
            m.weight.copy_(m.network_weights_backup + delta)
        m.network_current_names = wanted

    module.network_weights_backup = module.weight.detach().clone()
    module.network_bias_backup = None if module.bias is None else module.bias.detach().clone()
    module.register_forward_pre_hook(network_apply_weights)
    network_apply_weights(module, None)


def test_lora_merged_by_the_webui_is_undone_while_training_and_given_back_after(sd_model):
    handle = WebUIHandle(sd_model)
    unet = sd_model.model.diffusion_model
    to_q = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    original = to_q.weight.detach().clone()
    x, t = _inputs()
    context = handle.encode_prompts(["a red circle", "blue"], (32, 32)).crossattn
    with torch.no_grad():
        clean = unet(x, t, context=context)
        _emulate_a1111_lora(sd_model.model, to_q, torch.randn(original.shape, generator=torch.Generator().manual_seed(7)))
        merged = unet(x, t, context=context)              # what the WebUI's generation sees
    assert _rel(merged, clean) > 1e-3, "the emulated WebUI LoRA must change the output"

    with handle.lock(), torch.no_grad():
        assert torch.equal(to_q.weight, original)
        during = unet(x, t, context=context)              # what training sees
        assert to_q.network_layer_name is None
    assert torch.equal(during, clean)
    # handed back: names restored, weights original; the WebUI re-merges on its next forward
    assert to_q.network_layer_name == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert to_q.network_current_names == ()
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=context), merged)


def test_lock_is_the_hosts_lock(sd_model):
    import threading
    host_lock = threading.Lock()
    handle = WebUIHandle(sd_model, lock=host_lock)
    with handle.lock():
        assert host_lock.locked()
    assert not host_lock.locked()


# -- OpenCLIP text encoders (SD2, SDXL's second) and SDXL keys ------------------------------------------------

class _OpenClipBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock`` (sequence-first, pre-LN, fused ``nn.MultiheadAttention``)."""

    def __init__(self, width: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(2 * width, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipEmbedder(nn.Module):
    """The module tree of ldm's ``FrozenOpenCLIPEmbedder`` / sgm's ``FrozenOpenCLIPEmbedder2`` (text side)."""

    def __init__(self, width: int, layers: int, layer_idx: int, always_return_pooled: bool):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.resblocks = nn.ModuleList(_OpenClipBlock(width) for _ in range(layers))
        self.layer_idx, self.always_return_pooled = layer_idx, always_return_pooled

    def hidden_states(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Every resblock over token + position embeddings [batch, tokens, width], causal as OpenCLIP."""
        n = embeddings.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        x = embeddings.transpose(0, 1)
        for block in self.model.transformer.resblocks:
            x = block(x, mask)
        return x.transpose(0, 1)


def test_open_clip_trains_attention_and_mlp_under_hf_names_and_skips_unused_layers():
    sd2_encoder = _OpenClipEmbedder(32, layers=3, layer_idx=1, always_return_pooled=False)   # penultimate layer
    targets = text_encoder_lora_targets(sd2_encoder, "lora_te_", "attn_mlp")
    keys = {t.key for t in targets}
    assert keys == {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in (0, 1)
                    for m in ("mlp_fc1", "mlp_fc2", "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                              "self_attn_out_proj")}
    assert {t.fused for t in targets if "self_attn" in t.key} == {"q", "k", "v", "out"}
    assert {t.key for t in text_encoder_lora_targets(sd2_encoder, "lora_te_", "attn")} == {
        k for k in keys if "self_attn" in k}
    sdxl_encoder = _OpenClipEmbedder(32, layers=3, layer_idx=1, always_return_pooled=True)   # pooled: every layer
    assert len(text_encoder_lora_targets(sdxl_encoder, "lora_te2_", "attn_mlp")) == 18


def test_a_vae_swapped_in_place_changes_the_cache_identity_and_the_latents_are_encoded_again(sd_model, tmp_path):
    from trainer import data

    _dataset(tmp_path / "data", n=1)
    handle = WebUIHandle(sd_model)
    options = data.DatasetOptions(folder=tmp_path / "data", resolution=64, min_bucket_reso=64, max_bucket_reso=128)
    dataset = data.scan_dataset(options)
    items = list(zip(dataset.items, data.assign_buckets(dataset, options)))
    cache = data.LatentCache(tmp_path / "latents")
    before_id, before = handle.identity, cache.get_latents(items, handle)
    assert handle.identity == before_id, "unchanged weights keep their identity"
    vae = sd_model.first_stage_model       # A1111's sd_vae.load_vae: load_state_dict into the same module
    vae.load_state_dict({k: v * 1.05 if v.is_floating_point() else v for k, v in vae.state_dict().items()})
    after = cache.get_latents(items, handle)
    assert handle.identity != before_id
    (key_before,), (key_after,) = before, after
    assert key_before != key_after
    assert float((before[key_before] - after[key_after]).abs().max()) > 1e-3, "the new VAE's latents, not stale ones"


def test_two_networks_on_one_fused_attention_detach_in_any_order_and_each_keeps_working():
    # e.g. a results grid on the text encoder of an SD2/SDXL job that trains it: attach A, attach B, detach B
    torch.manual_seed(0)
    encoder = _OpenClipEmbedder(32, layers=2, layer_idx=1, always_return_pooled=True)
    mha = next(m for m in encoder.modules() if isinstance(m, nn.MultiheadAttention))
    targets = [t for t in text_encoder_lora_targets(encoder, "lora_te2_", "attn") if t.module is mha]
    x = torch.randn(3, 2, 32)
    run = lambda: mha(x, x, x, need_weights=False)[0].detach().clone()
    base = run()
    nets = {}
    for name, seed in (("a", 1), ("b", 2)):
        nets[name] = LoraNetwork(targets, NetworkShape(4, 4.0), seed=seed)
        _randomize(nets[name])
    nets["a"].attach()
    only_a = run()
    nets["b"].attach()
    both = run()
    nets["b"].detach()
    assert torch.allclose(run(), only_a, atol=1e-6), "detaching B must leave A at work"
    nets["b"].attach()
    nets["a"].detach()
    nets["a"].attach()
    assert torch.allclose(run(), both, atol=1e-6)
    nets["a"].detach()
    nets["b"].detach()
    assert torch.equal(run(), base) and "forward" not in mha.__dict__, "the original forward is back"
    assert not torch.allclose(only_a, base) and not torch.allclose(both, only_a)


def _tiny_sdxl_pipeline(text_encoder, tmp_path):
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(_text_config(32, projection_dim=32, hidden_act="gelu"))
    return StableDiffusionXLPipeline(vae=AutoencoderKL(), text_encoder=text_encoder, text_encoder_2=te2,
                                     tokenizer=char_tokenizer(tmp_path / "t1"), tokenizer_2=char_tokenizer(tmp_path / "t2"),
                                     unet=unet, scheduler=_scheduler())


def test_open_clip_attention_lora_loads_in_diffusers_with_the_same_outputs(sd_model, tmp_path):
    """A LoRA on OpenCLIP's fused attention and MLP (as A1111's SDXL te2), saved, then loaded by diffusers into
    the HF CLIP with the same weights: same hidden states (1e-4). Merge + unmerge and detach are exact."""
    from ldm_convert import open_clip_to_ldm

    pipe = _tiny_sdxl_pipeline(sd_model.cond_stage_model.transformer, tmp_path)
    hf = pipe.text_encoder_2
    embedder = _OpenClipEmbedder(32, layers=2, layer_idx=0, always_return_pooled=True)
    state = {k[len("transformer."):]: v for k, v in open_clip_to_ldm(hf, "").items() if k.startswith("transformer.")}
    embedder.model.transformer.load_state_dict(state)
    ids = torch.tensor([[512, 5, 9, 40, 513, 513], [512, 7, 513, 513, 513, 513]])
    with torch.no_grad():
        embeddings = hf.text_model.embeddings(input_ids=ids)
        ours_before = embedder.hidden_states(embeddings)
        theirs_before = hf(ids, output_hidden_states=True).hidden_states[-1]
    assert _rel(ours_before, theirs_before) < 1e-5, "the two encoders agree before any LoRA"

    net = LoraNetwork(text_encoder_lora_targets(embedder, "lora_te2_", "attn_mlp"), NetworkShape(4, 2.0)).attach()
    _randomize(net, 0.3)
    with torch.no_grad():
        ours = embedder.hidden_states(embeddings)
    assert _rel(ours, ours_before) > 1e-2, "the LoRA changes the output"
    path = net.save(tmp_path / "te2.safetensors")
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = hf(ids, output_hidden_states=True).hidden_states[-1]
    assert _rel(ours, theirs) < 1e-4

    loss = embedder.hidden_states(embeddings).square().mean()
    loss.backward()
    attention = [m for k, m in net.lora.items() if "self_attn" in k]
    assert len(attention) == 8 and all(float(m.lora_up.weight.grad.abs().sum()) > 0 for m in attention)
    net.merge()
    with torch.no_grad():
        assert _rel(embedder.hidden_states(embeddings), ours) < 1e-5
    net.unmerge()
    net.attach()
    net.detach()
    with torch.no_grad():
        assert torch.equal(embedder.hidden_states(embeddings), ours_before)
    assert set(dict(embedder.model.transformer.named_parameters())) == set(state), "every parameter is back in place"


def _sdxl_stand_in(sd_model) -> nn.Module:
    """An sgm-shaped ``DiffusionEngine``: ldm's UNetModel in SDXL's layout (sgm's UNet is its fork), CLIP-L
    and an OpenCLIP tree in ``conditioner.embedders``. sgm itself is not on PyPI."""
    torch.manual_seed(2)
    engine = nn.Module()
    engine.model = nn.Module()
    engine.model.diffusion_model = LdmUNetModel(**dict(UNET, channel_mult=[1, 2, 2], attention_resolutions=[2, 4],
                                                       use_linear_in_transformer=True))
    _unzero(engine.model)
    engine.conditioner = nn.Module()
    engine.conditioner.embedders = nn.ModuleList([copy.deepcopy(sd_model.cond_stage_model),
                                                  _OpenClipEmbedder(32, 2, 1, always_return_pooled=True)])
    engine.first_stage_model = sd_model.first_stage_model
    engine.alphas_cumprod, engine.parameterization, engine.is_sdxl = sd_model.alphas_cumprod, "eps", True
    return engine


def test_sdxl_unet_keys_keep_ldm_names_and_equal_the_diffusers_backends(sd_model, tmp_path):
    engine = _sdxl_stand_in(sd_model)
    pipe = _tiny_sdxl_pipeline(engine.conditioner.embedders[0].transformer, tmp_path)
    options = TargetOptions("all", text_encoder=True)
    handle = WebUIHandle(engine)
    ours = {t.key: t.block_id for t in handle.lora_targets(options)}
    theirs = {t.key: t.block_id for t in DiffusersHandle(pipe).lora_targets(options)}
    assert handle.arch == "sdxl"
    assert ours == theirs
    assert ours["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == "IN04"
    assert ours["lora_unet_output_blocks_2_2_conv"] == "OUT02"
    assert ours["lora_unet_input_blocks_1_0_in_layers_2"] == "IN01"
    assert not any("down_blocks" in k or "up_blocks" in k for k in ours)


def test_webui_host_trains_queued_jobs_on_the_loaded_model_and_refreshes_the_lora_list(sd_model, tmp_path):
    """The WebUI glue's logic: the worker starts once, jobs train on shared.sd_model under the host's lock,
    outputs land in the LoRA folder, the WebUI's LoRA list is refreshed, and the x/y/z axis lists them."""
    import threading

    from PIL import Image

    from trainer import jobs
    from trainer.host.webui import WebUIHost

    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "data" / "a.png")
    refreshed = []
    lock = threading.Lock()
    host = WebUIHost(get_sd_model=lambda: sd_model, queue_lock=lock, lora_dir=tmp_path / "Lora",
                     data_dir=tmp_path / "ext-data", refresh_loras=lambda: refreshed.append(1),
                     output_subdir="lora_queue")
    try:
        worker = host.start()
        assert host.start() is worker, "a UI reload must not start a second worker"
        assert host.handle_for() is host.handle_for(), "one handle per loaded model"
        job_id = worker.queue.add(jobs.StandardJob(name="mine", dataset_dir=str(tmp_path / "data"), resolution=64,
                                                   min_bucket_reso=64, max_bucket_reso=64, steps=2,
                                                   network_dim=2, network_alpha=2.0, mixed_precision="no"))
        worker.wake()
        for _ in range(600):
            if worker.queue.get(job_id).state in ("done", "failed"):
                break
            threading.Event().wait(0.1)
        row = worker.queue.get(job_id)
        assert row.state == "done", row.error
        assert (tmp_path / "Lora" / "lora_queue" / "mine.safetensors").is_file()
        assert refreshed, "the WebUI's LoRA list is refreshed after a job"
        assert host.list_loras() == ["mine"]
        assert not lock.locked(), "the host's lock is free between jobs"
    finally:
        host.stop()


def test_the_webuis_lora_list_is_refreshed_when_a_job_ends_done_or_stopped_and_saved(tmp_path):
    import threading

    from trainer.host.webui import WebUIHost
    from trainer.queue.store import QueueEvent

    refreshed = []
    host = WebUIHost(get_sd_model=lambda: None, queue_lock=threading.Lock(), lora_dir=tmp_path, data_dir=tmp_path,
                     refresh_loras=lambda: refreshed.append(True))
    for state in ("running", "done", "stopped", "failed", "cancelled"):
        host._on_event(QueueEvent(1, "state", state=state))
    assert len(refreshed) == 2, "done and stopped wrote a LoRA; the others did not"
