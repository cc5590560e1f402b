"""Copier two-pass difference LoRA: teach a model one precise change from a pair of images A -> B.

Pass 1 (the copier) trains LoRA A on image A until the model reproduces A. Pass 2 (the difference)
keeps the copier attached, frozen and applied at multiplier 1 in every step (like the loop's own
network it is switched off between steps, so an image generated meanwhile sees the base model),
and trains a new LoRA B on image B.
Whatever the copier already explains (A itself: subject, layout, style) costs pass 2 nothing, so
LoRA B holds only the change A -> B. The saved LoRA contains network B alone.

Each step of either pass reads:
  1. take the pair of this step (pairs take turns: pair = step mod n)
  2. its cached latent (A in pass 1, B in pass 2), repeated ``batch_size`` times, and its conditioning
  3. the noise-prediction loss with independent noise and timesteps per row, restricted to the
     pair's mask when ``use_mask`` is on

Several pairs (e.g. front, left, right views): ONE shared copier learns every image A with the
same prompt, and one difference LoRA learns every image B on top of it. Why shared: the
difference LoRA is one network anyway; a copier of the set absorbs what differs between the
views, so pass 2 keeps only the change the pairs have in common; a job saves and reuses one copier
file (``save_copier`` / ``copier_file``); and only one extra network sits on the model.

Images train at their own size: scaled down to about ``resolution`` x ``resolution`` pixels when
larger (aspect ratio kept), then rounded down to the model's size multiple (:func:`training_size`).
The two images of a pair must have the same size (checked before anything trains).

Masks: the region that changes, at latent resolution (each cell the mean over its pixels): from the
alpha channels (``use_mask``: the product of A's and B's, an image without alpha being opaque
everywhere, so marking the changed region in B's alpha keeps the difference local and swapping A and B
keeps the same region) and/or from the pixels that differ between A and B (``difference_mask``:
:func:`difference_region`). Outside the region pass 2 trains toward no change (``outside_mask`` keep:
the target there is the prediction of the copier alone, without the difference) or not at all
(ignore: the loss is weighted by the mask, and the change spreads over the picture). Pass 1 weights
its loss by A's alpha.

Convergence of pass 1: the copier's reconstruction error on A at fixed timesteps
(:data:`RECONSTRUCTION_TIMESTEPS`, fixed noise): the mean squared error of the predicted x0 against
A's latent, divided by the base model's error on the same inputs (:func:`reconstruction_error`).
It is logged and sent as a Progress message before pass 1, every quarter of it and at its end, and
stored in the metadata of both files (``lq_copier_reconstruction``). The copier has converged when
that ratio is at most :data:`CONVERGED_RATIO`; otherwise the job warns before pass 2 starts.

Progress reports both passes as one job: ``Progress.phase`` is ``"pass 1 of 2"`` or ``"pass 2 of 2"``,
``Progress.step`` / ``total`` count over both passes (pass 2's step k is reported as
steps_of_pass_1 + k, out of steps_of_pass_1 + steps_of_pass_2) and the ETA covers what is left of
the whole job. With a saved copier (``copier_file``) there is no pass 1: the total is pass 2's steps.
A job resumed in pass 2 reads the copier it saved at the end of pass 1 (``NAME_copier.safetensors``,
removed at the end unless ``save_copier``) and counts pass 1 as done.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from trainer import data
from trainer.data.dataset import inspect_image, short_reason
from trainer import jobs
from trainer.jobs.vocabulary import Phase
from trainer.lora import files as lora_files
from trainer.lora.metadata import TrainingFacts
from trainer.paths import write_atomic
from trainer.models.handle import Cond, ModelHandle
from trainer.lora.network import LoraNetwork, NetworkError, applied, at_strength, network_for_file, switched
from trainer.diffusion.ddim import predict_x0_eps
from trainer.diffusion.schedules import add_noise
from trainer.diffusion.losses import sample_noise
from trainer.train.differential import addift_loss, step_roles
from trainer.train.loop import LoopResult, Outputs, Progress, TrainingLoop, diffusion_loss
from trainer.train.previews import previewer, render_guided_preview
from trainer.train.plan import build_network, facts_for, loop_settings, noise_settings
from trainer.train.context import JobContext, job_outputs, run_loop

#: Timesteps at which the copier's reconstruction of A is measured (low, middle and high noise).
RECONSTRUCTION_TIMESTEPS = (200, 500, 800)
#: Seed of the fixed noise of that measurement (the same noise every time, so values compare).
RECONSTRUCTION_SEED = 0
#: The copier has converged when its reconstruction error is at most this fraction of the base model's.
#: A floor rather than a target: on a photo the base model's x0 estimate at t=800 is another picture
#: and a trained copier goes far below it; when the prompt already describes A exactly (the demo
#: model's "a red circle on a white background") the base error is mostly what no model can know
#: from that much noise, and a copier that learned A removes only the rest (about 10-20% in 60-240
#: steps). Below 0.9 the copier has learned A beyond what the prompt gives.
CONVERGED_RATIO = 0.9
#: Reconstruction checks during pass 1, besides the one before it starts.
RECONSTRUCTION_CHECKS = 4

PASS_1, PASS_2 = Phase.COPIER_PASS, Phase.DIFFERENCE_PASS
METADATA_KEY = "lq_copier_reconstruction"
IMAGES_KEY = "lq_copier_images"


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------

def training_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(w, h) an image trains at: its own size, scaled down to an area of about resolution² when
    larger (aspect kept), each side rounded down to ``multiple`` (at least one multiple)."""
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    return (max(multiple, int(width * scale) // multiple * multiple),
            max(multiple, int(height * scale) // multiple * multiple))


def size_multiple(handle: ModelHandle) -> int:
    """Pixels an image side must be a multiple of: the VAE factor times the UNet's 8x downsampling."""
    return handle.vae_scale * 8


def latent_mask(alpha: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[1, h, w] loss weights in [0, 1]: an alpha channel [H, W] in [0, 1] averaged over each latent cell."""
    return F.adaptive_avg_pool2d(alpha[None, None].float(), latent_hw)[0]


def difference_region(a: torch.Tensor, b: torch.Tensor, threshold: int, dilate: int) -> torch.Tensor:
    """[H, W] in {0, 1}: the pixels where images a and b ([3, H, W], 0-255) differ by more than ``threshold``
    (|dR| + |dG| + |dB|, traintrain's measure), widened by ``dilate`` pixels on every side (a square)."""
    changed = ((a.float() - b.float()).abs().sum(0) > threshold).float()
    if dilate:
        changed = F.max_pool2d(changed[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
    return changed


def reconstruction_error(handle: ModelHandle, x0: torch.Tensor, cond: Cond, noise: torch.Tensor,
                         timesteps=RECONSTRUCTION_TIMESTEPS, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the model's x0 estimate of ``x0`` [C,h,w] noised with ``noise`` to each
    timestep, one value per timestep (under ``mask`` [1,h,w] when given). The caller holds the lock."""
    n = len(timesteps)
    t = torch.tensor(timesteps, device=x0.device)
    alpha_bar = handle.alphas_cumprod.to(x0.device)[t]
    x0s = x0.expand(n, *x0.shape)
    # 1. noise A to each timestep with the same fixed noise
    x_t = add_noise(x0s, noise.expand_as(x0s), alpha_bar)
    # 2. the model's prediction -> its estimate of x0
    with torch.no_grad():
        out = handle.predict(x_t.to(handle.dtype), t, cond.repeat(n).to(x0.device, handle.dtype)).float()
    x0_hat, _ = predict_x0_eps(out, x_t, alpha_bar.view(-1, 1, 1, 1), handle.prediction)
    # 3. squared error per timestep, where the mask counts
    err = (x0_hat - x0s) ** 2
    if mask is None:
        return err.flatten(1).mean(1)
    m = mask.to(err.dtype).expand_as(err)
    return (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1e-8)


@dataclass(frozen=True)
class Reconstruction:
    """The copier's reconstruction of the A images against the base model's, summed over the images."""

    step: int
    timesteps: tuple[int, ...]
    base_mse: tuple[float, ...]      # per timestep
    copier_mse: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """Copier error / base error over all timesteps (1 = no better than the base model)."""
        return sum(self.copier_mse) / max(sum(self.base_mse), 1e-12)

    @property
    def converged(self) -> bool:
        return self.ratio <= CONVERGED_RATIO

    def message(self) -> str:
        per_t = ", ".join(f"t={t}: {c:.4g} (base {b:.4g})"
                          for t, b, c in zip(self.timesteps, self.base_mse, self.copier_mse))
        return f"copier reconstruction of A at step {self.step}: {self.ratio:.1%} of the base model's error ({per_t})"

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "timesteps": list(self.timesteps),
                           "base_mse": [round(v, 8) for v in self.base_mse],
                           "copier_mse": [round(v, 8) for v in self.copier_mse],
                           "ratio": round(self.ratio, 6), "converged": self.converged,
                           "converged_ratio": CONVERGED_RATIO})

    @classmethod
    def from_json(cls, text: str) -> "Reconstruction":
        d = json.loads(text)
        return cls(int(d["step"]), tuple(d["timesteps"]), tuple(d["base_mse"]), tuple(d["copier_mse"]))


def not_converged_warning(r: Reconstruction) -> str:
    return (f"warning: the copier did not converge: its reconstruction error on A is {r.ratio:.0%} of the base "
            f"model's (converged means at most {CONVERGED_RATIO:.0%}); the difference LoRA will also learn part "
            "of A itself. Give pass 1 more steps or a higher learning rate (or a bigger batch with it).")


def job_progress(p: Progress, offset: int, total: int, steps_after: int) -> Progress:
    """A pass's Progress as a step of the whole job: step offset, job total, ETA of what is left."""
    eta = p.eta_s + (steps_after / p.it_per_s if p.it_per_s else math.inf)
    return dataclasses.replace(p, step=offset + p.step, total=total, eta_s=eta)


# ---------------------------------------------------------------------------------------------
# Pairs: checked before anything trains, then encoded
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairFiles:
    """One pair as it will train (after swap_ab): A may be absent when a saved copier replaces pass 1."""

    a: data.ImageItem | None
    b: data.ImageItem
    size: tuple[int, int]            # (w, h) training size


def _image_item(path: str, field: str, base: Path | None = None) -> data.ImageItem:
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise jobs.JobError(f"{field.replace('_', ' ')} '{path}' does not exist", field=field)
    try:
        width, height, digest = inspect_image(p, verify=True)
    except Exception as e:  # PIL raises many types for broken files
        raise jobs.JobError(f"{field.replace('_', ' ')} '{path}' is not a readable image "
                            f"({short_reason(e)})", field=field) from None
    return data.ImageItem(p, "", 1, width, height, digest)


def read_alpha(path: Path, size: tuple[int, int]) -> torch.Tensor | None:
    """The image's alpha [h, w] in [0, 1], oriented, resized and cropped like its pixels; None without alpha."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if not (img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)):
            return None
        alpha = data.resize_and_crop(img.convert("RGBA").getchannel("A"), size)
    w, h = size
    return torch.frombuffer(bytearray(alpha.tobytes()), dtype=torch.uint8).view(h, w).float() / 255.0


def check_pairs(job, handle: ModelHandle) -> list[PairFiles]:
    """Every pair readable, both images of a pair the same size; raises JobError naming the field."""
    return pair_files(job, size_multiple(handle))


def pair_files(job, multiple: int, base: Path | None = None) -> list[PairFiles]:
    """:func:`check_pairs` for sides rounded to ``multiple`` pixels, relative paths taken from ``base``."""
    names_a = list(job.image_a)
    names_b = list(job.image_b)
    if not names_b:
        raise jobs.JobError("image B is required", field="image_b")
    if names_a and len(names_a) != len(names_b):
        raise jobs.JobError(f"{len(names_a)} image(s) A but {len(names_b)} image(s) B: give one B for each A, "
                            "in the same order", field="image_b")
    copier_file = getattr(job, "copier_file", "")      # copier jobs only: a saved copier replaces A
    if not names_a and not copier_file:
        raise jobs.JobError("image A is required" + (" (or a saved copier in copier_file)" if job.mode == "copier"
                                                     else ""), field="image_a")
    items_a = [_image_item(p, "image_a", base) for p in names_a] or [None] * len(names_b)
    items_b = [_image_item(p, "image_b", base) for p in names_b]
    for a, b in zip(items_a, items_b):
        if a is not None and (a.width, a.height) != (b.width, b.height):
            raise jobs.JobError(f"image B '{b.path.name}' is {b.width}x{b.height} but its image A '{a.path.name}' is "
                                f"{a.width}x{a.height}: the two images of a pair must have the same size "
                                "(crop or resize one to match the other)", field="image_b")
    if job.swap_ab:
        if items_a[0] is None:
            raise jobs.JobError("swap A and B needs the images A (a saved copier learned A, not B)", field="swap_ab")
        items_a, items_b = items_b, items_a
    return [PairFiles(a, b, training_size(b.width, b.height, job.resolution, multiple))
            for a, b in zip(items_a, items_b)]


@dataclass
class Pair:
    """One pair ready to train: latents [C,h,w] of A (None without A) and B, masks [1,h,w] or None."""

    files: PairFiles
    latent_a: torch.Tensor | None
    latent_b: torch.Tensor
    mask_a: torch.Tensor | None       # pass 1
    mask_ab: torch.Tensor | None      # pass 2 and ADDifT: the region that changes

    @property
    def hw(self) -> tuple[int, int]:
        return self.files.size[1], self.files.size[0]


def _pixels(item: data.ImageItem, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] 0-255: the image as it trains (transparency on white), at its training size."""
    img = data.resize_and_crop(data.open_rgb(item.path), size)
    w, h = size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


def difference_mask(files: PairFiles, latent_hw: tuple[int, int], threshold: int, dilate: int) -> torch.Tensor:
    """[1, h, w]: :func:`difference_region` of the pair at latent resolution; refuses a pair with no difference."""
    region = difference_region(_pixels(files.a, files.size), _pixels(files.b, files.size), threshold, dilate)
    if float(region.max()) == 0.0:
        raise jobs.JobError(f"'{files.a.path.name}' and '{files.b.path.name}' differ nowhere by more than the "
                            f"difference threshold ({threshold}): the difference mask would be empty (lower the "
                            "threshold, or turn the difference mask off)", field="difference_mask")
    return latent_mask(region, latent_hw)


def pair_masks(files: PairFiles, latent_hw: tuple[int, int], use_alpha: bool = True,
               difference: tuple[int, int] | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pass-1 mask from A's alpha, the changing region: A's and B's alpha, times the difference mask when
    ``difference`` = (threshold, dilate) is given); refuses fully transparent images and empty regions."""
    if difference is not None and files.a is None:
        raise jobs.JobError("the difference mask needs the images A (a saved copier replaces them)",
                            field="difference_mask")
    alphas = {}
    for role, item in (("image_a", files.a), ("image_b", files.b)) if use_alpha else ():
        if item is None:
            continue
        alpha = read_alpha(item.path, files.size)
        if alpha is not None:
            if float(alpha.max()) == 0.0:
                raise jobs.JobError(f"'{item.path.name}' is fully transparent: with mask from alpha on, nothing of it "
                                    "would train (make the region to learn opaque, or turn the mask off)", field=role)
            alphas[role] = latent_mask(alpha, latent_hw)
    mask_a = alphas.get("image_a")
    both = [alphas[r] for r in ("image_a", "image_b") if r in alphas]
    mask_ab = both[0] * both[1] if len(both) == 2 else (both[0] if both else None)
    if mask_ab is not None and float(mask_ab.max()) == 0.0:
        raise jobs.JobError(f"the opaque regions of '{files.a.path.name}' and '{files.b.path.name}' do not overlap: "
                            "the pass-2 mask would be empty", field="use_mask")
    if difference is not None:
        changed = difference_mask(files, latent_hw, *difference)
        mask_ab = changed if mask_ab is None else mask_ab * changed
        if float(mask_ab.max()) == 0.0:
            raise jobs.JobError("the pixels that differ between A and B lie outside the opaque region of the "
                                "alpha mask: the mask would be empty", field="difference_mask")
    return mask_a, mask_ab


def check_masks(job, base: Path | None = None, multiple: int = 64) -> None:
    """Refuses, before the job runs, pairs whose masks would be empty (fully transparent images, alpha regions
    that do not overlap, A and B equal within the difference threshold); raises JobError naming the field.
    ``multiple``: the SD VAE's 8 x the UNet's 8, the size rounding of every model we train."""
    options = mask_options(job)
    if not (options["use_mask"] or options["difference"]):
        return
    for files in pair_files(job, multiple, base):
        w, h = files.size
        pair_masks(files, (h // 8, w // 8), options["use_mask"], options["difference"])


def mask_options(job) -> dict:
    """The keyword arguments of :func:`load_pairs` for a job's mask fields."""
    return {"use_mask": job.use_mask,
            "difference": (job.difference_threshold, job.difference_dilate) if job.difference_mask else None}


def over_the_other(item: data.ImageItem, other: data.ImageItem | None, size: tuple[int, int], folder: Path
                   ) -> data.ImageItem:
    """With masks from alpha: the image as it trains, its transparent pixels taken from the other image of the
    pair (its alpha marks where it differs; elsewhere it *is* the other image), not from a white background
    that would be a change of its own. Written once, by content, as a PNG in ``folder``; the item itself when
    it has no alpha or no partner."""
    if other is None:
        return item
    with Image.open(item.path) as img:
        img = ImageOps.exif_transpose(img)
        if not (img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)):
            return item
        rgba = data.resize_and_crop(img.convert("RGBA"), size)
    under = data.resize_and_crop(data.open_rgb(other.path), size).convert("RGBA")
    path = folder / f"{item.sha256[:16]}_over_{other.sha256[:16]}_{size[0]}x{size[1]}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.alpha_composite(under, rgba).convert("RGB").save(buffer, format="PNG")
        write_atomic(path, buffer.getvalue())
    return _image_item(str(path), "image_b")


def load_pairs(pair_files: list[PairFiles], handle: ModelHandle, cache: data.LatentCache, use_mask: bool,
               difference: tuple[int, int] | None = None) -> list[Pair]:
    """Latents (from the shared latent cache) and masks of every pair; with ``use_mask`` the transparent
    pixels of an image come from the other image of its pair (:func:`over_the_other`)."""
    folder = cache.folder.parent / "pairs"
    trained = [(over_the_other(pf.a, pf.b, pf.size, folder) if use_mask and pf.a is not None else pf.a,
                over_the_other(pf.b, pf.a, pf.size, folder) if use_mask else pf.b) for pf in pair_files]
    items = [(item, pf.size) for pf, both in zip(pair_files, trained) for item in both if item is not None]
    latents = cache.get_latents(items, handle)
    identity = handle.identity
    pairs = []
    for pf, (item_a, item_b) in zip(pair_files, trained):
        get = lambda item: None if item is None else latents[data.latent_key(item.sha256, identity, pf.size)]
        latent_b = get(item_b)
        masks = (pair_masks(pf, tuple(latent_b.shape[1:]), use_mask, difference) if use_mask or difference
                 else (None, None))
        pairs.append(Pair(pf, get(item_a), latent_b, *masks))
    return pairs


# ---------------------------------------------------------------------------------------------
# The copier network: trained in pass 1 or read from a file
# ---------------------------------------------------------------------------------------------

def copier_network(handle: ModelHandle, path: str) -> LoraNetwork:
    """A saved copier as a frozen-to-be network holding the file exactly (not yet attached)."""
    try:
        return network_for_file(handle, path)
    except (lora_files.LoraFileError, NetworkError) as e:
        raise jobs.JobError(f"saved copier: {e}", field="copier_file") from None


def freeze(network: LoraNetwork, handle: ModelHandle) -> LoraNetwork:
    """The copier during pass 2: attached at multiplier 1, without gradients, applied only inside a step.

    Like the loop's own network, it is disabled between steps so that an image generated meanwhile
    sees the base model; :func:`applied` enables it around each step's forward pass.
    """
    network.requires_grad_(False)
    network.multiplier = 1.0
    network.disable()
    with handle.lock():
        network.attach()
    return network


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------

def _conditions(handle: ModelHandle, prompt: str, pairs: list[Pair], copier: LoraNetwork | None = None
                ) -> dict[tuple[int, int], Cond]:
    """The prompt's conditioning at every pair size, through the copier when given (it may hold text-encoder layers)."""
    with torch.no_grad(), handle.lock(), applied(copier):
        return {pair.hw: handle.encode_prompts([prompt], pair.hw).detach() for pair in pairs}


def _measure(handle: ModelHandle, copier: LoraNetwork, pairs: list[Pair], prompt: str, step: int
             ) -> Reconstruction:
    """The copier's and the base model's reconstruction error on every A, summed over the pairs."""
    base = torch.zeros(len(RECONSTRUCTION_TIMESTEPS))
    mine = torch.zeros(len(RECONSTRUCTION_TIMESTEPS))
    was_enabled = copier.enabled
    with handle.lock():
        try:
            for pair in pairs:
                x0 = pair.latent_a.to(handle.device)
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(RECONSTRUCTION_SEED)).to(x0)
                mask = pair.mask_a.to(x0) if pair.mask_a is not None else None
                for enabled, total in ((False, base), (True, mine)):
                    copier.enabled = enabled
                    # encoded each time: a copier that trains the text encoder changes the conditioning
                    with torch.no_grad():
                        cond = handle.encode_prompts([prompt], pair.hw)
                    total += reconstruction_error(handle, x0, cond, noise, mask=mask).cpu()
        finally:
            copier.enabled = was_enabled
    return Reconstruction(step, RECONSTRUCTION_TIMESTEPS, tuple(base.tolist()), tuple(mine.tolist()))


class _JobEvents:
    """Forwards each pass's Progress as the job's, and sends messages (reconstruction, warnings)."""

    def __init__(self, ctx: JobContext, steps_1: int, steps_2: int):
        self.ctx, self.steps_1, self.steps_2 = ctx, steps_1, steps_2
        self.last: Progress | None = None

    @property
    def total(self) -> int:
        return self.steps_1 + self.steps_2

    def of_pass(self, phase: str, on_step=None):
        offset, after = (0, self.steps_2) if phase == PASS_1 else (self.steps_1, 0)

        def forward(p: Progress) -> None:
            self.last = job_progress(p, offset, self.total, after)
            if self.ctx.events:
                self.ctx.events(self.last)
            if on_step:
                on_step(p)
        return forward

    def message(self, phase: str, text: str, step: int) -> None:
        if text.startswith("warning: "):
            self.ctx.warn(text[len("warning: "):])    # kept with the job, not only logged
        else:
            self.ctx.log(text)
        if self.ctx.events:
            base = self.last or Progress(step, self.total, math.nan, math.nan, 0.0, 0.0, math.inf)
            self.ctx.events(dataclasses.replace(base, step=step, total=self.total, phase=phase, message=text))


def unchanged_prediction(handle: ModelHandle, network: LoraNetwork):
    """``(noisy, t, cond) -> output`` of the model without ``network`` (switched off, no gradient): the
    target outside a mask whose outside is kept (``outside_mask`` keep)."""
    def predict(noisy: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        with torch.no_grad(), switched(network, False):
            return handle.predict(noisy.to(handle.dtype), t, cond.to(dtype=handle.dtype))
    return predict


def _step_loss(handle, pairs, conds, latent_of, mask_of, batch_size, noise, generator, prompt, encode_each_step,
               copier: LoraNetwork | None = None, keep_outside: LoraNetwork | None = None,
               opposite: LoraNetwork | None = None, keep: bool = True):
    """compute_loss of one pass: the pair of this step, its latent repeated batch_size times; with
    ``keep_outside`` (the trained network) the target outside the mask is the prediction without it. With
    ``opposite`` (pass 2's network, ``train_opposite``) every other round of the pairs trains it at -1 instead:
    on noised A it must predict what the copier alone predicts on B noised alike (ADDifT's differential loss),
    so that -1 undoes A -> B; ``keep``: outside the mask that target is the copier alone on A."""
    unchanged = unchanged_prediction(handle, keep_outside) if keep_outside is not None else None
    def compute_loss(micro_step: int) -> torch.Tensor:
        # 1. the pair of this step, and with ``opposite`` its direction
        index, forward = step_roles(micro_step, len(pairs)) if opposite is not None else \
            (micro_step % len(pairs), True)
        pair = pairs[index]
        # 2. its latent repeated batch_size times, and the prompt's conditioning at its size
        x0 = latent_of(pair).to(handle.device).expand(batch_size, -1, -1, -1)
        mask = mask_of(pair)
        if mask is not None:
            mask = mask.to(handle.device).expand(batch_size, -1, -1, -1)
        # 3. the noise-prediction loss (independent noise and timestep per row, under the mask), with the
        #    frozen copier applied in pass 2; or the opposite step: the network at -1 turns B back into A
        with applied(copier):
            if not forward:
                a = pair.latent_a.to(handle.device).expand(batch_size, -1, -1, -1)
                eps, t = sample_noise(x0, noise, generator())
                cond, base_cond = conds[pair.hw], None
                if encode_each_step:   # a trained text encoder: at -1 in the prediction, off in the targets
                    with at_strength(opposite, -1.0):
                        cond = handle.encode_prompts([prompt], pair.hw)
                    with torch.no_grad(), switched(opposite, False):
                        base_cond = handle.encode_prompts([prompt], pair.hw).repeat(batch_size)
                return addift_loss(handle, opposite, x0, a, cond.repeat(batch_size), eps, t, -1.0, noise, mask,
                                   keep, target_cond=base_cond)
            cond = handle.encode_prompts([prompt], pair.hw) if encode_each_step else conds[pair.hw]
            return diffusion_loss(handle, x0, cond.repeat(batch_size), noise, generator(), mask=mask,
                                  unchanged=unchanged)
    return compute_loss


def train_copier(job: "jobs.CopierJob", handle: ModelHandle, ctx: JobContext) -> LoopResult:
    """Pass 1 (copier on A, unless ``copier_file``) then pass 2 (difference on B over the frozen copier)."""
    first, second = job.passes()
    # -- everything that can fail, before anything trains -----------------------------------
    outputs = job_outputs(job, ctx)
    # The copier goes to the LoRA folder only when the job asks to keep it; otherwise it lives in the job's folder.
    copier_outputs = Outputs(outputs.dir if job.save_copier else outputs.work, f"{job.name}_copier", outputs.work)
    pair_files = check_pairs(job, handle)
    resuming_pass_2 = ctx.resume and not job.copier_file and not copier_outputs.state.is_file() \
        and copier_outputs.final.is_file()
    copier_path = job.copier_file or (str(copier_outputs.final) if resuming_pass_2 else "")
    saved_copier = copier_network(handle, copier_path) if copier_path else None
    if job.save_copier and not job.copier_file and copier_outputs.final.exists() and not job.overwrite \
            and not ctx.resume:
        raise jobs.JobError(f"{copier_outputs.final} already exists: choose another name or tick overwrite",
                            field="save_copier")
    pairs = load_pairs(pair_files, handle, data.LatentCache(ctx.cache_dir / "latents"), **mask_options(job))

    noise = noise_settings(handle, job, second)
    runs_pass_1 = saved_copier is None
    # A saved copier means a one-pass job; a resumed job counts its finished pass 1.
    events = _JobEvents(ctx, 0 if job.copier_file else first.steps, second.steps)
    a_hashes = json.dumps([p.files.a.sha256 for p in pairs if p.files.a is not None])
    copier: LoraNetwork | None = None
    try:
        # -- pass 1: the copier learns A ----------------------------------------------------------
        if runs_pass_1:
            copier = build_network(handle, job, first)
            result, reconstruction = _train_pass_1(job, first, handle, ctx, pairs, copier, copier_outputs, events,
                                                   a_hashes)
            if result.stopped_early:         # stop-and-save during pass 1: the copier is what there is
                events.message(PASS_1, f"stopped during pass 1; the copier is saved as {result.final.name}",
                               result.steps_done)
                return result
        else:
            copier = saved_copier
            metadata = lora_files.read_metadata(Path(copier_path).expanduser())
            reconstruction = _reconstruction_of_saved(handle, copier, pairs, job.prompt, metadata)
            source = ("the interrupted job's copier" if resuming_pass_2
                      else f"the saved copier '{Path(copier_path).name}'")
            done = events.steps_1
            events.message(PASS_2, f"pass 1 skipped: using {source}", done)
            if job.copier_file and pairs[0].latent_a is not None and metadata.get(IMAGES_KEY, a_hashes) != a_hashes:
                events.message(PASS_2, "warning: the saved copier was trained on other images A than this job's", done)
            if reconstruction is not None:
                events.message(PASS_2, reconstruction.message(), done)
                if not reconstruction.converged:
                    events.message(PASS_2, not_converged_warning(reconstruction), done)

        # -- pass 2: the difference learns B over the frozen copier --------------------------------
        freeze(copier, handle)
        difference = build_network(handle, job, second)
        conds = _conditions(handle, job.prompt, pairs, copier)
        extra = {"lq_mode": "copier_difference", IMAGES_KEY: a_hashes}
        if reconstruction is not None:
            extra[METADATA_KEY] = reconstruction.to_json()
        facts = facts_for(handle, job, second, noise.prediction, num_images=len(pairs), extra=extra)
        # previews of the difference as it is used: on the base model (the copier is off between steps)
        preview = previewer(job, handle, difference, outputs, render_guided_preview, ctx.log,
                            (job.resolution, job.resolution), events.of_pass(PASS_2))
        loop = TrainingLoop(handle, difference, loop_settings(second, job, PASS_2), outputs, facts,
                            events.of_pass(PASS_2, on_step=preview), ctx.control)
        compute_loss = _step_loss(handle, pairs, conds, lambda p: p.latent_b,
                                  lambda p: p.mask_ab, second.batch_size, noise, lambda: loop.generator,
                                  job.prompt, job.train_text_encoder, copier,
                                  keep_outside=difference if job.outside_mask == "keep" else None,
                                  opposite=difference if job.train_opposite and all(
                                      p.latent_a is not None for p in pairs) else None,
                                  keep=job.outside_mask == "keep")
        result = run_loop(loop, compute_loss, ctx)
    finally:
        if copier is not None:
            copier.detach()
    if not job.copier_file and not job.save_copier and not result.stopped_early:
        copier_outputs.final.unlink(missing_ok=True)    # kept until pass 2 is done: a resume needs it
    return result


def _train_pass_1(job, first, handle, ctx, pairs, copier, copier_outputs, events, a_hashes):
    """Train the copier on the A images; returns (pass-1 result, its last reconstruction)."""
    noise = noise_settings(handle, job, first)
    conds = _conditions(handle, job.prompt, pairs)
    facts: TrainingFacts = facts_for(handle, job, first, noise.prediction, num_images=len(pairs),
                                     extra={"lq_mode": "copier", IMAGES_KEY: a_hashes})
    facts.output_name = facts.title = copier_outputs.name
    every = max(1, first.steps // RECONSTRUCTION_CHECKS)
    state: dict[str, Reconstruction] = {}

    def measure_and_tell(step: int) -> Reconstruction:
        state["last"] = _measure(handle, copier, pairs, job.prompt, step)
        facts.extra[METADATA_KEY] = state["last"].to_json()
        events.message(PASS_1, state["last"].message(), step)
        return state["last"]

    def check(p: Progress) -> None:
        # Called between steps (the loop has released the lock), before the final save reads facts.extra.
        if p.step % every == 0 or p.step == p.total:
            measure_and_tell(p.step)

    loop = TrainingLoop(handle, copier, loop_settings(first, job, PASS_1), copier_outputs, facts,
                        events.of_pass(PASS_1, check), ctx.control)
    compute_loss = _step_loss(handle, pairs, conds, lambda p: p.latent_a, lambda p: p.mask_a, first.batch_size,
                              noise, lambda: loop.generator, job.prompt, job.train_text_encoder)
    if ctx.resume and copier_outputs.state.is_file():
        loop.load_state_dict(TrainingLoop.read_state(copier_outputs.state))
    measure_and_tell(loop.step)
    result = loop.run(compute_loss)          # the copier stays attached for pass 2
    if not result.stopped_early:             # stop-and-save keeps the state so that resume can finish pass 1
        copier_outputs.state.unlink(missing_ok=True)
    last = state["last"]
    if last.step != result.steps_done:       # stopped early, between two checks
        last = measure_and_tell(result.steps_done)
    if not last.converged:
        events.message(PASS_1, not_converged_warning(last), result.steps_done)
    return result, last


def _reconstruction_of_saved(handle, copier, pairs, prompt, metadata) -> Reconstruction | None:
    """A saved copier's reconstruction: measured on this job's A images, else read from its metadata."""
    if all(p.latent_a is not None for p in pairs):
        copier.attach()
        try:
            return _measure(handle, copier, pairs, prompt, 0)
        finally:
            copier.detach()
    if METADATA_KEY in metadata:
        try:
            return Reconstruction.from_json(metadata[METADATA_KEY])
        except (ValueError, KeyError, TypeError):
            return None
    return None
