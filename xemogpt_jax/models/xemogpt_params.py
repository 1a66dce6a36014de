"""The release's PyTorch key names (docs/architecture.md, section 7) <-> our XEmoGPT parameter tree, and the
model config as JSON.

The sub-trees that are plain HF models reuse their family's key map: ``llm_model.base_model.model.``
(Qwen3/Qwen2, :mod:`qwen3_params`), ``visual_encoder.clip.`` (:mod:`clip_params`) and
``audio_encoder.audio_encoder.`` (:mod:`hubert_params`); the bridge layers reuse the CLIP and
HuBERT encoder-layer rules. What is left (LoRA factors, positional table, pooling vector, heads
and projections) is the small table below. PEFT wraps adapted projections, so their base weights
may appear as ``q_proj.base_layer.weight``; both spellings are accepted on import.

Export goes through :class:`ExportTensor` records (name, shape, dtype, and a function that fetches
the one tensor to the host), so writers can lay out a file before any weight leaves the devices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from xemogpt_jax.models import clip_params, hubert_params, qwen3_params
from xemogpt_jax.models.hf_io import StatePath, Target

LLM = "llm_model.base_model.model."
CLIP = "visual_encoder.clip."
HUBERT = "audio_encoder.audio_encoder."
VECB_LAYER = "visual_encoder.visual_alignment_layer."
AECB_LAYER = "audio_encoder.audio_alignment_layer."
PEFT_PREFIX = "base_model.model."  # adapter_model.safetensors names: PEFT_PREFIX + HF name, no adapter name

# release Linear module -> our module path (weight <-> kernel transposed, bias <-> bias)
LINEARS: dict[str, StatePath] = {
    "visual_encoder.visual_project": ("vecb", "visual_project"),
    "visual_encoder.text_project": ("vecb", "text_project"),
    "visual_encoder.temporal_disc_head.0": ("vecb", "temporal_disc_head", "layers", 0),
    "visual_encoder.temporal_disc_head.2": ("vecb", "temporal_disc_head", "layers", 2),
    "visual_encoder.frame_reconstructor": ("vecb", "frame_reconstructor"),
    "audio_encoder.audio_project": ("aecb", "audio_project"),
    "audio_encoder.text_project": ("aecb", "text_project"),
    "visual_llm_project": ("visual_llm_project",),
    "audio_llm_project": ("audio_llm_project",),
}
ArrayFn = Callable[[np.ndarray], np.ndarray]
# release tensor -> (our path, release -> ours, ours -> release)
TABLES: dict[str, tuple[StatePath, ArrayFn, ArrayFn]] = {
    # the release keeps the positional table as [1, F, D]; ours is [F, D]
    "visual_encoder.position_embedding": (
        ("vecb", "position_embedding"), lambda w: w.reshape(w.shape[-2:]), lambda w: w[None]
    ),
    "visual_encoder.attention_pooling.attn_vector": (
        ("vecb", "attention_pooling", "attn_vector"), lambda w: w, lambda w: w
    ),
}
_LORA_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.default)?\.weight$")
_BRIDGE_LAYER_RE = re.compile(r"^(\d+)\.(.+)$")
_HUBERT_KEY_MAP = hubert_params.hubert_key_map()
_HUBERT_LAYER_KEY_MAP = hubert_params.make_key_map(hubert_params.ENCODER_LAYER_RULES)
_CLIP_LAYERS = ("vision_model", "encoder", "layers")  # CLIP's stacked encoder layers, the bridge's layer rules
# our stacked parameters (one release tensor per slot of their leading axis)
_STACKED = (("llm", "layers"), ("vision_tower", "encoder", "layers"), ("audio_tower", "encoder", "layers"))


def _transpose(array: np.ndarray) -> np.ndarray:
    return np.swapaxes(array, -1, -2)


def _under(prefix: StatePath, target: Target | None) -> Target | None:
    if target is None:
        return None
    return Target(prefix + tuple(target.path), target.transform, target.index)


def lora_target(name: str) -> Target | None:
    """A PEFT adapter factor (HF name inside the LLM, with or without ``.default``) -> our stacked ``lora_a/b``."""
    match = _LORA_RE.match(name)
    if match is None:
        return None
    layer, module, proj, factor = match.groups()
    return Target(("llm", "layers", module, proj, f"lora_{factor.lower()}"), _transpose, int(layer))


def _llm_key_map(name: str) -> Target | None:
    return lora_target(name) or _under(("llm",), qwen3_params.hf_key_map(name.replace(".base_layer.", ".")))


def _bridge_layer(name: str, prefix: str) -> tuple[int, str] | None:
    match = _BRIDGE_LAYER_RE.match(name[len(prefix) :])
    return (int(match.group(1)), match.group(2)) if match else None


def release_key_map(name: str) -> Target | None:
    """Where the release tensor ``name`` goes in an :class:`XEmoGPT` tree (``None``: not one of ours)."""
    if name.startswith(LLM):
        return _llm_key_map(name[len(LLM) :])
    if name.startswith(CLIP):
        return _under(("vision_tower",), clip_params.vision_key_map(name[len(CLIP) :]))
    if name.startswith(HUBERT):
        return _under(("audio_tower",), _HUBERT_KEY_MAP(name[len(HUBERT) :]))
    if name.startswith(VECB_LAYER) and (found := _bridge_layer(name, VECB_LAYER)):
        target = clip_params.key_map("vision_model.encoder.layers.0." + found[1])
        if target is None:
            return None
        path = ("vecb", "visual_alignment_layer", found[0]) + tuple(target.path[len(_CLIP_LAYERS) :])
        return Target(path, target.transform)
    if name.startswith(AECB_LAYER) and (found := _bridge_layer(name, AECB_LAYER)):
        return _under(("aecb", "audio_alignment_layer", found[0]), _HUBERT_LAYER_KEY_MAP(found[1]))
    if name in TABLES:
        path, forward, _ = TABLES[name]
        return Target(path, forward)
    module, _, leaf = name.rpartition(".")
    if module in LINEARS and leaf == "weight":
        return Target(LINEARS[module] + ("kernel",), _transpose)
    if module in LINEARS and leaf == "bias":
        return Target(LINEARS[module] + ("bias",))
    return None


def peft_key_map(name: str) -> Target | None:
    """A name of PEFT's ``adapter_model.safetensors`` -> our LoRA factor."""
    return lora_target(name[len(PEFT_PREFIX) :]) if name.startswith(PEFT_PREFIX) else None


