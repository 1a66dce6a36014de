"""Decode one clip's media with PyAV: 16 CLIP-cropped frames and 16 kHz mono int16 audio (first 12 s).

Frame sampling follows the paper: every frame is decoded, then indices linspace(0, n_frames - 1, 16) cast to
int are kept. Only the kept frames are converted to RGB. Decoded YUV frames are buffered up to
``max_buffered_frames``; a longer clip is decoded twice instead (count, then keep the sampled frames), so memory
stays bounded whatever the clip length.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from data_pipelines.schema import AUDIO_SAMPLE_RATE, MAX_AUDIO_SAMPLES, NUM_FRAMES
from xemogpt_jax.preprocessing.image import resize_and_center_crop


class MediaError(Exception):
    """A media file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # uint8 [16, S, S, 3]
    frame_indices: np.ndarray  # int32 [16]
    num_decoded_frames: int


def sample_frame_indices(num_decoded_frames: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """linspace(0, n - 1, num_frames) cast to int, exactly as the reference samples frames."""
    return np.linspace(0, num_decoded_frames - 1, num_frames).astype(int)


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise MediaError(path, "file not found")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty file (zero length)")
    try:
        return av.open(str(path))
    except av.error.FFmpegError as error:
        raise MediaError(path, f"corrupt or unreadable media ({error.strerror or error})") from error


def _decoded_frames(path: Path) -> Iterator[av.VideoFrame]:
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            yield from container.decode(stream)
        except av.error.FFmpegError as error:
            raise MediaError(path, f"corrupt video stream ({error.strerror or error})") from error


def decode_video(path: str | os.PathLike, frame_size: int = 224, num_frames: int = NUM_FRAMES,
                 max_buffered_frames: int = 1024) -> DecodedVideo:
    """All frames decoded, ``num_frames`` kept at linspace indices, CLIP resize + centre crop to ``frame_size``."""
    path = Path(path)
    buffered: list[av.VideoFrame] = []
    count = 0
    for frame in _decoded_frames(path):
        count += 1
        if count <= max_buffered_frames:
            buffered.append(frame)
        elif buffered:
            buffered.clear()
    if count == 0:
        raise MediaError(path, "zero length (no decodable video frames)")
    indices = sample_frame_indices(count, num_frames)
    if count <= max_buffered_frames:
        kept = [buffered[i] for i in indices]
    else:
        wanted = set(indices.tolist())
        by_index = {i: frame for i, frame in enumerate(_decoded_frames(path)) if i in wanted}
        if len(by_index) != len(wanted):
            raise MediaError(path, f"second decode pass gave fewer than the {count} frames of the first")
        kept = [by_index[i] for i in indices]
    rgb = np.stack([frame.to_ndarray(format="rgb24") for frame in kept])
    return DecodedVideo(resize_and_center_crop(rgb, size=frame_size, crop=frame_size), indices.astype(np.int32),
                        count)


def decode_audio(path: str | os.PathLike, max_samples: int = MAX_AUDIO_SAMPLES) -> np.ndarray:
    """The first ``max_samples`` of the file's first audio track, resampled to 16 kHz mono int16."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].shape[0]
                if total >= max_samples:
                    break
            else:
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        except av.error.FFmpegError as error:
            raise MediaError(path, f"corrupt audio stream ({error.strerror or error})") from error
    audio = np.concatenate(chunks)[:max_samples] if chunks else np.zeros((0,), np.int16)
    if audio.shape[0] == 0:
        raise MediaError(path, "zero length (no decodable audio samples)")
    return audio.astype(np.int16, copy=False)
