"""Writing tensor files for PyTorch users one tensor at a time: safetensors (streamed) and torch ``.ckpt``.

The safetensors header comes first and needs every offset, so it is computed from the tensors'
names, shapes and dtypes alone; then each tensor is fetched from the devices, written and dropped.
Peak host memory is one tensor, whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from xemogpt_jax.models.hf_io import SAFETENSORS_DTYPES
from xemogpt_jax.models.xemogpt_params import ExportTensor

_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def _dtype_name(dtype: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name") from None


def write_safetensors(
    path: str | Path, tensors: Sequence[ExportTensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` to one safetensors file, fetching each only when its bytes are due.

    Every process fetches (a fetch may be a collective gather); only process 0 writes the file.
    """
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate tensor names")
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        size = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        header[t.name] = dict(dtype=_dtype_name(t.dtype), shape=list(t.shape), data_offsets=[offset, offset + size])
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path if jax.process_index() == 0 else os.devnull, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            value = t.fetch()
            if value.shape != t.shape or value.dtype != t.dtype:
                raise ValueError(f"{t.name}: fetched {value.shape} {value.dtype}, announced {t.shape} {t.dtype}")
            f.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes())


def write_torch(path: str | Path, tensors: Iterable[ExportTensor]) -> None:
    """A ``torch.save`` state dict (the release's own format); torch needs the whole dict in memory."""
    import torch

    state = {}
    for t in tensors:
        value = t.fetch()
        if value.dtype == ml_dtypes.bfloat16:
            state[t.name] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[t.name] = torch.from_numpy(value.copy())
    if jax.process_index() == 0:
        torch.save(state, path)
