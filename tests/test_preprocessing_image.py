"""CLIP image preprocessing against transformers' CLIPImageProcessorPil on real decoded video frames."""

from pathlib import Path

import av
import numpy as np
import pytest
from transformers import CLIPImageProcessorPil

from xemogpt_jax.preprocessing.image import normalize, resize_and_center_crop

MEDIA = Path(__file__).parents[2] / "shared/media"


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    video = MEDIA / "sample_00000007.mp4"
    assert video.is_file(), f"test media missing: {video}"
    with av.open(str(video)) as container:
        decoded = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), container.decode(video=0))]
    return np.stack(decoded[::10])


def reference(frames: np.ndarray) -> np.ndarray:
    pixel_values = CLIPImageProcessorPil()(images=list(frames), return_tensors="np")["pixel_values"]
    return np.transpose(pixel_values, (0, 2, 3, 1))


@pytest.mark.parametrize("layout", ["landscape", "portrait"])
def test_matches_clip_image_processor_pil(frames, layout):
    frames = frames if layout == "landscape" else np.ascontiguousarray(frames.transpose(0, 2, 1, 3))
    cropped = resize_and_center_crop(frames)
    assert cropped.dtype == np.uint8 and cropped.shape == (len(frames), 224, 224, 3)
    pixels = normalize(cropped)
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, reference(frames), atol=1e-5, rtol=0)


def test_refuses_non_uint8_or_non_rgb(frames):
    with pytest.raises(ValueError):
        normalize(frames.astype(np.float32))
    with pytest.raises(ValueError):
        resize_and_center_crop(frames[..., :2])
