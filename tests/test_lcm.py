"""LCM distillation: the math against diffusers and float64 formulas, the mode end to end on tiny models,
starting from LCM-LoRA files, the LCM samplers, and (on the demo model) that the 1-step student improves."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from tiny import sd1_pipeline, sdxl_pipeline
from trainer import jobs
from trainer.sampling import lcm as lcm_sampling
from trainer.lora.files import LoraFileError, read_metadata
from trainer.models.diffusers_model import DiffusersHandle
from trainer.models.handle import TargetOptions
from trainer.train.modes import lcm
from trainer.train.plan import build_network
from trainer.train.context import JobContext
from trainer.lora.network import LoraNetwork, NetworkShape, removed
from trainer.train.runner import run_job
from trainer.diffusion.ddim import predict_x0_eps
from trainer.diffusion import lcm as lcm_math
from trainer.sampling import guided
from trainer.sampling import webui_samplers

torch.set_num_threads(1)


# -- helpers --------------------------------------------------------------------------------------

def _handle(tmp_path: Path, arch: str = "sd1", prediction: str = "epsilon", dtype=torch.float32) -> DiffusersHandle:
    pipe = sdxl_pipeline(tmp_path) if arch == "sdxl" else sd1_pipeline(tmp_path, prediction=prediction)
    return DiffusersHandle(pipe.to(dtype=dtype))


def _network(handle, dim: int = 2, alpha: float = 2.0, random_up: bool = False, seed: int = 0) -> LoraNetwork:
    network = LoraNetwork(handle.lora_targets(TargetOptions("attn_mlp")), NetworkShape(dim, alpha), seed=seed)
    network.to(dtype=handle.dtype)
    if random_up:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in network.lora.values():
                w = module.lora_up.weight
                w.copy_(0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype))
    return network.attach()


def _ctx(tmp_path: Path, logs: list | None = None) -> JobContext:
    return JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                      log=(logs.append if logs is not None else lambda m: None))


def _job(**kw) -> jobs.LcmJob:
    base = dict(name="lcm", prompts=["red circle", "blue square"], num_generated_images=4, resolution=64, steps=2,
                batch_size=2, network_dim=2, network_alpha=2.0, mixed_precision="no")
    base.update(kw)
    return jobs.LcmJob(**base)


@pytest.fixture()
def few_teacher_steps(monkeypatch):
    """The teacher generates its training images in 4 DDIM steps instead of 30 (speed only)."""
    monkeypatch.setattr(lcm, "TEACHER_SAMPLING_STEPS", 4)


def _save_lora(handle, path: Path, dim: int, seed: int = 3) -> LoraNetwork:
    network = _network(handle, dim=dim, alpha=float(dim), random_up=True, seed=seed)
    network.detach()
    network.save(path)
    return network


# -- the solver grid and the DDIM chain ------------------------------------------------------------

def test_solver_grid_is_19_39_to_999_with_skip_20_and_t_n_clamped_at_0():
    grid = lcm_math.solver_grid(50)
    assert lcm_math.skip_k(50) == 20
    assert grid[:3].tolist() == [19, 39, 59] and grid[-1] == 999 and len(grid) == 50
    t_start, t_end = lcm_math.solver_times(grid, torch.tensor([0, 1, 49]), 20)
    assert t_start.tolist() == [19, 39, 999] and t_end.tolist() == [0, 19, 979]


def test_solver_chain_equals_diffusers_ddim_trailing_without_alpha_one():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    grid = lcm_math.solver_grid(50)
    assert scheduler.timesteps.tolist() == grid.flip(0).tolist()
    abar = scheduler.alphas_cumprod.double()
    eps_of = lambda z, t: torch.tanh(z) * math.cos(t / 300)      # any fixed "model"
    z_ours = z_theirs = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in reversed(range(50)):
        t_start, t_end = lcm_math.solver_times(grid, torch.tensor([n]), lcm_math.skip_k(50))
        t = int(t_start)
        eps = eps_of(z_ours, t)
        x0, _ = predict_x0_eps(eps, z_ours, abar[t], "eps")
        z_ours = lcm.ddim_step(x0, eps, abar[t_end])
        z_theirs = scheduler.step(eps_of(z_theirs, t), t, z_theirs, eta=0.0).prev_sample
        assert (z_ours - z_theirs).abs().max() < 1e-5, f"differs after the step from t = {t} (float32 schedule)"


def test_boundary_scalings_are_identity_at_0_and_pure_x0_at_999():
    c_skip, c_out = lcm_math.boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] == pytest.approx(0.25 / (190 ** 2 + 0.25)) and c_out[1] == pytest.approx(190 / math.sqrt(190 ** 2 + 0.25))
    assert c_skip[2] < 3e-7 and c_out[2] > 1 - 2e-7


def test_target_at_the_bottom_of_the_grid_is_the_ddim_step_itself(tmp_path):
    handle = _handle(tmp_path)
    network = _network(handle, random_up=True)
    cond = handle.encode_prompts(["red circle", "blue square"], (16, 16))
    z_end = torch.randn(2, 4, 8, 8)
    target = lcm.consistency_target(handle, network, z_end, torch.tensor([0, 0]), cond, "eps")
    assert torch.equal(target, z_end), "f(z, 0) = z: the model's output gets weight c_out(0) = 0"


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_guidance_on_x0_equals_x0_of_the_guided_eps(prediction):
    g = torch.Generator().manual_seed(1)
    z, out_cond, out_uncond = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    alpha_bar, w = torch.tensor(0.3, dtype=torch.float64), torch.tensor([0.0, 3.5, 7.5], dtype=torch.float64)
    x0_cond, eps_cond = predict_x0_eps(out_cond, z, alpha_bar, prediction)
    x0_uncond, eps_uncond = predict_x0_eps(out_uncond, z, alpha_bar, prediction)
    x0_from_guided_output, eps_from_guided_output = predict_x0_eps(lcm_math.guided(out_cond, out_uncond, w), z, alpha_bar,
                                                                   prediction)
    assert torch.allclose(lcm_math.guided(x0_cond, x0_uncond, w), x0_from_guided_output, atol=1e-12)
    assert torch.allclose(lcm_math.guided(eps_cond, eps_uncond, w), eps_from_guided_output, atol=1e-12)


# -- the step on a real (tiny) model ---------------------------------------------------------------

def test_at_initialisation_the_student_is_the_teacher(tmp_path):
    handle = _handle(tmp_path)
    network = _network(handle)   # up = 0: the LoRA adds nothing yet
    cond = handle.encode_prompts(["red circle"], (16, 16))
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([739])
    with torch.no_grad():
        student = lcm.student_output(handle, z, t, cond, "eps")
        with removed(network):
            teacher = lcm.student_output(handle, z, t, cond, "eps")
    assert torch.equal(student, teacher)
    assert network.enabled, "the LoRA is on again after the teacher's pass"


def test_no_gradient_reaches_the_base_weights_or_the_target(tmp_path):
    handle = _handle(tmp_path)
    network = _network(handle, random_up=True)
    x0 = torch.randn(2, 4, 8, 8)
    cond, uncond = handle.encode_prompts(["red circle", "blue square"], (16, 16)), handle.uncond(2, (16, 16))
    settings = lcm.LcmSettings()
    draw = lcm.draw_step(x0, settings, torch.Generator().manual_seed(0))
    t_start, t_end = lcm_math.solver_times(settings.grid, draw.index, settings.k)
    z_start = torch.randn(2, 4, 8, 8)
    z_end = lcm.teacher_solver_step(handle, network, z_start, t_start, t_end, cond, uncond, draw.w, "eps")
    target = lcm.consistency_target(handle, network, z_end, t_end, cond, "eps")
    assert not z_end.requires_grad and not target.requires_grad
    lcm.consistency_distillation_loss(handle, network, x0, cond, uncond, settings, draw).backward()
    assert all(p.grad is None for p in handle.unet.parameters())
    assert all(p.grad is None for p in handle.pipe.text_encoder.parameters())
    assert sum(float(m.lora_up.weight.grad.abs().sum()) for m in network.lora.values()) > 0


def test_teacher_runs_cond_and_uncond_in_one_forward_with_zeros_as_sdxl_uncond(tmp_path):
    handle = _handle(tmp_path, "sdxl")
    network = _network(handle)
    calls = []
    predict = handle.predict
    handle.predict = lambda z, t, cond: calls.append((len(z), cond)) or predict(z, t, cond)
    x0 = torch.randn(3, 4, 8, 8)
    cond, uncond = handle.encode_prompts(["red", "green", "blue"], (16, 16)), handle.uncond(3, (16, 16))
    settings = lcm.LcmSettings()
    lcm.consistency_distillation_loss(handle, network, x0, cond, uncond, settings,
                                      lcm.draw_step(x0, settings, torch.Generator().manual_seed(0)))
    assert [n for n, _ in calls] == [6, 3, 3], "teacher (cond + uncond batched), target, student"
    teacher_cond = calls[0][1]
    assert teacher_cond.crossattn[3:].abs().max() == 0 and teacher_cond.pooled[3:].abs().max() == 0
    assert teacher_cond.crossattn[:3].abs().max() > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_student_teacher_step_and_target_equal_the_formulas_in_float64(tmp_path, prediction):
    handle = _handle(tmp_path, prediction=prediction, dtype=torch.float64)
    p = handle.prediction
    network = _network(handle, random_up=True)
    unet, abar = handle.unet, handle.alphas_cumprod.double()
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond, uncond = handle.encode_prompts(["red circle", "blue square"], (16, 16)), handle.uncond(2, (16, 16))
    settings = lcm.LcmSettings(prediction=p, w_min=2.0, w_max=9.0, loss_type="huber", huber_c=0.001)
    draw = lcm.draw_step(x0, settings, torch.Generator().manual_seed(7))
    assert draw.w.min() >= 2.0 and draw.w.max() <= 9.0 and len(set(draw.w.tolist())) == 2

    # independently: the LCM paper's formulas written out, direct UNet calls
    def x0_eps(z, t, c, lora_on=True):
        network.enabled = lora_on
        out = unet(z, t, encoder_hidden_states=c.crossattn).sample
        network.enabled = True
        a, s = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        return ((z - s * out) / a, out) if p == "eps" else (a * z - s * out, s * z + a * out)

    def f(z, t, c):
        x = x0_eps(z, t, c)[0]
        st = 10.0 * t.double().view(-1, 1, 1, 1)
        return 0.25 / (st ** 2 + 0.25) * z + st / (st ** 2 + 0.25).sqrt() * x

    t_start = (draw.index + 1) * 20 - 1
    t_end = (t_start - 20).clamp(min=0)
    z_start = abar[t_start].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[t_start]).sqrt().view(-1, 1, 1, 1) * draw.noise
    with torch.no_grad():
        xc, ec = x0_eps(z_start, t_start, cond, lora_on=False)
        xu, eu = x0_eps(z_start, t_start, uncond, lora_on=False)
        w = draw.w.view(-1, 1, 1, 1)
        x_hat, e_hat = xc + w * (xc - xu), ec + w * (ec - eu)
        a_prev = abar[t_end].view(-1, 1, 1, 1)
        z_end_expected = a_prev.sqrt() * x_hat + (1 - a_prev).sqrt() * e_hat
        target_expected = f(z_end_expected, t_end, cond)
        student_expected = f(z_start, t_start, cond)
    loss_expected = (((student_expected - target_expected) ** 2 + 1e-6).sqrt() - 1e-3).mean()

    with torch.no_grad():
        z_end = lcm.teacher_solver_step(handle, network, z_start, t_start, t_end, cond, uncond, draw.w, p)
        target = lcm.consistency_target(handle, network, z_end, t_end, cond, p)
        student = lcm.student_output(handle, z_start, t_start, cond, p)
        loss = lcm.consistency_distillation_loss(handle, network, x0, cond, uncond, settings, draw)
    assert (z_end - z_end_expected).abs().max() < 1e-6
    assert (target - target_expected).abs().max() < 1e-6
    assert (student - student_expected).abs().max() < 1e-6
    assert abs(float(loss) - float(loss_expected)) < 1e-6
    assert float((student - target).abs().max()) > 1e-3, "the check compares something that differs"


def test_ema_target_is_a_moving_average_of_the_lora_weights_swapped_in_and_out(tmp_path):
    handle = _handle(tmp_path)
    network = _network(handle, random_up=True)
    ema = lcm.EmaTarget(network, decay=0.95)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
    ema.update(network)
    for name, p in network.named_parameters():
        assert torch.allclose(ema.weights[name], 0.95 * before[name] + 0.05 * p.detach())
    online = {n: p.detach().clone() for n, p in network.named_parameters()}
    with ema.swapped_in(network):
        assert all(torch.equal(p, ema.weights[n]) for n, p in network.named_parameters())
    assert all(torch.equal(p, online[n]) for n, p in network.named_parameters())
    assert sum(p.numel() for p in ema.weights.values()) == sum(p.numel() for p in network.parameters()), \
        "the EMA holds the LoRA weights only"


# -- samplers --------------------------------------------------------------------------------------

def test_lcm_timesteps_are_lcm_schedulers():
    from diffusers import LCMScheduler

    assert lcm_math.lcm_timesteps(4) == [999, 759, 499, 259]
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for steps in (1, 2, 4, 8):
        scheduler.set_timesteps(steps)
        assert lcm_math.lcm_timesteps(steps) == scheduler.timesteps.tolist()


def test_one_step_lcm_sample_is_the_students_boundary_scaled_output_at_999(tmp_path):
    handle = _handle(tmp_path)
    _network(handle, random_up=True)
    cond = handle.encode_prompts(["red circle", "blue square"], (16, 16))
    noise = torch.randn(2, 4, 8, 8)
    sample = lcm_sampling.lcm_latents(handle, noise, cond, steps=1)
    with torch.no_grad():
        student = lcm.student_output(handle, noise, torch.tensor([999, 999]), cond, "eps")
    assert torch.equal(sample, student)


def test_previews_switch_on_the_lora_that_training_keeps_off_between_steps(tmp_path):
    handle = _handle(tmp_path)
    network = _network(handle, random_up=True)
    network.disable()
    base = lcm_sampling.sample_lcm(handle, ["red circle"], [1], steps=2, size=(16, 16))
    with_lora = lcm_sampling.sample_lcm(handle, ["red circle"], [1], steps=2, size=(16, 16), network=network)
    assert base[0].tobytes() != with_lora[0].tobytes() and not network.enabled


def test_lcm_alternative_reduces_to_lcm_with_fresh_noise_only():
    abar = torch.linspace(0.999, 0.005, 1000, dtype=torch.float64)
    denoise = lambda z, t: 0.6 * torch.tanh(z) + t / 5000
    draws = [torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)]
    fresh = lambda i: draws[i]
    z, ts = torch.randn(1, 4, 4, 4, dtype=torch.float64), lcm_math.lcm_timesteps(4)
    plain = lcm_math.lcm_loop(denoise, z, ts, abar, fresh)
    assert torch.allclose(lcm_math.lcm_alternative_loop(denoise, z, ts, abar, fresh, euler_steps=4, ancestral=1.0), plain)
    assert torch.allclose(lcm_math.lcm_alternative_loop(denoise, z, ts, abar, fresh, euler_steps=0), plain)
    removed = lcm_math.lcm_alternative_loop(denoise, z, ts, abar, lambda i: 1 / 0, euler_steps=3)
    assert not torch.allclose(removed, plain), "re-noising with the removed noise is deterministic and different"


def test_k_diffusion_form_of_the_lcm_alternative_equals_ours_in_sigma_space():
    """x_ve = z / sqrt(abar), sigma = sqrt((1 - abar) / abar): the WebUI's form gives our sampler's result."""
    abar = torch.linspace(0.999, 0.005, 1000, dtype=torch.float64)
    denoise = lambda z, t: 0.6 * torch.tanh(z) + t / 5000
    ts = lcm_math.lcm_timesteps(4)
    sigma_of = {t: ((1 - abar[t]) / abar[t]).sqrt() for t in ts}
    t_of = {float(s): t for t, s in sigma_of.items()}
    ve_model = lambda x, sigma: denoise(x * abar[t_of[float(sigma[0])]].sqrt(), t_of[float(sigma[0])])
    draws = [torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(4)]
    z = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    sigmas = torch.tensor([float(sigma_of[t]) for t in ts] + [0.0], dtype=torch.float64)
    for euler_steps, ancestral in ((1, 0.0), (2, 0.5), (0, 0.0)):
        ours = lcm_math.lcm_alternative_loop(denoise, z, ts, abar, lambda i: draws[i], euler_steps, ancestral)
        k_form = webui_samplers.make_lcm_alternative_k(euler_steps, ancestral)
        theirs = k_form(ve_model, z / abar[ts[0]].sqrt(), sigmas, noise_sampler=lambda s, s_next: draws[ts.index(t_of[float(s)])])
        assert torch.allclose(ours, theirs, atol=1e-10)


def test_webui_samplers_register_once_through_the_modules_the_glue_passes():
    sd_samplers = SimpleNamespace(all_samplers=[], all_samplers_map={}, refreshed=0)
    sd_samplers.set_samplers = lambda: setattr(sd_samplers, "refreshed", sd_samplers.refreshed + 1)
    common = SimpleNamespace(SamplerData=lambda name, constructor, aliases, options: SimpleNamespace(
        name=name, constructor=constructor, aliases=aliases, options=options))
    kdiff = SimpleNamespace(KDiffusionSampler=lambda func, model: ("sampler", func, model))
    assert webui_samplers.register_webui_samplers(sd_samplers, common, kdiff) == ["LCM alternative",
                                                                               "LCM alternative ancestral"]
    assert webui_samplers.register_webui_samplers(sd_samplers, common, kdiff) == []
    assert sd_samplers.refreshed == 1 and len(sd_samplers.all_samplers) == 2
    kind, func, model = sd_samplers.all_samplers_map["LCM alternative"].constructor("the model")
    assert model == "the model" and func.__name__ == "sample_lcm_alternative"
    assert sd_samplers.all_samplers_map["LCM alternative"].options == {"scheduler": "sgm_uniform"}


class _SeededTorch:
    """What A1111/Forge put in k_diffusion.sampling.torch for a generation (sd_samplers_common.TorchHijack)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


