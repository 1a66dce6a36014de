"""The one place a run config becomes an :class:`XEmoGPTConfig`.

A run config is ``configs/sft.py`` (a ConfigDict) or its JSON as stored beside every checkpoint.
Training (:mod:`xemogpt_jax.stages`), inference (:mod:`xemogpt_jax.explainer`) and the model
checkpoints of ``tools/import_weights.py`` (whose :class:`ModelSpec` reads as a run config) all
build the assembled model here, so a checkpoint always rebuilds the model that wrote it.
Architecture precedence, as for the weights in training: a non-empty ``init_from`` HF folder's
``config.json``, else ``init_from.model`` (an imported model checkpoint: its encoders, LLM and bridge
sizes; LoRA stays the run's), else the config's own ``model.*`` fields: a preset name
(:mod:`xemogpt_jax.models.presets`) or, in run configs stored by older checkpoints, the HF fields.
The bridges' text heads take their widths from the encoders they sit on (:func:`text_widths`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from xemogpt_jax import checkpoint, prompt
from xemogpt_jax.models import bridges, hf_io, presets, sentence_encoder
from xemogpt_jax.models.attention import AttentionConfig
from xemogpt_jax.models.clip import CLIPConfig, CLIPVisionConfig
from xemogpt_jax.models.hubert import HubertConfig
from xemogpt_jax.models.layers import remat_name
from xemogpt_jax.models.lora import LoraConfig
from xemogpt_jax.models.qwen3 import Qwen3Config, parse_dtype
from xemogpt_jax.models.xemogpt import XEmoGPTConfig
from xemogpt_jax.models.xemogpt_params import ModelSpec, vision_hf_config
from xemogpt_jax.preprocessing import audio as audio_pre

RunConfig = Mapping[str, Any] | ml_collections.ConfigDict
# Architecture parts and the ``init_from`` folder that overrides each.
PARTS = ("llm", "clip", "hubert")
BRIDGE_FIELDS = ("bridge_layers", "num_frames", "align_dim", "video_text_dim", "audio_text_dim")


def as_dict(run: RunConfig) -> dict[str, Any]:
    return run.to_dict() if isinstance(run, ml_collections.ConfigDict) else dict(run)


def resolve(run: RunConfig) -> dict[str, Any]:
    """A stored checkpoint config (run config or model spec) as a run config with ``init_from.model`` applied."""
    run = as_dict(run)
    if ModelSpec.describes(run):
        return ModelSpec.from_json(run).run_config()
    folder = run.get("init_from", {}).get("model")
    if not folder:
        return run
    imported = ModelSpec.from_json(checkpoint.restore_config(folder)).run_config()["model"]
    fields = (*PARTS, *BRIDGE_FIELDS)
    return {**run, "model": {**run.get("model", {}), **{k: imported[k] for k in fields}}}


def architecture(run: RunConfig, part: str) -> dict[str, Any]:
    """HF ``config.json`` fields of ``part``: the ``init_from`` folder's when given, else ``model.<part>``.

    ``model.<part>`` is a preset name or the fields themselves. Serves every stage (``clip``,
    ``hubert``, ``text_encoder``, ``llm``); ``init_from.model`` is applied by :func:`resolve`, not here.
    """
    run = as_dict(run)
    folder = run.get("init_from", {}).get(part)
    return hf_io.read_config(folder) if folder else presets.fields(part, run["model"][part])


def set_architecture(run: ml_collections.ConfigDict, part: str, **changes: Any) -> ml_collections.ConfigDict:
    """Make ``model.<part>`` the HF fields it names plus ``changes``, for sizes between presets (tests, benches)."""
    fields = {**presets.fields(part, run.model[part]), **changes}
    del run.model[part]  # a preset name is a string field; ConfigDict refuses to retype it in place
    run.model[part] = fields
    return run.model[part]


def sentence_width(run: RunConfig) -> int:
    """Width of the sentence encoder's embeddings: its folder's last module, else its BERT's hidden size.

    The stage-2 encoder built without a folder is LaBSE-shaped: its dense layer keeps the BERT width.
    """
    folder = as_dict(run).get("init_from", {}).get("text_encoder")
    if folder:
        return sentence_encoder.output_width(folder)
    return int(architecture(run, "text_encoder")["hidden_size"])


def text_widths(run: RunConfig) -> dict[str, int]:
    """Input widths of the VECB and AECB text heads: CLIP's projection width and the sentence encoder's.

    Widths a run records (model specs of imported checkpoints, sized from the release's tensors, and
    run configs of older checkpoints) win over the encoders'.
    """
    model = as_dict(run).get("model", {})
    video = model.get("video_text_dim") or CLIPConfig.from_hf(architecture(run, "clip")).projection_dim
    audio = model.get("audio_text_dim") or sentence_width(run)
    return dict(video_text_dim=int(video), audio_text_dim=int(audio))


def attention_config(run: RunConfig) -> AttentionConfig:
    """``model.attention`` and the splash block sizes; configs stored before the switch read ``auto``."""
    model = as_dict(run).get("model", {})
    return AttentionConfig(
        impl=str(model.get("attention", "auto")),
        block_q=int(model.get("splash_block_q", AttentionConfig.block_q)),
        block_kv=int(model.get("splash_block_kv", AttentionConfig.block_kv)),
    )


def with_runtime_options(config: Any, run: RunConfig) -> Any:
    """An encoder config (CLIP, HuBERT, BERT; both CLIP towers) with the run's attention, tower remat and unroll."""
    if isinstance(config, CLIPConfig):
        return dataclasses.replace(
            config, text=with_runtime_options(config.text, run), vision=with_runtime_options(config.vision, run)
        )
    names = {f.name for f in dataclasses.fields(config)}
    model = as_dict(run).get("model", {})
    options = dict(attention=attention_config(run), remat=remat_name(model.get("remat_towers")),
                   unroll_layers=bool(model.get("unroll_layers", False)))
    return dataclasses.replace(config, **{k: v for k, v in options.items() if k in names})


