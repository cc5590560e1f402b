"""LoRA / LoCon network: modules, attach/detach, enable/disable, merge/unmerge, kohya files.

The network never changes the host's module tree: each target keeps its place and gets a forward
hook that adds ``multiplier * (alpha / dim) * up(down(x))``. Detaching removes the hooks; merging
writes the delta into the weight and keeps the original bytes so that unmerge restores them exactly.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.lora import files as lora_files
from trainer.lora.reading import read_lora_factors
from trainer.lora.svd import resize_factors
from trainer.models.handle import LoraTarget, ModelHandle, TargetOptions, is_linear


class NetworkError(ValueError):
    """Bad network settings or an unusable LoRA file; the message names the problem."""


@dataclass(frozen=True)
class NetworkShape:
    """Rank and alpha for linear/1x1 targets and for 3x3 convolutions (LoCon), named as the job fields.

    The values are validated where they are declared (``trainer.jobs``); this is a plain value."""

    network_dim: int = 16
    network_alpha: float = 8.0
    conv_dim: int = 0      # 0: 3x3 convolutions get no LoRA
    conv_alpha: float = 1.0

    def for_module(self, module: nn.Module) -> tuple[int, float]:
        """(rank, alpha) for a target; rank 0 means the module is skipped."""
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            return self.conv_dim, self.conv_alpha
        return self.network_dim, self.network_alpha


class LoraModule(nn.Module):
    """down: in -> rank (same kernel/stride/padding as the base for convs); up: rank -> out (1x1)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if is_linear(base) or isinstance(base, nn.MultiheadAttention):
            features = (base.in_features, base.out_features) if is_linear(base) else (base.embed_dim,) * 2
            self.lora_down = nn.Linear(features[0], rank, bias=False)
            self.lora_up = nn.Linear(rank, features[1], bias=False)
        elif isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       dilation=base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise NetworkError(f"LoRA supports Linear and Conv2d modules, not {type(base).__name__}")
        # kohya's init (kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in)); up = 0): the network
        # starts as an exact no-op. Drawn from the job's generator so that a run repeats exactly.
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.lora_down.weight[0].numel())
            w = torch.rand(self.lora_down.weight.shape, generator=generator) * (2 * bound) - bound
            self.lora_down.weight.copy_(w)
            self.lora_up.weight.zero_()
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_down.weight.dtype
        return self.lora_up(self.lora_down(x.to(dtype))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * up @ down, in the base weight's shape."""
        down, up = self.lora_down.weight, self.lora_up.weight
        if down.dim() == 2:
            return self.scale * (up @ down)
        delta = up.flatten(1) @ down.flatten(1)
        return self.scale * delta.reshape(up.shape[0], *down.shape[1:])


@contextlib.contextmanager
def _swapped(module: nn.Module, name: str, value: torch.Tensor | None) -> Iterator[None]:
    """``module.<name>`` reads ``value`` instead of the parameter for the duration (None: no swap)."""
    if value is None:
        yield
        return
    param = module._parameters.pop(name)
    module.__dict__[name] = value
    try:
        yield
    finally:
        del module.__dict__[name]
        module._parameters[name] = param


def fused_weight(target: LoraTarget) -> torch.Tensor:
    """The weight (or the slice of the fused weight) a target's LoRA changes; a view, so in-place
    updates reach the module."""
    if target.fused is None:
        return target.module.weight
    mha = target.module
    if target.fused == "out":
        return mha.out_proj.weight
    e = mha.embed_dim
    i = "qkv".index(target.fused)
    return mha.in_proj_weight[i * e:(i + 1) * e]


class _FusedAttention:
    """LoRA on the projections ``nn.MultiheadAttention`` passes as bare weights to
    ``F.multi_head_attention_forward`` (fused q/k/v ``in_proj_weight``, ``out_proj.weight``): a forward
    hook on them would never run, so the attention's forward runs with weight + delta swapped in, and the
    parameters are always put back.

    Several networks may sit on one attention (a results grid while a job trains the text encoder): the
    module gets one dispatching ``forward`` that adds the deltas of every attached network, and detaching
    one leaves the others working; the original ``forward`` comes back when the last one leaves."""

    _ATTR = "_loraq_fused"

    def __init__(self, network: "LoraNetwork", mha: nn.MultiheadAttention, parts: dict[str, "LoraModule"]):
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise NetworkError("LoRA on nn.MultiheadAttention needs its fused in_proj_weight (kdim = vdim = embed_dim)")
        self.network, self.mha, self.parts = network, mha, parts

    def install(self) -> None:
        attached = self.mha.__dict__.get(self._ATTR)
        if attached is None:
            attached = self.mha.__dict__[self._ATTR] = []
            self.mha.forward = _dispatching_forward(self.mha, type(self.mha).forward.__get__(self.mha), attached)
        attached.append(self)

    def remove(self) -> None:
        attached = self.mha.__dict__.get(self._ATTR, [])
        if self in attached:
            attached.remove(self)
        if not attached:
            self.mha.__dict__.pop(self._ATTR, None)
            self.mha.__dict__.pop("forward", None)

    def deltas(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(delta of in_proj_weight, delta of out_proj.weight) as this network applies them now."""
        net = self.network
        if not net.enabled or net.multiplier == 0:
            return None, None
        e, w = self.mha.embed_dim, self.mha.in_proj_weight
        d_in = d_out = None
        if any(p in self.parts for p in "qkv"):
            parts = [self.parts[p].delta_weight() if p in self.parts else w.new_zeros(e, e) for p in "qkv"]
            d_in = net.multiplier * torch.cat(parts).to(w.device)
        if "out" in self.parts:
            d_out = net.multiplier * self.parts["out"].delta_weight().to(self.mha.out_proj.weight.device)
        return d_in, d_out


def _dispatching_forward(mha: nn.MultiheadAttention, original, attached: list[_FusedAttention]):
    def forward(*args, **kwargs):
        d_in = d_out = None
        for wrapper in attached:
            i, o = wrapper.deltas()
            d_in = i if d_in is None else (d_in if i is None else d_in + i)
            d_out = o if d_out is None else (d_out if o is None else d_out + o)
        in_proj = None if d_in is None else mha.in_proj_weight + d_in.to(mha.in_proj_weight.dtype)
        out_proj = None if d_out is None else mha.out_proj.weight + d_out.to(mha.out_proj.weight.dtype)
        with _swapped(mha, "in_proj_weight", in_proj), _swapped(mha.out_proj, "weight", out_proj):
            return original(*args, **kwargs)
    return forward


class LoraNetwork(nn.Module):
    """A set of LoRA modules keyed by kohya key, attachable to their targets."""

    def __init__(self, targets: list[LoraTarget], shape: NetworkShape, multiplier: float = 1.0, seed: int = 0):
        super().__init__()
        if not targets:
            raise NetworkError("no modules to train: the target set and block selection match nothing")
        self.shape = shape
        self.multiplier = multiplier
        self.lora = nn.ModuleDict()
        self._targets: dict[str, LoraTarget] = {}
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        for target in targets:
            rank, alpha = shape.for_module(target.module)
            if rank == 0:
                continue
            self.lora[target.key] = LoraModule(target.module, rank, alpha, generator)
            self._targets[target.key] = target
        if not len(self.lora):
            raise NetworkError("no modules to train: only 3x3 convolutions matched and conv_dim is 0")
        self._hooks: list = []
        self.enabled = True
        self._merged: dict[str, torch.Tensor] = {}

    # -- attach / enable -------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> "LoraNetwork":
        if self.attached:
            return self
        if self._merged:
            raise NetworkError("unmerge the network before attaching it")
        fused: dict[int, dict[str, LoraModule]] = {}
        modules: dict[int, nn.Module] = {}
        for key, target in self._targets.items():
            if target.fused is None:
                self._hooks.append(target.module.register_forward_hook(self._hook_for(self.lora[key])))
            else:
                fused.setdefault(id(target.module), {})[target.fused] = self.lora[key]
                modules[id(target.module)] = target.module
        for ident, parts in fused.items():
            wrapper = _FusedAttention(self, modules[ident], parts)
            wrapper.install()
            self._hooks.append(wrapper)
        return self

    def _hook_for(self, lora: LoraModule):
        def add_lora(module, inputs, output):
            if not self.enabled or self.multiplier == 0:
                return output
            return output + (self.multiplier * lora(inputs[0])).to(output.dtype)
        return add_lora

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    # -- merge -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold multiplier * delta into the base weights (detaches the hooks); unmerge restores them."""
        if self._merged:
            return
        self.detach()
        for key, target in self._targets.items():
            weight = fused_weight(target)
            self._merged[key] = weight.detach().to("cpu", copy=True)
            delta = self.lora[key].delta_weight().to(device=weight.device, dtype=torch.float32)
            weight.copy_((weight.float() + self.multiplier * delta).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        for key, original in self._merged.items():
            weight = fused_weight(self._targets[key])
            weight.copy_(original.to(weight.device))
        self._merged.clear()

    @property
    def merged(self) -> bool:
        return bool(self._merged)

    # -- files -------------------------------------------------------------------------------

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for key, lora in self.lora.items():
            out[f"{key}.lora_down.weight"] = lora.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.lora_up.weight"] = lora.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{key}.alpha"] = lora.alpha.detach().to("cpu", dtype)
        return out

    def save(self, path: str | Path, metadata: dict[str, str] | None = None,
             dtype: torch.dtype = torch.float32) -> Path:
        """Write a kohya-format safetensors file atomically; hashes go into the metadata."""
        return lora_files.write_lora(path, self.kohya_state_dict(dtype), metadata or {})

    @torch.no_grad()
    def load_weights(self, path: str | Path, arch: str | None = None) -> list[str]:
        """Start from a LoRA file; a different rank is resized by SVD. Returns keys not in the file."""
        factors = read_lora_factors(path, expected_arch=arch)
        growth = torch.Generator().manual_seed(self.seed + 1)   # directions added when the file's rank is lower
        unknown = sorted(set(factors) - set(self.lora))
        if unknown and not set(factors) & set(self.lora):
            raise NetworkError(f"{Path(path).name}: none of its {len(factors)} modules match this model's "
                               f"targets (first: {unknown[0]}); is it for another architecture or target set?")
        for key, (down, up, alpha) in factors.items():
            if key not in self.lora:
                continue
            lora = self.lora[key]
            if down.shape[1:] != lora.lora_down.weight.shape[1:] or up.shape[0] != lora.lora_up.weight.shape[0]:
                raise NetworkError(f"{Path(path).name}: {key} has shape {tuple(up.shape[:1]) + tuple(down.shape[1:])}, "
                                   f"the model needs {tuple(lora.lora_up.weight.shape[:1]) + tuple(lora.lora_down.weight.shape[1:])}:"
                                   " the LoRA is for another architecture")
            scale = alpha / down.shape[0]
            if down.shape[0] != lora.rank:
                down, up = resize_factors(down, up, scale, lora.rank, growth)
                scale = 1.0
            # Keep the module's own alpha: fold the file's scale into the factors.
            fold = math.sqrt(scale / lora.scale)
            lora.lora_down.weight.copy_((down * fold).reshape(lora.lora_down.weight.shape))
            lora.lora_up.weight.copy_((up * fold).reshape(lora.lora_up.weight.shape))
        return sorted(set(self.lora) - set(factors))


@contextlib.contextmanager
def switched(network: "LoraNetwork | None", on: bool) -> Iterator[None]:
    """The network on (or off) for the duration, then as it was; its hooks act in forward passes only.

    The one way to switch a network for a while: previews and grids turn theirs on under the model lock,
    the LCM teacher turns the student's off. None: no-op."""
    if network is None:
        yield
        return
    was_enabled = network.enabled
    network.enabled = on
    try:
        yield
    finally:
        network.enabled = was_enabled


@contextlib.contextmanager
def at_strength(network: "LoraNetwork", strength: float) -> Iterator[None]:
    """The network acting at ``strength`` (its multiplier) for the forward passes inside, then as before; the
    graph keeps the strength for the backward pass."""
    was = network.multiplier
    network.multiplier = strength
    try:
        yield
    finally:
        network.multiplier = was


def applied(network: "LoraNetwork | None") -> contextlib.AbstractContextManager[None]:
    """The network on for the duration (see :func:`switched`)."""
    return switched(network, True)


def removed(network: "LoraNetwork | None") -> contextlib.AbstractContextManager[None]:
    """The network off for the duration: the base model (see :func:`switched`)."""
    return switched(network, False)


def network_for_file(handle: ModelHandle, path: str | Path) -> LoraNetwork:
    """A network holding a LoRA file exactly (its own modules and ranks) on ``handle``, not yet attached.

    Raises LoraFileError for a file that is not a usable LoRA and NetworkError when its modules do not
    exist in this model.
    """
    path = Path(path).expanduser()
    factors = read_lora_factors(path, expected_arch=handle.arch)
    te = any(key.startswith("lora_te") for key in factors)
    targets = [t for t in handle.lora_targets(TargetOptions("all", te)) if t.key in factors]
    unknown = sorted(set(factors) - {t.key for t in targets})
    if unknown:
        raise NetworkError(f"{path.name}: {len(unknown)} of its {len(factors)} modules do not exist in this model "
                           f"(first: {unknown[0]}); it was trained on another model")
    is_conv3 = lambda down: down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)
    dim = max((d.shape[0] for d, _, _ in factors.values() if not is_conv3(d)), default=1)
    conv_dim = max((d.shape[0] for d, _, _ in factors.values() if is_conv3(d)), default=0)
    network = LoraNetwork(targets, NetworkShape(dim, float(dim), conv_dim, float(max(conv_dim, 1))))
    network.load_weights(path, handle.arch)
    return network.to(handle.device)


@contextlib.contextmanager
def attached_file(handle: ModelHandle, path: str | Path) -> Iterator[LoraNetwork]:
    """A LoRA file's network on ``handle`` for the duration: attached switched off, without gradients (the
    samplers switch it on under the lock only while they draw; a job may be training on the handle meanwhile),
    and detached afterwards."""
    network = network_for_file(handle, path)
    network.requires_grad_(False)
    with handle.lock():
        network.attach()
        network.disable()
    try:
        yield network
    finally:
        with handle.lock():
            network.detach()