def test_webui_samplers_take_step_noise_from_the_hosts_seeded_k_diffusion_torch():
    k_sampling = SimpleNamespace(torch=None)
    sd_samplers = SimpleNamespace(all_samplers=[], all_samplers_map={}, set_samplers=lambda: None)
    common = SimpleNamespace(SamplerData=lambda name, constructor, aliases, options: SimpleNamespace(
        constructor=constructor))
    kdiff = SimpleNamespace(KDiffusionSampler=lambda func, model: func, k_diffusion=SimpleNamespace(sampling=k_sampling))
    webui_samplers.register_webui_samplers(sd_samplers, common, kdiff)
    sample = sd_samplers.all_samplers_map["LCM alternative ancestral"].constructor(None)
    model = lambda x, sigma, **kw: 0.5 * x
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.3, 0.0])
    images = []
    for seed in (1111, 1111, 2222):
        k_sampling.torch = _SeededTorch(seed)      # the host seeds each generation
        images.append(sample(model, torch.ones(1, 4, 8, 8) * 14.6, sigmas))
    assert torch.equal(images[0], images[1]), "the same seed gives the same image"
    assert not torch.equal(images[0], images[2])


# -- the mode --------------------------------------------------------------------------------------

def test_prompts_only_job_generates_the_teacher_images_once_and_saves_lcm_previews(tmp_path, few_teacher_steps):
    handle = _handle(tmp_path)
    logs = []
    job = _job(sample_prompts=["red circle"], save_every_n_steps=1, use_ema_target=True)
    result = run_job(job, handle, _ctx(tmp_path, logs))
    assert [p.name for p in result.saved] == ["lcm-000001.safetensors", "lcm.safetensors", "lcm.comparison.png"]
    # the final preview is the LoRA's card picture beside it; the step previews stay in the job's folder
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["lcm.comparison.png", "lcm.preview.png"]
    assert sorted(p.name for p in (tmp_path / "work" / "lcm").glob("*.png")) == ["lcm-000001.preview.png"]
    meta = read_metadata(result.final)
    assert meta["ss_lcm_teacher_cfg_min"] == "4.0" and meta["ss_lcm_teacher_cfg_max"] == "16.0"
    assert meta["ss_lcm_guidance_w_min"] == "3.0" and meta["ss_lcm_num_ddim_timesteps"] == "50"
    assert meta["ss_lcm_recipe"].startswith("LCM-LoRA (diffusers") and "changed: network_dim, network_alpha" in meta["ss_lcm_recipe"]
    assert sum("teacher: generating" in m for m in logs) == 1
    run_job(_job(overwrite=True), handle, _ctx(tmp_path, logs))
    assert sum("teacher: generating" in m for m in logs) == 1, "the second job reads the cached teacher images"


