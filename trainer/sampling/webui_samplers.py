"""The samplers this extension adds to the WebUI's list, in k-diffusion's sigma form (x = x0 + sigma eps)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from trainer.diffusion.lcm import renoise_with


def make_lcm_alternative_k(euler_steps: int = 1, ancestral: float = 0.0,
                           randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like
                           ) -> Callable[..., torch.Tensor]:
    """A k-diffusion sampler function (``model(x, sigma) -> denoised``, x = x0 + sigma eps) of the LCM alternative.

    ``randn_like``: where step noise comes from when the WebUI passes no ``noise_sampler``. The WebUIs seed
    k-diffusion's noise by replacing ``k_diffusion.sampling.torch`` for each generation, so the registered
    samplers look it up there at every call: the same seed gives the same image."""

    @torch.no_grad()
    def sample_lcm_alternative(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
        extra_args = {} if extra_args is None else extra_args
        fresh = noise_sampler or (lambda sigma, sigma_next: randn_like(x))
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            if sigmas[i + 1] == 0:
                x = denoised
                continue
            if i < euler_steps:
                removed = (x - denoised) / sigmas[i]
                noise = renoise_with(removed, fresh(sigmas[i], sigmas[i + 1]), ancestral) if ancestral > 0 else removed
            else:
                noise = fresh(sigmas[i], sigmas[i + 1])
            x = denoised + sigmas[i + 1] * noise
        return x

    return sample_lcm_alternative


@dataclass(frozen=True)
class WebuiSampler:
    label: str
    function: Callable[..., torch.Tensor]
    aliases: tuple[str, ...]
    options: dict


#: The WebUI scheduler the samplers default to: "SGM Uniform", the one ComfyUI's and the LCM-LoRA examples use
#: (4 steps: t = 999, 749, 500, 250). LCM's own grid (999, 759, 499, 259) would need a denoiser of our own, as
#: A1111's built-in LCM sampler has; SGM Uniform is the closest the WebUIs' schedulers offer.
SCHEDULER = "sgm_uniform"


def webui_samplers(randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> list[WebuiSampler]:
    """The samplers this extension adds to the WebUI's list."""
    options = {"scheduler": SCHEDULER}
    return [WebuiSampler("LCM alternative", make_lcm_alternative_k(1, 0.0, randn_like), ("lcm_alternative",), options),
            WebuiSampler("LCM alternative ancestral", make_lcm_alternative_k(1, 0.5, randn_like),
                         ("lcm_alternative_ancestral",), options)]


def register_webui_samplers(sd_samplers: Any, sd_samplers_common: Any, sd_samplers_kdiffusion: Any) -> list[str]:
    """Add ``webui_samplers()`` to A1111/Forge's sampler list; the caller passes the WebUI's modules
    (``modules.sd_samplers``, ``modules.sd_samplers_common``, ``modules.sd_samplers_kdiffusion``).
    Registering twice is harmless. Returns the labels added."""
    # k-diffusion's namespace as the WebUI's sampler module imported it; the WebUI swaps its ``torch`` for a
    # seeded one per generation, so it is read at each call, not now.
    k_sampling = getattr(getattr(sd_samplers_kdiffusion, "k_diffusion", None), "sampling", None)
    seeded = (lambda x: k_sampling.torch.randn_like(x)) if k_sampling is not None else torch.randn_like
    added = []
    for entry in webui_samplers(seeded):
        if entry.label in sd_samplers.all_samplers_map:
            continue
        data = sd_samplers_common.SamplerData(
            entry.label, lambda model, fn=entry.function: sd_samplers_kdiffusion.KDiffusionSampler(fn, model),
            list(entry.aliases), dict(entry.options))
        sd_samplers.all_samplers.append(data)
        sd_samplers.all_samplers_map[entry.label] = data
        added.append(entry.label)
    if added:
        sd_samplers.set_samplers()
    return added
