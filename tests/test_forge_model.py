"""Forge backend, on a stand-in shaped like Forge's own objects around a real tiny ldm model.

The stand-in copies the behaviour LoRA Queue depends on, as read in lllyasviel/stable-diffusion-webui-forge
(``backend/diffusion_engine/sd15.py``, ``backend/patcher/{base,lora,clip}.py``, ``backend/modules/k_model.py``,
``extensions-builtin/sd_forge_lora/networks.py``): every model made and moved under ``torch.inference_mode()``,
methods decorated with it, the predictor holding the schedule, the UNet computing in ``computation_dtype``,
HF CLIP text encoders in ``clip.cond_stage_model``, and LoRAs merged into the weights by a ``LoraLoader``
that keeps a backup of the originals.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from test_webui_model import _inputs, _ldm_sd1, clip_folder  # noqa: F401  (clip_folder is a fixture)
from trainer.models.forge_model import ForgeHandle
from trainer.models.handle import TargetOptions
from trainer.models.webui_model import WebUIHandle
from trainer.lora.network import LoraNetwork, NetworkShape


def _set_parameter(model: nn.Module, key: str, value: nn.Parameter) -> None:
    owner, _, name = key.rpartition(".")
    setattr(model.get_submodule(owner), name, value)


class LoraLoader:
    """Forge's ``LoraLoader.refresh``: restore the backup, merge the new patches, all under inference mode."""

    def __init__(self, model: nn.Module):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for key, weight in self.backup.items():
            _set_parameter(self.model, key, weight if isinstance(weight, nn.Parameter)
                           else nn.Parameter(weight, requires_grad=False))
        self.backup = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                weight = self.model.get_parameter(key)
                self.backup.setdefault(key, weight.to(offload_device))
                _set_parameter(self.model, key, nn.Parameter(weight + delta, requires_grad=False))
        self.loaded_hash = hashes


class ModelPatcher:
    def __init__(self, model: nn.Module):
        self.model, self.offload_device, self.lora_patches = model, torch.device("cpu"), {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)

    def clone(self) -> "ModelPatcher":
        twin = ModelPatcher(self.model)
        twin.lora_patches = dict(self.lora_patches)
        return twin

    def refresh_loras(self) -> None:
        self.model.lora_loader.refresh(self.lora_patches, self.offload_device)


class ForgeObjects(SimpleNamespace):
    def shallow_copy(self) -> "ForgeObjects":
        return ForgeObjects(**vars(self))


