"""Explain clips from the command line, one clip or a whole annotation file / ArrayRecord folder.

    python -m xemogpt_jax.infer --checkpoint DIR --video F.mp4 [--audio F.wav] [--subtitle TEXT]
    python -m xemogpt_jax.infer --checkpoint DIR --audio F.wav            # audio only
    python -m xemogpt_jax.infer --checkpoint DIR --batch A.csv --out preds.jsonl [--media-root DIR]
    python -m xemogpt_jax.infer --checkpoint DIR --batch RECORDS_DIR --out preds.jsonl

Without ``--audio`` the video's own audio track is used when it has one. Decoding defaults are
the release's (max_new_tokens 756, 5 beams with sampling at temperature 0.3 and top-p 0.9, seed 42).

``--batch`` writes one JSON line per clip (``id``, ``explanation``, ``seconds``: the clip's share
of its batch's wall time) and flushes after every batch; rerunning the same command skips the ids
already in ``--out`` and drops a half-written last line, so a killed run resumes without
duplicates or gaps. Clips whose media cannot be decoded get an ``error`` line instead.

``--instruction TEXT`` asks another question about the clip. ``--json`` prints (or, with
``--batch``, writes) the explanation with its ``token_ids``, ``token_logprobs`` (each generated
token's log-softmax under the model's raw logits), ``prompt_tokens``, ``generated_tokens`` and
``seconds``. ``--score TEXT`` (repeatable) or ``--score-file F`` generate nothing: they print each
given explanation's teacher-forced log-likelihood after the clip's prompt, per token and summed.

``chat_completion(messages, checkpoint=DIR)`` is the text entry point used by
``python -m xemogpt_jax.emocue360 extract --backend local``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import tqdm

from data_pipelines import annotations as annotations_lib
from data_pipelines import media, records, schema
from xemogpt_jax import cli_checks, infer_output, sharding
from xemogpt_jax import explainer as explainer_lib
from xemogpt_jax.explainer import Clip, Decoding, Explainer

EXIT_OK, EXIT_MEDIA = 0, 3


COMPUTE_DTYPES = {"bf16": "bfloat16", "f32": "float32"}


@functools.lru_cache(maxsize=2)
def load_cached(checkpoint: str, tokenizer: str | None = None, step: int | None = None, mesh: str = "1,-1,1",
                dtype: str | None = None) -> Explainer:
    """One loaded (and, once used, compiled) model per checkpoint per process, sharded on a local mesh."""
    devices = jax.local_devices()
    placement = sharding.make_mesh(tuple(int(s) for s in mesh.split(",")), devices=devices)
    return explainer_lib.load(checkpoint, tokenizer=tokenizer, step=step, mesh=placement,
                              dtype=COMPUTE_DTYPES[dtype] if dtype else None)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="stage-3 workdir, its checkpoints/ folder, or an imported model checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run config's init_from)")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh over the local devices "
                                                         "(default: FSDP over all of them)")
    parser.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), help="compute dtype (default: the run's)")


def chat_completion(messages: Sequence[dict[str, str]], checkpoint: str, decoding: Decoding | None = None) -> str:
    """The model's reply to a text conversation (the model is loaded once per checkpoint per process).

    Default decoding here is greedy (beams 1, no sampling) with the release's token budget: cue
    extraction wants the most likely reply.
    """
    decoding = decoding or Decoding(num_beams=1, do_sample=False)
    return load_cached(str(checkpoint)).chat([list(messages)], decoding)[0]


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    d = Decoding()
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--num-beams", type=int, default=d.num_beams)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--greedy", action="store_true", help="no sampling (with --num-beams 1: greedy decoding)")


def decoding_from(args: argparse.Namespace) -> Decoding:
    return Decoding(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=not args.greedy,
        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xemogpt_jax.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--video", type=Path)
    parser.add_argument("--audio", type=Path)
    parser.add_argument("--subtitle", default="")
    parser.add_argument("--batch", type=Path, help="annotation file (.csv/.json/.jsonl) or ArrayRecord folder")
    parser.add_argument("--out", type=Path, help="JSONL output of --batch (appended to; resumable)")
    parser.add_argument("--media-root", type=Path, help="folder of <clip_id>.mp4 for --batch annotations "
                                                        "(default: the annotation file's folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per model call in --batch mode")
    parser.add_argument("--no-progress", action="store_true")
    add_decoding_arguments(parser)
    infer_output.add_arguments(parser)
    return parser


def finished_ids(out: Path) -> set[str]:
    """Ids already written to ``out``; a trailing half-written line (a killed run) is cut off the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(out, "r+b") as f:
            f.truncate(len(complete))
    return {json.loads(line)["id"] for line in complete.decode().splitlines() if line.strip()}


