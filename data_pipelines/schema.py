"""The clip record schema: one record per clip, serialised with msgpack (never pickle).

A record is a flat dict (plus one optional nested ``cues`` dict) with these fields:

==================  ==============================  ============================================================
field               type / shape                    meaning
==================  ==============================  ============================================================
version             str "MAJOR.MINOR"               schema version the writer used (readers refuse newer MAJOR)
clip_id             str (non-empty)                 clip name, e.g. EMER's ``name`` column
frames              uint8 [16, S, S, 3]             16 RGB frames after the CLIP resize (shortest edge S) +
                                                    centre crop S; S=224 at paper scale. Normalisation (CLIP
                                                    mean/std) happens at load time, so records stay compact and
                                                    independent of the encoder checkpoint. Shape [0, 0, 0, 3] when
                                                    ``has_video`` is False.
frame_indices       int32 [16]                      which decoded frames were kept: linspace(0, n-1, 16) cast to
                                                    int; shape [0] when ``has_video`` is False
audio               int16 [L], L <= 192000          16 kHz mono, the first 12 s only. int16 rather than float32:
                                                    half the bytes, and the sources are 16-bit (or lossy-coded)
                                                    audio, so the 2^-15 quantisation step is far below the signal's
                                                    own noise; HuBERT's feature extractor re-normalises each
                                                    utterance anyway. ``audio_float32`` turns it into [-1, 1).
                                                    shape [0] when ``has_audio`` is False.
audio_length        int                             number of valid samples (== len(audio))
subtitle            str                             transcript shown to the LLM (may be empty)
description         str                             target cue-level explanation (may be empty for caption data)
captions            list[str]                       short emotional-cue captions (bridge pretraining)
cues                None | {visual, auditory,       optional cue lists per axis (EmoCue-360 style)
                    emotional: list[str]}
emotion             None | str                      optional discrete emotion label
has_video           bool                            the clip has usable frames
has_audio           bool                            the clip has usable audio
split               None | str                      optional split name (train / val / test / ...)
clip_cls            None | float [16, D]            optional cached per-frame CLIP CLS (frozen encoder)
hubert_hidden       None | float [T, D]             optional cached HuBERT last hidden state (valid frames only)
hubert_frames       None | int                      number of valid HuBERT frames (== T)
==================  ==============================  ============================================================

Versioning: bump MINOR for additive, optional fields (old readers keep unknown fields untouched); bump MAJOR
for anything an old reader would misinterpret, so old readers refuse it instead of guessing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import serialization

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"

NUM_FRAMES = 16
AUDIO_SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 12
MAX_AUDIO_SAMPLES = AUDIO_SAMPLE_RATE * MAX_AUDIO_SECONDS
CUE_AXES = ("visual", "auditory", "emotional")

_REQUIRED = ("version", "clip_id", "frames", "frame_indices", "audio", "audio_length", "subtitle",
             "description", "captions", "has_video", "has_audio")
_OPTIONAL = ("cues", "emotion", "split", "clip_cls", "hubert_hidden", "hubert_frames")
_FLOAT_FEATURE_DTYPES = (np.float16, np.float32)


class RecordValidationError(ValueError):
    """A record field is missing or malformed; ``field`` names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"record field {field!r}: {problem}")
        self.field = field
        self.problem = problem


class SchemaVersionError(ValueError):
    """The record was written by a newer, incompatible schema major version."""


def empty_frames() -> np.ndarray:
    """The ``frames`` value of a clip without video."""
    return np.zeros((0, 0, 0, 3), np.uint8)


def empty_audio() -> np.ndarray:
    """The ``audio`` value of a clip without audio."""
    return np.zeros((0,), np.int16)


def make_record(clip_id: str, *, frames: np.ndarray | None = None, frame_indices: np.ndarray | None = None,
                audio: np.ndarray | None = None, subtitle: str = "", description: str = "",
                captions: list[str] | None = None, **optional: Any) -> dict[str, Any]:
    """Builds a valid record; missing media become the empty forms and set ``has_video``/``has_audio``."""
    has_video = frames is not None
    has_audio = audio is not None and len(audio) > 0
    record = {
        "version": SCHEMA_VERSION,
        "clip_id": clip_id,
        "frames": np.asarray(frames, np.uint8) if has_video else empty_frames(),
        "frame_indices": np.asarray(frame_indices, np.int32) if has_video else np.zeros((0,), np.int32),
        "audio": np.asarray(audio, np.int16) if has_audio else empty_audio(),
        "audio_length": int(len(audio)) if has_audio else 0,
        "subtitle": subtitle,
        "description": description,
        "captions": list(captions or []),
        "has_video": has_video,
        "has_audio": has_audio,
    }
    for key in _OPTIONAL:
        record[key] = optional.pop(key, None)
    if optional:
        raise RecordValidationError(sorted(optional)[0], "unknown field")
    validate_record(record)
    return record


def parse_version(version: Any) -> tuple[int, int]:
    """'MAJOR.MINOR' -> (major, minor)."""
    if not isinstance(version, str):
        raise RecordValidationError("version", f"expected a 'MAJOR.MINOR' string, got {type(version).__name__}")
    parts = version.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise RecordValidationError("version", f"expected 'MAJOR.MINOR', got {version!r}")
    return int(parts[0]), int(parts[1])


