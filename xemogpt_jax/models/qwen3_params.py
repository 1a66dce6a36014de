"""HF <-> ours key mapping for Qwen3/Qwen2, the model a HF directory describes, and its tokenizer.

The mapping is a bijection between HF tensor names and (state path, layer slot) pairs:
:func:`hf_key_map` goes HF -> ours (with the kernel transpose), :func:`hf_name` and
:func:`export_tensors` go back, so an exporter only needs the inverse that lives here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from xemogpt_jax.models import hf_io
from xemogpt_jax.models.hf_io import StatePath, Target
from xemogpt_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

# HF suffix inside ``model.layers.{i}.`` -> our path inside ``layers``; kernels are transposed.
_LAYER_LINEARS = {
    "self_attn.q_proj": ("self_attn", "q_proj"),
    "self_attn.k_proj": ("self_attn", "k_proj"),
    "self_attn.v_proj": ("self_attn", "v_proj"),
    "self_attn.o_proj": ("self_attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"),
    "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
_LAYER_NORMS = {
    "input_layernorm": ("input_layernorm",),
    "post_attention_layernorm": ("post_attention_layernorm",),
    "self_attn.q_norm": ("self_attn", "q_norm"),
    "self_attn.k_norm": ("self_attn", "k_norm"),
}
_GLOBAL = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
    "model.norm.weight": (("norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _transpose(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array.T)


def hf_key_map(name: str) -> Target | None:
    """Where the HF tensor ``name`` goes in our model, or ``None`` for keys we do not hold."""
    if name in _GLOBAL:
        path, transposed = _GLOBAL[name]
        return Target(path, _transpose if transposed else None)
    match = _LAYER_RE.match(name)
    if match is None:
        return None
    index, module, kind = int(match.group(1)), match.group(2), match.group(3)
    if module in _LAYER_LINEARS:
        leaf = "kernel" if kind == "weight" else "bias"
        return Target(("layers", *_LAYER_LINEARS[module], leaf), _transpose if kind == "weight" else None, index)
    if module in _LAYER_NORMS and kind == "weight":
        return Target(("layers", *_LAYER_NORMS[module], "scale"), None, index)
    return None


def _inverse_tables() -> dict[StatePath, tuple[str, bool, bool]]:
    """Our path -> (HF name template, transposed, stacked)."""
    table: dict[StatePath, tuple[str, bool, bool]] = {}
    for name, (path, transposed) in _GLOBAL.items():
        table[path] = (name, transposed, False)
    for hf, ours in _LAYER_LINEARS.items():
        table[("layers", *ours, "kernel")] = (f"model.layers.{{i}}.{hf}.weight", True, True)
        table[("layers", *ours, "bias")] = (f"model.layers.{{i}}.{hf}.bias", False, True)
    for hf, ours in _LAYER_NORMS.items():
        table[("layers", *ours, "scale")] = (f"model.layers.{{i}}.{hf}.weight", False, True)
    return table


_INVERSE = _inverse_tables()


def hf_name(path: StatePath, index: int | None = None) -> str:
    """The HF tensor name of our parameter ``path`` (layer ``index`` for stacked ones)."""
    template, _, stacked = _INVERSE[tuple(path)]
    return template.format(i=index) if stacked else template


def export_tensors(model: Qwen3ForCausalLM) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` for every base parameter, one (layer slot) at a time.

    LoRA adapters are not HF tensors: merge them first (``lora.merge_lora``) to export a plain model.
    """
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        if path not in _INVERSE:
            continue
        template, transposed, stacked = _INVERSE[path]
        value = np.asarray(jax.device_get(variable.get_value()))
        slots = [(template.format(i=i), value[i]) for i in range(value.shape[0])] if stacked else [(template, value)]
        for name, array in slots:
            yield name, _transpose(array) if transposed else array


def hf_factory(path: str | Path, seed: int = 0, **overrides: Any) -> Callable[[], Qwen3ForCausalLM]:
    """The model a HF directory's ``config.json`` describes (``overrides`` set dtype, remat, lora), for
    ``loading.from_hf``."""
    config = Qwen3Config.from_hf(hf_io.read_config(path), **overrides)
    return lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(seed))


def load_tokenizer(path: str | Path) -> Any:
    """The HF tokenizer stored beside the weights (``transformers.AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
