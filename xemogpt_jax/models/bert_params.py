"""HF BERT checkpoint names -> paths in :class:`xemogpt_jax.models.bert.BertModel`.

Accepts bare ``BertModel`` keys and the ``bert.``-prefixed keys of task heads, and the old
TF-era ``gamma``/``beta`` LayerNorm names found in early checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from xemogpt_jax.models import hf_io
from xemogpt_jax.models.bert import BertConfig, BertModel
from xemogpt_jax.models.layers import DType

_PARAM_NAMES = {"weight": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias"}
_NORM_NAMES = {"weight": "scale", "bias": "bias", "gamma": "scale", "beta": "bias"}

_EMBEDDINGS = {
    "word_embeddings.weight": ("embeddings", "word", "embedding"),
    "position_embeddings.weight": ("embeddings", "position", "embedding"),
    "token_type_embeddings.weight": ("embeddings", "token_type", "embedding"),
}

_LAYER_MODULES = {
    "attention.self.query": ("attention", "q_proj"),
    "attention.self.key": ("attention", "k_proj"),
    "attention.self.value": ("attention", "v_proj"),
    "attention.output.dense": ("attention", "out_proj"),
    "attention.output.LayerNorm": ("attention_norm",),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("output",),
    "output.LayerNorm": ("output_norm",),
}

_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def bert_key_map(name: str) -> hf_io.Target | None:
    """Target of one HF BERT tensor, or None for buffers and heads we do not hold."""
    name = name.removeprefix("bert.")
    if name.startswith("embeddings."):
        rest = name.removeprefix("embeddings.")
        if rest in _EMBEDDINGS:
            return hf_io.Target(_EMBEDDINGS[rest])
        module, _, leaf = rest.rpartition(".")
        if module == "LayerNorm" and leaf in _NORM_NAMES:
            return hf_io.Target(("embeddings", "norm", _NORM_NAMES[leaf]))
        return None
    if name.startswith("pooler.dense."):
        leaf = name.removeprefix("pooler.dense.")
        return hf_io.Target(("pooler", _PARAM_NAMES[leaf]), _transpose if leaf == "weight" else None)
    match = _LAYER_KEY.match(name)
    if match is None:
        return None
    index, module, leaf = int(match.group(1)), match.group(2), match.group(3)
    if module not in _LAYER_MODULES:
        return None
    path = ("layers", index, *_LAYER_MODULES[module])
    if module.endswith("LayerNorm"):
        return hf_io.Target((*path, _NORM_NAMES[leaf]))
    return hf_io.Target((*path, _PARAM_NAMES[leaf]), _transpose if leaf == "weight" else None)


def load_bert(
    path: str | Path,
    *,
    add_pooling_layer: bool = True,
    dtype: DType = jnp.float32,
    mesh: Mesh | None = None,
    strict: bool = True,
) -> tuple[BertModel, hf_io.LoadReport]:
    """Build a BertModel from a HF directory (config.json + weights) and fill it.

    ``strict`` refuses a checkpoint that leaves any parameter untouched, so a renamed key
    cannot silently leave random weights in place.
    """
    config = BertConfig.from_hf(hf_io.read_config(path))
    model = nnx.eval_shape(
        lambda: BertModel(config, rngs=nnx.Rngs(0), add_pooling_layer=add_pooling_layer, dtype=dtype)
    )
    report = hf_io.assign(model, hf_io.iter_tensors(path), bert_key_map, mesh)
    if strict and report.missing:
        raise ValueError(f"{path}: checkpoint leaves parameters unset: {report.missing}")
    _zero_unset(model)
    return model, report


def _zero_unset(model: nnx.Module) -> None:
    """Give parameters no tensor reached (only when not strict) zero buffers instead of abstract shapes."""
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = variable.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            variable.set_value(jnp.zeros(value.shape, value.dtype))
