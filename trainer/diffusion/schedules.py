"""Noise schedules as small pure functions over tensors (DDPM notation: beta_t, alpha_bar_t)."""
from __future__ import annotations

import torch


def betas_scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000) -> torch.Tensor:
    """Stable Diffusion's schedule: linear in sqrt(beta)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2


def betas_linear(beta_start: float, beta_end: float, n: int = 1000) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale sqrt(alpha_bar) so the last step is pure noise."""
    s = alpha_bar.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    return s ** 2


def alphas_cumprod_from_scheduler_config(config: dict) -> torch.Tensor:
    """alpha_bar as float32 [T] from a diffusers scheduler config (the keys every SD scheduler shares)."""
    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "scaled_linear")
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = betas_scaled_linear(start, end, n)
    elif kind == "linear":
        betas = betas_linear(start, end, n)
    else:
        raise ValueError(f"beta schedule {kind!r} is not supported (scaled_linear, linear)")
    abar = alphas_cumprod(betas)
    if config.get("rescale_betas_zero_snr"):
        abar = rescale_zero_terminal_snr(abar)
        abar[-1] = 4.8973451890853435e-08  # as diffusers: keep the last step invertible
    return abar.float()


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
    return alpha_bar / (1.0 - alpha_bar)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps  (alpha_bar_t shaped [B])."""
    a = alpha_bar_t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho)."""
    a = alpha_bar_t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return a.sqrt() * noise - (1 - a).sqrt() * x0
