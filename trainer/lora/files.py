"""Reading and writing kohya-format LoRA safetensors files, safely.

We read safetensors only (never pickle), check the header before trusting it, and write atomically
(temporary name, fsync, rename) so a crash never leaves a half-written LoRA under its real name.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from trainer.paths import write_atomic

MAX_HEADER_BYTES = 100 * 1024 * 1024


class LoraFileError(ValueError):
    """A LoRA file cannot be used; the message names the file and the problem."""


def read_header(path: str | Path) -> tuple[dict, int]:
    """Validated safetensors header (tensor entries + ``__metadata__``) and the data offset.

    Refuses pickle/zip checkpoints without unpickling them, and truncated files.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFileError(f"{path.name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            # torch.save writes a zip ("PK"); older checkpoints are raw pickles (0x80, protocol byte).
            if head[:2] == b"PK" or (head[0] == 0x80 and head[1] in range(2, 6)):
                raise LoraFileError(f"{path.name}: this is a pickle (.ckpt/.pt) file; LoRA Queue loads "
                                    ".safetensors only, because pickle files can run code when loaded")
            raise LoraFileError(f"{path.name}: not a safetensors file, or truncated (header of {n} bytes "
                                f"in a file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{path.name}: not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name}: not a safetensors file (header is not a table)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise LoraFileError(f"{path.name}: truncated: the header promises {8 + n + end} bytes, the file has {size}; "
                            "the download or copy did not finish")
    return header, 8 + n


def read_metadata(path: str | Path) -> dict[str, str]:
    header, _ = read_header(path)
    return dict(header.get("__metadata__") or {})


def safetensors_data_hash(blob: bytes) -> str:
    """sha256 of the tensor bytes after the header (kohya's ``sshs_model_hash``, A1111's addnet hash)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def legacy_hash(blob: bytes) -> str:
    """kohya's ``sshs_legacy_hash``: first 8 hex of sha256 over the 64 KiB at offset 1 MiB of the file."""
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


_LEGACY_PLACEHOLDER = "?" * 8


def write_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Serialise with hashes of exactly the bytes written, then write atomically.

    The tensor bytes do not depend on the header, so ``sshs_model_hash`` is known before the header is
    final; the legacy hash covers a fixed file offset, so it is computed with a same-length placeholder
    in the header (the offsets do not move) and written over it.
    """
    digest = safetensors_data_hash(save(tensors))
    meta = {k: str(v) for k, v in metadata.items()}
    meta.update({"sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest,
                 "sshs_legacy_hash": _LEGACY_PLACEHOLDER})
    blob = bytearray(save(tensors, metadata=meta))
    (n,) = struct.unpack("<Q", blob[:8])
    header = bytes(blob[8:8 + n]).replace(f'"{_LEGACY_PLACEHOLDER}"'.encode(), f'"{legacy_hash(bytes(blob))}"'.encode(), 1)
    blob[8:8 + n] = header
    if safetensors_data_hash(bytes(blob)) != digest:  # the tensor bytes must not depend on the header
        raise RuntimeError("safetensors changed the tensor bytes when metadata was added")
    return write_atomic(path, bytes(blob))
