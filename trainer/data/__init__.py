"""Training data: image folders, captions, aspect buckets, latent and text-embedding caches, batches.

The pieces, in the order a training run uses them:

1. ``scan_dataset(options)`` (``dataset``) walks the folder once: images, captions, repeats, sizes, hashes.
2. ``assign_buckets(dataset, options)`` (``buckets``) gives every image a (width, height) bucket.
3. ``LatentCache.get_latents`` (``caches``) encodes each (image, bucket, flip) once per VAE, ever: files on
   disk keyed by content, so a second job on the same images starts training at once.
4. ``BatchSampler`` (``sampler``) yields same-bucket batches in a seeded order a resumed run continues.
5. ``process_caption`` (``captions``) turns a caption into one sample's text (trigger word, shuffle,
   dropout); ``TextEmbeddingCache`` avoids re-encoding it while the text encoder is frozen.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# Names -> the module holding them. Loaded on first use (PEP 562): the scan (``dataset``) needs no torch,
# so checking a dataset when a job is queued does not pay for importing it.
_WHERE = {
    "assign_buckets": "buckets", "bucket_for": "buckets", "make_buckets": "buckets",
    "LatentCache": "caches", "TextEmbeddingCache": "caches", "latent_key": "caches",
    "caption_keys": "caches", "caption_texts": "captions", "process_caption": "captions", "split_tags": "captions",
    "IMAGE_EXTENSIONS": "dataset", "Dataset": "dataset", "DatasetError": "dataset", "ImageItem": "dataset",
    "read_caption": "dataset", "scan_dataset": "dataset",
    "load_image_tensor": "images", "open_rgb": "images", "resize_and_crop": "images",
    "DatasetOptions": "options", "options_for": "options",
    "Batch": "sampler", "BatchSampler": "sampler", "collate": "sampler",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
    return getattr(import_module(f"trainer.data.{_WHERE[name]}"), name)


__all__ = [
    "IMAGE_EXTENSIONS", "Batch", "BatchSampler", "Dataset", "DatasetError", "DatasetOptions", "ImageItem",
    "LatentCache", "TextEmbeddingCache", "assign_buckets", "bucket_for", "caption_keys", "caption_texts", "collate", "latent_key",
    "load_image_tensor",
    "make_buckets", "open_rgb", "process_caption", "read_caption", "resize_and_crop", "scan_dataset", "split_tags",
]
