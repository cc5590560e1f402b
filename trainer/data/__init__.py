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

from trainer.data.buckets import assign_buckets, bucket_for, make_buckets
from trainer.data.caches import LatentCache, TextEmbeddingCache, latent_key
from trainer.data.captions import process_caption, split_tags
from trainer.data.dataset import IMAGE_EXTENSIONS, Dataset, DatasetError, ImageItem, read_caption, scan_dataset
from trainer.data.images import load_image_tensor, open_rgb, resize_and_crop
from trainer.data.options import DatasetOptions
from trainer.data.sampler import Batch, BatchSampler, collate

__all__ = [
    "IMAGE_EXTENSIONS", "Batch", "BatchSampler", "Dataset", "DatasetError", "DatasetOptions", "ImageItem",
    "LatentCache", "TextEmbeddingCache", "assign_buckets", "bucket_for", "collate", "latent_key", "load_image_tensor",
    "make_buckets", "open_rgb", "process_caption", "read_caption", "resize_and_crop", "scan_dataset", "split_tags",
]
