"""What a dataset is read with: the folder and the caption and bucket settings of a job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DatasetOptions:
    folder: str | Path
    caption_extension: str = ".txt"          # ".caption" is tried when this one is missing
    trigger_word: str = ""
    shuffle_captions: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    flip_horizontal: bool = False
    resolution: int = 512
    enable_buckets: bool = True
    bucket_no_upscale: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_step: int = 64
    default_repeats: int = 1


def options_for(job, folder: str | Path | None = None) -> DatasetOptions:
    """The dataset settings of a job (any spec with the dataset fields); ``folder`` overrides its dataset_dir."""
    return DatasetOptions(
        folder=job.dataset_dir if folder is None else folder, caption_extension=job.caption_extension,
        trigger_word=job.trigger_word, shuffle_captions=job.shuffle_captions, keep_tokens=job.keep_tokens,
        caption_dropout=job.caption_dropout, flip_horizontal=job.flip_horizontal, resolution=job.resolution,
        enable_buckets=job.enable_buckets, bucket_no_upscale=job.bucket_no_upscale,
        min_bucket_reso=job.min_bucket_reso, max_bucket_reso=job.max_bucket_reso)