def release_bridge_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Bridge sizes a release state dict's own tensor shapes fix (only those its tensors show).

    A release built around another CLIP or sentence encoder carries text heads of that width; reading
    it here means the import needs no config that repeats it.
    """
    sizes: dict[str, int] = {}
    for name, field in (("visual_encoder.text_project.weight", "video_text_dim"),
                        ("audio_encoder.text_project.weight", "audio_text_dim")):
        if name in shapes:
            sizes["align_dim"], sizes[field] = shapes[name]
    if "visual_encoder.position_embedding" in shapes:
        sizes["num_frames"] = shapes["visual_encoder.position_embedding"][-2]
    layers = [found[0] + 1 for name in shapes for prefix in (VECB_LAYER, AECB_LAYER)
              if name.startswith(prefix) and (found := _bridge_layer(name, prefix))]
    if layers:
        sizes["bridge_layers"] = max(layers)
    return sizes


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportTensor:
    """One tensor to write: its name and layout are known before ``fetch`` brings its values to this host."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]

    def renamed(self, name: str) -> ExportTensor:
        return dataclasses.replace(self, name=name)


def host_value(array: jax.Array) -> np.ndarray:
    """One array on this host; across processes only this array is gathered."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _hubert_inverse(rules: list[hubert_params.Rule]) -> Callable[[StatePath], tuple[str, Callable | None]]:
    """Our HuBERT path -> (HF name, inverse transform); the first row per path is the export form."""
    compiled = [
        (re.compile(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + r"\Z"), hf, t) for hf, ours, t in rules
    ]

    def inverse(path: StatePath, index: int | None = None) -> tuple[str, Callable | None]:
        dotted = "/".join(map(str, path))
        for pattern, hf, kind in compiled:
            match = pattern.match(dotted)
            if match:
                number = match.groupdict().get("i") or ("" if index is None else str(index))
                return hf.replace("{i}", number), hubert_params.TRANSFORMS[kind][1] if kind else None
        raise KeyError(f"no HuBERT name for parameter {dotted}")

    return inverse


_HUBERT_NAME = _hubert_inverse(hubert_params.HUBERT_RULES)
_HUBERT_LAYER_NAME = _hubert_inverse(hubert_params.ENCODER_LAYER_RULES)
_LINEAR_NAMES = {path: module for module, path in LINEARS.items()}
_TABLE_NAMES = {path: (name, inverse) for name, (path, _, inverse) in TABLES.items()}


def _clip_name(path: StatePath, index: int | None = None) -> tuple[str, Callable]:
    hf, kind = clip_params.hf_key_for(path, index)
    return hf, clip_params.TRANSFORMS[kind].inverse


def release_name(path: StatePath, index: int | None = None) -> tuple[str, Callable | None]:
    """Our parameter ``path`` (slot ``index`` of a stacked one) -> (release name, ours -> release transform)."""
    head, rest = path[0], tuple(path[1:])
    if head == "llm":
        if rest[-1] in ("lora_a", "lora_b"):
            factor = rest[-1][-1].upper()
            return f"{LLM}model.layers.{index}.{rest[1]}.{rest[2]}.lora_{factor}.default.weight", _transpose
        return LLM + qwen3_params.hf_name(rest, index), _transpose if rest[-1] == "kernel" else None
    if head == "vision_tower":
        hf, inverse = _clip_name(("vision_model",) + rest, index)
        return CLIP + hf, inverse
    if head == "audio_tower":
        hf, inverse = _HUBERT_NAME(rest, index)
        return HUBERT + hf, inverse
    if rest[:1] == ("visual_alignment_layer",):
        hf, inverse = _clip_name(_CLIP_LAYERS + rest[2:], 0)
        return f"{VECB_LAYER}{rest[1]}." + hf[len("vision_model.encoder.layers.0.") :], inverse
    if rest[:1] == ("audio_alignment_layer",):
        hf, inverse = _HUBERT_LAYER_NAME(rest[2:])
        return f"{AECB_LAYER}{rest[1]}.{hf}", inverse
    if tuple(path) in _TABLE_NAMES:
        return _TABLE_NAMES[tuple(path)]
    module, leaf = tuple(path[:-1]), path[-1]
    if module in _LINEAR_NAMES and leaf == "kernel":
        return f"{_LINEAR_NAMES[module]}.weight", _transpose
    if module in _LINEAR_NAMES and leaf == "bias":
        return f"{_LINEAR_NAMES[module]}.bias", None
    raise KeyError(f"no release name for parameter {'/'.join(map(str, path))}")


def is_stacked(path: StatePath) -> bool:
    """Whether ``path`` is a stacked (scanned-layer) parameter, one release tensor per slot of its leading axis."""
    return any(path[: len(prefix)] == prefix for prefix in _STACKED)


def _export_record(
    name: str, array: jax.Array, transform: Callable | None, dtype: Any, index: int | None
) -> ExportTensor:
    """A lazy record of ``array`` (or its slot ``index``), transformed to the release layout and cast to ``dtype``."""

    def fetch() -> np.ndarray:
        value = host_value(array if index is None else array[index])
        value = transform(value) if transform else value
        return np.ascontiguousarray(value.astype(dtype or value.dtype))

    shape = tuple(array.shape[1:] if index is not None else array.shape)
    probe = np.broadcast_to(np.zeros((), np.uint8), shape)  # a zero-byte stand-in to learn the output shape
    out_shape = tuple(transform(probe).shape) if transform else shape
    return ExportTensor(name, out_shape, np.dtype(dtype or array.dtype), fetch)


def release_tensors(model: nnx.Module, dtype: Any = None) -> Iterator[ExportTensor]:
    """Every parameter of an :class:`XEmoGPT` under its release name (one record per stacked layer slot)."""
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        array = variable.get_value()
        slots = range(array.shape[0]) if is_stacked(path) else [None]
        for index in slots:
            name, transform = release_name(path, index)
            yield _export_record(name, array, transform, dtype, index)


def is_trainable_release_name(name: str) -> bool:
    """The parts a release checkpoint carries as trained weights: LoRA, bridges, heads and projections."""
    if name.startswith(LLM):
        return ".lora_A." in name or ".lora_B." in name
    return not name.startswith((CLIP, HUBERT))


def to_peft_name(release: str) -> str:
    """``llm_model.base_model.model.X.lora_A.default.weight`` -> ``base_model.model.X.lora_A.weight``."""
    return PEFT_PREFIX + release[len(LLM) :].replace(".default.weight", ".weight")


# ---------------------------------------------------------------- config

SPEC_FORMAT = "xemogpt-model"


def vision_hf_config(clip_config: dict[str, Any]) -> dict[str, Any]:
    """The vision part of a CLIPModel or CLIPVisionModel ``config.json``, as a CLIPVisionModel config."""
    vision = clip_config.get("vision_config") if clip_config.get("model_type") == "clip" else clip_config
    return {**(vision or {}), "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an :class:`XEmoGPT`: the source HF configs plus bridge and LoRA settings.

    Stored as the ``config`` item of a model checkpoint, so an exporter can write ``config.json``
    files consistent with the sources (activation names, rope, tied embeddings, vocab size).
    """

    llm: dict[str, Any]
    vision: dict[str, Any]
    hubert: dict[str, Any]
    video_text_dim: int
    audio_text_dim: int
    bridge_layers: int = 2
    num_frames: int = 16
    align_dim: int = 768
    lora: dict[str, Any] | None = None
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    prompt_layout: dict[str, Any] = dataclasses.field(default_factory=dict)  # run_config.PROMPT_LAYOUT_FIELDS

    def run_config(self) -> dict[str, Any]:
        """The spec as run-config fields (``configs/sft.py`` names), for :func:`xemogpt_jax.run_config.xemogpt_config`.

        The source LLM folder is named as the tokenizer folder (HF LLM folders carry their tokenizer).
        """
        model = {
            "llm": self.llm, "clip": self.vision, "hubert": self.hubert, "lora": self.lora,
            "bridge_layers": self.bridge_layers, "num_frames": self.num_frames, "align_dim": self.align_dim,
            "video_text_dim": self.video_text_dim, "audio_text_dim": self.audio_text_dim,
        }
        return {"dtype": "float32", "model": model, "data": dict(self.prompt_layout),
                "init_from": {"tokenizer": self.sources.get("llm", "")}}

    def to_json(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, **dataclasses.asdict(self)}

    @staticmethod
    def describes(data: dict[str, Any]) -> bool:
        """Whether a checkpoint's stored config is a model spec (else it is a trainer run config)."""
        return data.get("format") == SPEC_FORMAT

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        if not cls.describes(data):
            raise ValueError(f"not an XEmoGPT model checkpoint config (format={data.get('format')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
