"""Waveform preprocessing for HuBERT in numpy, equal to transformers' ``Wav2Vec2FeatureExtractor``.

XEmoGPT keeps only the first 12 s (192,000 samples at 16 kHz) of each clip; the rest follows the
checkpoint's ``preprocessor_config.json``: pad to the longest clip with ``padding_value``, and,
when ``do_normalize``, scale each clip to zero mean / unit variance. As in HF, the statistics
cover only the valid samples when the extractor returns an attention mask, and the whole padded
row otherwise. The arithmetic is done in float32 with the same numpy calls, so results agree
bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

SAMPLING_RATE = 16_000
MAX_SECONDS = 12
MAX_SAMPLES = SAMPLING_RATE * MAX_SECONDS


@dataclasses.dataclass(frozen=True)
class AudioPreprocessConfig:
    """The ``preprocessor_config.json`` fields of a Wav2Vec2FeatureExtractor that change its output."""

    do_normalize: bool = True
    return_attention_mask: bool = True
    padding_value: float = 0.0
    sampling_rate: int = SAMPLING_RATE

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> AudioPreprocessConfig:
        if hf.get("feature_size", 1) != 1:
            raise ValueError(f"only mono waveforms (feature_size=1) are supported, got {hf['feature_size']}")
        if hf.get("padding_side", "right") != "right":
            raise ValueError("only right padding is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})


def first_seconds(waveform: np.ndarray, max_samples: int = MAX_SAMPLES) -> np.ndarray:
    """The first ``max_samples`` samples of a mono waveform (the XEmoGPT 12 s rule)."""
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform [S], got shape {waveform.shape}")
    return waveform[:max_samples]


def _normalize(row: np.ndarray, length: int) -> np.ndarray:
    valid = row[:length]
    return (row - valid.mean()) / np.sqrt(valid.var() + 1e-7)


def preprocess_audio(
    waveforms: Sequence[np.ndarray],
    config: AudioPreprocessConfig = AudioPreprocessConfig(),
    *,
    sampling_rate: int = SAMPLING_RATE,
    max_samples: int | None = MAX_SAMPLES,
) -> tuple[np.ndarray, np.ndarray]:
    """Mono waveforms -> ``(input_values float32 [B, S], attention_mask int32 [B, S])``, padded to the longest.

    ``max_samples=None`` keeps whole clips (plain HF behaviour).
    """
    if sampling_rate != config.sampling_rate:
        raise ValueError(f"audio is at {sampling_rate} Hz, the feature extractor expects {config.sampling_rate} Hz")
    if not waveforms:
        raise ValueError("preprocess_audio needs at least one waveform")
    clips = [first_seconds(np.asarray(w, dtype=np.float32), max_samples or len(w)) for w in waveforms]
    lengths = [len(c) for c in clips]
    width = max(lengths)
    values = np.full((len(clips), width), config.padding_value, dtype=np.float32)
    mask = np.zeros((len(clips), width), dtype=np.int32)
    for i, (clip, length) in enumerate(zip(clips, lengths)):
        values[i, :length] = clip
        mask[i, :length] = 1
    if config.do_normalize:
        for i, length in enumerate(lengths):
            if config.return_attention_mask:
                values[i] = _normalize(values[i], length)
                values[i, length:] = config.padding_value
            else:
                values[i] = _normalize(values[i], width)
    return values, mask
