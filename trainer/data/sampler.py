"""Same-bucket batches in a seeded order that a resumed run continues exactly, and their collation."""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from trainer.data.captions import process_caption
from trainer.data.caches import latent_key
from trainer.data.dataset import Dataset
from trainer.data.options import DatasetOptions


@dataclass(frozen=True)
class Batch:
    indices: list[int]           # into dataset.items
    bucket: tuple[int, int]      # (w, h)
    epoch: int
    position: int                # index of this batch within its epoch
    seed: int

    def random(self) -> random.Random:
        """The per-batch RNG for flips and captions: a function of (seed, epoch, position), so a
        resumed run draws the same flips and captions without saving any RNG state."""
        return random.Random(f"{self.seed}:{self.epoch}:{self.position}")


class BatchSampler:
    """Endless iterator of same-bucket batches; each epoch's order is seeded from (seed, epoch).

    Each item appears ``repeats`` times per epoch. Within a bucket the samples are shuffled and cut
    into batches (the last one of a bucket may be smaller), then all batches are shuffled.
    """

    def __init__(self, repeats: Sequence[int], buckets: Sequence[tuple[int, int]], batch_size: int,
                 seed: int):
        if len(repeats) != len(buckets):
            raise ValueError("repeats and buckets must have one entry per item")
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.repeats, self.buckets = list(repeats), [tuple(b) for b in buckets]
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._plan: tuple[int, list[list[int]]] | None = None

    @classmethod
    def for_dataset(cls, dataset: Dataset, buckets: Sequence[tuple[int, int]], batch_size: int,
                    seed: int) -> "BatchSampler":
        return cls([item.repeats for item in dataset.items], buckets, batch_size, seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in order (pure: depends only on the inputs and ``epoch``)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, (count, bucket) in enumerate(zip(self.repeats, self.buckets)):
            by_bucket[bucket].extend([index] * count)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            samples = by_bucket[bucket]
            order = torch.randperm(len(samples), generator=generator).tolist()
            shuffled = [samples[i] for i in order]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        order = torch.randperm(len(batches), generator=generator).tolist()
        plan = [batches[i] for i in order]
        self._plan = (epoch, plan)
        return plan

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> "BatchSampler":
        return self

    def __next__(self) -> Batch:
        plan = self.epoch_batches(self.epoch)
        if not plan:
            raise StopIteration
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self.epoch_batches(self.epoch)
        indices = plan[self.position]
        batch = Batch(list(indices), self.buckets[indices[0]], self.epoch, self.position, self.seed)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off. If the dataset changed meanwhile (fingerprint differs),
        the epoch is kept and the position clamped: training goes on rather than failing on resume."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._plan = None
        self.position = min(self.position, len(self.epoch_batches(self.epoch)))

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr((self.repeats, self.buckets, self.batch_size, self.seed)).encode())
        return h.hexdigest()[:16]


def collate(batch: Batch, dataset: Dataset, latents: dict[str, torch.Tensor], identity: str,
            options: DatasetOptions | None = None) -> tuple[torch.Tensor, list[str]]:
    """(latents [B, C, h, w], captions) of one batch, flips and captions drawn from ``batch.random()``."""
    options = options or dataset.options
    rng = batch.random()
    rows, captions = [], []
    for index in batch.indices:
        item = dataset.items[index]
        flipped = options.flip_horizontal and rng.random() < 0.5
        rows.append(latents[latent_key(item.sha256, identity, batch.bucket, flipped)])
        captions.append(process_caption(item.caption, options, rng))
    return torch.stack(rows), captions
