"""Decode clips once into sharded ArrayRecord files: ``python -m data_pipelines.build --annotations A
--media-root DIR --out DIR [--num-shards N] [--workers W] [--frame-size 224] [column flags]``.

Sharding is by position in the annotation file (contiguous ranges), so the same inputs always give the same
shards, byte for byte. A shard is written under a temporary name and renamed once complete; its entry in
``manifest.json`` (records, skipped clips, sha256) is written right after. A restarted build keeps every shard
whose file still matches its manifest checksum and rebuilds the rest.

Broken clips are skipped and listed with their reason in ``skipped.jsonl``. Exit codes:
  0  every annotation row became a record
  2  usage error: missing media root, unreadable annotation file, bad arguments
  3  finished, but some clips were skipped (see skipped.jsonl)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from data_pipelines.annotations import Annotation, AnnotationFileError, BadRow, Columns, read_annotations
from data_pipelines.media import MediaError, decode_audio, decode_video
from data_pipelines.records import MANIFEST_NAME, SKIPPED_NAME, shard_name
from data_pipelines.schema import SCHEMA_VERSION, RecordValidationError, encode_record, make_record
from xemogpt_jax.cli_checks import Problems, UsageError, command

EXIT_OK = 0
EXIT_SKIPPED = 3
WRITER_OPTIONS = "group_size:1"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BuildConfig:
    annotations: Path
    media_root: Path
    out: Path
    num_shards: int = 1
    workers: int = 2
    frame_size: int = 224
    video_ext: str = ".mp4"
    audio_ext: str = ".wav"
    allow_missing_audio: bool = False
    columns: Columns = Columns()

    def fingerprint(self, annotations_sha256: str) -> dict[str, Any]:
        """What a finished shard depends on; a restart with a different fingerprint rebuilds everything."""
        return {"schema_version": SCHEMA_VERSION, "annotations_sha256": annotations_sha256,
                "media_root": str(self.media_root.resolve()), "num_shards": self.num_shards,
                "frame_size": self.frame_size, "video_ext": self.video_ext, "audio_ext": self.audio_ext,
                "allow_missing_audio": self.allow_missing_audio, "columns": asdict(self.columns)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_ranges(num_entries: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) position ranges, sizes differing by at most one."""
    base, extra = divmod(num_entries, num_shards)
    ranges, start = [], 0
    for k in range(num_shards):
        end = start + base + (1 if k < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _media_path(root: Path, named: str | None, clip_id: str, ext: str) -> Path:
    return root / named if named else root / f"{clip_id}{ext}"


def build_record(annotation: Annotation, config: BuildConfig) -> bytes:
    """Decodes one clip's media and serialises its record; MediaError / RecordValidationError when unusable."""
    video_path = _media_path(config.media_root, annotation.video, annotation.clip_id, config.video_ext)
    video = decode_video(video_path, frame_size=config.frame_size)
    audio_path = _media_path(config.media_root, annotation.audio, annotation.clip_id, config.audio_ext)
    if annotation.audio is None and not audio_path.exists():
        audio_path = video_path
    try:
        audio = decode_audio(audio_path)
    except MediaError as error:
        if not (config.allow_missing_audio and error.problem == "no audio stream"):
            raise
        audio = None
    record = make_record(annotation.clip_id, frames=video.frames, frame_indices=video.frame_indices, audio=audio,
                         subtitle=annotation.subtitle, description=annotation.description,
                         captions=annotation.captions, cues=annotation.cues, emotion=annotation.emotion,
                         split=annotation.split)
    return encode_record(record)


def _try_build(entry: Annotation | BadRow, config: BuildConfig) -> bytes | BadRow:
    if isinstance(entry, BadRow):
        return entry
    try:
        return build_record(entry, config)
    except (MediaError, RecordValidationError) as error:
        return BadRow(entry.position, entry.clip_id, str(error))
    except Exception as error:  # one clip's unexpected failure must not stop the other clips
        return BadRow(entry.position, entry.clip_id, f"unexpected {type(error).__name__}: {error}")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """Like executor.map, in order, but with at most 2 * workers items in flight (bounded memory)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Future] = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def mark_duplicates(entries: list[Annotation | BadRow]) -> list[Annotation | BadRow]:
    """Later rows repeating a clip id become BadRows (one record per clip)."""
    seen: dict[str, int] = {}
    marked: list[Annotation | BadRow] = []
    for entry in entries:
        if isinstance(entry, Annotation) and entry.clip_id in seen:
            entry = BadRow(entry.position, entry.clip_id, f"duplicate clip id (first at row {seen[entry.clip_id]})")
        elif isinstance(entry, Annotation):
            seen[entry.clip_id] = entry.position
        marked.append(entry)
    return marked


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _load_finished(out: Path, fingerprint: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shard entries from a previous run whose files are still intact and built from the same inputs."""
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.exists():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if manifest.get("fingerprint") != fingerprint:
        return {}
    finished = {}
    for entry in manifest.get("shards", []):
        path = out / entry["file"]
        if path.exists() and file_sha256(path) == entry["sha256"]:
            finished[entry["index"]] = entry
    return finished


def _manifest(config: BuildConfig, fingerprint: dict, shards: dict[int, dict], num_rows: int) -> dict[str, Any]:
    ordered = [shards[k] for k in sorted(shards)]
    return {
        "schema_version": SCHEMA_VERSION,
        "complete": len(ordered) == config.num_shards,
        "num_annotation_rows": num_rows,
        "num_records": sum(s["num_records"] for s in ordered),
        "num_skipped": sum(len(s["skipped"]) for s in ordered),
        "writer_options": WRITER_OPTIONS,
        "fingerprint": fingerprint,
        "shards": ordered,
    }


def _write_shard(index: int, span: tuple[int, int], results: Iterator[bytes | BadRow], config: BuildConfig,
                 progress: tqdm) -> dict[str, Any]:
    name = shard_name(index, config.num_shards)
    tmp = config.out / (name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    num_records, skipped = 0, []
    for _ in range(span[1] - span[0]):
        result = next(results)
        if isinstance(result, BadRow):
            skipped.append(asdict(result))
        else:
            writer.write(result)
            num_records += 1
        progress.update(1)
    writer.close()
    os.replace(tmp, config.out / name)
    return {"index": index, "file": name, "positions": list(span), "num_records": num_records,
            "skipped": skipped, "sha256": file_sha256(config.out / name)}


def build(config: BuildConfig, show_progress: bool = True) -> dict[str, Any]:
    """Builds (or finishes) the shards and returns the manifest; raises UsageError for unusable inputs."""
    problems = Problems()
    problems.file("--annotations", config.annotations)
    problems.folder("--media-root", config.media_root)
    for flag, value in (("--num-shards", config.num_shards), ("--workers", config.workers),
                        ("--frame-size", config.frame_size)):
        if value < 1:
            problems.add(flag, f"{value}: must be positive")
    problems.raise_if_any()
    try:
        entries = mark_duplicates(read_annotations(config.annotations, config.columns))
    except AnnotationFileError as error:
        raise UsageError(str(error)) from error
    config.out.mkdir(parents=True, exist_ok=True)
    for leftover in config.out.glob("*.tmp"):
        leftover.unlink()
    fingerprint = config.fingerprint(file_sha256(config.annotations))
    shards = _load_finished(config.out, fingerprint)
    ranges = shard_ranges(len(entries), config.num_shards)
    todo = [k for k in range(config.num_shards) if k not in shards]
    _write_json_atomic(config.out / MANIFEST_NAME, _manifest(config, fingerprint, shards, len(entries)))

    pending_entries = (entries[p] for k in todo for p in range(*ranges[k]))
    results = ordered_map(lambda entry: _try_build(entry, config), pending_entries, config.workers)
    total = sum(ranges[k][1] - ranges[k][0] for k in todo)
    with tqdm(total=total, desc="clips", unit="clip", disable=not show_progress) as progress:
        for k in todo:
            shards[k] = _write_shard(k, ranges[k], results, config, progress)
            _write_json_atomic(config.out / MANIFEST_NAME, _manifest(config, fingerprint, shards, len(entries)))
    manifest = _manifest(config, fingerprint, shards, len(entries))
    skipped_lines = [json.dumps(s, ensure_ascii=False) for k in sorted(shards) for s in shards[k]["skipped"]]
    (config.out / SKIPPED_NAME).write_text("".join(line + "\n" for line in skipped_lines))
    return manifest


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="CSV, JSON or JSONL annotation file")
    parser.add_argument("--media-root", type=Path, required=True, help="folder holding <clip_id><video-ext> files")
    parser.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads")
    parser.add_argument("--frame-size", type=int, default=224, help="CLIP resize + centre crop size S")
    parser.add_argument("--video-ext", default=".mp4")
    parser.add_argument("--audio-ext", default=".wav", help="separate audio file used when present")
    parser.add_argument("--allow-missing-audio", action="store_true",
                        help="keep clips without audio (has_audio=False) instead of skipping them")
    defaults = Columns()
    for name in Columns.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}-column", default=getattr(defaults, name),
                            help=f"column / key holding {name} (default: %(default)s)")
    args = parser.parse_args(argv)
    columns = Columns(**{name: getattr(args, f"{name}_column") for name in Columns.__dataclass_fields__})
    return BuildConfig(annotations=args.annotations, media_root=args.media_root, out=args.out,
                       num_shards=args.num_shards, workers=args.workers, frame_size=args.frame_size,
                       video_ext=args.video_ext, audio_ext=args.audio_ext,
                       allow_missing_audio=args.allow_missing_audio, columns=columns)


@command
def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    manifest = build(config)
    print(f"wrote {manifest['num_records']} records in {config.num_shards} shards to {config.out}; "
          f"skipped {manifest['num_skipped']} (see {config.out / SKIPPED_NAME})", file=sys.stderr)
    return EXIT_SKIPPED if manifest["num_skipped"] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
