"""Reading HuggingFace-style checkpoints tensor by tensor, and assigning them into NNX models.

One loader for every family: safetensors (single file or sharded with an index) are memory
mapped and read one tensor at a time; an older ``pytorch_model.bin`` is opened only with
``torch.load(..., weights_only=True)`` so a pickle cannot run code. Each family's key mapping
(``models/<family>_params.py``) turns HF names into paths in our parameter tree.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from xemogpt_jax import sharding

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}

StatePath = tuple[str | int, ...]
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a state path, a transform, and optionally a slot of a stacked axis."""

    path: StatePath
    transform: Transform | None = None
    index: int | None = None


KeyMap = Callable[[str], Target | None]


@dataclass
class LoadReport:
    """What a load used, skipped and left untouched; ``missing`` params keep their initial values."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"loaded {len(self.loaded)} tensors, {len(self.unused)} unused keys, {len(self.missing)} missing params"


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a HF model directory, with a clear error when absent."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no config.json; expected a HuggingFace model directory")
    return json.loads(config_file.read_text())


def _safetensors_header(file: Path) -> tuple[dict[str, Any], int]:
    """The tensor entries of a safetensors header and the byte offset where the data starts."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _read_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    header, offset = _safetensors_header(file)
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=offset)
    for name, info in header.items():
        dtype = info["dtype"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        start, end = info["data_offsets"]
        yield name, data[start:end].view(SAFETENSORS_DTYPES[dtype]).reshape(info["shape"])


def _describe(value: Any) -> str:
    """What a torch file holds at its top level, for a refusal message: key -> type of the first keys."""
    if not isinstance(value, Mapping):
        return type(value).__name__
    items = [f"{k!r}: {type(v).__name__}" for k, v in itertools.islice(value.items(), 12)]
    more = f", ... ({len(value)} keys)" if len(value) > 12 else ""
    return "{" + ", ".join(items) + more + "}"


def torch_state_dict(loaded: Any, file: Path) -> Mapping[str, Any]:
    """The tensors of a loaded torch file: a bare state dict, or the one under ``state_dict``.

    The release's loader read ``ckpt["state_dict"]`` until June 2026 (Lightning-style files with
    ``epoch``, ``global_step``, ...) and a bare state dict since; files of both shapes exist.
    """
    import torch

    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if isinstance(state, Mapping) and state and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        return state
    raise ValueError(
        f"{file}: not a state dict (name -> tensor), bare or under 'state_dict'; found {_describe(loaded)}"
    )


def _load_torch(file: Path) -> Mapping[str, Any]:
    import torch

    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError subclasses and RuntimeError here
        raise ValueError(f"{file}: refused to load: not a plain tensor checkpoint ({e})") from e
    return torch_state_dict(loaded, file)


def _read_torch_bin(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    import torch

    for name, tensor in _load_torch(file).items():
        if tensor.dtype == torch.bfloat16:
            yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, tensor.numpy()


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a HF directory, or the file itself."""
    path = Path(path)
    if path.is_file():
        return [path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded index or pytorch_model.bin found")


def iter_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for every tensor of a checkpoint, one at a time."""
    for file in checkpoint_files(path):
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_torch_bin
        yield from reader(file)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor of a checkpoint, without reading tensor data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            shapes.update((k, tuple(v["shape"])) for k, v in _safetensors_header(file)[0].items())
        else:
            shapes.update((k, tuple(v.shape)) for k, v in _load_torch(file).items())
    return shapes


def _flat_params(model: nnx.Module) -> dict[StatePath, nnx.Variable]:
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assign(
    model: nnx.Module,
    tensors: Iterable[tuple[str, np.ndarray]],
    key_map: KeyMap,
    mesh: Mesh | None = None,
) -> LoadReport:
    """Copy tensors into ``model`` in place, each placed with its parameter's sharding.

    A stacked (scanned-layer) parameter is filled slot by slot in one host buffer and placed
    once its last slot arrives. Refuses shape mismatches, naming the key and both shapes.
    ``missing`` lists parameters (or stacked slots) that no tensor reached.
    """
    params = _flat_params(model)
    report = LoadReport()
    touched: set[StatePath] = set()
    pending: dict[StatePath, tuple[np.ndarray, set[int]]] = {}
    for name, array in tensors:
        target = key_map(name)
        if target is None or target.path not in params:
            report.unused.append(name)
            continue
        variable = params[target.path]
        value = np.asarray(target.transform(array) if target.transform else array)
        full_shape = variable.get_value().shape
        expected = full_shape if target.index is None else full_shape[1:]
        if tuple(value.shape) != tuple(expected):
            where = "/".join(map(str, target.path)) + ("" if target.index is None else f"[{target.index}]")
            raise ValueError(
                f"shape mismatch for {name!r} -> {where}: checkpoint {tuple(value.shape)}, model {tuple(expected)}"
            )
        report.loaded.append(name)
        touched.add(target.path)
        dtype = variable.get_value().dtype
        if target.index is None:
            _place(variable, value.astype(dtype), mesh)
            continue
        buffer, slots = pending.setdefault(target.path, (_host_copy(variable), set()))
        buffer[target.index] = value
        slots.add(target.index)
        if len(slots) == full_shape[0]:
            _place(variable, buffer, mesh)
            del pending[target.path]
    for path, (buffer, slots) in pending.items():
        _place(params[path], buffer, mesh)
        report.missing.extend(f"{'/'.join(map(str, path))}[{i}]" for i in range(buffer.shape[0]) if i not in slots)
    report.missing.extend("/".join(map(str, path)) for path in params if path not in touched)
    return report


def _host_copy(variable: nnx.Variable) -> np.ndarray:
    """The variable's value on the host; zeros for an abstract (``nnx.eval_shape``) one."""
    value = variable.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
        return np.zeros(value.shape, value.dtype)
    return np.array(jax.device_get(value))


def _place(variable: nnx.Variable, value: np.ndarray, mesh: Mesh | None) -> None:
    placement = sharding.variable_sharding(variable, mesh) if mesh is not None else None
    variable.set_value(jax.device_put(value, placement))