def test_a_finished_lcm_job_leaves_a_comparison_sheet_teacher_25_steps_against_the_lora_at_2_4_8(tmp_path,
                                                                                                 few_teacher_steps,
                                                                                                 monkeypatch):
    from PIL import Image

    from trainer.train import previews

    import gc
    import weakref

    handle = _handle(tmp_path)
    made = []

    from trainer.lora import network as lora_network

    def network_for_file(*args, _load=lora_network.network_for_file):
        network = _load(*args)
        made.append(weakref.ref(network))
        return network
    monkeypatch.setattr(lora_network, "network_for_file", network_for_file)   # what attached_file loads with
    gc.collect()
    gc.disable()
    try:
        events = []
        result = run_job(_job(steps=3), handle, dataclasses.replace(_ctx(tmp_path), events=events.append))
        # the queue shows the job at 100 % "comparison sheet" while the sheet renders (minutes on a CPU)
        assert [(e.step, e.total, e.phase) for e in events][-1] == (3, 3, "comparison sheet")
        assert math.isnan(events[-1].loss), "no loss point for the plot"
        assert len(made) == 1 and made[0]() is None, "the sheet's LoRA is freed without a full garbage collection"
    finally:
        gc.enable()
    sheet_file = tmp_path / "out" / "lcm.comparison.png"
    assert result.saved[-1] == sheet_file and result.saved[-2] == result.final, "listed with the job's outputs"
    sheet = Image.open(sheet_file).convert("RGB")
    # columns: 2 prompts x seeds 1, 2; rows: teacher, LCM 2, 4, 8; cells 64 px shown at 128; labels 70 px left,
    # title and column labels 40 px on top
    cell, left, top = 128, 70, 40
    assert previews.SHEET_SEEDS == (1, 2) and previews.SHEET_LCM_STEPS == (2, 4, 8)
    assert sheet.size == (left + 2 * 2 * cell, top + 4 * cell)

    def cell_at(row: int, column: int) -> torch.Tensor:
        box = (left + column * cell, top + row * cell, left + (column + 1) * cell, top + (row + 1) * cell)
        return torch.tensor(list(sheet.crop(box).getdata()), dtype=torch.float32)

    teacher = guided.sample(handle, ["blue square"], [2], steps=25, cfg=7.0, size=(64, 64))[0]
    expected = torch.tensor(list(teacher.resize((cell, cell), Image.NEAREST).getdata()), dtype=torch.float32)
    assert float((cell_at(0, 3) - expected).abs().mean()) < 1.0, "row 0 is the model alone, 25 steps, CFG 7, seed 2"
    lora = build_network(handle, _job(init_lora=str(result.final)))
    lora.enable()
    try:
        # the same batch as the sheet's column pair: the LCM sampler's fresh noise is drawn for the whole batch
        four = lcm_sampling.sample_lcm(handle, ["red circle"] * 2, [1, 2], steps=4, size=(64, 64))[0]
    finally:
        lora.detach()
    expected = torch.tensor(list(four.resize((cell, cell), Image.NEAREST).getdata()), dtype=torch.float32)
    assert float((cell_at(2, 0) - expected).abs().mean()) < 1.0, "row 2 is the saved LoRA at 4 LCM steps, seed 1"
    assert float((cell_at(2, 0) - cell_at(0, 0)).abs().mean()) > 1.0, "the teacher and the student differ"
    assert float((cell_at(1, 0) - cell_at(3, 0)).abs().mean()) > 0.0, "2 and 8 steps differ"


