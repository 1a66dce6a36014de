"""The ArrayRecord builder: broken inputs are skipped with reasons, and a killed build resumes to identical shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data_pipelines.build import EXIT_OK, EXIT_SKIPPED, BuildConfig, build, file_sha256, main
from data_pipelines.records import MANIFEST_NAME, SKIPPED_NAME, load_manifest, open_source
from data_pipelines.schema import decode_record
from xemogpt_jax.cli_checks import EXIT_USAGE

REPO = Path(__file__).parents[1]
MEDIA = Path(__file__).parents[2] / "shared/media"
CLIP = MEDIA / "sample_00000007.mp4"
WAV = MEDIA / "sample_00000007.wav"


@pytest.fixture(scope="module", autouse=True)
def real_media():
    if not CLIP.exists() or not WAV.exists():
        pytest.fail(f"reference media missing: expected {CLIP} and {WAV}")


def write_video_only_mp4(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture
def broken_folder(tmp_path) -> tuple[Path, Path]:
    media = tmp_path / "media"
    media.mkdir()
    for name in ("good_a", "good_b", "bad_subtitle"):
        shutil.copy(CLIP, media / f"{name}.mp4")
    shutil.copy(WAV, media / "good_a.wav")
    (media / "truncated.mp4").write_bytes(CLIP.read_bytes()[: CLIP.stat().st_size // 2])
    (media / "text.mp4").write_text("this is not a video\n")
    write_video_only_mp4(media / "silent.mp4")
    (media / "empty.mp4").write_bytes(b"")
    rows = [b"good_a,first,hello", b"truncated,x,x", b"text,x,x", b"silent,x,x", b"empty,x,x", b"missing,x,x",
            b"bad_subtitle,x,caf\xe9", b"good_b,second,bye"]
    annotations = tmp_path / "annotations.csv"
    annotations.write_bytes(b"name,english,subtitle\n" + b"\n".join(rows) + b"\n")
    return annotations, media


EXPECTED_REASONS = {
    "truncated": "corrupt or unreadable media",
    "text": "corrupt or unreadable media",
    "silent": "no audio stream",
    "empty": "empty file",
    "missing": "file not found",
    "bad_subtitle": "column 'subtitle': non-UTF-8 text",
}


def test_broken_inputs_are_skipped_with_reasons(tmp_path, broken_folder):
    annotations, media = broken_folder
    out = tmp_path / "out"
    code = main(["--annotations", str(annotations), "--media-root", str(media), "--out", str(out),
                 "--num-shards", "3", "--workers", "2", "--frame-size", "32"])
    assert code == EXIT_SKIPPED
    skipped = [json.loads(line) for line in (out / SKIPPED_NAME).read_text().splitlines()]
    assert {s["clip_id"]: s["reason"] for s in skipped}.keys() == EXPECTED_REASONS.keys()
    for entry in skipped:
        assert EXPECTED_REASONS[entry["clip_id"]] in entry["reason"], entry
    source = open_source(out)
    records = [decode_record(source[i]) for i in range(len(source))]
    assert [(r["clip_id"], r["description"], r["subtitle"]) for r in records] == [
        ("good_a", "first", "hello"), ("good_b", "second", "bye")]
    assert all(r["frames"].shape == (16, 32, 32, 3) and r["audio_length"] == 74676 for r in records)
    manifest = load_manifest(out)
    assert (manifest["num_records"], manifest["num_skipped"], manifest["num_annotation_rows"]) == (2, 6, 8)


def test_video_without_audio_is_kept_when_allowed(tmp_path, broken_folder):
    annotations, media = broken_folder
    annotations.write_text("name,english\nsilent,quiet\n")
    config = BuildConfig(annotations=annotations, media_root=media, out=tmp_path / "out", frame_size=16,
                         allow_missing_audio=True)
    assert build(config, show_progress=False)["num_skipped"] == 0
    [record] = [decode_record(r) for r in open_source(tmp_path / "out")]
    assert record["has_video"] and not record["has_audio"] and record["frame_indices"].tolist()[-1] == 19


def test_usage_errors_exit_2(tmp_path, broken_folder):
    annotations, media = broken_folder
    assert main(["--annotations", str(annotations), "--media-root", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert main(["--annotations", str(tmp_path / "nope.csv"), "--media-root", str(media),
                 "--out", str(tmp_path / "o")]) == EXIT_USAGE


def shard_checksums(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.array_record"))}


def test_killed_build_resumes_to_identical_shards(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    names = [f"clip{i:02d}" for i in range(12)]
    for name in names:
        shutil.copy(CLIP, media / f"{name}.mp4")
    annotations = tmp_path / "a.csv"
    annotations.write_text("name,english\n" + "".join(f"{n},description of {n}\n" for n in names))
    args = ["--annotations", str(annotations), "--media-root", str(media), "--num-shards", "6", "--workers", "1",
            "--frame-size", "32"]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "data_pipelines.build", *args, "--out", str(killed)],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest_path, done = killed / MANIFEST_NAME, 0
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if manifest_path.exists():
            done = len(json.loads(manifest_path.read_text())["shards"])
            if done >= 1:
                break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 1 <= done < 6, "the build must be killed part-way for this test to mean anything"
    kept = {p.name: p.stat().st_mtime_ns for p in killed.glob("*.array_record")}

    resumed = build(BuildConfig(annotations=annotations, media_root=media, out=killed, num_shards=6, workers=1,
                                frame_size=32), show_progress=False)
    assert resumed["complete"] and resumed["num_records"] == 12
    for name, mtime in kept.items():
        assert (killed / name).stat().st_mtime_ns == mtime, f"finished shard {name} was rewritten"
    assert not list(killed.glob("*.tmp"))

    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == EXIT_OK
    assert shard_checksums(killed) == shard_checksums(reference)
    assert len(shard_checksums(reference)) == 6
    assert [s["sha256"] for s in resumed["shards"]] == list(shard_checksums(reference).values())

    damaged = killed / resumed["shards"][0]["file"]
    damaged.write_bytes(b"\0" + damaged.read_bytes()[1:])
    build(BuildConfig(annotations=annotations, media_root=media, out=killed, num_shards=6, workers=1,
                      frame_size=32), show_progress=False)
    assert shard_checksums(killed) == shard_checksums(reference)
