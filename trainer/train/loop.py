"""Pieces every training mode shares: the diffusion loss, the optimisation loop, saving, resuming.

A mode supplies a ``compute_loss(step) -> loss`` closure and a network; the loop does the rest:
locking the model per step, mixed precision, accumulation, clipping, schedules, NaN guard, progress
events, periodic saves, stop / stop-and-save, and a resumable state beside the output.
"""
from __future__ import annotations

import csv
import io
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from trainer import device as devices
from trainer.train import optim
from trainer.diffusion import schedules
from trainer.paths import write_atomic
from trainer.train.state import read_state, write_state
from trainer.lora.metadata import TrainingFacts, lora_metadata
from trainer.models.handle import Cond, ModelHandle
from trainer.lora.network import LoraNetwork
from trainer.diffusion.losses import NoiseSettings, min_snr_weight, sample_noise


class TrainingError(RuntimeError):
    """A job cannot go on; the message says why and what was kept."""


class NonFiniteLoss(TrainingError):
    pass


class Stopped(Exception):
    """The user cancelled the job (nothing more is saved)."""


@dataclass
class Control:
    """Flags the queue sets from another thread; the loop reads them between steps."""

    cancel: bool = False
    save_and_stop: bool = False

    def check(self, doing: str) -> None:
        """Between the pieces of work before training (caching latents, the LCM teacher's images): there is
        nothing to save yet, so stop-and-save stops like cancel. What is cached stays for a retry."""
        if self.cancel or self.save_and_stop:
            raise Stopped(f"cancelled while {doing}, before training started; what was cached is kept, so a "
                          "retry starts from it")


@dataclass
class Progress:
    step: int
    total: int
    loss: float
    smoothed_loss: float
    lr: float
    it_per_s: float
    eta_s: float
    phase: str = ""   # a Phase (its text)
    message: str = ""


EventSink = Callable[[Progress], None]


# -- the diffusion loss (pure given its inputs) ---------------------------------------------------