def test_dataset_folder_job_trains_on_captioned_images(tmp_path):
    from trainer.models.demo.shapes import draw

    folder = tmp_path / "data"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        draw(colour, "circle", "white", 64).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} circle")
    handle = _handle(tmp_path)
    result = run_job(_job(prompts=[], dataset_dir=str(folder), loss_type="l2"), handle, _ctx(tmp_path))
    assert result.steps_done == 2 and all(math.isfinite(x) and x > 0 for x in result.losses)


def test_starting_from_an_lcm_lora_of_another_rank_resizes_it(tmp_path, few_teacher_steps):
    handle = _handle(tmp_path)
    source = _save_lora(handle, tmp_path / "lcm_r4.safetensors", dim=4)
    wanted = {k: m.delta_weight() for k, m in source.lora.items()}
    padded = build_network(handle, _job(init_lora=str(tmp_path / "lcm_r4.safetensors"), network_dim=8,
                                        network_alpha=8.0))
    assert max(float((padded.lora[k].delta_weight().detach() - d).abs().max()) for k, d in wanted.items()) < 1e-6
    padded.detach()
    rank1 = build_network(handle, _job(init_lora=str(tmp_path / "lcm_r4.safetensors"), network_dim=1,
                                       network_alpha=8.0))
    for key, delta in wanted.items():
        s = torch.linalg.svdvals(delta.flatten(1).double())
        error = float(torch.linalg.matrix_norm((rank1.lora[key].delta_weight() - delta).flatten(1).double()))
        assert error == pytest.approx(float(s[1:].norm()), rel=1e-4, abs=1e-6), f"{key}: best rank-1 approximation"
    rank1.detach()
    result = run_job(_job(init_lora=str(tmp_path / "lcm_r4.safetensors"), network_dim=1, network_alpha=8.0,
                          steps=1), handle, _ctx(tmp_path))
    assert load_file(str(result.final))[f"{next(iter(wanted))}.lora_down.weight"].shape[0] == 1


