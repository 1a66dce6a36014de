"""HF HuBERT checkpoint names <-> our parameter paths, and the model a local HF HuBERT directory describes.

The mapping is one declarative table of ``(hf_template, our_template, transform)`` rows; every
transform has an inverse in :data:`TRANSFORMS`, so the exporter walks the same table backwards.
When two HF names map to one path (the positional conv's weight norm), the first row is the
export form: ``parametrizations.weight.original0/1``; the older ``weight_g``/``weight_v`` names
(as published for chinese-hubert-large) are accepted on import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from xemogpt_jax.models import hf_io
from xemogpt_jax.models.hubert import HubertConfig, HubertModel

# name -> (HF tensor -> ours, ours -> HF tensor)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "linear": (lambda w: w.T, lambda k: k.T),  # torch [out, in] <-> (in, out)
    "conv": (lambda w: w.transpose(2, 1, 0), lambda k: k.transpose(2, 1, 0)),  # torch [out, in, k] <-> [k, in, out]
    "weight_norm_g": (lambda g: g.reshape(-1), lambda g: g.reshape(1, 1, -1)),  # torch [1, 1, k] <-> [k]
}

Rule = tuple[str, str, str | None]

_LAYER_LINEARS = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.out_proj",
    "feed_forward.intermediate_dense",
    "feed_forward.output_dense",
)
# Layer-relative rows, shared by the backbone and by any module built from HubertEncoderLayer.
ENCODER_LAYER_RULES: list[Rule] = [
    *[(f"{p}.weight", f"{p.replace('.', '/')}/kernel", "linear") for p in _LAYER_LINEARS],
    *[(f"{p}.bias", f"{p.replace('.', '/')}/bias", None) for p in _LAYER_LINEARS],
    *[(f"{n}.weight", f"{n}/scale", None) for n in ("layer_norm", "final_layer_norm")],
    *[(f"{n}.bias", f"{n}/bias", None) for n in ("layer_norm", "final_layer_norm")],
]

_POS = "encoder.pos_conv_embed.conv"
HUBERT_RULES: list[Rule] = [
    ("feature_extractor.conv_layers.{i}.conv.weight", "feature_extractor/conv_layers/{i}/kernel", "conv"),
    ("feature_extractor.conv_layers.{i}.conv.bias", "feature_extractor/conv_layers/{i}/bias", None),
    ("feature_extractor.conv_layers.{i}.layer_norm.weight", "feature_extractor/conv_layers/{i}/layer_norm/scale", None),
    ("feature_extractor.conv_layers.{i}.layer_norm.bias", "feature_extractor/conv_layers/{i}/layer_norm/bias", None),
    ("feature_projection.layer_norm.weight", "feature_projection/layer_norm/scale", None),
    ("feature_projection.layer_norm.bias", "feature_projection/layer_norm/bias", None),
    ("feature_projection.projection.weight", "feature_projection/projection/kernel", "linear"),
    ("feature_projection.projection.bias", "feature_projection/projection/bias", None),
    (f"{_POS}.parametrizations.weight.original0", "encoder/pos_conv_embed/weight_g", "weight_norm_g"),
    (f"{_POS}.parametrizations.weight.original1", "encoder/pos_conv_embed/weight_v", "conv"),
    (f"{_POS}.weight_g", "encoder/pos_conv_embed/weight_g", "weight_norm_g"),
    (f"{_POS}.weight_v", "encoder/pos_conv_embed/weight_v", "conv"),
    (f"{_POS}.bias", "encoder/pos_conv_embed/bias", None),
    ("encoder.layer_norm.weight", "encoder/layer_norm/scale", None),
    ("encoder.layer_norm.bias", "encoder/layer_norm/bias", None),
    ("masked_spec_embed", "masked_spec_embed", None),
    # the encoder layers are stacked: HF's layer number is a slot of our leading axis, not a path element
    *[(f"encoder.layers.{{i}}.{hf}", f"encoder/layers/{ours}", t) for hf, ours, t in ENCODER_LAYER_RULES],
]


def _compile(rules: list[Rule]) -> list[tuple[re.Pattern[str], str, str | None]]:
    return [(re.compile(re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), ours, t) for hf, ours, t in rules]


def _to_target(template: str, index: str | None, path_prefix: hf_io.StatePath, transform: str | None) -> hf_io.Target:
    """The target of one matched rule: ``{i}`` is a path element (conv layers), or a stacked slot."""
    slot = int(index) if index is not None and "{i}" not in template else None
    parts = template.replace("{i}", index or "").split("/")
    path = path_prefix + tuple(int(p) if p.isdigit() else p for p in parts)
    return hf_io.Target(path, TRANSFORMS[transform][0] if transform else None, slot)


def make_key_map(rules: list[Rule], prefix: str = "", path_prefix: hf_io.StatePath = ()) -> hf_io.KeyMap:
    """A key map for ``hf_io.assign``: names under ``prefix`` matched to ``rules``, paths under ``path_prefix``."""
    compiled = _compile(rules)

    def key_map(name: str) -> hf_io.Target | None:
        if not name.startswith(prefix):
            return None
        name = name[len(prefix) :]
        for pattern, ours, transform in compiled:
            match = pattern.match(name)
            if match:
                return _to_target(ours, match.groupdict().get("i"), path_prefix, transform)
        return None

    return key_map


def hubert_key_map(prefix: str | None = None) -> hf_io.KeyMap:
    """Key map for a HF HubertModel; ``prefix=None`` accepts bare names and the ``hubert.`` of task heads."""
    if prefix is not None:
        return make_key_map(HUBERT_RULES, prefix)
    bare, headed = make_key_map(HUBERT_RULES), make_key_map(HUBERT_RULES, "hubert.")
    return lambda name: headed(name) if name.startswith("hubert.") else bare(name)


def hf_factory(path: str | Path, seed: int = 0, **config_overrides: Any) -> Callable[[], HubertModel]:
    """The HubertModel a HF directory describes (load with :func:`hubert_key_map`; task heads are reported)."""
    config = HubertConfig.from_hf(hf_io.read_config(path), **config_overrides)
    return lambda: HubertModel(config, rngs=nnx.Rngs(seed))
