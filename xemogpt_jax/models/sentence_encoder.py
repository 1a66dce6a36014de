"""Run a sentence-transformers folder in JAX, module by module as its ``modules.json`` says.

Supported modules: ``Transformer`` (a BERT-family encoder, with ``sentence_bert_config.json``'s
``max_seq_length`` and ``do_lower_case``), ``Pooling`` (cls, mean, max, mean_sqrt_len_tokens,
weightedmean, lasttoken, or several concatenated), ``Dense`` (weights ``linear.weight/bias``
plus an activation such as LaBSE's tanh) and ``Normalize``. Anything else is refused by name,
so a folder we cannot reproduce never yields silently different embeddings.

``encode`` groups sentences by length bucket (so one long sentence does not pad a whole batch),
pads each batch to its bucket and its row count to a power of two (at most the batch size), so the
jitted function compiles once per (rows, bucket) pair, not once per batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xemogpt_jax.models import hf_io
from xemogpt_jax.models.bert import BertModel
from xemogpt_jax.models.bert_params import load_bert
from xemogpt_jax.models.layers import Linear, activation

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# torch activation class name (as Dense's config stores it) -> our activation.
_DENSE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Identity": lambda x: x,
    "Tanh": activation("tanh"),
    "ReLU": activation("relu"),
    "GELU": activation("gelu"),
    "SiLU": activation("silu"),
    "Sigmoid": jax.nn.sigmoid,
}
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """The pooling modes of a ``1_Pooling/config.json``, new (``pooling_mode``) or legacy (booleans) form."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key, False)) or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ValueError(f"unsupported pooling modes {unknown}; known: {POOLING_MODES}")
    return modes


def pool(hidden: jax.Array, mask: jax.Array, modes: Sequence[str]) -> jax.Array:
    """Sentence vectors from token vectors [B,T,D] and a right-padded mask [B,T], modes concatenated."""
    maskf = mask.astype(hidden.dtype)[..., None]
    counts = jnp.maximum(maskf.sum(1), 1e-9)
    outputs = []
    for mode in modes:
        if mode == "cls":
            first = jnp.argmax(mask, axis=1)
            outputs.append(jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0])
        elif mode == "max":
            outputs.append(jnp.where(maskf > 0, hidden, -jnp.inf).max(1))
        elif mode == "mean":
            outputs.append((hidden * maskf).sum(1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            outputs.append((hidden * maskf).sum(1) / jnp.sqrt(counts))
        elif mode == "weightedmean":
            weights = maskf * jnp.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None]
            outputs.append((hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9))
        elif mode == "lasttoken":
            last = jnp.maximum(mask.astype(jnp.int32).sum(1) - 1, 0)
            outputs.append(jnp.take_along_axis(hidden * maskf, last[:, None, None], axis=1)[:, 0])
        else:
            raise ValueError(f"unsupported pooling mode {mode!r}")
    return jnp.concatenate(outputs, axis=-1)


class Dense(nnx.Module):
    """sentence-transformers ``Dense``: activation(x @ W + b)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, activation_name: str, rngs: nnx.Rngs):
        if activation_name not in _DENSE_ACTIVATIONS:
            raise ValueError(f"unsupported Dense activation {activation_name!r}; known: {sorted(_DENSE_ACTIVATIONS)}")
        self.linear = Linear(in_features, out_features, axes=("embed", None), rngs=rngs, use_bias=use_bias)
        self.activation_name = activation_name

    def __call__(self, x: jax.Array) -> jax.Array:
        return _DENSE_ACTIVATIONS[self.activation_name](self.linear(x))


def load_dense(folder: Path) -> Dense:
    """A ``Dense`` module folder: ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("use_residual", False):
        raise ValueError(f"{folder}: Dense with use_residual is not supported")
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"{folder}: Dense over {config['module_input_name']!r} is not supported")
    activation_name = config.get("activation_function", "torch.nn.modules.activation.Tanh").rsplit(".", 1)[-1]
    dense = Dense(
        config["in_features"],
        config["out_features"],
        use_bias=config.get("bias", True),
        activation_name=activation_name,
        rngs=nnx.Rngs(0),
    )

    def key_map(name: str) -> hf_io.Target | None:
        if name == "linear.weight":
            return hf_io.Target(("linear", "kernel"), lambda a: a.T)
        if name == "linear.bias":
            return hf_io.Target(("linear", "bias"))
        return None

    report = hf_io.assign(dense, hf_io.iter_tensors(folder), key_map)
    if report.missing:
        raise ValueError(f"{folder}: Dense weights missing {report.missing}")
    return dense


class SentencePipeline(nnx.Module):
    """Transformer -> Pooling -> Dense* -> Normalize?, as one jittable module."""

    def __init__(self, bert: BertModel, modes: tuple[str, ...], denses: list[Dense], normalize: bool):
        self.bert = bert
        self.modes = modes
        self.denses = nnx.List(denses)
        self.normalize = normalize

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
        x = pool(hidden.astype(jnp.float32), attention_mask, self.modes)
        for dense in self.denses:
            x = dense(x)
        if self.normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x


@dataclass(frozen=True)
class TransformerSettings:
    path: Path
    max_seq_length: int | None
    do_lower_case: bool


def _module_kind(entry: dict[str, Any]) -> str:
    return entry["type"].rsplit(".", 1)[-1]


def _transformer_settings(folder: Path) -> TransformerSettings:
    config_file = folder / "sentence_bert_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return TransformerSettings(folder, config.get("max_seq_length"), bool(config.get("do_lower_case", False)))