def check_version(version: Any) -> None:
    """Refuses records from a newer major schema version (a newer minor only adds optional fields)."""
    major, minor = parse_version(version)
    if major > SCHEMA_MAJOR:
        raise SchemaVersionError(
            f"record schema version {major}.{minor} is newer than this reader's {SCHEMA_VERSION}; "
            f"upgrade xemogpt-jax (data_pipelines) to read it, or rebuild the records with this version")


def _require_type(record: dict, field: str, kind: type | tuple[type, ...], allow_none: bool = False) -> None:
    value = record.get(field)
    if value is None and allow_none:
        return
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise RecordValidationError(field, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")


def _require_array(record: dict, field: str, dtypes: tuple, ndim: int) -> np.ndarray:
    value = record[field]
    if not isinstance(value, np.ndarray):
        raise RecordValidationError(field, f"expected a numpy array, got {type(value).__name__}")
    if value.dtype not in [np.dtype(d) for d in dtypes]:
        raise RecordValidationError(field, f"dtype {value.dtype} not in {[np.dtype(d).name for d in dtypes]}")
    if value.ndim != ndim:
        raise RecordValidationError(field, f"expected {ndim} dims, got shape {value.shape}")
    return value


def _require_str_list(field: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordValidationError(field, "expected a list of strings")


def validate_record(record: dict[str, Any]) -> None:
    """Raises RecordValidationError naming the first bad field; SchemaVersionError for a newer major version."""
    if not isinstance(record, dict):
        raise RecordValidationError("<record>", f"expected a dict, got {type(record).__name__}")
    for field in _REQUIRED:
        if field not in record:
            raise RecordValidationError(field, "missing")
    check_version(record["version"])
    _require_type(record, "clip_id", str)
    if not record["clip_id"]:
        raise RecordValidationError("clip_id", "empty")
    for field in ("subtitle", "description"):
        _require_type(record, field, str)
    for field in ("has_video", "has_audio"):
        _require_type(record, field, bool)
    _require_str_list("captions", record["captions"])

    frames = _require_array(record, "frames", (np.uint8,), 4)
    indices = _require_array(record, "frame_indices", (np.int32, np.int64), 1)
    if record["has_video"]:
        if frames.shape[0] != NUM_FRAMES or frames.shape[1] != frames.shape[2] or frames.shape[3] != 3:
            raise RecordValidationError("frames", f"expected [{NUM_FRAMES}, S, S, 3], got {frames.shape}")
        if frames.shape[1] == 0:
            raise RecordValidationError("frames", "frame size is zero")
        if indices.shape != (NUM_FRAMES,):
            raise RecordValidationError("frame_indices", f"expected [{NUM_FRAMES}], got {indices.shape}")
        if (indices < 0).any() or (np.diff(indices) < 0).any():
            raise RecordValidationError("frame_indices", "must be non-negative and non-decreasing")
    elif frames.size or indices.size:
        raise RecordValidationError("frames", "has_video is False but frames/frame_indices are not empty")

    audio = _require_array(record, "audio", (np.int16,), 1)
    _require_type(record, "audio_length", int)
    if record["audio_length"] != audio.shape[0]:
        raise RecordValidationError("audio_length", f"{record['audio_length']} != len(audio) {audio.shape[0]}")
    if audio.shape[0] > MAX_AUDIO_SAMPLES:
        raise RecordValidationError("audio", f"{audio.shape[0]} samples exceed {MAX_AUDIO_SAMPLES} (12 s at 16 kHz)")
    if record["has_audio"] != (audio.shape[0] > 0):
        raise RecordValidationError("has_audio", f"is {record['has_audio']} but audio has {audio.shape[0]} samples")

    cues = record.get("cues")
    if cues is not None:
        if not isinstance(cues, dict) or set(cues) != set(CUE_AXES):
            raise RecordValidationError("cues", f"expected a dict with exactly the keys {CUE_AXES}")
        for axis in CUE_AXES:
            _require_str_list(f"cues.{axis}", cues[axis])
    for field in ("emotion", "split"):
        _require_type(record, field, str, allow_none=True)

    if record.get("clip_cls") is not None:
        clip_cls = _require_array(record, "clip_cls", _FLOAT_FEATURE_DTYPES, 2)
        if clip_cls.shape[0] != NUM_FRAMES:
            raise RecordValidationError("clip_cls", f"expected [{NUM_FRAMES}, D], got {clip_cls.shape}")
    if record.get("hubert_hidden") is not None:
        hidden = _require_array(record, "hubert_hidden", _FLOAT_FEATURE_DTYPES, 2)
        _require_type(record, "hubert_frames", int)
        if record["hubert_frames"] != hidden.shape[0]:
            raise RecordValidationError("hubert_frames", f"{record['hubert_frames']} != {hidden.shape[0]} rows")
    elif record.get("hubert_frames") is not None:
        raise RecordValidationError("hubert_frames", "set without hubert_hidden")


def encode_record(record: dict[str, Any]) -> bytes:
    """Validates and serialises one record with msgpack (numpy arrays as flax's ndarray extension)."""
    validate_record(record)
    return serialization.msgpack_serialize(dict(record))


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses and validates one record; refuses a newer major schema version with SchemaVersionError."""
    try:
        record = serialization.msgpack_restore(data)
    except Exception as error:
        raise RecordValidationError("<record>", f"not a msgpack record ({error})") from error
    if isinstance(record, dict) and "version" in record:
        check_version(record["version"])
    validate_record(record)
    return record


def audio_float32(record: dict[str, Any]) -> np.ndarray:
    """The record's audio as float32 in [-1, 1)."""
    return record["audio"].astype(np.float32) / 32768.0
