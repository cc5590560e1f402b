"""The CLIP BPE tokenizer, built offline from the vocabulary file open-clip-torch ships.

``openai/clip-vit-large-patch14`` (SD1, SDXL ``tokenizer``) and the OpenCLIP tokenizers of SD2 and
SDXL ``tokenizer_2`` share one vocabulary: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``. The PyPI
package open-clip-torch carries that file; we read it without importing open_clip (its torchvision
dependency does not install alongside our torch). ``vocab.json`` and ``merges.txt`` are derived
exactly as OpenAI's ``SimpleTokenizer`` does and cached on disk; only the pad token differs:
``<|endoftext|>`` for CLIP-L, ``!`` for the OpenCLIP tokenizers (as the diffusers repos configure them).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from trainer.models.handle import ModelError
from trainer.paths import cache_dir, write_atomic

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
#: Pad tokens per architecture and tokenizer slot.
PAD_CLIP_L = "<|endoftext|>"
PAD_OPEN_CLIP = "!"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode character map (256 entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def vocab_and_merges(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` and the merge lines from the lines of ``bpe_simple_vocab_16e6.txt``."""
    merges = bpe_lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise ModelError(f"the CLIP vocabulary file gave {len(tokens)} tokens, expected {VOCAB_SIZE}; "
                         "reinstall open-clip-torch (pip install --no-deps open-clip-torch)")
    return {t: i for i, t in enumerate(tokens)}, merges


def find_bpe_file() -> Path:
    """The vocabulary file inside the installed open-clip-torch package (never imported)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / VOCAB_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ModelError("the CLIP tokenizer vocabulary was not found: install it with "
                     "`pip install --no-deps open-clip-torch` (it ships bpe_simple_vocab_16e6.txt.gz)")


def default_cache_dir() -> Path:

    return cache_dir() / "clip_tokenizer"


def write_tokenizer_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (once) and return their folder."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return folder
    lines = gzip.open(find_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    vocab, merges = vocab_and_merges(lines)
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in ((vocab_path, json.dumps(vocab, ensure_ascii=False)),
                       (merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")):
        write_atomic(path, text.encode("utf-8"))
    return folder


def clip_tokenizer(pad_token: str = PAD_CLIP_L, cache_dir: str | os.PathLike | None = None):
    """A ``CLIPTokenizer`` (77 tokens) equal to the official one, built without a model hub."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(cache_dir)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)
