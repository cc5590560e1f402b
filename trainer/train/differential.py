"""The differential loss of ADDifT (traintrain's ``train_diff2``), shared by the ``addift`` mode and the
copier's opposite steps: with the same noise and timestep, a LoRA at a strength on one noised image must
predict what the model without it predicts on the other noised image (see trainer/train/modes/addift.py)."""
from __future__ import annotations

import torch

from trainer.diffusion import schedules
from trainer.diffusion.losses import NoiseSettings, min_snr_weight
from trainer.lora.network import LoraNetwork, at_strength, switched
from trainer.models.handle import Cond, ModelHandle

#: Timesteps of successive rows are drawn from successive tenths of [timestep_min, timestep_max): with only
#: tens of steps every noise level is seen about equally often (traintrain cycles through ten as well).
TIMESTEP_STRATA = 10


def stratified_timesteps(n: int, low: int, high: int, first: int, generator: torch.Generator,
                         strata: int = TIMESTEP_STRATA) -> torch.Tensor:
    """[n] timesteps in [low, high): row i uniform in stratum (first + i) mod ``strata`` of the range."""
    k = (first + torch.arange(n)) % strata
    width = (high - low) / strata
    u = torch.rand(n, generator=generator)
    t = low + (k + u) * width
    return t.long().clamp(low, high - 1)


def step_roles(step: int, n_pairs: int) -> tuple[int, bool]:
    """(pair index, forward): pairs take turns, and after each round of them the direction swaps."""
    return step % n_pairs, (step // n_pairs) % 2 == 0


def addift_loss(handle: ModelHandle, network: LoraNetwork, source: torch.Tensor, other: torch.Tensor, cond: Cond,
                noise: torch.Tensor, t: torch.Tensor, strength: float, settings: NoiseSettings,
                mask: torch.Tensor | None = None, keep_outside: bool = True,
                target_cond: Cond | None = None) -> torch.Tensor:
    """The ADDifT loss of one batch: the LoRA at ``strength`` on ``other`` noised must predict what the base
    model predicts on ``source`` noised with the same ``noise`` to the same ``t`` (latents [B,C,h,w]).

    ``mask`` [B,1,h,w]: the region that changes. Outside it the target is the base model's output on the same
    input (``keep_outside``) or there is no target (the loss is weighted by the mask). ``target_cond``: the
    conditioning of the targets when it differs from ``cond`` (a text encoder the network trains: the targets
    see it without the network)."""
    alpha_bar = handle.alphas_cumprod.to(source.device)[t]
    # 1. both images noised with the same noise to the same timestep
    noisy_source = schedules.add_noise(source, noise, alpha_bar)
    noisy_other = schedules.add_noise(other, noise, alpha_bar)
    keep = mask is not None and keep_outside
    base_cond = cond if target_cond is None else target_cond
    # 2. the base model's outputs, without gradient: on the source, and on the other image when it is kept
    with torch.no_grad(), switched(network, False):
        inputs = torch.cat([noisy_source, noisy_other]) if keep else noisy_source
        base = handle.predict(inputs.to(handle.dtype), torch.cat([t, t]) if keep else t,
                              base_cond.repeat(2) if keep else base_cond).float()
    target = base[: len(source)]
    if keep:
        m = mask.to(target.dtype).expand_as(target)
        target = m * target + (1 - m) * base[len(source):]
    # 3. the LoRA at the training strength on the other image
    with at_strength(network, strength):
        pred = handle.predict(noisy_other.to(handle.dtype), t, cond.to(dtype=handle.dtype)).float()
    err = (pred - target) ** 2
    if mask is not None and not keep:
        m = mask.to(err.dtype).expand_as(err)
        per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1.0)
    else:
        per_sample = err.flatten(1).mean(1)
    if settings.min_snr_gamma:
        per_sample = per_sample * min_snr_weight(alpha_bar.float(), settings.min_snr_gamma, settings.prediction)
    return per_sample.mean()
