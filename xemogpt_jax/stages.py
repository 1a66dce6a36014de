"""The three training stages as :class:`xemogpt_jax.trainer.Task`s: models, trainable sets, losses, data.

- stage 1 ``align_video``: frozen CLIP (both towers) + VECB with its heads + a learnable log-scale;
  ``L_cva + l1 L_ftd + l2 L_mfm``;
- stage 2 ``align_audio``: frozen HuBERT + frozen LaBSE-shaped sentence encoder + AECB + log-scale; ``L_caa``;
- stage 3 ``sft``: :class:`XEmoGPT`; LoRA, projections and the bridges (not their pretraining heads) train
  with the causal-LM loss. The modality rule holds by construction: a bridge's tokens enter the LLM only
  at the slots of samples that have its modality, so samples without it give that bridge no gradient.

Bridge modules carry the same names (``vecb``, ``aecb``) in every stage, so stage 3 initialises them
from the stage 1-2 checkpoints by path.

``model.train_encoders`` (False at paper scale; True in the tiny stage 1-2 configs, whose random-init
towers cannot see anything while frozen) makes the towers trainable as well: CLIP's vision and text
towers in stage 1, HuBERT and the sentence encoder in stage 2, the vision and audio towers in stage 3.
A stage 1-2 checkpoint that holds its trained tower gives it to stage 3 (``init_from.video_bridge`` /
``audio_bridge``; it replaces ``init_from.clip`` / ``hubert`` weights).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from data_pipelines import pipelines
from xemogpt_jax import loading, losses, prompt, run_config
from xemogpt_jax.models import bridges, clip_params, hubert_params, qwen3_params
from xemogpt_jax.models import lora as lora_lib
from xemogpt_jax.models.bert import BertConfig, BertModel
from xemogpt_jax.models.clip import CLIPConfig, CLIPModel
from xemogpt_jax.models.hubert import HubertConfig, HubertModel
from xemogpt_jax.models.qwen3 import parse_dtype
from xemogpt_jax.models.sentence_encoder import Dense, SentenceEncoder, SentencePipeline
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.trainer import Task

LOGIT_SCALE = "align_logit_scale"


def _loader(config: ml_collections.ConfigDict, batch_size: int, process: int, count: int, **kw: Any):
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by {count} processes")
    return pipelines.LoaderConfig(
        batch_size=batch_size // count, seed=config.data.shuffle_seed, process_index=process, process_count=count,
        worker_count=config.data.worker_count, **kw,
    )


def load_text_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


# ---------------------------------------------------------------- stage 1


class VideoAlignModel(nnx.Module):
    """Frozen CLIP, the VECB with its stage-1 heads, and the contrastive log-scale."""

    def __init__(self, clip_config: CLIPConfig, vecb_config: bridges.VECBConfig, tau_init: float, *,
                 rngs: nnx.Rngs, dtype: Any = None):
        self.clip = CLIPModel(clip_config, rngs=rngs, dtype=dtype)
        self.vecb = bridges.VECB(vecb_config, rngs=rngs, dtype=dtype)
        setattr(self, LOGIT_SCALE, nnx.Param(losses.init_logit_scale(tau_init)))

    def clip_features(self, pixel_values: jax.Array) -> jax.Array:
        """``[B, F, S, S, 3]`` -> per-frame CLS before the post-layernorm ``[B, F, D]``."""
        batch, frames = pixel_values.shape[:2]
        cls = self.clip.vision_model(pixel_values.reshape(batch * frames, *pixel_values.shape[2:])).cls_token
        return cls.reshape(batch, frames, -1)


def encoder_output(train_encoders: bool):
    """Identity for trained towers, ``stop_gradient`` for frozen ones."""
    return (lambda x: x) if train_encoders else jax.lax.stop_gradient


def video_align_loss(loss_config: ml_collections.ConfigDict, train_encoders: bool = False):
    encoded = encoder_output(train_encoders)

    def loss_fn(model: VideoAlignModel, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        cls = encoded(model.clip_features(batch["pixel_values"]))
        batch_size, frames = cls.shape[:2]
        text = encoded(model.clip.get_text_features(batch["text_ids"], batch["text_mask"]))
        video = model.vecb.video_embedding(model.vecb(cls))
        scale = getattr(model, LOGIT_SCALE)[...]
        cva = losses.info_nce(video, model.vecb.text_embedding(text), scale, loss_config.max_logit_scale)
        shuffle_key, mask_key = jax.random.split(key)
        order = losses.shuffled_frame_order(shuffle_key, batch_size, frames)
        shuffled = model.vecb.video_embedding(model.vecb(cls, frame_order=order))
        temporal = model.vecb.temporal_logit
        ftd = losses.frame_temporal_discrimination(temporal(video), temporal(shuffled))
        mask = losses.sample_frame_mask(mask_key, (batch_size, frames), loss_config.mask_ratio)
        target = jax.lax.stop_gradient(cls)  # a trained tower must not collapse its features to ease MFM
        mfm = losses.masked_frame_modeling(model.vecb.reconstruct(model.vecb(cls, masked_frames=mask)), target, mask)
        total = losses.stage1_total(cva, ftd, mfm, loss_config.ftd_weight, loss_config.mfm_weight)
        return total, {"cva": cva, "ftd": ftd, "mfm": mfm, "temperature": jnp.exp(-scale)}

    return loss_fn


def _trained_paths(config: ml_collections.ConfigDict, always: tuple[str, ...], encoders: tuple[str, ...]) -> list:
    """Path filters of the trained modules; the encoders join them when ``model.train_encoders``."""
    names = always + (encoders if config.model.get("train_encoders", False) else ())
    return [nnx.PathContains(name) for name in names]


def align_video_task(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Task:
    clip_config = run_config.with_runtime_options(CLIPConfig.from_hf(run_config.architecture(config, "clip")), config)
    vecb_config = bridges.VECBConfig(
        encoder=clip_config.vision, num_layers=config.model.bridge_layers, num_frames=config.model.num_frames,
        align_dim=config.model.align_dim, text_dim=clip_config.projection_dim,
    )
    dtype = parse_dtype(config.dtype)
    if tokenizer is None:
        tokenizer = load_text_tokenizer(config.init_from.tokenizer or config.init_from.clip)
    frame_size = clip_config.vision.image_size

    def data(records_dir: str, batch_size: int, shuffle: bool):
        def make(process: int, count: int):
            loader = _loader(config, batch_size, process, count, shuffle=shuffle)
            dataset = pipelines.stage1_dataset(records_dir, tokenizer, loader, frame_size=frame_size,
                                               text_max_length=config.data.max_text_tokens)
            return iter(dataset)
        return make

    def load_pretrained(model: VideoAlignModel, mesh: Mesh) -> None:
        if config.init_from.clip:
            loading.fill_from_hf(model.clip, config.init_from.clip, clip_params.key_map, mesh)

    return Task(
        build_model=lambda rngs: VideoAlignModel(clip_config, vecb_config, config.loss.tau_init, rngs=rngs,
                                                 dtype=dtype),
        trainable=nnx.All(nnx.Param, nnx.Any(*_trained_paths(config, ("vecb", LOGIT_SCALE), ("clip",)))),
        loss=video_align_loss(config.loss, config.model.get("train_encoders", False)),
        train_data=data(config.data.train_dir, config.data.batch_size, True),
        eval_data=data(config.data.eval_dir, config.data.eval_batch_size, False) if config.data.eval_dir else None,
        load_pretrained=load_pretrained,
        abstract_batch=lambda batch_size, length=None: pipelines.batch_shapes(
            pipelines.stage1_collate(tokenizer.pad_token_id, frame_size=frame_size,
                                     text_max_length=config.data.max_text_tokens),
            {"frames": None, "text": np.zeros(1, np.int32)}, batch_size),
    )


# ---------------------------------------------------------------- stage 2


def labse_shaped_encoder(bert_config: BertConfig, text_dim: int, *, rngs: nnx.Rngs,
                         pooling: str = "cls") -> SentencePipeline:
    """LaBSE's sentence-transformers pipeline: BERT, CLS pooling, Dense with tanh, L2 normalisation."""
    bert = BertModel(bert_config, rngs=rngs, add_pooling_layer=False)
    dense = Dense(bert_config.hidden_size, text_dim, use_bias=True, activation_name="Tanh", rngs=rngs)
    return SentencePipeline(bert, (pooling,), [dense], normalize=True)