class IntegratedCLIP(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


def k_model(unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> nn.Module:
    """``backend/modules/k_model.py`` KModel: the UNet and the predictor holding the schedule."""
    kmodel = nn.Module()
    kmodel.diffusion_model = unet
    kmodel.predictor = nn.Module()
    kmodel.predictor.register_buffer("alphas_cumprod", alphas_cumprod.clone())
    kmodel.predictor.prediction_type = prediction_type
    return kmodel


class ForgeLinear(nn.Module):
    """``backend.operations.ForgeOperations.Linear``: a plain ``nn.Module`` (not an ``nn.Linear``) with
    ``in_features``, ``out_features``, ``weight`` and ``bias``; Forge builds its UNet and CLIP from it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _forge_layers(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, ForgeLinear(child))
        else:
            _forge_layers(child)


def _forge_block_forward(self, x, context=None):
    """``backend/nn/unet.py`` BasicTransformerBlock: the attention outputs are added in place (``x += n``)."""
    n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
    x += n
    n = self.attn2(self.norm2(x), context=context)
    x += n
    x += self.ff(self.norm3(x))
    return x


class FakeInitialModel:
    """``modules.sd_models.FakeInitialModel``: Forge's ``shared.sd_model`` until the first generation loads one."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class ForgeSD15:
    """``backend/diffusion_engine/sd15.py``: the parts LoRA Queue uses, with Forge's own layers (plain-Module
    Linear, in-place transformer blocks) and its tied token embedding."""

    def __init__(self, ldm, prediction_type: str = "epsilon"):
        import types

        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False
        self._ldm = ldm
        unet = ldm.model.diffusion_model
        _forge_layers(unet)
        _forge_layers(ldm.cond_stage_model.transformer)
        for block in unet.modules():
            if type(block).__name__ == "BasicTransformerBlock":
                block._forward = types.MethodType(_forge_block_forward, block)
        clip_l = ldm.cond_stage_model.transformer
        embeddings = getattr(clip_l, "text_model", clip_l).embeddings    # transformers 5 dropped text_model
        embeddings.tied = nn.Module()                  # the token embedding under a second name, as Forge ties it
        embeddings.tied.register_parameter("weight", embeddings.token_embedding.weight)
        unet.computation_dtype = torch.float32
        kmodel = k_model(unet, ldm.alphas_cumprod, prediction_type)
        text = nn.ModuleDict({"clip_l": IntegratedCLIP(ldm.cond_stage_model.transformer)})
        clip = SimpleNamespace(cond_stage_model=text, patcher=ModelPatcher(text))
        self.forge_objects = ForgeObjects(unet=ModelPatcher(kmodel), clip=clip,
                                          vae=SimpleNamespace(first_stage_model=ldm.first_stage_model))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        return self._ldm.get_learned_conditioning(list(prompts))

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self._ldm.get_first_stage_encoding(self._ldm.encode_first_stage(x))

    def get_first_stage_encoding(self, x):
        return x

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self._ldm.decode_first_stage(z)

    def generate_with_lora(self, unet_patches: dict) -> None:
        """``networks.load_networks`` (new patcher clones when the LoRA set changes), then sampling loading the
        patcher, which merges its patches (``LoadedModel.model_load`` -> ``refresh_loras``)."""
        target = str([["some.safetensors", 1.0, 1.0, False]])
        if self.current_lora_hash != target:
            self.current_lora_hash = target
            self.forge_objects.unet = self.forge_objects_original.unet.clone()
            self.forge_objects.unet.lora_patches[("some.safetensors", 1.0, 1.0, False)] = unet_patches
            self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
            self.forge_objects.unet.refresh_loras()

    @torch.inference_mode()
    def move_weights(self) -> None:
        """Forge moving the UNet between devices under inference mode: new (inference) weight tensors."""
        unet = self.forge_objects.unet.model.diffusion_model
        for key, p in list(unet.named_parameters()):
            _set_parameter(unet, key, nn.Parameter(p.clone(), requires_grad=False))


@pytest.fixture()
def forge(clip_folder):  # noqa: F811
    with torch.inference_mode():                       # as Forge loads its models
        return ForgeSD15(_ldm_sd1(clip_folder))


def _unet(engine):
    return engine.forge_objects.unet.model.diffusion_model


def test_schedule_dtype_and_text_encoders_come_from_forges_objects(clip_folder):  # noqa: F811
    with torch.inference_mode():
        engine = ForgeSD15(_ldm_sd1(clip_folder, "v"), prediction_type="v_prediction")
    assert not hasattr(engine, "alphas_cumprod") and not hasattr(engine, "cond_stage_model")
    handle = ForgeHandle(engine)
    assert handle.arch == "sd1" and handle.prediction == "v" and handle.dtype == torch.float32
    assert torch.equal(handle.alphas_cumprod, engine.forge_objects.unet.model.predictor.alphas_cumprod)
    assert handle.text_encoders() == [("lora_te_", engine.forge_objects.clip.cond_stage_model.clip_l.transformer)]
    assert not any(p.is_inference() for p in _unet(engine).parameters())


def test_unet_and_text_encoder_lora_train_with_the_keys_a1111_uses(forge, clip_folder):  # noqa: F811
    handle = ForgeHandle(forge)
    options = TargetOptions("attn_mlp", text_encoder=True)
    targets = handle.lora_targets(options)
    a1111 = WebUIHandle(_ldm_sd1(clip_folder)).lora_targets(options)
    assert [(t.key, t.block_id) for t in targets] == [(t.key, t.block_id) for t in a1111]
    assert any(t.key == "lora_te_text_model_encoder_layers_0_self_attn_q_proj" for t in targets)
    net = LoraNetwork(targets, NetworkShape(2, 2.0)).attach()
    x, t = _inputs()
    with handle.lock():
        cond = handle.encode_prompts(["a red circle", "blue"], (32, 32))   # with the graph: Forge's undecorated code
        loss = handle.predict(x, t, cond).square().mean()
        loss.backward()
    grads = {k: m.lora_up.weight.grad for k, m in net.lora.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    text = [float(g.abs().sum()) for k, g in grads.items() if k.startswith("lora_te_")]
    unet = [float(g.abs().sum()) for k, g in grads.items() if k.startswith("lora_unet_")]
    assert text and min(text) >= 0 and sum(text) > 0, "the text-encoder LoRA gets gradients through Forge's code"
    assert sum(unet) > 0
    with torch.no_grad():
        cached = handle.encode_prompts(["a red circle"], (32, 32))           # no graph: Forge's decorated call
    assert not cached.crossattn.requires_grad and not cached.crossattn.is_inference()


def test_merged_forge_lora_is_undone_while_training_and_forge_reapplies_it_next_time(forge):
    handle = ForgeHandle(forge)
    x, t = _inputs()
    with torch.no_grad():
        cond = handle.encode_prompts(["a red circle", "blue"], (32, 32))
        with handle.lock():
            clean = handle.predict(x, t, cond)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    delta = 0.5 * torch.ones_like(forge.forge_objects.unet.model.get_parameter(key))
    forge.generate_with_lora({key: delta})
    with torch.no_grad():
        assert torch.equal(handle.predict(x, t, cond), clean), "predict undoes the merge before it runs"
    loader = forge.forge_objects.unet.model.lora_loader
    assert loader.loaded_hash == str([]) and not loader.backup
    assert forge.current_lora_hash == str([]), "Forge's next load_networks rebuilds its patchers"
    assert forge.forge_objects.unet is forge.forge_objects_original.unet
    assert forge.forge_objects_after_applying_lora.unet is forge.forge_objects_original.unet
    forge.generate_with_lora({key: delta})         # the next generation merges its LoRA again
    assert loader.loaded_hash != str([])
    weight = forge.forge_objects.unet.model.get_parameter(key)
    assert torch.allclose(weight, loader.backup[key] + delta)
    with torch.no_grad(), handle.lock():
        assert torch.equal(handle.predict(x, t, cond), clean)


def test_a_step_trains_after_forge_made_new_inference_weights(forge):
    handle = ForgeHandle(forge)
    net = LoraNetwork(handle.lora_targets(TargetOptions("attn")), NetworkShape(2, 2.0)).attach()
    x, t = _inputs()
    with torch.no_grad():
        cond = handle.encode_prompts(["a red circle", "blue"], (32, 32))
    for _ in range(2):
        forge.move_weights()
        assert all(p.is_inference() for p in _unet(forge).parameters())
        with handle.lock():
            handle.predict(x, t, cond).square().mean().backward()
    assert sum(float(m.lora_up.weight.grad.abs().sum()) for m in net.lora.values()) > 0


def test_predict_loads_the_unet_with_forges_memory_manager(forge):
    loaded = []
    handle = ForgeHandle(forge, load_model_gpu=loaded.append)
    x, t = _inputs()
    with torch.no_grad():
        cond = handle.encode_prompts(["a red circle", "blue"], (32, 32))
        with handle.lock():
            handle.predict(x, t, cond)
    assert loaded == [forge.forge_objects.unet]


def test_sdxl_keys_equal_the_diffusers_backends_with_every_layer_of_both_text_encoders(clip_folder, tmp_path):  # noqa: F811
    """Forge's SDXL: the ldm-layout UNet keeps ldm names, and both HF CLIP encoders (clip_l, clip_g) train every
    layer (A1111's OpenCLIP te2 gets the same keys through fused targets)."""
    from test_webui_model import _sdxl_stand_in, _tiny_sdxl_pipeline

    from trainer.models.diffusers_model import DiffusersHandle

    ldm = _ldm_sd1(clip_folder)
    sgm = _sdxl_stand_in(ldm)
    pipe = _tiny_sdxl_pipeline(sgm.conditioner.embedders[0].transformer, tmp_path)
    kmodel = k_model(sgm.model.diffusion_model, ldm.alphas_cumprod)
    text = nn.ModuleDict({"clip_l": IntegratedCLIP(pipe.text_encoder), "clip_g": IntegratedCLIP(pipe.text_encoder_2)})
    engine = SimpleNamespace(is_sdxl=True, forge_objects=ForgeObjects(
        unet=ModelPatcher(kmodel), clip=SimpleNamespace(cond_stage_model=text, patcher=ModelPatcher(text)),
        vae=SimpleNamespace(first_stage_model=ldm.first_stage_model)))
    options = TargetOptions("all", text_encoder=True)
    ours = {t.key: t.block_id for t in ForgeHandle(engine).lora_targets(options)}
    theirs = {t.key: t.block_id for t in DiffusersHandle(pipe).lora_targets(options)}
    assert ours == theirs
    assert "lora_te2_text_model_encoder_layers_1_self_attn_k_proj" in ours
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in ours



def test_forges_layers_are_all_targeted_and_a_step_trains_through_its_in_place_blocks(forge, clip_folder):  # noqa: F811
    assert not any(type(m) is nn.Linear for m in _unet(forge).modules()), "the stand-in has Forge's own Linear"
    handle = ForgeHandle(forge)
    options = TargetOptions("attn_mlp", text_encoder=True)
    a1111 = WebUIHandle(_ldm_sd1(clip_folder)).lora_targets(options)
    targets = handle.lora_targets(options)
    assert [t.key for t in targets] == [t.key for t in a1111], "every Linear Forge has, as A1111's are found"
    net = LoraNetwork(targets, NetworkShape(2, 2.0)).attach()
    x, t = _inputs()
    with handle.lock():
        cond = handle.encode_prompts(["a red circle", "blue"], (32, 32))
        handle.predict(x, t, cond).square().mean().backward()    # Forge's x += n after norm2 saved x
    assert sum(float(m.lora_up.weight.grad.abs().sum()) for m in net.lora.values()) > 0
    net.detach()
    with torch.no_grad(), handle.lock():
        latents = handle.encode_images(torch.zeros(1, 3, 32, 32))   # Forge's VAE returns the latent tensor
    assert latents.shape[:2] == (1, 4) and torch.isfinite(latents).all()


def test_a_tied_weight_stays_one_tensor_when_forges_inference_weights_are_made_ordinary(forge):
    from trainer.models.forge_model import ordinary_weights_in_place

    with torch.inference_mode():                     # Forge ties CLIP's token embedding under a second name
        owner = nn.Module()
        owner.embedding = nn.Embedding(8, 4)
        owner.tied = nn.Module()
        owner.tied.register_parameter("weight", owner.embedding.weight)
    assert ordinary_weights_in_place(owner) == 1, "one copy, not one per name"
    assert owner.tied.weight is owner.embedding.weight and not owner.embedding.weight.is_inference()
    ForgeHandle(forge)
    clip_l = forge.forge_objects.clip.cond_stage_model.clip_l.transformer
    embeddings = getattr(clip_l, "text_model", clip_l).embeddings
    assert embeddings.tied.weight is embeddings.token_embedding.weight and not embeddings.tied.weight.is_inference()


def test_a_job_queued_before_forges_first_generation_loads_the_model_and_trains(clip_folder, tmp_path):  # noqa: F811
    import threading

    from safetensors.torch import load_file

    from test_standard import _dataset, _job
    from trainer.host.webui import WebUIHost

    state = {"model": FakeInitialModel()}
    loaded = []

    def forge_model_reload():                          # Forge's own loading, as the first generation does it
        with torch.inference_mode():
            state["model"] = ForgeSD15(_ldm_sd1(clip_folder))
        loaded.append(True)

    host = WebUIHost(get_sd_model=lambda: state["model"], queue_lock=threading.Lock(), lora_dir=tmp_path / "loras",
                     data_dir=tmp_path / "data", load_model=forge_model_reload)
    _dataset(tmp_path / "images", n=2)
    job = _job(tmp_path, steps=2, dataset_dir=str(tmp_path / "images"), train_text_encoder=True,
               text_encoder_lr=1e-4, target_set="attn_mlp")
    from trainer.queue.store import JobQueue
    from trainer.queue.worker import Worker
    queue = JobQueue(tmp_path / "data" / "queue.sqlite")
    job_id = queue.add(job)
    Worker(queue, host.handle_for, host.job_context).run_until_empty()
    row = queue.get(job_id)
    assert row.state == "done", row.error
    assert loaded == [True]
    keys = {k.split(".")[0] for k in load_file(row.outputs[-1])}
    expected = {t.key for t in WebUIHandle(_ldm_sd1(clip_folder)).lora_targets(TargetOptions("attn_mlp", True))}
    assert keys == expected, "the same modules as on A1111: UNet and text encoder"