def diffusion_loss(handle: ModelHandle, latents: torch.Tensor, cond: Cond, settings: NoiseSettings,
                   generator: torch.Generator, mask: torch.Tensor | None = None,
                   unchanged: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """The noise-prediction loss of one batch; ``mask`` [B,1,h,w] in [0,1] restricts it.

    ``unchanged(noisy, t, cond)``: with a mask, the model's output without the trained LoRA (no gradient).
    Outside the mask that output is the target, so the LoRA learns to change nothing there instead of
    not being trained there (a mask that only weights the loss lets the change spread over the picture)."""
    noise, t = sample_noise(latents, settings, generator)
    alpha_bar_t = handle.alphas_cumprod.to(latents.device)[t]
    noisy = schedules.add_noise(latents, noise, alpha_bar_t)
    pred = handle.predict(noisy.to(handle.dtype), t, cond.to(dtype=handle.dtype)).float()
    target = (schedules.v_target(latents, noise, alpha_bar_t) if settings.prediction == "v" else noise).float()
    if mask is not None and unchanged is not None:
        m = mask.to(target.dtype).expand_as(target)
        target = m * target + (1 - m) * unchanged(noisy, t, cond).float()
        mask = None                  # every pixel has a target now
    err = (pred - target) ** 2
    if mask is not None:
        m = mask.to(err.dtype).expand_as(err)
        per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp(min=1.0)
    else:
        per_sample = err.flatten(1).mean(1)
    if settings.min_snr_gamma:
        per_sample = per_sample * min_snr_weight(alpha_bar_t.float(), settings.min_snr_gamma, settings.prediction)
    return per_sample.mean()


# -- outputs ------------------------------------------------------------------------------------

@dataclass
class Outputs:
    """Where a job writes. In ``dir`` (the LoRA folder, which lists only finished LoRAs): ``NAME.safetensors``
    and the ``NAME-000500.safetensors`` checkpoints the job asks for. In ``work`` (the job's own folder under
    the data folder): the loss log ``NAME.loss.csv``, the resumable state and whatever else a run needs."""

    dir: Path
    name: str
    work: Path

    @property
    def final(self) -> Path:
        return self.dir / f"{self.name}.safetensors"

    def at_step(self, step: int) -> Path:
        return self.dir / f"{self.name}-{step:06d}.safetensors"

    @property
    def loss_log(self) -> Path:
        return self.work / f"{self.name}.loss.csv"

    @property
    def state(self) -> Path:
        return self.work / f"{self.name}.state.safetensors"


@dataclass
class LoopSettings:
    steps: int
    lr: float
    text_encoder_lr: float = 0.0
    optimizer: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    save_every_n_steps: int = 0
    save_dtype: torch.dtype = torch.float16
    seed: int = 42
    phase: str = ""   # a Phase (its text)


@dataclass
class LoopResult:
    final: Path | None
    saved: list[Path]
    steps_done: int
    losses: list[float]
    stopped_early: bool = False
    warnings: list[str] = field(default_factory=list)   # for the user: kept with the job


#: The smoothed loss ending this many times above its lowest point means the run diverged.
DIVERGED_RATIO = 10.0


def divergence_warning(losses: Sequence[float], phase: str = "") -> str | None:
    """A warning when the smoothed loss (the curve the tab plots) ended far above its lowest point."""
    if len(losses) < 20:
        return None
    smoothed, lowest, lowest_at = math.nan, math.inf, 0
    for step, loss in enumerate(losses, 1):
        smoothed = loss if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss
        if smoothed < lowest:
            lowest, lowest_at = smoothed, step
    if lowest > 0 and smoothed > DIVERGED_RATIO * lowest:
        where = f"{phase}: " if phase else ""
        return (f"{where}the loss diverged: smoothed {lowest:.4g} at step {lowest_at}, {smoothed:.4g} at the end "
                f"({smoothed / lowest:.0f}x); the LoRA is probably broken. Lower the learning rate, or use an "
                f"earlier checkpoint (save every N steps)")
    return None


def param_groups(network: LoraNetwork, lr: float, text_encoder_lr: float) -> list[dict]:
    unet, te = [], []
    for key, module in network.lora.items():
        (te if key.startswith("lora_te") else unet).extend(module.parameters())
    groups = [{"params": unet, "lr": lr}] if unet else []
    if te:
        groups.append({"params": te, "lr": text_encoder_lr or lr})
    return groups


def rng_state(generator: torch.Generator, py_random: random.Random | None = None) -> dict:
    return {"generator": generator.get_state(), "python": py_random.getstate() if py_random else None}


class TrainingLoop:
    """Runs ``settings.steps`` optimizer steps of ``compute_loss`` on ``network``."""

    def __init__(self, handle: ModelHandle, network: LoraNetwork, settings: LoopSettings, outputs: Outputs,
                 facts: TrainingFacts, events: EventSink | None = None, control: Control | None = None,
                 extra_state: Callable[[], dict] | None = None):
        self.handle, self.network, self.settings, self.outputs, self.facts = handle, network, settings, outputs, facts
        self.events = events or (lambda p: None)
        self.control = control or Control()
        self.extra_state = extra_state or (lambda: {})
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.device = handle.device
        network.to(self.device)
        self.optimizer = optim.make_optimizer(settings.optimizer,
                                              param_groups(network, settings.lr, settings.text_encoder_lr),
                                              settings.lr, settings.optimizer_args, self.device)
        self.scheduler = optim.make_scheduler(self.optimizer, settings.lr_scheduler, settings.lr_warmup_steps,
                                              settings.steps, settings.lr_scheduler_num_cycles,
                                              settings.lr_scheduler_power)
        self.scaler = devices.grad_scaler(settings.mixed_precision, self.device)
        self.step = 0
        self.losses: list[float] = []
        self.smoothed = math.nan      # the smoothed loss, kept in the state so a resumed run continues it exactly
        self.saved: list[Path] = []
        self._last_good: Path | None = None
        self._last_good_step = 0

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(self.generator), "losses": list(self.losses), "smoothed_loss": self.smoothed,
                "saved": [str(p) for p in self.saved], "extra": self.extra_state()}

    def load_state_dict(self, state: dict) -> dict:
        self.step = state["step"]
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["rng"]["generator"])
        self.losses = list(state["losses"])
        self.smoothed = state["smoothed_loss"]
        self.saved = [Path(p) for p in state["saved"]]
        return state["extra"]

    def save_state(self) -> None:
        try:
            write_state(self.outputs.state, self.state_dict())
        except OSError as e:
            raise self._save_failed(self.outputs.state, e) from None

    @staticmethod
    def read_state(path: Path) -> dict:
        return read_state(path)

    # -- saving -------------------------------------------------------------------------------

    def save_lora(self, path: Path) -> Path:
        self.facts.steps = self.step
        try:
            written = self.network.save(path, lora_metadata(self.facts), self.settings.save_dtype)
        except OSError as e:
            raise self._save_failed(path, e) from None
        self._last_good, self._last_good_step = written, self.step
        return written

    def _save_failed(self, path: Path, e: OSError) -> TrainingError:
        """A failed write (a full disk, a folder gone read-only) named with what the user can do about it."""
        kept = (f"the last good save is {self._last_good} (step {self._last_good_step})" if self._last_good
                else "nothing was saved yet")
        free = ""
        try:
            free = f", {shutil.disk_usage(path.parent).free / 2**20:.0f} MB free there"
        except OSError:
            pass
        return TrainingError(f"cannot write {path} at step {self.step}: {e.strerror or e}{free}; {kept}. "
                             "Free some space (or fix the folder's permissions) and resume the job")

    def _truncate_log(self, step: int) -> None:
        """Keep the loss log's rows up to ``step`` (a resumed run rewrites the steps after its state)."""
        if not self.outputs.loss_log.exists():
            return
        with open(self.outputs.loss_log, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        text = io.StringIO(newline="")
        csv.writer(text).writerows(kept)
        write_atomic(self.outputs.loss_log, text.getvalue().encode())

    def _write_log_row(self, loss: float, smoothed: float, lr: float) -> None:
        new = not self.outputs.loss_log.exists() or self.step == 1
        with open(self.outputs.loss_log, "w" if self.step == 1 else "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "loss", "smoothed_loss", "lr"])
            w.writerow([self.step, f"{loss:.6g}", f"{smoothed:.6g}", f"{lr:.6g}"])

    # -- the loop -----------------------------------------------------------------------------

    def run(self, compute_loss: Callable[[int], torch.Tensor]) -> LoopResult:
        s = self.settings
        self.outputs.dir.mkdir(parents=True, exist_ok=True)
        self.outputs.work.mkdir(parents=True, exist_ok=True)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        started, first_step = time.perf_counter(), self.step
        if self.step:
            self._truncate_log(self.step)
        # The LoRA acts only while a step holds the model lock: a generation between steps sees the base
        # model. The network is left disabled; enable it (under the lock) to use it after training.
        self.network.disable()
        checkpointing = s.gradient_checkpointing and self.handle.supports_gradient_checkpointing
        if s.gradient_checkpointing and not checkpointing:
            warnings.warn("this model backend cannot use gradient checkpointing; training without it")
        while self.step < s.steps:
            if self.control.cancel:
                raise Stopped(f"cancelled at step {self.step}")
            if self.control.save_and_stop:
                self.save_state()      # stop-and-save can be continued later with resume
                break
            with self.handle.lock():
                self.network.enable()
                if checkpointing:
                    self.handle.set_gradient_checkpointing(True)
                try:
                    loss_value = self._one_step(compute_loss, params)
                finally:
                    self.network.disable()
                    if checkpointing:
                        self.handle.set_gradient_checkpointing(False)
            self.step += 1
            self.losses.append(loss_value)
            self.smoothed = loss_value if math.isnan(self.smoothed) else 0.9 * self.smoothed + 0.1 * loss_value
            smoothed = self.smoothed
            lr = self.optimizer.param_groups[0]["lr"]
            self._write_log_row(loss_value, smoothed, lr)
            if s.save_every_n_steps and self.step % s.save_every_n_steps == 0 and self.step < s.steps:
                self.saved.append(self.save_lora(self.outputs.at_step(self.step)))
                self.save_state()
            rate = (self.step - first_step) / max(1e-9, time.perf_counter() - started)
            self.events(Progress(self.step, s.steps, loss_value, smoothed, lr, rate,
                                 (s.steps - self.step) / rate if rate else math.inf, s.phase))
        final = self.save_lora(self.outputs.final)
        self.saved.append(final)
        diverged = divergence_warning(self.losses, s.phase)
        return LoopResult(final, list(self.saved), self.step, list(self.losses),
                          stopped_early=self.step < s.steps, warnings=[diverged] if diverged else [])

    def _one_step(self, compute_loss: Callable[[int], torch.Tensor], params: list[torch.nn.Parameter]) -> float:
        """1. forward/backward over the accumulation micro-batches  2. guard  3. clip  4. step."""
        s = self.settings
        total = 0.0
        for micro in range(s.gradient_accumulation):
            with devices.autocast(s.mixed_precision, self.device):
                loss = compute_loss(self.step * s.gradient_accumulation + micro) / s.gradient_accumulation
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                kept = f"; the last good save is {self._last_good.name}" if self._last_good else ""
                raise NonFiniteLoss(f"the loss became {float(loss.detach())} at step {self.step + 1} (learning rate too "
                                    f"high, or fp16 overflow: try a lower lr or bf16){kept}")
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total
