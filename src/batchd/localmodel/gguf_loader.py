"""GGUF files: metadata and tensors, dequantized to float32 with numpy.

The SmolLM2 file holds Q4_1 matrices, one Q8_0 matrix (the token embeddings, tied with the
output head) and F32 norms. Dequantizing once at load costs ~0.5 GB of RAM for the 135M
parameters and lets every step run float32 BLAS matmuls over the whole batch.

Block layouts (ggml, 32 weights a block, little-endian)::

    Q4_1  f16 d, f16 m, 16 bytes of nibbles   w = d * q + m   (low nibbles are weights 0-15)
    Q8_0  f16 d, 32 int8                      w = d * q
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader

F32 = npt.NDArray[np.float32]

_BLOCK = 32


def dequantize_q4_1(raw: npt.NDArray[np.uint8], rows: int, cols: int) -> F32:
    blocks = np.ascontiguousarray(raw).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(rows, cols)


def dequantize_q8_0(raw: npt.NDArray[np.uint8], rows: int, cols: int) -> F32:
    blocks = np.ascontiguousarray(raw).reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, cols)


class LazyTensors(Mapping[str, F32]):
    """A GGUF file's tensors by name, dequantized when looked up (not kept): a model built
    from it holds one float32 copy of its weights, not two, even at load time."""

    def __init__(self, reader: GGUFReader) -> None:
        self._tensors = {str(t.name): t for t in reader.tensors}

    def __getitem__(self, name: str) -> F32:
        return _tensor_to_f32(self._tensors[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass(frozen=True, slots=True)
class GGUFModel:
    """A GGUF file's metadata (plain Python values) and its tensors as float32 arrays
    in numpy's row-major layout: a matrix ``[ne0, ne1]`` is an array ``(ne1, ne0)``."""

    metadata: dict[str, Any]
    tensors: Mapping[str, F32]


def _tensor_to_f32(tensor: Any) -> F32:
    shape = [int(n) for n in tensor.shape]  # ne0 (columns) first
    cols = shape[0]
    rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    kind = tensor.tensor_type
    data = tensor.data
    if kind == GGMLQuantizationType.F32:
        out = np.array(data, dtype=np.float32)
    elif kind == GGMLQuantizationType.F16:
        out = np.array(data, dtype=np.float16).astype(np.float32)
    elif kind == GGMLQuantizationType.Q4_1:
        out = dequantize_q4_1(data, rows, cols)
    elif kind == GGMLQuantizationType.Q8_0:
        out = dequantize_q8_0(data, rows, cols)
    else:
        raise ValueError(f"GGUF tensor {tensor.name}: type {kind.name} is not supported")
    if len(shape) == 1:
        return out.reshape(cols)
    return out.reshape(*reversed(shape))


def load_gguf(path: Path) -> GGUFModel:
    """Read every metadata key and tensor of a GGUF file."""
    reader = GGUFReader(str(path))
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = field.contents()
    return GGUFModel(metadata=metadata, tensors=LazyTensors(reader))
