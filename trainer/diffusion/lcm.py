"""LCM math: the solver grid, boundary scalings, consistency function, guidance, losses and the
multistep LCM samplers, as pure functions over tensors (Luo et al. 2023; diffusers' LCMScheduler).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from trainer.diffusion.ddim import ddim_step


SIGMA_DATA = 0.5          # sigma_d of the boundary scalings


TIMESTEP_SCALING = 10.0   # s: the scalings see s * t (LCM-LoRA / diffusers' LCMScheduler)


TRAIN_STEPS = 1000


def skip_k(num_ddim_timesteps: int, train_steps: int = TRAIN_STEPS) -> int:
    """k: training timesteps per solver step (20 for N = 50)."""
    if not 1 <= num_ddim_timesteps <= train_steps:
        raise ValueError(f"solver steps must be between 1 and {train_steps}, got {num_ddim_timesteps}")
    return train_steps // num_ddim_timesteps


def solver_grid(num_ddim_timesteps: int, train_steps: int = TRAIN_STEPS) -> torch.Tensor:
    """tau_i = (i + 1) k - 1 for i < N: 19, 39, ..., 999 for N = 50 (diffusers' DDIMSolver)."""
    k = skip_k(num_ddim_timesteps, train_steps)
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def solver_times(grid: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n): the grid point and the one a solver step below it, clamped at 0."""
    t_start = grid.to(index.device)[index]
    return t_start, (t_start - k).clamp(min=0)


def boundary_scalings(t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) = (sigma_d^2 / ((s t)^2 + sigma_d^2), s t / sqrt((s t)^2 + sigma_d^2)); (1, 0) at t = 0."""
    st = timestep_scaling * t.double()
    denominator = st ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denominator, st / denominator.sqrt()


def consistency_function(z_t: torch.Tensor, x0: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor
                         ) -> torch.Tensor:
    """f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t): the identity at t = 0 whatever the model says."""
    return _per_sample(c_skip, z_t) * z_t + _per_sample(c_out, x0) * x0


def guided(cond_value: torch.Tensor, uncond_value: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """The LCM paper's guidance cond + w (cond - uncond), i.e. WebUI CFG scale w + 1; applied to x0 and eps alike."""
    w = _per_sample(torch.as_tensor(w, dtype=cond_value.dtype, device=cond_value.device), cond_value)
    return cond_value + w * (cond_value - uncond_value)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """mean(sqrt((pred - target)^2 + c^2) - c): quadratic below c, linear above (LCM-LoRA's loss)."""
    return (((pred.float() - target.float()) ** 2 + c * c).sqrt() - c).mean()


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    if loss_type == "huber":
        return pseudo_huber(pred, target, huber_c)
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    raise ValueError(f"loss type must be huber or l2, got {loss_type!r}")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """The math runs in fp32 (fp64 stays fp64), whatever precision the model computes in."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] (or a scalar) -> broadcastable against ``like`` [B, C, H, W], in its dtype and device."""
    values = values.to(like.device, like.dtype)
    return values.view(-1, *([1] * (like.dim() - 1))) if values.dim() else values


Denoise = Callable[[torch.Tensor, int], torch.Tensor]


FreshNoise = Callable[[int], torch.Tensor]


def lcm_timesteps(steps: int, original_steps: int = 50, train_steps: int = 1000) -> list[int]:
    """diffusers' LCMScheduler: ``steps`` evenly spaced indices into the (reversed) 50-point solver grid.

    4 steps: 999, 759, 499, 259.
    """
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM steps must be between 1 and {original_steps}, got {steps}")
    k = train_steps // original_steps
    grid = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    return [grid[int(i * original_steps / steps)] for i in range(steps)]


def removed_noise(z_t: torch.Tensor, denoised: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The noise the model took out: (z_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return (z_t - alpha_bar.sqrt() * denoised) / (1 - alpha_bar).sqrt()


def renoise_with(removed: torch.Tensor, fresh: torch.Tensor, ancestral: float) -> torch.Tensor:
    """sqrt(ancestral) fresh + sqrt(1 - ancestral) removed: unit variance for any mix (ComfyUI's LCM alternative)."""
    return ancestral ** 0.5 * fresh + (1 - ancestral) ** 0.5 * removed


def lcm_loop(denoise: Denoise, z: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
             fresh_noise: FreshNoise) -> torch.Tensor:
    """LCM multistep sampling: denoise, then re-noise to the next timestep with fresh noise; the last
    denoised sample is the result. One step = f(z_T, T)."""
    for i, t in enumerate(timesteps):
        denoised = denoise(z, t)
        if i + 1 == len(timesteps):
            return denoised
        z = ddim_step(denoised, fresh_noise(i), alphas_cumprod[timesteps[i + 1]])
    return z


def lcm_alternative_loop(denoise: Denoise, z: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                         fresh_noise: FreshNoise, euler_steps: int = 1, ancestral: float = 0.0) -> torch.Tensor:
    """The LCM sampler whose first ``euler_steps`` steps re-noise with the noise the model removed (a DDIM-like,
    deterministic step), mixed with fresh noise by ``ancestral`` (0 = only removed, 1 = plain LCM)."""
    if not 0.0 <= ancestral <= 1.0:
        raise ValueError(f"ancestral must be between 0 and 1, got {ancestral}")
    for i, t in enumerate(timesteps):
        denoised = denoise(z, t)
        if i + 1 == len(timesteps):
            return denoised
        if i < euler_steps:
            removed = removed_noise(z, denoised, alphas_cumprod[t])
            noise = renoise_with(removed, fresh_noise(i), ancestral) if ancestral > 0 else removed
        else:
            noise = fresh_noise(i)
        z = ddim_step(denoised, noise, alphas_cumprod[timesteps[i + 1]])
    return z
