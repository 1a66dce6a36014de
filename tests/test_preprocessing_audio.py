"""The numpy audio preprocessing against transformers' Wav2Vec2FeatureExtractor on a real wav."""

import wave
from pathlib import Path

import numpy as np
import pytest
from transformers import Wav2Vec2FeatureExtractor

from xemogpt_jax.preprocessing.audio import MAX_SAMPLES, AudioPreprocessConfig, preprocess_audio

MEDIA = Path(__file__).parents[2] / "shared/media"


@pytest.fixture(scope="module")
def waveform() -> np.ndarray:
    path = MEDIA / "sample_00000007.wav"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the shared sample media are missing")
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 16_000)
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def hf_extract(clips, *, do_normalize=True, return_attention_mask=True):
    extractor = Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=return_attention_mask)
    out = extractor(clips, sampling_rate=16_000, padding=True, return_tensors="np")
    return out["input_values"], out.get("attention_mask")


@pytest.mark.parametrize("do_normalize", [True, False])
def test_single_real_clip_matches_hf(waveform, do_normalize):
    config = AudioPreprocessConfig(do_normalize=do_normalize)
    values, mask = preprocess_audio([waveform], config)
    ref_values, ref_mask = hf_extract(waveform, do_normalize=do_normalize)
    assert values.dtype == np.float32 and values.shape == ref_values.shape == (1, len(waveform))
    np.testing.assert_allclose(values, ref_values, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(mask, ref_mask)
    if do_normalize:
        assert abs(values.mean()) < 1e-4 and abs(values.std() - 1) < 1e-3


@pytest.mark.parametrize("return_attention_mask", [True, False])
def test_padded_batch_matches_hf(waveform, return_attention_mask):
    clips = [waveform[:30_000], waveform, waveform[5_000:9_000] * 3.0]
    config = AudioPreprocessConfig(return_attention_mask=return_attention_mask)
    values, mask = preprocess_audio(clips, config)
    ref_values, ref_mask = hf_extract(clips, return_attention_mask=return_attention_mask)
    np.testing.assert_allclose(values, ref_values, atol=1e-5, rtol=0)
    if return_attention_mask:
        np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(mask.sum(-1), [30_000, len(waveform), 4_000])
    assert mask[0, 29_999] == 1 and mask[0, 30_000] == 0


def test_keeps_only_first_twelve_seconds(waveform):
    long_clip = np.tile(waveform, 3)  # ~14 s, longer than the 12 s XEmoGPT keeps
    assert len(long_clip) > MAX_SAMPLES == 192_000
    values, mask = preprocess_audio([long_clip, waveform])
    ref_values, ref_mask = hf_extract([long_clip[:MAX_SAMPLES], waveform])
    assert values.shape == (2, MAX_SAMPLES)
    np.testing.assert_allclose(values, ref_values, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(mask, ref_mask)


def test_config_from_hf_preprocessor_config():
    hf = {
        "do_normalize": True,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0,
        "return_attention_mask": False,
        "sampling_rate": 16000,
    }
    assert AudioPreprocessConfig.from_hf(hf) == AudioPreprocessConfig(return_attention_mask=False)
    with pytest.raises(ValueError, match="Hz"):
        preprocess_audio([np.zeros(10)], sampling_rate=8_000)
