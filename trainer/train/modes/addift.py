"""ADDifT: a difference LoRA trained directly on the change between images A and B, without a copier.

The method is traintrain's ADDifT (hako-mikan/sd-webui-traintrain, ``train_diff2``), rebuilt on our loop.
With the same noise and timestep, A and B noised to x_t^A and x_t^B differ only by sqrt(alpha_bar) (B - A).
The LoRA, applied on x_t^B, is trained to give the base model's output on x_t^A (no gradient there).
Written as the x0 estimate, the LoRA model's estimate from x_t^B then becomes the base model's estimate
from x_t^A plus (B - A): the LoRA adds the change A -> B to what the model would draw, and nothing the
base model already knows about A or B (both sides see the same model, so whatever A and B share cancels
out). That is why it needs no copier and converges in tens of steps rather than hundreds.

Each step reads:
  1. take the pair of this step (pairs take turns: pair = step mod n; several pairs are traintrain's
     Multi-ADDifT, each with its own caption in ``pair_prompts``) and its direction (every other round of the pairs the roles swap, as traintrain's
     alternating steps: the LoRA at minus the strength on A must give the base model's output on B)
  2. the same noise and timestep for both images, timesteps spread over the range in ten strata
  3. the target: the base model's output on the noised source image (no gradient)
  4. the LoRA at ``addift_strength`` on the other noised image, against that target (MSE, min-SNR)
  5. with a mask whose outside is kept (``outside_mask`` keep), the target outside the region is the base
     model's output on the same input: the LoRA learns to change nothing there

At strength s the saved LoRA makes the change it learned at ``addift_strength`` (1: the pair's change) in
proportion: 0 is the base model bit for bit, -1 moves away from B. Images train at their own size as in
the copier (``copier.training_size``), with the same masks (alpha, difference) and pair checks.
"""
from __future__ import annotations

import json

import torch

from trainer import data, jobs
from trainer.diffusion.losses import NoiseSettings
from trainer.lora.network import LoraNetwork
from trainer.models.handle import Cond, ModelHandle
from trainer.train.context import JobContext, job_outputs, run_loop
from trainer.train.differential import addift_loss, step_roles, stratified_timesteps
from trainer.train.loop import LoopResult, TrainingLoop
from trainer.train.modes.copier import Pair, check_pairs, load_pairs, mask_options
from trainer.train.plan import build_network, facts_for, loop_settings, noise_settings
from trainer.train.previews import previewer, render_guided_preview

PAIRS_KEY = "lq_addift_pairs"


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def pair_conditions(handle: ModelHandle, job, pairs: list[Pair]) -> list[Cond]:
    """Each pair's conditioning at its size: its own prompt (``pair_prompts``) or the job's."""
    prompts = list(job.pair_prompts) or [job.prompt] * len(pairs)
    with torch.no_grad(), handle.lock():
        return [handle.encode_prompts([prompt], pair.hw).detach() for prompt, pair in zip(prompts, pairs)]


def _compute_loss(job, handle: ModelHandle, network: LoraNetwork, pairs: list[Pair], conds, noise: NoiseSettings,
                  generator):
    def compute_loss(micro_step: int) -> torch.Tensor:
        # 1. the pair and direction of this step
        index, forward = step_roles(micro_step, len(pairs))
        pair = pairs[index]
        a = pair.latent_a.to(handle.device).expand(job.batch_size, -1, -1, -1)
        b = pair.latent_b.to(handle.device).expand(job.batch_size, -1, -1, -1)
        source, other, strength = (a, b, job.addift_strength) if forward else (b, a, -job.addift_strength)
        # 2. one noise and timestep per row, the same for both images
        g = generator()
        eps = torch.randn(a.shape, generator=g).to(a)
        t = stratified_timesteps(job.batch_size, noise.timestep_min, noise.timestep_max,
                                 micro_step * job.batch_size, g).to(a.device)
        mask = pair.mask_ab.to(handle.device).expand(job.batch_size, -1, -1, -1) if pair.mask_ab is not None else None
        # 3-5. base target on the source, the LoRA on the other image, kept outside the mask
        return addift_loss(handle, network, source, other, conds[index].repeat(job.batch_size), eps, t, strength,
                           noise, mask, job.outside_mask == "keep")
    return compute_loss


def train_addift(job: "jobs.AddiftJob", handle: ModelHandle, ctx: JobContext) -> LoopResult:
    """One LoRA from one or several pairs A -> B (Multi-ADDifT), trained on the prediction difference."""
    # -- everything that can fail, before anything trains -----------------------------------
    outputs = job_outputs(job, ctx)
    pair_files = check_pairs(job, handle)
    pairs = load_pairs(pair_files, handle, data.LatentCache(ctx.cache_dir / "latents"), **mask_options(job))
    noise = noise_settings(handle, job)
    conds = pair_conditions(handle, job, pairs)
    network = build_network(handle, job)
    hashes = json.dumps([[p.files.a.sha256, p.files.b.sha256] for p in pairs])
    facts = facts_for(handle, job, job, noise.prediction, num_images=2 * len(pairs),
                      extra={"lq_mode": "addift", PAIRS_KEY: hashes,
                             "lq_addift_strength": repr(job.addift_strength)})
    preview = previewer(job, handle, network, outputs, render_guided_preview, ctx.log,
                        (job.resolution, job.resolution), ctx.events)

    def on_progress(progress) -> None:
        if ctx.events:
            ctx.events(progress)
        preview(progress)

    loop = TrainingLoop(handle, network, loop_settings(job, job), outputs, facts, on_progress, ctx.control)
    try:
        return run_loop(loop, _compute_loss(job, handle, network, pairs, conds, noise, lambda: loop.generator), ctx)
    finally:
        network.multiplier = 1.0
