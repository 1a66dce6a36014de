"""Read built record shards back: the manifest, and a Grain random-access source over the shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain

from data_pipelines.schema import check_version

MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"


def shard_name(index: int, num_shards: int) -> str:
    return f"records-{index:05d}-of-{num_shards:05d}.array_record"


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The build's manifest; refuses an unfinished build and a newer major schema version."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; build the records with python -m data_pipelines.build")
    manifest = json.loads(path.read_text())
    check_version(manifest["schema_version"])
    if not manifest.get("complete"):
        raise ValueError(f"{path}: the build is unfinished ({len(manifest['shards'])} shards done); rerun it")
    return manifest


def shard_paths(directory: str | Path) -> list[Path]:
    """Non-empty shard files in shard order (record key order)."""
    manifest = load_manifest(directory)
    return [Path(directory) / s["file"] for s in manifest["shards"] if s["num_records"] > 0]


def open_source(directory: str | Path) -> grain.sources.ArrayRecordDataSource:
    """Random-access source of serialised records (bytes); decode each with schema.decode_record."""
    return grain.sources.ArrayRecordDataSource([str(p) for p in shard_paths(directory)])