def test_an_sdxl_lora_is_refused_for_an_sd1_model_with_a_clear_message(tmp_path, few_teacher_steps):
    sdxl = _handle(tmp_path / "xl", "sdxl")
    _save_lora(sdxl, tmp_path / "xl_lcm.safetensors", dim=2)
    handle = _handle(tmp_path)
    with pytest.raises(LoraFileError, match="xl_lcm.safetensors: this LoRA is for SDXL, the model is SD1"):
        run_job(_job(init_lora=str(tmp_path / "xl_lcm.safetensors")), handle, _ctx(tmp_path))


# -- it works: the demo model ------------------------------------------------------------------------

# The default LCM job (the LCM-LoRA recipe) with only the step count, the data source (the demo's 45 prompts,
# the teacher drawing the 200 training images) and the demo's 64 px set. Issue 18 asks for a 2x distance ratio;
# it is NOT reached: the defaults give 1.27x at 600 steps (1.28x at 800), and no single knob tried within the
# 3-minute budget got near 2x (lr 3e-4: 1.31x at best, lr 1e-3: 0.5-0.75x, N = 4: 1.15x, w fixed at 9 with lr
# 3e-4: 1.36x at best, lr 3e-4 cosine: 1.23x; bench/README.md, ## LCM). The test holds what the defaults reach,
# so a regression shows; DEMO_DEVIATIONS stays empty.
DEMO_STEPS = 600
DEMO_DEVIATIONS: dict = {}
MIN_DISTANCE_RATIO = 1.2      # the base model's 4-step distance to the teacher / the student's (issue 18: 2.0)
SCORER_SLACK = 2              # the student reads right for at least the teacher's 30-step count minus 2
SEED_SETS = (range(5000, 5045), range(6000, 6045))   # never the teacher's training seeds (job seed 42 + i)
TEACHER_CACHE = Path(__file__).parent / "data" / "lcm_teacher"
REFERENCE_CACHE = Path(__file__).parent / "data" / "lcm_reference"