def lora_settings(run: RunConfig) -> dict[str, Any] | None:
    """``model.lora`` as plain values; ``None`` when the run adapts no LoRA (rank 0 frozen, < 0 full fine-tuning)."""
    lora = as_dict(run).get("model", {}).get("lora")
    if not lora or int(lora["rank"]) <= 0:
        return None
    return dict(rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora.get("dropout", 0.0)),
                targets=list(lora["targets"]))


def lora_config(run: RunConfig) -> LoraConfig | None:
    settings = lora_settings(run)
    return None if settings is None else LoraConfig(**{**settings, "targets": tuple(settings["targets"])})


def bridge_settings(run: RunConfig) -> dict[str, int]:
    """Bridge depth, frame count and the stage 1-2 head widths (defaults: the paper's)."""
    model = as_dict(run).get("model", {})
    return dict(
        bridge_layers=int(model.get("bridge_layers", 2)),
        num_frames=int(model.get("num_frames", prompt.NUM_VIDEO_TOKENS)),
        align_dim=int(model.get("align_dim", bridges.ALIGN_DIM)),
        **text_widths(run),
    )


def xemogpt_config(run: RunConfig, tokenizer: Any = None) -> XEmoGPTConfig:
    """The assembled model of a run config.

    With ``tokenizer``, EOS/pad ids that the LLM's config leaves unset (a random-init LLM's
    architecture fields name none) are the tokenizer's.
    """
    run = resolve(run)
    dtype = parse_dtype(run.get("dtype", "float32"))
    model, data = run.get("model", {}), run.get("data", {})
    llm = Qwen3Config.from_hf(
        architecture(run, "llm"), dtype=dtype, remat=model.get("remat", False), attention=attention_config(run),
        unroll_layers=bool(model.get("unroll_layers", False)), lora=lora_config(run),
    )
    if tokenizer is not None:
        llm = llm.replace(
            eos_token_id=tokenizer.eos_token_id if llm.eos_token_id is None else llm.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if llm.pad_token_id is None else llm.pad_token_id,
        )
    clip = architecture(run, "clip")
    bridge = bridge_settings(run)
    return XEmoGPTConfig(
        vision=with_runtime_options(CLIPVisionConfig.from_hf(clip.get("vision_config") or clip), run),
        hubert=with_runtime_options(HubertConfig.from_hf(architecture(run, "hubert"), dtype=dtype), run),
        llm=llm,
        vecb_layers=bridge["bridge_layers"],
        aecb_layers=bridge["bridge_layers"],
        num_frames=bridge["num_frames"],
        align_dim=bridge["align_dim"],
        video_text_dim=bridge["video_text_dim"],
        audio_text_dim=bridge["audio_text_dim"],
        max_audio_samples=int(data.get("max_audio_seconds", audio_pre.MAX_SECONDS) * audio_pre.SAMPLING_RATE),
        max_context=int(data.get("max_context", prompt.MAX_CONTEXT)),
        truncate=str(data.get("truncate", "tail")),
        loss_chunk=int(model.get("loss_chunk", 512)),
        dtype=dtype,
        train_encoders=bool(model.get("train_encoders", False)),
    )


# ``data`` fields that shape the prompt a model reads (its audio window, context cut and length buckets): a
# model checkpoint keeps those of the config it was imported with, so it explains as that run did.
PROMPT_LAYOUT_FIELDS = ("max_audio_seconds", "max_context", "truncate", "length_buckets")


def prompt_layout(run: RunConfig) -> dict[str, Any]:
    """The run's :data:`PROMPT_LAYOUT_FIELDS` that it sets (the rest stay the release's defaults)."""
    data = as_dict(run).get("data", {})
    return {name: data[name] for name in PROMPT_LAYOUT_FIELDS if name in data}


def model_spec(run: RunConfig) -> ModelSpec:
    """The :class:`ModelSpec` of a stage-3 run: its architectures, bridge sizes, LoRA and weight sources.

    What an export of a trained run writes beside the weights; ``sources`` are the imported model's
    (``init_from.model``) overridden by the run's own HF folders and tokenizer.
    """
    run = as_dict(run)
    init = run.get("init_from", {})
    sources = {}
    if init.get("model"):
        sources.update(ModelSpec.from_json(checkpoint.restore_config(init["model"])).sources)
    sources.update({k: init[k] for k in ("llm", "clip", "hubert", "tokenizer") if init.get(k)})
    resolved = resolve(run)
    return ModelSpec(
        llm=architecture(resolved, "llm"), vision=vision_hf_config(architecture(resolved, "clip")),
        hubert=architecture(resolved, "hubert"), **bridge_settings(resolved), lora=lora_settings(resolved),
        sources=sources, prompt_layout=prompt_layout(resolved),
    )
