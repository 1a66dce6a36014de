"""CLIP image preprocessing in numpy, equal to transformers' ``CLIPImageProcessorPil``.

Split in two on purpose: :func:`resize_and_center_crop` runs once in the data builder, which
stores the cropped uint8 frames (4x smaller than float32); :func:`normalize` runs at load time.
The resize goes through PIL's bicubic filter on uint8 pixels, exactly as the reference does,
so the stored frames are bit-identical to what the HF processor would see before rescaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter edge to ``size``; the longer edge is truncated like HF does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [N,H,W,3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")


def resize_and_center_crop(frames: np.ndarray, size: int = 224, crop: int = 224) -> np.ndarray:
    """Bicubic-resize each frame's shortest edge to ``size``, then take the central ``crop x crop``: uint8 NHWC."""
    _check_frames(frames)
    height, width = shortest_edge_size(frames.shape[1], frames.shape[2], size)
    if crop > min(height, width):
        raise ValueError(f"crop {crop} exceeds the resized frame {height}x{width}")
    top, left = (height - crop) // 2, (width - crop) // 2
    out = np.empty((frames.shape[0], crop, crop, 3), np.uint8)
    for i, frame in enumerate(frames):
        resized = np.asarray(Image.fromarray(frame).resize((width, height), resample=Image.Resampling.BICUBIC))
        out[i] = resized[top : top + crop, left : left + crop]
    return out


def normalize(
    frames: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
    """Scale uint8 pixels by 1/255 and standardise per channel: float32 NHWC.

    The rounding follows the reference: rescale in float64, cast to float32, then subtract and
    divide with float32 mean/std.
    """
    _check_frames(frames)
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