class AudioAlignModel(nnx.Module):
    """Frozen HuBERT and sentence encoder, the AECB with its stage-2 heads, and the contrastive log-scale."""

    def __init__(self, hubert_config: HubertConfig, bert_config: BertConfig, aecb_config: bridges.AECBConfig,
                 tau_init: float, *, rngs: nnx.Rngs, text_pooling: str = "cls"):
        self.hubert = HubertModel(hubert_config, rngs=rngs)
        self.text_encoder = labse_shaped_encoder(bert_config, aecb_config.text_dim, rngs=rngs, pooling=text_pooling)
        self.aecb = bridges.AECB(aecb_config, rngs=rngs)
        setattr(self, LOGIT_SCALE, nnx.Param(losses.init_logit_scale(tau_init)))


def audio_align_loss(loss_config: ml_collections.ConfigDict, train_encoders: bool = False):
    encoded = encoder_output(train_encoders)

    def loss_fn(model: AudioAlignModel, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        del key  # stage 2 is deterministic
        hidden, frame_mask = model.hubert(batch["input_values"], batch["audio_mask"])
        hidden = encoded(jnp.where(frame_mask[..., None], hidden, jnp.zeros((), hidden.dtype)))
        text_ids, text_mask = batch["text_ids"], batch["text_mask"]
        text = encoded(model.text_encoder(text_ids, text_mask, jnp.zeros_like(text_ids)))
        audio = model.aecb.audio_embedding(model.aecb(hidden, frame_mask), frame_mask)
        scale = getattr(model, LOGIT_SCALE)[...]
        caa = losses.info_nce(audio, model.aecb.text_embedding(text), scale, loss_config.max_logit_scale)
        return caa, {"caa": caa, "temperature": jnp.exp(-scale)}

    return loss_fn


def align_audio_task(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Task:
    dtype = parse_dtype(config.dtype)
    hubert_config = run_config.with_runtime_options(
        HubertConfig.from_hf(run_config.architecture(config, "hubert"), dtype=dtype), config
    )
    text_folder = config.init_from.text_encoder
    bert_config = run_config.with_runtime_options(
        BertConfig.from_hf(run_config.architecture(config, "text_encoder")), config
    )
    aecb_config = bridges.AECBConfig(
        encoder=hubert_config, num_layers=config.model.bridge_layers, align_dim=config.model.align_dim,
        text_dim=run_config.sentence_width(config),
    )
    if tokenizer is None:
        tokenizer = load_text_tokenizer(config.init_from.tokenizer or text_folder)
    max_samples = int(config.data.max_audio_seconds * 16_000)

    def data(records_dir: str, batch_size: int, shuffle: bool):
        def make(process: int, count: int):
            loader = _loader(config, batch_size, process, count, shuffle=shuffle)
            return iter(pipelines.stage2_dataset(records_dir, tokenizer, loader, max_audio_samples=max_samples,
                                                 text_max_length=config.data.max_text_tokens))
        return make

    def load_pretrained(model: AudioAlignModel, mesh: Mesh) -> None:
        if config.init_from.hubert:
            loading.fill_from_hf(model.hubert, config.init_from.hubert, hubert_params.hubert_key_map(), mesh)
        if text_folder:
            loading.place_module(model.text_encoder, SentenceEncoder.from_folder(text_folder).pipeline, mesh)

    return Task(
        build_model=lambda rngs: AudioAlignModel(
            hubert_config, bert_config, aecb_config, config.loss.tau_init, rngs=rngs,
            text_pooling=config.model.get("text_pooling", "cls"),
        ),
        trainable=nnx.All(
            nnx.Param, nnx.Any(*_trained_paths(config, ("aecb", LOGIT_SCALE), ("hubert", "text_encoder")))
        ),
        loss=audio_align_loss(config.loss, config.model.get("train_encoders", False)),
        train_data=data(config.data.train_dir, config.data.batch_size, True),
        eval_data=data(config.data.eval_dir, config.data.eval_batch_size, False) if config.data.eval_dir else None,
        load_pretrained=load_pretrained,
        abstract_batch=lambda batch_size, length=None: pipelines.batch_shapes(
            pipelines.stage2_collate(tokenizer.pad_token_id, max_audio_samples=max_samples,
                                     text_max_length=config.data.max_text_tokens),
            {"audio": None, "text": np.zeros(1, np.int32)}, batch_size),
    )


# ---------------------------------------------------------------- stage 3

# Parts of the bridges that stage 3 trains (their stage 1-2 heads get no gradient there).
BRIDGE_PARTS = {"vecb": ("position_embedding", "visual_alignment_layer"), "aecb": ("audio_alignment_layer",)}
PROJECTIONS = ("visual_llm_project", "audio_llm_project")
ENCODERS = ("vision_tower", "audio_tower")


def bridge_layers(path: tuple[Any, ...], value: Any) -> bool:
    """True for a bridge's own layers and positional table (not the frozen towers' namesakes)."""
    return any(
        bridge in path and any(part in path for part in parts) for bridge, parts in BRIDGE_PARTS.items()
    )


def sft_trainable(config: ml_collections.ConfigDict) -> Any:
    parts = _trained_paths(config, PROJECTIONS, ENCODERS)
    if config.model.train_bridges:
        parts.append(bridge_layers)
    if config.model.lora.rank > 0:
        parts.append(lora_lib.LoraParam)
    elif config.model.lora.rank < 0:
        parts.append(nnx.PathContains("llm"))
    return nnx.All(nnx.Param, nnx.Any(*parts))


def sft_loss(model: XEmoGPT, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
    loss = model(
        batch["token_ids"], batch["kind"], batch["feature_index"], batch["labels"], batch["attention_mask"],
        batch["positions"], frames=batch["pixel_values"], audio=batch["input_values"], audio_mask=batch["audio_mask"],
        dropout_rng=key,
    )
    return loss, {"target_tokens": jnp.sum(batch["labels"] != prompt.IGNORE_INDEX)}


def sft_task(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Task:
    if tokenizer is None:
        tokenizer = qwen3_params.load_tokenizer(config.init_from.tokenizer or config.init_from.llm)
    model_config = run_config.xemogpt_config(config, tokenizer)
    max_samples = model_config.max_audio_samples

    def data(records_dir: str, batch_size: int, shuffle: bool):
        def make(process: int, count: int):
            loader = _loader(config, batch_size, process, count, shuffle=shuffle)
            return iter(pipelines.stage3_dataset(
                records_dir, tokenizer, loader, frame_size=model_config.vision.image_size,
                max_audio_samples=max_samples, audio_tokens_for=model_config.num_audio_tokens,
                buckets=tuple(config.data.length_buckets), max_context=config.data.max_context,
                truncate=model_config.truncate,
            ))
        return make

    def abstract_batch(batch_size: int, length: int | None = None) -> dict[str, Any]:
        length = length or config.data.max_context
        placeholder = prompt.Sample(token_ids=np.zeros(length, np.int32), kind=np.zeros(length, np.int8),
                                    feature_index=np.zeros(length, np.int32), labels=np.zeros(length, np.int32),
                                    condition_length=0)
        collate = pipelines.stage3_collate(tokenizer.pad_token_id, buckets=tuple(config.data.length_buckets),
                                           frame_size=model_config.vision.image_size, max_audio_samples=max_samples)
        return pipelines.batch_shapes(collate, {"sample": placeholder, "frames": None, "audio": None}, batch_size)

    def load_pretrained(model: XEmoGPT, mesh: Mesh) -> None:
        loading.fill_init_from(model, config.init_from, mesh)

    return Task(
        build_model=lambda rngs: XEmoGPT(model_config, rngs=rngs),
        trainable=sft_trainable(config),
        loss=sft_loss,
        train_data=data(config.data.train_dir, config.data.batch_size, True),
        eval_data=data(config.data.eval_dir, config.data.eval_batch_size, False) if config.data.eval_dir else None,
        load_pretrained=load_pretrained,
        tokens=lambda batch: int(np.sum(batch["attention_mask"])),
        pad_values=pipelines.stage3_pad_values(tokenizer.pad_token_id),
        abstract_batch=abstract_batch,
    )


TASKS = {"align_video": align_video_task, "align_audio": align_audio_task, "sft": sft_task}


def task_for(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Task:
    """The stage's task; ``tokenizer`` (default: loaded from ``init_from``) may be a stand-in that has only the
    token ids the model reads (``eos_token_id``, ``pad_token_id``) where no data is read (``aot_check``)."""
    if config.stage not in TASKS:
        raise ValueError(f"unknown stage {config.stage!r}; known: {sorted(TASKS)}")
    return TASKS[config.stage](config, tokenizer)
