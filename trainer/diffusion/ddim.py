"""The DDIM step and its timesteps: pure functions over tensors."""
from __future__ import annotations

import torch


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """'Trailing' spacing (Lin et al. 2023): starts at the last training step, so flat colours come out right."""
    return [round(train_steps - 1 - i * train_steps / steps) for i in range(steps)]


def predict_x0_eps(model_out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                   prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from the model output of an eps- or v-prediction model."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "v":
        return a * x_t - s * model_out, s * x_t + a * model_out
    return (x_t - s * model_out) / a, model_out


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps
