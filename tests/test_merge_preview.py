"""The merge preview on the demo model: "applied together" is what the inputs give when attached together at
their ratios, the lossless rank renders the same picture, a rank too small does not, and the suggested rank
is the smallest tried one under the threshold (mean pixel difference < 2/255)."""
from __future__ import annotations

import time

import torch

from trainer.lora.network import LoraNetwork, NetworkShape, network_for_file
from trainer.merge.svd_merge import MergeInput
from trainer.models.diffusers_model import load_handle
from trainer.models.handle import TargetOptions
from trainer.sampling.guided import sample
from trainer.sampling.merge_preview import candidate_ranks, mean_pixel_difference, preview_merge

torch.set_num_threads(1)
PROMPT = "a red circle on a white background"
SEEDS = (1, 2)
KW = dict(steps=12, cfg=5.0, size=(64, 64))


def _random_lora(handle, path, seed: int, std: float):
    network = LoraNetwork(handle.lora_targets(TargetOptions("attn_mlp")), NetworkShape(4, 4.0), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.lora.values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * std)
    network.save(path, {}, torch.float32)
    return path


def test_candidate_ranks_are_powers_of_two_then_the_lossless_rank_and_the_asked_one():
    assert candidate_ranks(8) == [1, 2, 4, 8]
    assert candidate_ranks(12, asked=6) == [1, 2, 4, 6, 8, 12]
    assert candidate_ranks(12, asked=100) == [1, 2, 4, 8, 12]


def test_preview_on_the_demo_model_suggests_the_smallest_rank_under_2_of_255(tmp_path):
    started = time.perf_counter()
    handle = load_handle("demo")
    a = _random_lora(handle, tmp_path / "a.safetensors", 1, 0.4)
    b = _random_lora(handle, tmp_path / "b.safetensors", 2, 0.04)
    inputs = [MergeInput(str(a), 0.8), MergeInput(str(b), -0.6)]
    preview = preview_merge(handle, inputs, PROMPT, SEEDS, rank=2, stop_at_suggestion=False, **KW)

    # "applied together" is the two files attached at once at their ratios (hooks, not a merge)
    nets = []
    for path, ratio in ((a, 0.8), (b, -0.6)):
        net = network_for_file(handle, path)
        net.multiplier = ratio
        nets.append(net.attach())
    attached = sample(handle, [PROMPT] * len(SEEDS), list(SEEDS), **KW)
    for net in nets:
        net.detach()
    base = sample(handle, [PROMPT] * len(SEEDS), list(SEEDS), **KW)
    assert mean_pixel_difference(preview.together, attached) < 0.5
    assert mean_pixel_difference(base, attached) > 5, "the LoRAs must change the picture for the test to mean much"

    by_rank = {r.rank: r for r in preview.renders}
    assert sorted(by_rank) == [1, 2, 4, 8]
    assert by_rank[8].difference < 0.5, "the lossless rank (4 + 4) is the same picture up to fp16"
    assert by_rank[1].difference > preview.threshold, "rank 1 of two rank-4 LoRAs is visibly different"
    # the suggestion: the smallest tried rank under the threshold, every smaller one above it
    assert preview.suggested is not None and by_rank[preview.suggested].difference < 2.0
    assert preview.suggested == 4, "b is weak: rank 4 keeps a, which is most of the picture (measured 0.9/255)"
    assert all(r.difference >= 2.0 for r in preview.renders if r.rank < preview.suggested)
    # per-module error falls with the rank; the summary states the threshold and shows the asked rank's modules
    errors = [by_rank[r].result.totals["relative_error"] for r in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3
    text = preview.summary()
    assert f"suggested rank: {preview.suggested}" in text and "less than 2/255" in text
    assert "per module at rank 2:" in text
    assert preview.grid.size[0] == 70 + 128 * 5
    assert time.perf_counter() - started < 40


def test_the_tabs_preview_button_reads_names_from_the_lora_folder_and_reports(tmp_path):
    from trainer.ui.loras import preview_in_folder

    handle = load_handle("demo")
    _random_lora(handle, tmp_path / "a.safetensors", 1, 0.4)
    _random_lora(handle, tmp_path / "b.safetensors", 2, 0.04)
    grid, text = preview_in_folder(handle, "a:0.8\nb:-0.6", 2, PROMPT, "1", 8, 2.0, tmp_path, 64)
    assert text.startswith("preview of 2 LoRAs on the loaded model") and "(nothing saved)" in text.splitlines()[0]
    assert "per module at rank 2:" in text and ("suggested rank:" in text or "no tried rank" in text)
    assert grid.size[1] == 24 + 16 + 128 and not list(tmp_path.glob("*rank*"))
