"""Captions into training text: tags, trigger word, shuffle with kept tokens, dropout (pure)."""
from __future__ import annotations

import dataclasses
import random

from trainer.data.options import DatasetOptions


def split_tags(caption: str) -> list[str]:
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def caption_texts(caption: str, options: DatasetOptions) -> list[str] | None:
    """Every text :func:`process_caption` can make of ``caption``, or None when shuffling makes too many to list.

    Lets a job with a frozen text encoder encode its captions once before the first step, as kohya's
    ``--cache_text_encoder_outputs`` does (which refuses shuffled captions for the same reason)."""
    if options.shuffle_captions:
        return None
    kept = process_caption(caption, dataclasses.replace(options, caption_dropout=0.0), random.Random(0))
    return [kept, ""] if options.caption_dropout > 0 else [kept]


def process_caption(caption: str, options: DatasetOptions, rng: random.Random) -> str:
    """The text of one training sample: dropout, then trigger word first, then shuffled tags.

    ``keep_tokens`` counts the caption's leading tags, not the trigger word (which always leads).
    Without shuffling the caption text is kept as written, so prose captions are not re-punctuated.
    """
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    trigger = options.trigger_word.strip()
    tags = split_tags(caption)
    if not options.shuffle_captions:
        if not trigger or trigger in tags:
            return caption.strip()
        return f"{trigger}, {caption.strip()}" if tags else trigger
    tags = [tag for tag in tags if tag != trigger]
    kept, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(([trigger] if trigger else []) + kept + rest)