def _demo_job(**kw) -> jobs.LcmJob:
    from trainer.models.demo.shapes import all_combinations, caption

    return jobs.LcmJob(name="demo_lcm", prompts=[caption(*c) for c in all_combinations()], resolution=64,
                       steps=DEMO_STEPS, **DEMO_DEVIATIONS, **kw)


def _teacher_references(handle, prompts: list[str], cfg: float) -> dict[str, torch.Tensor]:
    """The teacher's guided DDIM latents (50 steps: the distance's reference; 30 steps: the scorer's) from the
    seed sets' noises, cached in tests/data by model weights, prompts, CFG and seeds (regenerated when stale)."""
    import hashlib
    import json

    from safetensors.torch import save_file
    from trainer.models.handle import weights_fingerprint

    key = json.dumps([weights_fingerprint(handle.identity, [handle.unet]), prompts, cfg,
                      [[s.start, s.stop] for s in SEED_SETS], [50, 30]])
    path = REFERENCE_CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    if path.is_file():
        return {k: v.float() for k, v in load_file(str(path)).items()}
    out = {}
    with torch.no_grad():
        cond, uncond = handle.encode_prompts(prompts, (64, 64)), handle.uncond(len(prompts), (64, 64))
        for i, seeds in enumerate(SEED_SETS):
            noise = guided.seeded_noise(list(seeds), (4, 16, 16), "cpu")
            for steps in (50, 30):
                out[f"ddim{steps}_set{i}"] = guided.ddim_latents(handle, noise, cond, uncond, steps=steps, cfg=cfg)
    REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in out.items()}, str(path))
    print(f"the teacher's reference samples were not cached: stored in {path} (commit the new file)")
    return {k: v.half().float() for k, v in out.items()}


