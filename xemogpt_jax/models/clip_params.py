"""HF CLIP checkpoint <-> our parameter tree: one invertible rules table, and the models HF directories describe.

Each rule pairs a HF key template with our dotted-path template and a named transform, so the
same table serves import (:func:`key_map`) and export (:func:`hf_key_for`, with
``TRANSFORMS[kind].inverse``). ``loading.from_hf`` builds a model abstractly and fills it tensor by
tensor, so no random initialisation is materialised.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xemogpt_jax.models import hf_io
from xemogpt_jax.models.clip import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from xemogpt_jax.models.layers import DType


@dataclass(frozen=True)
class Transform:
    """A checkpoint -> model array transform and its inverse (model -> checkpoint)."""

    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(lambda w: w, lambda w: w),
    # torch Linear weight (out, in) <-> our kernel (in, out)
    "linear": Transform(lambda w: w.T, lambda w: w.T),
    # torch Conv2d weight (out, in, kh, kw) <-> our patch kernel (kh, kw, in, out)
    "conv": Transform(lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
}

GROUPS = {
    "tower": r"text_model|vision_model",
    "layer": r"\d+",
    "linear": r"self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]",
    "norm": r"layer_norm[12]",
    "table": r"token_embedding|position_embedding",
    "projection": r"visual_projection|text_projection",
}

# (HF key template, our path template, transform kind). The encoder layers are stacked: HF's layer number
# ``{layer}`` is a slot of our parameter's leading axis (``hf_io.Target.index``), not part of its path.
RULES: tuple[tuple[str, str, str], ...] = (
    ("{tower}.encoder.layers.{layer}.{linear}.weight", "{tower}.encoder.layers.{linear}.kernel", "linear"),
    ("{tower}.encoder.layers.{layer}.{linear}.bias", "{tower}.encoder.layers.{linear}.bias", "copy"),
    ("{tower}.encoder.layers.{layer}.{norm}.weight", "{tower}.encoder.layers.{norm}.scale", "copy"),
    ("{tower}.encoder.layers.{layer}.{norm}.bias", "{tower}.encoder.layers.{norm}.bias", "copy"),
    ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_kernel", "conv"),
    ("vision_model.embeddings.class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    (
        "vision_model.embeddings.position_embedding.weight",
        "vision_model.embeddings.position_embedding.embedding",
        "copy",
    ),
    ("vision_model.pre_layrnorm.weight", "vision_model.pre_layernorm.scale", "copy"),
    ("vision_model.pre_layrnorm.bias", "vision_model.pre_layernorm.bias", "copy"),
    ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.scale", "copy"),
    ("vision_model.post_layernorm.bias", "vision_model.post_layernorm.bias", "copy"),
    ("text_model.embeddings.{table}.weight", "text_model.{table}.embedding", "copy"),
    ("text_model.final_layer_norm.weight", "text_model.final_layer_norm.scale", "copy"),
    ("text_model.final_layer_norm.bias", "text_model.final_layer_norm.bias", "copy"),
    ("{projection}.weight", "{projection}.kernel", "linear"),
    ("logit_scale", "logit_scale", "copy"),
)


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{GROUPS[p]})" for i, p in enumerate(parts))
    return re.compile(pattern + r"\Z")


_COMPILED = tuple((_compile(hf), hf, _compile(ours), ours, kind) for hf, ours, kind in RULES)


def _to_path(dotted: str) -> hf_io.StatePath:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def key_map(name: str) -> hf_io.Target | None:
    """HF ``CLIPModel`` / ``CLIPVisionModel`` key -> target in a ``CLIPModel`` tree (None: not ours)."""
    for hf_pattern, _, _, ours, kind in _COMPILED:
        match = hf_pattern.match(name)
        if match:
            groups = match.groupdict()
            layer = groups.pop("layer", None)
            index = None if layer is None else int(layer)
            return hf_io.Target(_to_path(ours.format(**groups)), TRANSFORMS[kind].forward, index)
    return None


def hf_key_for(path: hf_io.StatePath, index: int | None = None) -> tuple[str, str]:
    """Our ``CLIPModel`` parameter path (slot ``index`` of a stacked layer one) -> (HF key, transform kind).

    The inverse of :func:`key_map`.
    """
    dotted = ".".join(map(str, path))
    for _, hf, our_pattern, _, kind in _COMPILED:
        match = our_pattern.match(dotted)
        if match:
            if ("{layer}" in hf) != (index is not None):
                raise KeyError(f"{dotted}: a layer index is {'needed' if index is None else 'not taken'}")
            return hf.format(layer=index, **match.groupdict()), kind
    raise KeyError(f"no HF key for parameter {dotted}")


def vision_key_map(name: str) -> hf_io.Target | None:
    """Key map into a standalone ``CLIPVisionModel``: the ``vision_model`` part of a CLIP checkpoint.

    transformers 5 saves a ``CLIPVisionModel`` without the ``vision_model.`` prefix that
    ``CLIPModel`` (and older ``CLIPVisionModel`` checkpoints) use; both spellings are accepted.
    """
    target = key_map(name if name.startswith(("vision_model.", "text_model.")) else f"vision_model.{name}")
    if target is None or target.path[0] != "vision_model":
        return None
    return hf_io.Target(target.path[1:], target.transform, target.index)


def hf_factory(path: str | Path, *, dtype: DType = None, param_dtype: DType = jnp.float32) -> Callable[[], CLIPModel]:
    """A full ``CLIPModel`` (both towers, projections, logit scale) as a HF directory describes it."""
    config = hf_io.read_config(path)
    if config.get("model_type") != "clip":
        raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not a CLIPModel ('clip')")
    clip_config = CLIPConfig.from_hf(config)
    return lambda: CLIPModel(clip_config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)


def vision_factory(
    path: str | Path, *, dtype: DType = None, param_dtype: DType = jnp.float32
) -> Callable[[], CLIPVisionModel]:
    """Only the vision tower, of a ``CLIPModel`` or a ``CLIPVisionModel`` directory (load with
    :func:`vision_key_map`)."""
    config = hf_io.read_config(path)
    model_type = config.get("model_type")
    if model_type == "clip":
        vision_config = CLIPVisionConfig.from_hf(config.get("vision_config") or {})
    elif model_type == "clip_vision_model":
        vision_config = CLIPVisionConfig.from_hf(config)
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is neither 'clip' nor 'clip_vision_model'")
    return lambda: CLIPVisionModel(vision_config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