def _annotation_clips(path: Path, media_root: Path, frame_size: int) -> Iterator[tuple[str, Clip | str]]:
    for row in annotations_lib.read_annotations(path):
        if isinstance(row, annotations_lib.BadRow):
            yield (row.clip_id or f"row{row.position}"), f"bad annotation row: {row.reason}"
            continue
        video = media_root / (row.video or f"{row.clip_id}.mp4")
        audio = media_root / row.audio if row.audio else media_root / f"{row.clip_id}.wav"
        try:
            yield row.clip_id, explainer_lib.read_clip(
                row.clip_id, video, audio if audio.exists() else None, row.subtitle, frame_size=frame_size
            )
        except (media.MediaError, ValueError) as error:
            yield row.clip_id, str(error)


def _record_clips(folder: Path, frame_size: int) -> Iterator[tuple[str, Clip | str]]:
    source = records.open_source(folder)
    for index in range(len(source)):
        record = schema.decode_record(source[index])
        if record["has_video"] and record["frames"].shape[1:3] != (frame_size, frame_size):
            yield record["clip_id"], (f"record frames are {record['frames'].shape[1]} px, the model wants "
                                      f"{frame_size} px: rebuild the records with --frame-size {frame_size}")
            continue
        try:
            yield record["clip_id"], explainer_lib.clip_from_record(record)
        except ValueError as error:
            yield record["clip_id"], str(error)


def _count(batch: Path) -> int:
    if batch.is_dir():
        return int(records.load_manifest(batch)["num_records"])
    return len(annotations_lib.read_annotations(batch))


def run_batch(model: Explainer, batch: Path, out: Path, media_root: Path, decoding: Decoding,
              batch_size: int, show_progress: bool,
              output: infer_output.Output = infer_output.Output()) -> dict[str, int]:
    """Explain every clip of ``batch`` not yet in ``out``; returns counts of written, skipped and failed."""
    done = finished_ids(out)
    if batch.is_dir():
        clips = _record_clips(batch, model.frame_size)
    else:
        clips = _annotation_clips(batch, media_root, model.frame_size)
    counts = {"written": 0, "already_done": 0, "failed": 0}
    bar = tqdm.tqdm(total=_count(batch), disable=not show_progress, unit="clip", dynamic_ncols=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as sink:

        def write(lines: list[dict]) -> None:
            sink.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(lines))

        pending: list[Clip] = []

        def flush_pending() -> None:
            lines = infer_output.records(model, pending, decoding, output)
            write([{"id": c.clip_id, **line} for c, line in zip(pending, lines)])
            counts["written"] += len(pending)
            pending.clear()

        for clip_id, clip in clips:
            if clip_id in done:
                counts["already_done"] += 1
                bar.update(1)
                continue
            done.add(clip_id)
            if isinstance(clip, str):
                write([{"id": clip_id, "error": clip}])
                counts["failed"] += 1
                continue
            pending.append(clip)
            if len(pending) == batch_size:
                flush_pending()
        if pending:
            flush_pending()
    bar.close()
    return counts


def check_args(args: argparse.Namespace) -> None:
    """Every input path named with its flag, before the model is loaded."""
    problems = cli_checks.Problems()
    problems.explainer_checkpoint("--checkpoint", args.checkpoint, "infer", args.step)
    problems.tokenizer_folder("--tokenizer", args.tokenizer)
    problems.file("--video", args.video)
    problems.file("--audio", args.audio)
    if args.batch is not None and args.batch.is_dir():
        problems.records_folder("--batch", args.batch)
    else:
        problems.file("--batch", args.batch)
    problems.folder("--media-root", args.media_root)
    problems.raise_if_any()


@cli_checks.command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch is None and args.video is None and args.audio is None:
        parser.error("give --video and/or --audio, or --batch")
    if args.batch is not None and args.out is None:
        parser.error("--batch needs --out")
    try:
        decoding = decoding_from(args)
        output = infer_output.from_args(args)
    except ValueError as error:
        parser.error(str(error))
    check_args(args)
    model = load_cached(str(args.checkpoint), args.tokenizer, args.step, args.mesh, args.dtype)
    if args.batch is not None:
        media_root = args.media_root or args.batch.parent
        counts = run_batch(model, args.batch, args.out, media_root, decoding, args.batch_size, not args.no_progress,
                           output)
        print(json.dumps(counts), file=sys.stderr)
        return EXIT_OK
    try:
        clip = explainer_lib.read_clip("clip", args.video, args.audio, args.subtitle, frame_size=model.frame_size)
    except media.MediaError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_MEDIA
    record = infer_output.records(model, [clip], decoding, output)[0]
    print(json.dumps(record, ensure_ascii=False) if output.as_json or output.scoring else record["explanation"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
