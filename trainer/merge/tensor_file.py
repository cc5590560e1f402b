"""Single-file checkpoints streamed, one tensor at a time: read by plain reads (:class:`TensorFile`) and written
(:func:`header_bytes`, :func:`tensor_bytes`), so a multi-GB checkpoint is never held whole, nor twice."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Mapping

import torch

from trainer.lora import files as lora_files
from trainer.merge.svd_merge import MergeError
from trainer.models.single_file import SAFETENSORS_DTYPES


class TensorFile:
    """One tensor at a time from a ``.safetensors`` file, by plain reads (no memory map): the process holds only
    the tensors being worked on, not the pages of two multi-GB files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            header, self.offset = lora_files.read_header(self.path)
        except lora_files.LoraFileError as e:
            raise MergeError(str(e)) from None
        self.metadata = dict(header.pop("__metadata__", None) or {})
        self.entries = header
        self._file = open(self.path, "rb")

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str, row: int | None = None) -> torch.Tensor:
        """The tensor ``key``; with ``row``, only its row block ``row`` of 3 (OpenCLIP's fused q/k/v)."""
        entry = self.entries[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise MergeError(f"{self.path.name}: {key} is stored as {entry['dtype']}, not a float type")
        start, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if row is not None:
            block = (end - start) // 3
            start, end, shape[0] = start + row * block, start + (row + 1) * block, shape[0] // 3
        buffer = bytearray(end - start)
        self._file.seek(self.offset + start)
        self._file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if buffer else torch.zeros(shape, dtype=dtype)

    def copy_to(self, key: str, out: BinaryIO, chunk: int = 16 << 20) -> None:
        """The stored bytes of ``key`` written to ``out`` as they are (a tensor passed through unchanged)."""
        start, end = self.entries[key]["data_offsets"]
        self._file.seek(self.offset + start)
        left = end - start
        while left:
            data = self._file.read(min(left, chunk))
            if not data:
                raise MergeError(f"{self.path.name} ended inside tensor {key}: the file is truncated")
            out.write(data)
            left -= len(data)


def header_bytes(layout: Mapping[str, dict], metadata: Mapping[str, str]) -> bytes:
    """A safetensors header for ``layout`` ({key: {"dtype", "shape", "data_offsets"}}, in data order): its 8-byte
    length and the JSON, padded so the data starts 8-byte aligned as safetensors writes it."""
    head = json.dumps({"__metadata__": dict(metadata), **layout}, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes as safetensors stores them (little-endian, C order)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
