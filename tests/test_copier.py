"""Copier two-pass difference LoRA: both passes as one job, the frozen copier, reuse, masks, early errors,
and on the demo model the red circle -> blue circle difference."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tiny import sd1_pipeline, sdxl_pipeline
from trainer import jobs
from trainer.lora import files as lora_files
from trainer.models import demo
from trainer.models.demo import score
from trainer.models.demo.shapes import COLOURS, caption, draw
from trainer.models.diffusers_model import DiffusersHandle, load_handle
from trainer.models.handle import TargetOptions
from trainer.train.modes import copier
from trainer.train.loop import Progress
from trainer.train.context import JobContext
from trainer.lora.network import network_for_file, LoraNetwork, NetworkShape
from trainer.train.runner import run_job
from trainer.sampling.guided import sample


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _pair(folder: Path, a=("red", "circle", "white"), b=("blue", "circle", "white"), size=32) -> tuple[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    draw(*a, size=size).save(folder / "a.png")
    draw(*b, size=size).save(folder / "b.png")
    return str(folder / "a.png"), str(folder / "b.png")


def _job(tmp_path: Path, **kw) -> jobs.CopierJob:
    a, b = _pair(tmp_path / "pair")
    tiny_pass = dict(steps=2, batch_size=2, lr=1e-3, network_dim=2, network_alpha=2.0)
    base = dict(name="diff", image_a=[a], image_b=[b], prompt="a red circle", resolution=64, mixed_precision="no",
                copier_pass=tiny_pass, difference_pass=dict(network_dim=2, network_alpha=1.0))
    base.update(kw)
    return jobs.CopierJob(**base)


def _ctx(tmp_path: Path, **kw) -> JobContext:
    return JobContext(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """One tiny SD1 model for the module (building it is the slow part); every job detaches its networks."""
    return DiffusersHandle(sd1_pipeline(tmp_path_factory.mktemp("model")))


# -- pure pieces ---------------------------------------------------------------------------------

def test_images_train_at_their_own_size_rounded_down_to_the_model_multiple():
    assert copier.training_size(64, 64, 512, 32) == (64, 64)
    assert copier.training_size(100, 70, 512, 32) == (96, 64)
    # larger than resolution^2: scaled to an area of about 512^2, aspect 3:2 kept, then rounded to 64
    assert copier.training_size(3000, 2000, 512, 64) == (576, 384)
    assert copier.training_size(20, 20, 512, 64) == (64, 64), "at least one multiple"


def test_job_progress_counts_pass_2_after_pass_1_with_the_eta_of_the_whole_job():
    p = Progress(step=3, total=10, loss=0.5, smoothed_loss=0.5, lr=1e-4, it_per_s=2.0, eta_s=3.5, phase="pass 1 of 2")
    first = copier.job_progress(p, offset=0, total=30, steps_after=20)
    assert (first.step, first.total, first.eta_s) == (3, 30, 3.5 + 20 / 2.0)
    second = copier.job_progress(p, offset=10, total=30, steps_after=0)
    assert (second.step, second.total, second.eta_s, second.phase) == (13, 30, 3.5, "pass 1 of 2")


def test_converged_means_at_most_nine_tenths_of_the_base_models_reconstruction_error():
    r = copier.Reconstruction(100, (200, 500, 800), base_mse=(0.1, 0.5, 1.4), copier_mse=(0.05, 0.4, 1.3))
    assert r.ratio == pytest.approx(1.75 / 2.0) and r.converged
    assert not copier.Reconstruction(1, (200,), (1.0,), (0.91,)).converged
    assert copier.Reconstruction.from_json(r.to_json()) == r
    assert json.loads(r.to_json())["converged"] is True
    assert "90%" in copier.not_converged_warning(copier.Reconstruction(1, (200,), (1.0,), (0.95,)))


def test_alpha_becomes_a_latent_mask_and_pass_2_uses_the_overlap_of_both_alphas(tmp_path):
    rgba_a = draw("red", "circle", "white").convert("RGBA")
    rgba_b = draw("blue", "circle", "white").convert("RGBA")
    alpha_a = Image.new("L", (64, 64), 255)
    alpha_a.paste(0, (0, 0, 64, 16))            # A: top quarter transparent
    alpha_b = Image.new("L", (64, 64), 0)
    alpha_b.paste(255, (0, 0, 32, 64))          # B: only the left half opaque
    rgba_a.putalpha(alpha_a)
    rgba_b.putalpha(alpha_b)
    rgba_a.save(tmp_path / "a.png")
    rgba_b.save(tmp_path / "b.png")
    pf = copier.PairFiles(copier._image_item(str(tmp_path / "a.png"), "image_a"),
                          copier._image_item(str(tmp_path / "b.png"), "image_b"), (64, 64))
    mask_a, mask_ab = copier.pair_masks(pf, (16, 16))
    assert mask_a.shape == (1, 16, 16)
    assert float(mask_a[0, :4].max()) == 0.0 and float(mask_a[0, 4:].min()) == 1.0
    # pass 2: opaque in both = left half below the top quarter; 3/8 of the picture
    assert float(mask_ab.sum()) == pytest.approx(16 * 16 * 3 / 8)
    assert float(mask_ab[0, 4:, :8].min()) == 1.0 and float(mask_ab[0, :, 8:].max()) == 0.0
    swapped = copier.PairFiles(pf.b, pf.a, (64, 64))
    assert torch.equal(copier.pair_masks(swapped, (16, 16))[1], mask_ab), "swapping A and B keeps the region"


# -- the job on a tiny SD1 model ----------------------------------------------------------------

def test_both_passes_report_as_one_job_and_the_file_holds_only_the_difference(tmp_path, sd1):
    events = []
    job = _job(tmp_path, difference_pass=dict(same_as_pass1=False, steps=3, batch_size=1, lr=1e-3,
                                              network_dim=3, network_alpha=3.0))
    result = run_job(job, sd1, _ctx(tmp_path, events=events.append))

    steps = [(e.phase, e.step, e.total) for e in events if not e.message]
    assert steps == [("pass 1 of 2", 1, 5), ("pass 1 of 2", 2, 5),
                     ("pass 2 of 2", 3, 5), ("pass 2 of 2", 4, 5), ("pass 2 of 2", 5, 5)]
    measured = [e for e in events if e.message.startswith("copier reconstruction")]
    assert [e.step for e in measured] == [0, 1, 2], "before pass 1, every quarter of it (here each step), at its end"
    assert all(e.phase == "pass 1 of 2" for e in measured)

    tensors = load_file(str(result.final))
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")}
    assert ranks == {3}, "network B (rank 3) only, not the copier (rank 2)"
    meta = lora_files.read_metadata(result.final)
    assert meta["ss_network_dim"] == "3" and meta["lq_mode"] == "copier_difference"
    reconstruction = json.loads(meta["lq_copier_reconstruction"])
    assert reconstruction["step"] == 2 and reconstruction["timesteps"] == [200, 500, 800]
    assert not (tmp_path / "out" / "diff_copier.safetensors").exists(), "the copier is kept only on request"
    assert not list((tmp_path / "work").rglob("*.state.safetensors"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["diff.safetensors"]


def _networks_hooked_on(module) -> list[LoraNetwork]:
    """The LoRA networks whose forward hooks sit on ``module`` (read from the hooks' closures)."""
    found = []
    for hook in module._forward_hooks.values():
        found += [c.cell_contents for c in hook.__closure__ or () if isinstance(c.cell_contents, LoraNetwork)]
    return found


def test_pass_2_applies_the_copier_frozen_at_strength_1_in_every_step(tmp_path, sd1):
    target = dict(sd1.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    during_steps, between_steps = [], []

    def during(unet, args):           # inside each forward: every network on the model, as it acts
        during_steps.append([(n.enabled, n.multiplier, any(p.requires_grad for p in n.parameters()))
                             for n in _networks_hooked_on(target)])

    def between(p):
        if not p.message:
            between_steps.append((p.phase, [n.enabled for n in _networks_hooked_on(target)]))

    hook = sd1.unet.register_forward_pre_hook(during)
    try:
        run_job(_job(tmp_path), sd1, _ctx(tmp_path, events=between))
        pass_2 = [nets for nets in during_steps if len(nets) == 2]
        during_steps.clear()
        run_job(_job(tmp_path, name="one_way", train_opposite=False), sd1, _ctx(tmp_path, events=between))
        one_way = [nets for nets in during_steps if len(nets) == 2]
    finally:
        hook.remove()
    # (enabled, strength, trainable) of the copier, then of the difference, in each forward of pass 2
    copier = (True, 1.0, False)
    assert one_way == [[copier, (True, 1.0, True)]] * 2, "without train -1 too: the difference at 1 in both steps"
    # step 1 as above; step 2 the opposite: the copier alone on the noised B (the target), then the
    # difference at -1 on A noised alike
    assert pass_2 == [[copier, (True, 1.0, True)], [copier, (False, 1.0, True)], [copier, (True, -1.0, True)]]
    # between steps a generation sees the base model: both networks attached but off
    assert between_steps[-2:] == [("pass 2 of 2", [False, False])] * 2
    assert _networks_hooked_on(target) == [], "both networks are detached when the job ends"


def test_with_the_text_encoder_trained_the_opposite_step_encodes_the_prompt_at_minus_1_and_the_targets_without(
        tmp_path, sd1):
    _, text_encoder = sd1.text_encoders()[0]
    target = next(m for n, m in text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    seen = []

    def during(module, args):         # each text-encoder forward in pass 2: the difference network as it acts
        nets = _networks_hooked_on(target)
        if len(nets) == 2:
            seen.append([(n.enabled, n.multiplier) for n in nets if any(p.requires_grad for p in n.parameters())][0])

    hook = target.register_forward_pre_hook(during)
    try:
        result = run_job(_job(tmp_path, train_text_encoder=True), sd1, _ctx(tmp_path))
    finally:
        hook.remove()
    # step 1 at +1; step 2 (the opposite): the prediction's prompt at -1, the targets' without the difference
    assert seen[-3:] == [(True, 1.0), (True, -1.0), (False, 1.0)], seen
    trained = load_file(str(result.final))
    assert any(k.startswith("lora_te") and "lora_up" in k and trained[k].abs().max() > 0 for k in trained), \
        "the text-encoder part of the difference trained"


def test_a_saved_copier_replaces_pass_1_and_gives_the_same_difference(tmp_path, sd1):
    first = run_job(_job(tmp_path, save_copier=True, save_precision="fp32"), sd1, _ctx(tmp_path))
    saved = tmp_path / "out" / "diff_copier.safetensors"
    assert saved.is_file()
    assert lora_files.read_metadata(saved)["lq_mode"] == "copier"

    events = []
    # with images A (train -1 too needs them), pass 2 is the same as the first job's
    reuse = _job(tmp_path, name="again", copier_file=str(saved), save_precision="fp32")
    second = run_job(reuse, sd1, _ctx(tmp_path, events=events.append))
    assert [(e.phase, e.step, e.total) for e in events if not e.message] == [("pass 2 of 2", 1, 2),
                                                                           ("pass 2 of 2", 2, 2)]
    assert any("pass 1 skipped" in e.message for e in events)
    a, b = load_file(str(first.final)), load_file(str(second.final))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"the difference trained over the reused copier differs by {worst}"
    # without images A: a one-way difference (told when queued), the reconstruction from the copier's metadata
    one_way = _job(tmp_path, name="one_way", image_a=[], copier_file=str(saved), save_precision="fp32")
    assert "cannot train -1" in one_way.warnings.get("train_opposite", "")
    third = run_job(one_way, sd1, _ctx(tmp_path))
    meta = json.loads(lora_files.read_metadata(third.final)["lq_copier_reconstruction"])
    assert meta == json.loads(lora_files.read_metadata(first.final)["lq_copier_reconstruction"]), \
        "a copier file without image A carries its reconstruction over from its metadata"


def test_a_job_cancelled_in_pass_2_resumes_there_with_its_copier_and_ends_as_if_uninterrupted(tmp_path, sd1):
    from trainer.train.loop import Stopped
    full = run_job(_job(tmp_path, name="full", save_precision="fp32"), sd1, _ctx(tmp_path))
    ctx = _ctx(tmp_path)

    def cancel_in_pass_2(p):
        if p.phase == "pass 2 of 2" and not p.message:
            ctx.control.cancel = True

    ctx.events = cancel_in_pass_2
    cut = _job(tmp_path, name="cut", save_precision="fp32", save_every_n_steps=1)
    with pytest.raises(Stopped):
        run_job(cut, sd1, ctx)
    assert (tmp_path / "work" / "cut" / "cut_copier.safetensors").is_file(), "the copier waits for the resumed pass 2"
    assert not (tmp_path / "out" / "cut_copier.safetensors").exists(), "in the job's folder: save_copier is off"
    events = []
    resumed = run_job(cut, sd1, _ctx(tmp_path, resume=True, events=events.append))
    assert [(e.phase, e.step) for e in events if not e.message] == [("pass 2 of 2", 4)], \
        "pass 1 is not repeated; the job counts it as done"
    a, b = load_file(str(full.final)), load_file(str(resumed.final))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"the resumed difference differs by {worst}"
    assert not (tmp_path / "work" / "cut" / "cut_copier.safetensors").exists(), "not kept: save_copier is off"


def test_swap_ab_makes_the_copier_learn_b(tmp_path, sd1):
    job = _job(tmp_path, swap_ab=True, save_copier=True)
    run_job(job, sd1, _ctx(tmp_path))
    b_hash = copier._image_item(job.image_b[0], "image_b").sha256
    saved = lora_files.read_metadata(tmp_path / "out" / "diff_copier.safetensors")
    assert json.loads(saved["lq_copier_images"]) == [b_hash]


def test_several_pairs_train_one_shared_copier_and_one_difference(tmp_path, sd1):
    a1, b1 = _pair(tmp_path / "front")
    a2, b2 = _pair(tmp_path / "side", a=("red", "square", "white"), b=("blue", "square", "white"), size=48)
    events = []
    job = _job(tmp_path, image_a=[a1, a2], image_b=[b1, b2], save_copier=True)
    result = run_job(job, sd1, _ctx(tmp_path, events=events.append))
    assert result.steps_done == 2
    hashes = json.loads(lora_files.read_metadata(result.final)["lq_copier_images"])
    assert len(hashes) == 2 and len(set(hashes)) == 2
    assert len(list((tmp_path / "out").glob("*_copier.safetensors"))) == 1


# -- clear errors before anything trains ---------------------------------------------------------

def _fails_before_training(tmp_path, handle, job, field: str, *words: str) -> None:
    with pytest.raises(jobs.JobError) as caught:
        run_job(job, handle, _ctx(tmp_path))
    assert caught.value.field == field, caught.value.message
    for word in words:
        assert word in caught.value.message
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir()), "nothing was trained or written"


def test_images_of_different_sizes_in_a_pair_are_refused(tmp_path, sd1):
    job = _job(tmp_path)
    draw("blue", "circle", "white", size=48).save(job.image_b[0])
    _fails_before_training(tmp_path, sd1, job, "image_b", "48x48", "32x32", "same size")


def test_a_missing_image_is_refused(tmp_path, sd1):
    job = _job(tmp_path)
    Path(job.image_a[0]).unlink()
    _fails_before_training(tmp_path, sd1, job, "image_a", "a.png", "does not exist")


def test_a_fully_transparent_mask_is_refused(tmp_path, sd1):
    job = _job(tmp_path, use_mask=True)
    clear = draw("blue", "circle", "white", size=32).convert("RGBA")
    clear.putalpha(0)
    clear.save(job.image_b[0])
    _fails_before_training(tmp_path, sd1, job, "image_b", "fully transparent")


def test_a_copier_of_another_architecture_is_refused(tmp_path, sd1):
    xl = DiffusersHandle(sdxl_pipeline(tmp_path / "xl"))
    LoraNetwork(xl.lora_targets(TargetOptions()), NetworkShape(2, 2.0)).save(tmp_path / "xl_copier.safetensors")
    job = _job(tmp_path, image_a=[], copier_file=str(tmp_path / "xl_copier.safetensors"))
    _fails_before_training(tmp_path, sd1, job, "copier_file", "SDXL", "SD1")


# -- the demo model: red circle -> blue circle -----------------------------------------------------

RED, BLUE = COLOURS["red"], COLOURS["blue"]
A_PROMPT = caption("red", "circle", "white")
SEEDS = (11, 12)
SAMPLING = dict(steps=20, cfg=5.0, size=(64, 64))
#: The copier alone at strength 1: reconstruction error on A at most this fraction of the base model's
#: (measured 0.895-0.905 after 100 steps over training seeds 1-3; the prompt already describes A exactly,
#: so most of the base model's error is what nothing can know at t=800).
COPIER_BOUND = 0.95
#: Strength 1 must bring the circle at least this much closer to blue (colour distance, 0..1 scale);
#: measured 0.52-0.55 (0.44-0.46 before train -1 too; training seed 1, sampling seeds 11-12, 120 difference steps; 60 steps gave only
#: 0.09 for seed 12 on the current demo model, whose red is surer than the old one's).
TOWARD_BLUE = 0.25
#: Strength -1 goes the other way (train -1 too, on by default): away from blue by at least this, to yellow
#: (the demo model's red has no redder red). Measured +0.056 / +0.073 (0.604 -> 0.660 / 0.609 -> 0.682);
#: without train -1 too the copier's difference at -1 moved by -0.006 to +0.0 (it learns A -> B only).
AWAY_FROM_BLUE = 0.03


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if not demo.weights_available():
        pytest.fail("demo model weights are not built (python -m trainer.models.demo.train_demo)")
    tmp = tmp_path_factory.mktemp("demo")
    handle = load_handle("demo", device="cpu")
    draw("red", "circle", "white").save(tmp / "a.png")     # the same layout: centred, 44% of the side
    draw("blue", "circle", "white").save(tmp / "b.png")
    messages = []
    training = dict(batch_size=2, lr=1e-3, lr_scheduler="constant", seed=1)
    job = jobs.CopierJob(name="to_blue", image_a=[str(tmp / "a.png")], image_b=[str(tmp / "b.png")],
                         prompt=A_PROMPT, resolution=64, mixed_precision="no", save_copier=True,
                         copier_pass=dict(network_dim=16, network_alpha=16.0, steps=100, **training),
                         difference_pass=dict(network_dim=8, network_alpha=8.0, same_as_pass1=False, steps=120,
                                              **training))
    result = run_job(job, handle, JobContext(tmp / "out", tmp / "cache", log=messages.append))
    return handle, result, tmp / "out" / "to_blue_copier.safetensors", messages


def _network_from(handle, path) -> LoraNetwork:
    return network_for_file(handle, path)


def _images_at(handle, network, strengths):
    network.attach()
    try:
        out = {}
        for strength in strengths:
            network.multiplier = strength
            out[strength] = sample(handle, [A_PROMPT] * len(SEEDS), SEEDS, **SAMPLING)
        return out
    finally:
        network.detach()


def test_the_copier_alone_reproduces_a_after_pass_1(demo_run):
    handle, result, copier_file, messages = demo_run
    saved = lora_files.read_metadata(copier_file)
    reconstruction = copier.Reconstruction.from_json(saved["lq_copier_reconstruction"])
    assert reconstruction.step == 100
    assert reconstruction.ratio <= COPIER_BOUND, reconstruction.message()
    assert reconstruction.copier_mse[-1] < reconstruction.base_mse[-1], "better than the base model at t=800"
    assert sum(m.startswith("copier reconstruction") for m in messages) == 1 + copier.RECONSTRUCTION_CHECKS
    images = _images_at(handle, _network_from(handle, copier_file), [1.0])[1.0]
    for img in images:
        assert (score.dominant_colour(img), score.shape_of(img), score.background_colour(img)) == \
            ("red", "circle", "white")
        assert score.colour_distance(img, RED) <= 0.15


def test_the_difference_moves_the_colour_toward_blue_and_keeps_shape_and_background(demo_run):
    handle, result, _, _ = demo_run
    base = sample(handle, [A_PROMPT] * len(SEEDS), SEEDS, **SAMPLING)
    images = _images_at(handle, _network_from(handle, result.final), [-1.0, 0.0, 1.0])
    report = []
    for i, seed in enumerate(SEEDS):
        to_blue = {s: score.colour_distance(images[s][i], BLUE) for s in images}
        base_to_blue = score.colour_distance(base[i], BLUE)
        report.append(f"seed {seed}: base {base_to_blue:.3f}, "
                      + ", ".join(f"{s:+g}: {d:.3f}" for s, d in to_blue.items()))
        # strength 0 is the base model, bit for bit
        assert list(images[0.0][i].getdata()) == list(base[i].getdata())
        # strength 1: much nearer blue, farther from red; the circle on white stays
        assert to_blue[1.0] <= base_to_blue - TOWARD_BLUE, report
        assert score.colour_distance(images[1.0][i], RED) > score.colour_distance(base[i], RED) + TOWARD_BLUE, report
        assert (score.shape_of(images[1.0][i]), score.background_colour(images[1.0][i])) == ("circle", "white"), report
        # strength -1: the other way, away from blue (a pure red circle turns yellow)
        assert to_blue[-1.0] >= base_to_blue + AWAY_FROM_BLUE, report
        assert score.dominant_colour(images[-1.0][i]) != "blue", report
        assert (score.shape_of(images[-1.0][i]), score.background_colour(images[-1.0][i])) == ("circle", "white"), report
    print("distance to blue by strength:", "; ".join(report))


def test_a_copier_job_renders_previews_of_the_difference_on_the_base_model(tmp_path, sd1):
    """Preview prompts were accepted and silently ignored in copier jobs."""
    job = _job(tmp_path, sample_prompts=["a red circle"], sample_every_n_steps=1,
               difference_pass=dict(same_as_pass1=False, steps=2, batch_size=1, lr=1e-3, network_dim=2, network_alpha=2.0))
    run_job(job, sd1, _ctx(tmp_path))
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["diff.preview.png"]
    assert [p.name for p in sorted((tmp_path / "work" / "diff").glob("*.png"))] == ["diff-000001.preview.png"]


def test_the_difference_moves_toward_blue_monotonically_as_the_strength_goes_from_minus_1_to_1(demo_run):
    """From -1 to 1 the colour moves one way only: away from blue, the base model, toward blue."""
    handle, result, _, _ = demo_run
    strengths = [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0]
    images = _images_at(handle, _network_from(handle, result.final), strengths)
    for i, seed in enumerate(SEEDS):
        to_blue = [score.colour_distance(images[s][i], BLUE) for s in strengths]
        assert all(b <= a + 0.005 for a, b in zip(to_blue, to_blue[1:])), \
            f"seed {seed}: distance to blue by strength {dict(zip(strengths, to_blue))} is not monotone"
        assert to_blue[-1] <= to_blue[2] - TOWARD_BLUE
