"""The noise-prediction training objective's pieces: noise and timestep draws, min-SNR weights (pure)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.diffusion import schedules


@dataclass(frozen=True)
class NoiseSettings:
    prediction: str = "eps"        # eps | v
    timestep_min: int = 0
    timestep_max: int = 1000
    min_snr_gamma: float = 0.0     # 0 = off
    noise_offset: float = 0.0


def sample_noise(latents: torch.Tensor, settings: NoiseSettings, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps), drawn on the CPU from ``generator`` so runs repeat on any device."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
    t = torch.randint(settings.timestep_min, settings.timestep_max, (b,), generator=generator)
    return noise.to(latents.device, latents.dtype), t.to(latents.device)


def min_snr_weight(alpha_bar_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Hang et al. 2023: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v (as kohya)."""
    snr = schedules.snr(alpha_bar_t)
    return torch.clamp(snr, max=gamma) / (snr + 1 if prediction == "v" else snr)
