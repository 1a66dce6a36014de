"""Records/s: Grain over ArrayRecord (read + decode_record) vs decoding the mp4s on the fly, same samples.

Both paths yield the same thing (16 CLIP-cropped uint8 frames + 16 kHz int16 audio per clip) on one thread,
so the ratio is what decoding once buys. The clips are copies of shared/media/sample_00000007.mp4.

    python -m bench.data [--clips 16] [--frame-size 224] [--epochs 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import grain

from data_pipelines.build import BuildConfig, build
from data_pipelines.media import decode_audio, decode_video
from data_pipelines.records import open_source
from data_pipelines.schema import decode_record

CLIP = Path(__file__).resolve().parents[2] / "shared/media/sample_00000007.mp4"


def on_the_fly(paths: list[Path], frame_size: int, epochs: int) -> float:
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for path in paths:
            video, audio = decode_video(path, frame_size=frame_size), decode_audio(path)
            count += int(video.frames.shape[0] > 0 and audio.shape[0] > 0)
    return count / (time.perf_counter() - start)


def from_records(records_dir: Path, epochs: int) -> float:
    dataset = grain.MapDataset.source(open_source(records_dir)).repeat(epochs).map(decode_record)
    start, count = time.perf_counter(), 0
    for record in dataset:
        count += int(record["frames"].shape[0] > 0 and record["audio_length"] > 0)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frame-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if not CLIP.exists():
        raise SystemExit(f"reference clip missing: {CLIP}")
    with tempfile.TemporaryDirectory() as tmp:
        media = Path(tmp) / "media"
        media.mkdir()
        names = [f"clip{i:04d}" for i in range(args.clips)]
        for name in names:
            shutil.copy(CLIP, media / f"{name}.mp4")
        annotations = Path(tmp) / "annotations.csv"
        annotations.write_text("name,english\n" + "".join(f"{n},x\n" for n in names))
        start = time.perf_counter()
        build(BuildConfig(annotations=annotations, media_root=media, out=Path(tmp) / "records", num_shards=4,
                          workers=1, frame_size=args.frame_size), show_progress=False)
        build_rate = args.clips / (time.perf_counter() - start)
        decode_rate = on_the_fly([media / f"{n}.mp4" for n in names], args.frame_size, args.epochs)
        record_rate = from_records(Path(tmp) / "records", args.epochs)
    print(f"clips={args.clips} frame_size={args.frame_size} epochs={args.epochs} (1 thread each)")
    print(f"build once (1 worker):         {build_rate:9.1f} clips/s")
    print(f"on-the-fly mp4 decode:         {decode_rate:9.1f} records/s")
    print(f"Grain ArrayRecord read+decode: {record_rate:9.1f} records/s")
    print(f"speed-up: {record_rate / decode_rate:.1f}x")


if __name__ == "__main__":
    main()
