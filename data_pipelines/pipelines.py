"""Grain pipelines for the three training stages, and the step from per-process numpy batches to global arrays.

Order of operations, identical for every stage::

    ArrayRecord source -> shuffle(seed) -> repeat(epochs) -> slice(process_index::process_count)
      -> decode + keep clips with the stage's modality -> per-sample transform   (threads: ReadOptions)
      -> batch(local batch size, stage collate) -> [mp_prefetch(worker processes)]

Shuffling is one global permutation (a fresh one each epoch) that every process computes alike, and each
process takes every ``process_count``-th element of it, so the processes' local batches are disjoint parts
of one global batch. The iterator's state (``get_state``/``set_state``) is a small dict of counters;
:func:`iterator_state` / :func:`restore_iterator` turn it into the JSON string the checkpoint stores.

Batches (numpy, leading dim = local batch):

- stage 1 (video + visual caption): ``pixel_values`` float32 [B, 16, S, S, 3] (CLIP-normalised),
  ``text_ids`` int32 [B, Lt], ``text_mask`` int32 [B, Lt].
- stage 2 (audio + auditory caption): ``input_values`` float32 [B, A] (HuBERT feature-extractor output padded
  to ``max_audio_samples``), ``audio_mask`` int32 [B, A], ``text_ids``, ``text_mask``.
- stage 3 (instruction tuning): :func:`xemogpt_jax.prompt.collate`'s fields (``token_ids``, ``kind``,
  ``feature_index``, ``labels``, ``attention_mask``, ``positions`` [B, bucket], ``condition_length`` [B]), plus
  ``pixel_values``, ``has_video`` bool [B], ``input_values``, ``audio_mask``, ``has_audio`` bool [B]. A row
  without a modality carries zeros (and an all-zero ``audio_mask``) in that modality's arrays.

Captions: a record's ``captions`` list holds the visual caption first and the auditory one last (the synthetic
world writes them so; a clip with one caption uses it for both stages), so stage 1 reads ``captions[0]`` and
stage 2 ``captions[-1]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from data_pipelines.records import open_source
from data_pipelines.schema import audio_float32, decode_record
from xemogpt_jax import prompt
from xemogpt_jax.preprocessing.audio import AudioPreprocessConfig, preprocess_audio
from xemogpt_jax.preprocessing.image import normalize
from xemogpt_jax.sharding import batch_sharding

Record = dict[str, Any]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """What every stage shares: batching, order, sharding by process and parallelism."""

    batch_size: int  # per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None  # None: jax.process_count()
    read_threads: int = 4
    read_prefetch: int = 16
    worker_count: int = 0  # > 0: that many Grain worker processes build whole batches
    worker_buffer_size: int = 2

    def shard(self) -> tuple[int, int]:
        index = jax.process_index() if self.process_index is None else self.process_index
        count = jax.process_count() if self.process_count is None else self.process_count
        if not 0 <= index < count:
            raise ValueError(f"process index {index} is outside [0, {count})")
        return index, count


def _ordered_records(records_dir: str | Path, config: LoaderConfig,
                     keep: Callable[[Record], bool]) -> grain.MapDataset:
    """Global shuffle, repeat, this process's slice, then decode and keep the stage's clips."""
    dataset = grain.MapDataset.source(open_source(records_dir))
    if config.shuffle:
        dataset = dataset.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        dataset = dataset.repeat(config.num_epochs)
    index, count = config.shard()
    dataset = dataset[index::count]
    return dataset.map(decode_record).filter(keep)


def _finish(dataset: grain.MapDataset, config: LoaderConfig,
            collate: Callable[[Sequence[Any]], Batch]) -> grain.IterDataset:
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_prefetch)
    batched = dataset.to_iter_dataset(read).batch(
        config.batch_size, drop_remainder=config.drop_remainder, batch_fn=collate)
    if config.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; a program without absl.app has none
            flags.FLAGS.mark_as_parsed()
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size))
    return batched


# ---------------------------------------------------------------- per-sample pieces


def caption_tokens(tokenizer: Any, text: str, max_length: int) -> np.ndarray:
    """Caption ids for a text tower: the tokenizer's own special tokens, ending in EOS when it has one.

    CLIP's tokenizer already ends a caption with EOS (the text tower pools there) and BERT's with [SEP]
    (no EOS token); the synthetic world's tokenizer adds nothing, so EOS is appended for it.
    """
    ids = list(tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids[: max_length - 1] + [eos]
    return np.asarray(ids, np.int32)


def pad_rows(rows: Sequence[np.ndarray], width: int, fill: float | int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D rows into ``[B, width]`` with a validity mask (int32)."""
    out = np.full((len(rows), width), fill, dtype)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return out, mask


