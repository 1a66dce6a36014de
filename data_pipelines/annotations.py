"""Read clip annotations from CSV, JSON (a list, or {clip_id: {...}}) or JSONL with configurable column names.

The defaults read EMER's CSV as is (``name`` -> clip id, ``english`` -> description). A row that cannot be used
(no clip id, malformed, non-UTF-8 text, bad JSON line) becomes a :class:`BadRow` with its reason instead of
stopping the build; an annotation file that cannot be read at all raises :class:`AnnotationFileError`.
Entries keep their position in the file, which is what the builder shards by.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipelines.schema import CUE_AXES


class AnnotationFileError(Exception):
    """The annotation file as a whole cannot be read."""


@dataclass(frozen=True)
class Columns:
    """Which column (or JSON key) holds each field; absent optional columns mean empty/None."""

    clip_id: str = "name"
    description: str = "english"
    subtitle: str = "subtitle"
    captions: str = "captions"
    emotion: str = "emotion"
    split: str = "split"
    cues: str = "cues"
    video: str = "video"
    audio: str = "audio"


@dataclass(frozen=True)
class Annotation:
    position: int
    clip_id: str
    description: str = ""
    subtitle: str = ""
    captions: list[str] = field(default_factory=list)
    cues: dict[str, list[str]] | None = None
    emotion: str | None = None
    split: str | None = None
    video: str | None = None  # path relative to the media root, when the annotation names one
    audio: str | None = None


@dataclass(frozen=True)
class BadRow:
    position: int
    clip_id: str | None
    reason: str


class _RowError(ValueError):
    pass


def _has_undecodable_bytes(text: str) -> bool:
    """True where surrogateescape decoding kept raw non-UTF-8 bytes as lone surrogates."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _text(row: dict[str, Any], column: str, required: bool = False) -> str:
    value = row.get(column)
    if value is None:
        if required:
            raise _RowError(f"missing column {column!r}")
        return ""
    if not isinstance(value, str):
        raise _RowError(f"column {column!r}: expected text, got {type(value).__name__}")
    if _has_undecodable_bytes(value):
        raise _RowError(f"column {column!r}: non-UTF-8 text")
    return value


def _optional_text(row: dict[str, Any], column: str) -> str | None:
    return _text(row, column) or None


def _text_list(value: Any, column: str) -> list[str]:
    """A list of strings from JSON, or from a CSV cell holding a JSON list or a single caption."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        if _has_undecodable_bytes(value):
            raise _RowError(f"column {column!r}: non-UTF-8 text")
        if not value.lstrip().startswith("["):
            return [value]
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _RowError(f"column {column!r}: bad JSON list ({error})") from error
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _RowError(f"column {column!r}: expected a list of strings")
    if any(_has_undecodable_bytes(v) for v in value):
        raise _RowError(f"column {column!r}: non-UTF-8 text")
    return value


def _cues(row: dict[str, Any], column: str) -> dict[str, list[str]] | None:
    value = row.get(column)
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _RowError(f"column {column!r}: bad JSON ({error})") from error
    if not isinstance(value, dict):
        raise _RowError(f"column {column!r}: expected an object with keys {CUE_AXES}")
    return {axis: _text_list(value.get(axis), f"{column}.{axis}") for axis in CUE_AXES}


def parse_row(position: int, row: Any, columns: Columns) -> Annotation | BadRow:
    """One annotation row -> Annotation, or BadRow with the reason."""
    clip_id = row.get(columns.clip_id) if isinstance(row, dict) else None
    clip_id = clip_id if isinstance(clip_id, str) and not _has_undecodable_bytes(clip_id) else None
    try:
        if not isinstance(row, dict):
            raise _RowError(f"expected an object, got {type(row).__name__}")
        if None in row:
            raise _RowError("malformed row (more fields than the header)")
        if not _text(row, columns.clip_id, required=True).strip():
            raise _RowError(f"empty clip id column {columns.clip_id!r}")
        return Annotation(
            position=position,
            clip_id=clip_id.strip(),
            description=_text(row, columns.description),
            subtitle=_text(row, columns.subtitle),
            captions=_text_list(row.get(columns.captions), columns.captions),
            cues=_cues(row, columns.cues),
            emotion=_optional_text(row, columns.emotion),
            split=_optional_text(row, columns.split),
            video=_optional_text(row, columns.video),
            audio=_optional_text(row, columns.audio),
        )
    except _RowError as error:
        return BadRow(position, clip_id, str(error))


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise AnnotationFileError(f"{path}: cannot read annotation file ({error.strerror or error})") from error
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _csv_rows(path: Path, text: str, columns: Columns) -> list[Any]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as error:
        raise AnnotationFileError(f"{path}: unreadable CSV ({error})") from error
    if reader.fieldnames is None or columns.clip_id not in reader.fieldnames:
        raise AnnotationFileError(f"{path}: CSV header {reader.fieldnames} has no clip id column {columns.clip_id!r}")
    return rows


def _json_rows(path: Path, text: str, columns: Columns) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(f"{path}: unreadable JSON ({error})") from error
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [{columns.clip_id: name, **value} if isinstance(value, dict) else value for name, value in data.items()]
    raise AnnotationFileError(f"{path}: JSON must be a list of rows or an object {{clip_id: row}}")


def _jsonl_rows(text: str) -> list[Any]:
    rows: list[Any] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            rows.append(_RowError(f"line {number}: bad JSON ({error})"))
    return rows


def read_annotations(path: str | Path, columns: Columns = Columns()) -> list[Annotation | BadRow]:
    """All rows in file order; the format comes from the suffix (.csv, .json, .jsonl)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json", ".jsonl"):
        raise AnnotationFileError(f"{path}: unknown annotation format {suffix!r} (expected .csv, .json or .jsonl)")
    text = _read_text(path)
    if suffix == ".csv":
        rows = _csv_rows(path, text, columns)
    elif suffix == ".json":
        rows = _json_rows(path, text, columns)
    else:
        rows = _jsonl_rows(text)
    return [BadRow(i, None, str(row)) if isinstance(row, _RowError) else parse_row(i, row, columns)
            for i, row in enumerate(rows)]