def _pixels(handle, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (handle.decode_latents(latents).clamp(-1, 1) + 1) * 127.5


def _read_right(images: torch.Tensor, combos) -> int:
    from trainer.models.demo import score

    right = 0
    for combo, p in zip(combos, images):
        img = guided.to_pil(p / 127.5 - 1)
        right += (score.dominant_colour(img), score.shape_of(img), score.background_colour(img)) == combo
    return right


def test_default_lcm_job_brings_4_step_samples_closer_to_the_teachers_than_the_base_model(tmp_path):
    """From the same noises (45 demo prompts x 2 seed sets): the student's 4-step LCM samples at CFG 1 against
    the teacher's 50-step guided DDIM samples at CFG w + 1 (w the middle of the trained range), pixel MSE,
    closer than the base model's 4-step LCM samples by MIN_DISTANCE_RATIO (issue 18's 2x is not reached); and the demo scorer reads the student's images
    right (colour, shape, background) as often as the teacher's 30-step images, less 2."""
    from trainer.models.demo.shapes import all_combinations, caption
    from trainer.models.diffusers_model import load_handle

    handle = load_handle("demo", device="cpu")
    job = _demo_job()
    combos = all_combinations()
    prompts = [caption(*c) for c in combos]
    cfg = lcm.LcmSettings.from_job(job, handle.prediction).w_middle + 1
    references = _teacher_references(handle, prompts, cfg)
    noises = [guided.seeded_noise(list(seeds), (4, 16, 16), "cpu") for seeds in SEED_SETS]
    with torch.no_grad():
        cond = handle.encode_prompts(prompts, (64, 64))

    def four_step() -> list[torch.Tensor]:
        return [_pixels(handle, lcm_sampling.lcm_latents(handle, n, cond, steps=4)) for n in noises]

    def distance(images: list[torch.Tensor]) -> float:
        return sum(float(((a - _pixels(handle, references[f"ddim50_set{i}"])) ** 2).mean())
                   for i, a in enumerate(images)) / len(images)

    base = four_step()
    # The teacher's 200 training images come from the cache the mode keeps (keyed by the UNet's weights, the
    # prompts and the settings); the repository carries the entry for the demo model, so no run regenerates them.
    shutil.copytree(TEACHER_CACHE, tmp_path / "cache" / "lcm_teacher")
    logs: list[str] = []
    result = run_job(job, handle, _ctx(tmp_path, logs))
    if any(m.startswith("teacher: generating") for m in logs):
        shutil.copytree(tmp_path / "cache" / "lcm_teacher", TEACHER_CACHE, dirs_exist_ok=True)
        print(f"the teacher set was not cached for this demo model or recipe: generated and stored in {TEACHER_CACHE} "
              "(commit the new file)")
    network = build_network(handle, _demo_job(init_lora=str(result.final)))
    network.enable()   # attached switched off, as every network a job builds
    try:
        student = four_step()
    finally:
        network.detach()
    base_mse, student_mse = distance(base), distance(student)
    teacher_right = sum(_read_right(_pixels(handle, references[f"ddim30_set{i}"]), combos) for i in range(2))
    student_right = sum(_read_right(images, combos) for images in student)
    print(f"4-step pixel MSE to the teacher's 50-step samples (CFG {cfg:g}): base {base_mse:.0f}, student "
          f"{student_mse:.0f} ({base_mse / student_mse:.2f}x); read right: teacher 30 steps {teacher_right}/90, "
          f"student {student_right}/90, base {sum(_read_right(b, combos) for b in base)}/90")
    assert base_mse >= MIN_DISTANCE_RATIO * student_mse
    assert student_right >= teacher_right - SCORER_SLACK


def test_no_lora_reaches_2x_with_the_4_step_lcm_sampler_on_the_demo_model_the_ideal_student_ceiling():
    """The ceiling of the proof test's metric (bench/lcm_ceiling.py, recorded in bench/README.md): a perfect
    consistency model of the teacher -- its answer at (z, t) is the teacher's own guided DDIM solution from z at t
    on the solver grid -- sampled with the real 4-step LCM sampler and its fresh noise. Here on every third
    demo prompt x the first seed set (1.58x; all 45 prompts of that set: 1.80x); 2x would need a student closer to the teacher's
    samples than the teacher's own ODE."""
    import importlib.util

    from trainer.models.demo.shapes import all_combinations, caption
    from trainer.models.diffusers_model import load_handle

    spec = importlib.util.spec_from_file_location("lcm_ceiling", Path(__file__).parents[1] / "bench" / "lcm_ceiling.py")
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    handle = load_handle("demo", device="cpu")
    cfg = lcm.LcmSettings.from_job(_demo_job(), handle.prediction).w_middle + 1
    all_prompts = [caption(*c) for c in all_combinations()]
    references = _teacher_references(handle, all_prompts, cfg)   # cached in tests/data
    picked = list(range(0, 45, 3))
    prompts = [all_prompts[i] for i in picked]
    noise = guided.seeded_noise([SEED_SETS[0][i] for i in picked], (4, 16, 16), "cpu")
    with torch.no_grad():
        cond, uncond = handle.encode_prompts(prompts, (64, 64)), handle.uncond(len(prompts), (64, 64))
    reference = _pixels(handle, references["ddim50_set0"][picked])
    ideal = _pixels(handle, ceiling.ideal_student_latents(handle, noise, cond, uncond, cfg - 1, steps=4))
    base = _pixels(handle, lcm_sampling.lcm_latents(handle, noise, cond, steps=4))
    ideal_mse, base_mse = float(((ideal - reference) ** 2).mean()), float(((base - reference) ** 2).mean())
    print(f"4-step LCM, {len(picked)} prompts: ideal student {ideal_mse:.0f}, base {base_mse:.0f}, "
          f"ceiling {base_mse / ideal_mse:.2f}x")
    assert 1.2 * ideal_mse < base_mse < 2.0 * ideal_mse


def test_the_teachers_prompts_are_encoded_before_the_first_step_not_inside_the_steps(tmp_path, few_teacher_steps):
    """The student's text cache is filled before training: a step never pays for a prompt's first encoding."""
    events: list = []

    class Recording(DiffusersHandle):
        calls: list = []

        def encode_prompts(self, texts, size):
            Recording.calls.append(len(events))
            return super().encode_prompts(texts, size)

    handle = Recording(sd1_pipeline(tmp_path))
    job = _job(batch_size=1, steps=4, comparison_sheet=False, prompts=["red circle", "blue square", "green star"],
               num_generated_images=3)
    run_job(job, handle, dataclasses.replace(_ctx(tmp_path), events=events.append))
    assert len(events) == 4 and Recording.calls and set(Recording.calls) == {0}, Recording.calls
