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
