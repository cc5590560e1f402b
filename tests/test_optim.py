"""Optimizers and schedules by name; our schedules agree with diffusers.optimization."""
from __future__ import annotations

import pytest
import torch

from trainer.train import optim


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("name", optim.LR_SCHEDULES)
def test_schedules_match_diffusers_formulas(name):
    from diffusers.optimization import get_scheduler

    ours_opt = torch.optim.SGD(_params(), lr=3e-4)
    ref_opt = torch.optim.SGD(_params(), lr=3e-4)
    ours = optim.make_scheduler(ours_opt, name, warmup=10, total=100, cycles=3, power=2.0)
    kwargs = {"num_cycles": 3} if name == "cosine_with_restarts" else {"power": 2.0} if name == "polynomial" else {}
    ref = get_scheduler(name, ref_opt, num_warmup_steps=10, num_training_steps=100, **kwargs)
    for _ in range(110):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()


@pytest.mark.parametrize("name", ["AdamW", "Lion", "Prodigy", "Adafactor", "SGD"])
def test_each_cpu_optimizer_reduces_a_quadratic(name):
    p = torch.nn.Parameter(torch.full((4,), 2.0))
    lr = 1.0 if name == "Prodigy" else 0.05
    opt = optim.make_optimizer(name, [{"params": [p]}], lr)
    for _ in range(400):  # Prodigy first has to grow its step-size estimate from d0 = 1e-6
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        opt.step()
    assert float((p ** 2).sum()) < 0.5 * 16.0


def test_adamw8bit_without_cuda_says_what_to_choose():
    with pytest.raises(optim.OptimizerError, match="CUDA.*AdamW"):
        optim.make_optimizer("AdamW8bit", [{"params": _params()}], 1e-4, device="cpu")


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(optim.OptimizerError, match="Lion"):
        optim.make_optimizer("Adam9000", [{"params": _params()}], 1e-4)
    with pytest.raises(optim.OptimizerError, match="cosine_with_restarts") as e:
        optim.schedule_fn("warp", 0, 10)
    assert e.value.field == "lr_scheduler"