def _load_tokenizer(settings: TransformerSettings, max_positions: int) -> Any:
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(settings.path))
    limit = settings.max_seq_length if settings.max_seq_length is not None else tokenizer.model_max_length
    tokenizer.model_max_length = min(int(limit), max_positions)
    if settings.do_lower_case:
        normalizer = tokenizer.backend_tokenizer.normalizer
        if "lowercase" not in repr(normalizer).lower():
            existing = [] if normalizer is None else [normalizer]
            tokenizer.backend_tokenizer.normalizer = NormalizerSequence([Lowercase(), *existing])
    return tokenizer


def output_width(path: str | Path) -> int:
    """Width of a folder's sentence embeddings, read from its module configs (no weights are loaded).

    Sizes the heads that consume them (the AECB text projection) from the encoder itself.
    """
    folder = Path(path)
    entries = sorted(json.loads((folder / "modules.json").read_text()), key=lambda e: e["idx"])
    hidden = hf_io.read_config(folder / entries[0]["path"])["hidden_size"]
    width = hidden
    for entry in entries[1:]:
        config_file = folder / entry["path"] / "config.json"
        if _module_kind(entry) == "Pooling":
            width = len(pooling_modes(json.loads(config_file.read_text()))) * hidden
        elif _module_kind(entry) == "Dense":
            width = json.loads(config_file.read_text())["out_features"]
    return int(width)


class SentenceEncoder:
    """A sentence-transformers folder as a tokenizer plus one jitted JAX pipeline."""

    def __init__(self, tokenizer: Any, pipeline: SentencePipeline, buckets: Sequence[int] = DEFAULT_BUCKETS):
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.max_length = int(tokenizer.model_max_length)
        self.buckets = tuple(sorted({b for b in buckets if b < self.max_length} | {self.max_length}))
        graphdef, state = nnx.split(pipeline)
        self._state = state
        self._forward = jax.jit(lambda st, ids, mask, tt: nnx.merge(graphdef, st)(ids, mask, tt))

    @classmethod
    def from_folder(cls, path: str | Path, *, buckets: Sequence[int] = DEFAULT_BUCKETS) -> SentenceEncoder:
        folder = Path(path)
        modules_file = folder / "modules.json"
        if not modules_file.is_file():
            raise FileNotFoundError(f"{modules_file}: not a sentence-transformers folder")
        entries = sorted(json.loads(modules_file.read_text()), key=lambda e: e["idx"])
        kinds = [_module_kind(e) for e in entries]
        if not kinds or kinds[0] != "Transformer" or "Pooling" not in kinds:
            raise ValueError(f"{folder}: expected Transformer then Pooling modules, found {kinds}")
        settings = _transformer_settings(folder / entries[0]["path"])
        bert, _ = load_bert(settings.path, add_pooling_layer=False)
        modes: tuple[str, ...] | None = None
        denses: list[Dense] = []
        normalize = False
        for entry, kind in zip(entries[1:], kinds[1:]):
            module_dir = folder / entry["path"]
            if kind == "Pooling" and modes is None and not denses and not normalize:
                modes = pooling_modes(json.loads((module_dir / "config.json").read_text()))
            elif kind == "Dense" and modes is not None and not normalize:
                denses.append(load_dense(module_dir))
            elif kind == "Normalize" and modes is not None and not normalize:
                normalize = True
            else:
                raise ValueError(
                    f"{folder}: unsupported module {entry['type']!r} at position {entry['idx']} "
                    "(supported: Transformer, Pooling, Dense*, Normalize, in that order)"
                )
        tokenizer = _load_tokenizer(settings, bert.config.max_position_embeddings)
        return cls(tokenizer, SentencePipeline(bert, modes, denses, normalize), buckets)

    def _bucket(self, length: int) -> int:
        return next(b for b in self.buckets if b >= length)

    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings [N, D] float32, in the order given."""
        sentences = list(sentences)
        if not sentences:
            return np.zeros((0, self.dimension), np.float32)
        tokens = self.tokenizer(sentences, truncation=True, max_length=self.max_length)
        ids, types = tokens["input_ids"], tokens.get("token_type_ids")
        buckets = np.array([self._bucket(len(x)) for x in ids])
        out = np.zeros((len(sentences), self.dimension), np.float32)
        for length in np.unique(buckets):
            members = np.flatnonzero(buckets == length)
            members = members[np.argsort([-len(ids[i]) for i in members], kind="stable")]
            for start in range(0, len(members), batch_size):
                rows = members[start : start + batch_size]
                out[rows] = self._encode_batch(rows, int(length), batch_size, ids, types)
        return out

    def _encode_batch(
        self, rows: np.ndarray, length: int, batch_size: int, ids: list, types: list | None
    ) -> np.ndarray:
        slots = min(batch_size, 1 << (len(rows) - 1).bit_length())
        batch_ids = np.full((slots, length), self.tokenizer.pad_token_id or 0, np.int32)
        batch_mask = np.zeros((slots, length), np.int32)
        batch_types = np.zeros((slots, length), np.int32)
        for slot, i in enumerate(rows):
            n = len(ids[i])
            batch_ids[slot, :n] = ids[i]
            batch_mask[slot, :n] = 1
            if types is not None:
                batch_types[slot, :n] = types[i]
        vectors = self._forward(self._state, batch_ids, batch_mask, batch_types)
        return np.asarray(vectors)[: len(rows)]

    @property
    def dimension(self) -> int:
        hidden = self.pipeline.bert.config.hidden_size
        dims = len(self.pipeline.modes) * hidden
        if self.pipeline.denses:
            dims = self.pipeline.denses[-1].linear.kernel.get_value().shape[1]
        return dims