def audio_batch(waveforms: Sequence[np.ndarray | None], max_audio_samples: int,
                audio_config: AudioPreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """HuBERT inputs padded to a fixed width; a missing waveform (None) gives a zero row with an empty mask."""
    values = np.full((len(waveforms), max_audio_samples), audio_config.padding_value, np.float32)
    mask = np.zeros((len(waveforms), max_audio_samples), np.int32)
    present = [i for i, w in enumerate(waveforms) if w is not None]
    if present:
        processed, processed_mask = preprocess_audio(
            [waveforms[i] for i in present], audio_config, max_samples=max_audio_samples)
        values[present, : processed.shape[1]] = processed
        mask[present, : processed.shape[1]] = processed_mask
    return values, mask


def clip_pixels(record: Record, frame_size: int) -> np.ndarray | None:
    """The record's frames CLIP-normalised (per sample, so the read threads share the work); None without video."""
    if not record["has_video"]:
        return None
    frames = record["frames"]
    if frames.shape[1:3] != (frame_size, frame_size):
        raise ValueError(f"{record['clip_id']}: frames are {frames.shape[1]}x{frames.shape[2]}, "
                         f"the pipeline expects {frame_size}")
    return normalize(frames)


def frames_batch(pixels: Sequence[np.ndarray | None], frame_size: int) -> np.ndarray:
    """Stack normalised frames into ``[B, 16, S, S, 3]``; a clip without video gives zeros."""
    out = np.zeros((len(pixels), 16, frame_size, frame_size, 3), np.float32)
    for i, clip in enumerate(pixels):
        if clip is not None:
            out[i] = clip
    return out


# ---------------------------------------------------------------- stages


def stage1_dataset(records_dir: str | Path, text_tokenizer: Any, config: LoaderConfig, *,
                   frame_size: int, text_max_length: int = 77) -> grain.IterDataset:
    """Video clips with their visual caption, for VECB pretraining."""

    def sample(record: Record) -> dict[str, np.ndarray]:
        return {"frames": clip_pixels(record, frame_size),
                "text": caption_tokens(text_tokenizer, record["captions"][0], text_max_length)}

    collate = stage1_collate(text_tokenizer.pad_token_id, frame_size=frame_size, text_max_length=text_max_length)
    records = _ordered_records(records_dir, config, lambda r: r["has_video"] and bool(r["captions"]))
    return _finish(records.map(sample), config, collate)


def stage1_collate(pad_id: int, *, frame_size: int, text_max_length: int) -> Callable[[Sequence[Any]], Batch]:
    """Stage 1's batch of ``{"frames": [16, S, S, 3] | None, "text": ids}`` samples."""

    def collate(samples: Sequence[dict[str, np.ndarray]]) -> Batch:
        text_ids, text_mask = pad_rows([s["text"] for s in samples], text_max_length, pad_id, np.int32)
        return {"pixel_values": frames_batch([s["frames"] for s in samples], frame_size),
                "text_ids": text_ids, "text_mask": text_mask}

    return collate


def stage2_dataset(records_dir: str | Path, text_tokenizer: Any, config: LoaderConfig, *,
                   max_audio_samples: int, text_max_length: int = 64,
                   audio_config: AudioPreprocessConfig = AudioPreprocessConfig()) -> grain.IterDataset:
    """Audio clips with their auditory caption, for AECB pretraining."""

    def sample(record: Record) -> dict[str, np.ndarray]:
        return {"audio": audio_float32(record),
                "text": caption_tokens(text_tokenizer, record["captions"][-1], text_max_length)}

    collate = stage2_collate(text_tokenizer.pad_token_id, max_audio_samples=max_audio_samples,
                             text_max_length=text_max_length, audio_config=audio_config)
    records = _ordered_records(records_dir, config, lambda r: r["has_audio"] and bool(r["captions"]))
    return _finish(records.map(sample), config, collate)


def stage2_collate(pad_id: int, *, max_audio_samples: int, text_max_length: int,
                   audio_config: AudioPreprocessConfig = AudioPreprocessConfig()) -> Callable[[Sequence[Any]], Batch]:
    """Stage 2's batch of ``{"audio": waveform | None, "text": ids}`` samples."""

    def collate(samples: Sequence[dict[str, np.ndarray]]) -> Batch:
        input_values, audio_mask = audio_batch([s["audio"] for s in samples], max_audio_samples, audio_config)
        text_ids, text_mask = pad_rows([s["text"] for s in samples], text_max_length, pad_id, np.int32)
        return {"input_values": input_values, "audio_mask": audio_mask, "text_ids": text_ids, "text_mask": text_mask}

    return collate


def stage3_dataset(records_dir: str | Path, tokenizer: Any, config: LoaderConfig, *,
                   frame_size: int, max_audio_samples: int, audio_tokens_for: Callable[[int], int],
                   instruction: str = prompt.INFERENCE_INSTRUCTION,
                   buckets: Sequence[int] = prompt.DEFAULT_BUCKETS, max_context: int = prompt.MAX_CONTEXT,
                   truncate: str = "tail",
                   audio_config: AudioPreprocessConfig = AudioPreprocessConfig()) -> grain.IterDataset:
    """Instruction samples laid out by ``prompt.build_sample`` and padded to length buckets by ``prompt.collate``.

    ``audio_tokens_for(num_samples)`` is the audio encoder's frame count (e.g. ``HubertConfig.conv_output_length``):
    every valid audio frame becomes one LLM token.
    """

    def sample(record: Record) -> dict[str, Any]:
        audio = audio_float32(record)[:max_audio_samples] if record["has_audio"] else None
        laid_out = prompt.build_sample(
            tokenizer, subtitle=record["subtitle"], instruction=instruction, target=record["description"],
            num_audio_tokens=int(audio_tokens_for(len(audio))) if audio is not None else None,
            has_video=record["has_video"], max_context=max_context, truncate=truncate)
        return {"sample": laid_out, "frames": clip_pixels(record, frame_size), "audio": audio}

    collate = stage3_collate(tokenizer.pad_token_id, buckets=buckets, frame_size=frame_size,
                             max_audio_samples=max_audio_samples, audio_config=audio_config)
    records = _ordered_records(records_dir, config, lambda r: bool(r["description"]))
    return _finish(records.map(sample), config, collate)


def stage3_collate(pad_id: int, *, buckets: Sequence[int], frame_size: int, max_audio_samples: int,
                   audio_config: AudioPreprocessConfig = AudioPreprocessConfig()) -> Callable[[Sequence[Any]], Batch]:
    """Stage 3's batch of ``{"sample": prompt.Sample, "frames": ... | None, "audio": waveform | None}`` samples."""

    def collate(samples: Sequence[dict[str, Any]]) -> Batch:
        batch = prompt.collate([s["sample"] for s in samples], buckets, pad_id)
        batch["pixel_values"] = frames_batch([s["frames"] for s in samples], frame_size)
        batch["has_video"] = np.asarray([s["frames"] is not None for s in samples])
        batch["input_values"], batch["audio_mask"] = audio_batch(
            [s["audio"] for s in samples], max_audio_samples, audio_config)
        batch["has_audio"] = np.asarray([s["audio"] is not None for s in samples])
        return batch

    return collate


def batch_shapes(collate: Callable[[Sequence[Any]], Batch], sample: Any, batch_size: int) -> dict[str, Any]:
    """The fields, shapes and dtypes of ``collate``'s batch of ``batch_size`` samples like ``sample``, as
    ``jax.ShapeDtypeStruct``s: collated from one sample, so no batch-sized array is ever built (for
    ahead-of-time compilation, :mod:`xemogpt_jax.aot_check`)."""
    one = collate([sample])
    return {name: jax.ShapeDtypeStruct((batch_size, *np.shape(value)[1:]), np.asarray(value).dtype)
            for name, value in one.items()}


def stage3_pad_values(pad_id: int) -> dict[str, int | str]:
    """How each stage-3 sequence field is extended to a longer bucket ('edge': repeat the last column)."""
    return {"token_ids": pad_id, "kind": prompt.TEXT, "feature_index": 0, "labels": prompt.IGNORE_INDEX,
            "attention_mask": 0, "positions": "edge"}


# ---------------------------------------------------------------- checkpointing and global batches


def pad_to_widths(batch: Batch, widths: Mapping[str, int], pad_values: Mapping[str, int | str]) -> Batch:
    """Extend the last axis of the fields in ``pad_values`` to ``widths[name]`` (no-op when already that wide)."""
    out = dict(batch)
    for name, fill in pad_values.items():
        extra = widths[name] - batch[name].shape[-1]
        if extra < 0:
            raise ValueError(f"{name} is {batch[name].shape[-1]} wide, more than the agreed {widths[name]}")
        if extra:
            spec = [(0, 0)] * (batch[name].ndim - 1) + [(0, extra)]
            out[name] = (np.pad(batch[name], spec, mode="edge") if fill == "edge"
                         else np.pad(batch[name], spec, constant_values=fill))
    return out


def agree_on_widths(local_batch: Batch, pad_values: Mapping[str, int | str]) -> Batch:
    """Processes may pick different length buckets; pad every process to the widest one."""
    if jax.process_count() == 1:
        return local_batch
    local = np.asarray([local_batch[name].shape[-1] for name in pad_values], np.int32)
    widest = np.asarray(multihost_utils.process_allgather(local)).max(axis=0)
    return pad_to_widths(local_batch, dict(zip(pad_values, widest.tolist())), pad_values)


def make_global_batch(local_batch: Batch, mesh: Mesh,
                      pad_values: Mapping[str, int | str] | None = None) -> dict[str, jax.Array]:
    """Each process's numpy batch -> global ``jax.Array``s sharded on the batch axis (``batch_sharding``).

    ``pad_values`` (e.g. :func:`stage3_pad_values`) names the bucketed fields whose width the processes must
    agree on first.
    """
    if pad_values:
        local_batch = agree_on_widths(local_batch, pad_values)
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value)
            for name, value in local_batch.items()}
