"""The on-disk latent cache (content x VAE x bucket x flip) and the in-memory text-embedding cache."""
from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from trainer.data.captions import caption_texts
from trainer.data.dataset import Dataset, ImageItem
from trainer.data.images import load_image_tensor
from trainer.data.options import DatasetOptions
from trainer.models.handle import Cond, ModelHandle
from trainer.paths import write_atomic


#: Images a latent cache encodes at once, at most. A job encodes no more at once than its batch size: the
#: VAE encoder at full resolution is the peak of an SDXL job on a GPU (4 x 1024 px: several GiB).
LATENT_CACHE_MAX_BATCH = 4


def latent_key(sha256: str, identity: str, bucket: tuple[int, int], flipped: bool = False) -> str:
    """File-name-safe key: image content + VAE identity + bucket + flip."""
    vae = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{sha256}-{vae}-{bucket[0]}x{bucket[1]}{'-flip' if flipped else ''}"


class LatentCache:
    """Latents on disk, one safetensors file per (image content, VAE, bucket, flip).

    Keyed by content, not path: renaming or moving images keeps their latents, editing one image
    re-encodes only that one, and every job on any folder shares the same cache.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.encoded = 0   # images encoded by this object
        self.hits = 0      # latents read from disk by this object

    def path_for(self, key: str) -> Path:
        # Two-character shards keep folders small for large datasets.
        return self.folder / key[:2] / f"{key}.safetensors"

    def get_latents(self, items_with_buckets: Sequence[tuple[ImageItem, tuple[int, int]]],
                    handle: ModelHandle, batch_size: int = 4, flip: bool = False,
                    check_stop: Callable[[], None] = lambda: None) -> dict[str, torch.Tensor]:
        """{latent_key: [C, h/f, w/f] float32 on CPU (f = ``handle.vae_scale``)} for every item (and its mirror image if ``flip``).

        Only what is missing on disk is encoded, in batches that share a bucket. ``check_stop`` runs before
        each batch and raises to stop (a cancel must not wait for a thousand images).
        """
        identity = handle.identity
        wanted: dict[str, tuple[ImageItem, tuple[int, int], bool]] = {}
        for item, bucket in items_with_buckets:
            if not item.sha256:
                raise ValueError(f"{item.path.name}: scanned without hashing (verify=False); cannot cache")
            # A VAE is not equivariant to mirroring, so the flipped image is encoded, not the latent flipped.
            for flipped in ((False, True) if flip else (False,)):
                wanted.setdefault(latent_key(item.sha256, identity, bucket, flipped), (item, bucket, flipped))

        result: dict[str, torch.Tensor] = {}
        missing: dict[tuple[int, int], list[str]] = defaultdict(list)
        for key, (_, bucket, _) in wanted.items():
            latents = self._read(key, bucket, handle.vae_scale)
            if latents is None:
                missing[bucket].append(key)
            else:
                result[key] = latents
                self.hits += 1

        for bucket in sorted(missing):
            keys = missing[bucket]
            for start in range(0, len(keys), max(1, batch_size)):
                chunk = keys[start:start + batch_size]
                check_stop()
                pixels = torch.stack([load_image_tensor(wanted[k][0].path, bucket, wanted[k][2]) for k in chunk])
                with torch.no_grad(), handle.lock():
                    latents = handle.encode_images(pixels).detach().float().cpu()
                for key, latent in zip(chunk, latents):
                    latent = latent.contiguous()
                    self._write(key, latent, identity)
                    result[key] = latent
                self.encoded += len(chunk)
        return result

    def _read(self, key: str, bucket: tuple[int, int], scale: int = 8) -> torch.Tensor | None:
        from safetensors import safe_open

        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                latents = f.get_tensor("latents")
        except Exception:
            # A damaged cache file (disk full, killed copy) is just a miss: it gets re-encoded.
            return None
        if latents.ndim != 3 or tuple(latents.shape[1:]) != (bucket[1] // scale, bucket[0] // scale):
            return None
        return latents

    def _write(self, key: str, latents: torch.Tensor, identity: str) -> None:
        from safetensors.torch import save

        blob = save({"latents": latents}, metadata={"key": key, "identity": identity})
        write_atomic(self.path_for(key), blob)


def caption_keys(dataset: Dataset, buckets: Sequence[tuple[int, int]],
                 options: DatasetOptions) -> list[tuple[str, tuple[int, int]]] | None:
    """Every (text, (height, width)) a step can ask the text cache for, given each image's (width, height)
    bucket; None with shuffled captions."""
    keys = []
    for item, bucket in zip(dataset.items, buckets):
        texts = caption_texts(item.caption, options)
        if texts is None:
            return None
        keys += [(text, (bucket[1], bucket[0])) for text in texts]
    return keys


class TextEmbeddingCache:
    """caption -> Cond while the text encoder is frozen (do not use it when training the text encoder).

    Keyed on the image size too, because SDXL's conditioning carries it (time ids). Bounded (least
    recently used out), because shuffled captions are new strings nearly every step.
    """

    def __init__(self, max_entries: int = 2048):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, tuple[int, int]], Cond] = OrderedDict()
        self._identity: str | None = None
        self.encoded = 0
        self.hits = 0

    def clear(self) -> None:
        self._entries.clear()

    def prime(self, wanted: Sequence[tuple[str, tuple[int, int]]], handle: ModelHandle, batch_size: int = 8,
              check_stop: Callable[[], None] | None = None) -> int:
        """Encode (text, size) pairs a job will ask for before its first step, ``batch_size`` at a time, each
        batch under ``handle.lock()`` (between batches the host may generate). Without it every caption's first
        use costs a text-encoder forward inside a training step. Returns how many were encoded; stops priming
        (keeping what it has) when the cache would overflow."""
        if handle.identity != self._identity:
            self.clear()
            self._identity = handle.identity
        todo = [(t, (int(s[0]), int(s[1]))) for t, s in dict.fromkeys(wanted)]
        todo = [key for key in todo if key not in self._entries][:max(0, self.max_entries - len(self._entries))]
        by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
        for text, size in todo:
            by_size[size].append(text)
        for size, texts in by_size.items():
            for start in range(0, len(texts), batch_size):
                if check_stop is not None:
                    check_stop()
                chunk = texts[start:start + batch_size]
                with handle.lock(), torch.no_grad():
                    cond = handle.encode_prompts(chunk, size).detach()
                for i, text in enumerate(chunk):
                    self._entries[(text, size)] = cond[i:i + 1]
        self.encoded += len(todo)
        return len(todo)

    def get(self, texts: Sequence[str], size: tuple[int, int], handle: ModelHandle) -> Cond:
        """Conditioning for ``texts`` at ``size`` (height, width); misses are encoded in one batch.

        Call it while holding ``handle.lock()`` (as a training step does)."""
        if handle.identity != self._identity:
            self.clear()
            self._identity = handle.identity
        size = (int(size[0]), int(size[1]))
        misses = [t for t in dict.fromkeys(texts) if (t, size) not in self._entries]
        if misses:
            # No handle.lock() here: this runs inside a training step, which already holds the
            # (non-reentrant) model lock.
            with torch.no_grad():
                cond = handle.encode_prompts(list(misses), size).detach()
            for i, text in enumerate(misses):
                self._entries[(text, size)] = cond[i:i + 1]
            self.encoded += len(misses)
        self.hits += len(texts) - len(misses)
        rows = []
        for text in texts:
            self._entries.move_to_end((text, size))
            rows.append(self._entries[(text, size)])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return Cond.cat(rows)
