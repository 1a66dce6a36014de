"""The prompt of the released weights and the static-shape sequence layout built from it.

One sample becomes ``[pad-as-BOS][condition][target + EOS]`` (docs/architecture.md, section 3). The condition
is the template with the subtitle and instruction filled in, cut at ``<AudioHere>`` and
``<VideoHere>``: each text piece is tokenized on its own without special tokens, and the cut
points become *slots* that the model fills with audio or video tokens. A sample without a
modality keeps that placeholder as literal text, as the reference does.

Every position carries three integers, so a jitted model can splice features without any
Python-side control flow:

- ``token_ids``: the text token (0 at feature slots),
- ``kind``: ``TEXT`` / ``AUDIO`` / ``VIDEO``,
- ``feature_index``: for a slot, the index of the frame in that sample's audio or video token
  sequence (0 elsewhere).

Label convention (pre-shifted): ``labels[i]`` is the token that the logits at position ``i``
must predict, i.e. ``token_ids[i + 1]`` when position ``i + 1`` holds a target token, and
``IGNORE_INDEX`` everywhere else. The loss is then a plain per-position cross-entropy of
``logits[:, i]`` against ``labels[:, i]`` with no shifting at the call site.

Truncation (``truncate``, the run config's ``data.truncate``): a condition longer than
``max_context`` keeps its *last* ``max_context`` positions by default (``"tail"``), so the
instruction and ``###Assistant: `` that the target follows always stay. This is our choice and a
deviation from the release, whose ``prompt_wrap`` keeps the *first* ``max_context`` positions and so
drops the question of an over-long sequence; ``"head"`` reproduces that cut exactly, for comparisons
with the authors' numbers (docs/architecture.md). Either way the BOS position is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

AUDIO_PLACEHOLDER = "<AudioHere>"
VIDEO_PLACEHOLDER = "<VideoHere>"

PROMPT_TEMPLATE = (
    "###Human: The audio content is as follows: <Audio><AudioHere></Audio>. "
    "Meanwhile, we uniformly sample raw frames from the video: <Video><VideoHere></Video>. "
    "The subtitle of this video is: <Subtitle>{subtitle}</Subtitle>. "
    "Now, please answer my question based on all the provided information. {instruction} ###Assistant: "
)

INFERENCE_INSTRUCTION = (
    "Please describe the emotional state of the speaker as one structured paragraph in the form "
    '"In the video, ... In the audio, ...", covering the visual and the auditory emotional cues, '
    "and end with an inference of the emotional state drawn from all of these cues."
)

TEXT, AUDIO, VIDEO = 0, 1, 2
IGNORE_INDEX = -100
NUM_VIDEO_TOKENS = 16
MAX_CONTEXT = 2048
DEFAULT_BUCKETS = (256, 512, 768, 1024, 1536, 2048, 2560, 3072)
TRUNCATIONS = ("tail", "head")


class Tokenizer(Protocol):
    """The part of a HF tokenizer the layout uses."""

    pad_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    """One laid-out sequence; all arrays have the same length."""

    token_ids: np.ndarray  # int32 [L]
    kind: np.ndarray  # int8 [L]
    feature_index: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L], pre-shifted (see module docstring)
    condition_length: int  # positions between BOS and the first target token

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def _special_id(tokenizer: Tokenizer, name: str) -> int:
    value = getattr(tokenizer, name)
    if value is None:
        raise ValueError(f"tokenizer has no {name}; the layout needs it (pad serves as BOS, EOS ends targets)")
    return int(value)


def _condition_segments(subtitle: str, instruction: str, has_audio: bool, has_video: bool) -> list[str | int]:
    """The filled template as text pieces and slot kinds, in order.

    The template is cut before the fields are filled so a subtitle that happens to contain a
    placeholder string stays text.
    """
    before_audio, rest = PROMPT_TEMPLATE.split(AUDIO_PLACEHOLDER)
    between, after_video = rest.split(VIDEO_PLACEHOLDER)
    after_video = after_video.format(subtitle=subtitle, instruction=instruction)
    segments: list[str | int] = []
    text = before_audio
    for present, kind, placeholder, following in (
        (has_audio, AUDIO, AUDIO_PLACEHOLDER, between),
        (has_video, VIDEO, VIDEO_PLACEHOLDER, after_video),
    ):
        if present:
            segments += [text, kind]
            text = following
        else:
            text += placeholder + following
    segments.append(text)
    return segments


def build_sample(
    tokenizer: Tokenizer,
    *,
    subtitle: str,
    instruction: str,
    target: str | None = None,
    num_audio_tokens: int | None = None,
    has_video: bool = False,
    num_video_tokens: int = NUM_VIDEO_TOKENS,
    max_context: int = MAX_CONTEXT,
    truncate: str = "tail",
) -> Sample:
    """Lay out one sample; ``num_audio_tokens=None`` / ``has_video=False`` mean the modality is absent.

    ``target=None`` builds a generation prompt (``[BOS][condition]``, no labels). ``truncate`` is
    ``"tail"`` or ``"head"`` (see the module docstring).
    """
    if truncate not in TRUNCATIONS:
        raise ValueError(f"truncate must be one of {TRUNCATIONS}, got {truncate!r}")
    pad_id = _special_id(tokenizer, "pad_token_id")
    token_ids: list[int] = []
    kind: list[int] = []
    feature_index: list[int] = []
    segments = _condition_segments(subtitle, instruction, num_audio_tokens is not None, has_video)
    for segment in segments:
        if isinstance(segment, str):
            ids = tokenizer.encode(segment, add_special_tokens=False) if segment else []
            token_ids += ids
            kind += [TEXT] * len(ids)
            feature_index += [0] * len(ids)
        else:
            count = num_audio_tokens if segment == AUDIO else num_video_tokens
            token_ids += [0] * count
            kind += [segment] * count
            feature_index += range(count)
    kept = slice(max(0, len(token_ids) - max_context), None) if truncate == "tail" else slice(0, max_context)
    token_ids, kind, feature_index = token_ids[kept], kind[kept], feature_index[kept]
    condition_length = len(token_ids)

    target_ids = []
    if target is not None:
        target_ids = tokenizer.encode(target, add_special_tokens=False) + [_special_id(tokenizer, "eos_token_id")]
    token_ids = [pad_id] + token_ids + target_ids
    kind = [TEXT] + kind + [TEXT] * len(target_ids)
    feature_index = [0] + feature_index + [0] * len(target_ids)
    labels = np.full(len(token_ids), IGNORE_INDEX, np.int32)
    first_target = 1 + condition_length
    labels[first_target - 1 : len(token_ids) - 1] = target_ids
    return Sample(
        token_ids=np.asarray(token_ids, np.int32),
        kind=np.asarray(kind, np.int8),
        feature_index=np.asarray(feature_index, np.int32),
        labels=labels,
        condition_length=condition_length,
    )


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` positions."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} positions exceeds the largest bucket {max(buckets)}")


def _stack(samples: Sequence[Sample], bucket: int, pad_id: int, left: bool) -> dict[str, np.ndarray]:
    fields = {
        "token_ids": (np.int32, pad_id),
        "kind": (np.int8, TEXT),
        "feature_index": (np.int32, 0),
        "labels": (np.int32, IGNORE_INDEX),
    }
    batch = {name: np.full((len(samples), bucket), fill, dtype) for name, (dtype, fill) in fields.items()}
    batch["attention_mask"] = np.zeros((len(samples), bucket), np.int32)
    for row, sample in enumerate(samples):
        span = slice(bucket - len(sample), bucket) if left else slice(0, len(sample))
        for name in fields:
            batch[name][row, span] = getattr(sample, name)
        batch["attention_mask"][row, span] = 1
    batch["positions"] = np.maximum(np.cumsum(batch["attention_mask"], axis=1) - 1, 0).astype(np.int32)
    batch["condition_length"] = np.asarray([s.condition_length for s in samples], np.int32)
    return batch


def collate(
    samples: Sequence[Sample], buckets: Sequence[int] = DEFAULT_BUCKETS, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Right-pad a training batch to the smallest bucket that fits its longest sample.

    Returns ``[B, bucket]`` arrays ``token_ids, kind, feature_index, labels, attention_mask,
    positions`` and ``condition_length [B]``; padding is ``pad_id`` text with label
    ``IGNORE_INDEX`` and attention mask 0.
    """
    bucket = pick_bucket(max(len(s) for s in samples), buckets)
    return _stack(samples, bucket, pad_id, left=False)


def collate_for_generation(
    samples: Sequence[Sample], buckets: Sequence[int] = DEFAULT_BUCKETS, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Left-pad prompts (samples built with ``target=None``) so every row ends at the last column.

    ``positions`` restart at 0 on each row's first real token, so a left-padded row sees the
    same RoPE positions as it would alone.
    """
    if any(s.labels.max(initial=IGNORE_INDEX) != IGNORE_INDEX for s in samples):
        raise ValueError("generation prompts must be built with target=None")
    bucket = pick_bucket(max(len(s) for s in samples), buckets)
    return _stack(samples, bucket, pad_id, left=True)
