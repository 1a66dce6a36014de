"""``make demo``: the whole pipeline on the synthetic cue world, on a CPU, in minutes.

1. generate the synthetic world (records, ground-truth cues, tokenizer) unless it is already there;
2. stage 1 (VECB) and stage 2 (AECB) on the tiny configs, then stage 3 initialised from both;
3. explain the held-out clips with the trained model (greedy decoding), and again with their audio, then
   their frames, swapped for another held-out clip's of a different emotion (:mod:`xemogpt_jax.faithfulness`);
   extract cues with the ``rules`` extractor and score them against the world's ground-truth cues;
4. print a short report (losses per stage, sample explanations, wall time and one table: rows normal clips,
   conflict clips, swap (a), swap (b) and a chance row; columns EmoCue-360 F1, exact cue recall and the
   hallucination rate per axis) and write ``report.html`` (the tables, then conflict and swap clips with
   their frames and each stated cue marked right, hallucinated or wrong).

``--ablate-pretraining`` also trains stage 3 from scratch (no stage 1-2 bridges or towers, same steps)
and scores it the same way, for the "with vs without stages 1-2" comparison (about 1.5x the time).
The tiny configs train the random-init towers (``model.train_encoders``, see ``configs/align_video.py``).

Rerunning reuses finished stages (each is a resumable trainer workdir) as long as the world in the workdir
is the one this generator writes (``synth.is_current_world``); otherwise, or with ``--fresh``, it starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import ml_collections


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train and evaluate XEmoGPT end to end on synthetic data.")
    parser.add_argument("--workdir", default="demo_out", help="world, stage workdirs and the report go here")
    parser.add_argument("--clips", type=int, default=800, help="clips in the synthetic world (10%% held out)")
    parser.add_argument("--steps", default="1500,600,1200",
                        help="train steps of stages 1, 2 and 3 (docs/training.md says why these)")
    parser.add_argument("--eval-clips", type=int, default=64,
                        help="held-out clips to explain and score (their audio and frame swaps are added)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    parser.add_argument("--ablate-pretraining", action="store_true",
                        help="also train stage 3 without stages 1-2 (same steps) and score both")
    return parser.parse_args(argv)


# Contrastive stages see more negatives per step than the tiny default of 8 (their steps are cheap).
BATCH_SIZE = {"align_video": 32, "align_audio": 16, "sft": 8}


def stage_config(module: Any, world: Path, steps: int) -> ml_collections.ConfigDict:
    config = module.get_config("tiny")
    config.data.batch_size = BATCH_SIZE[config.stage]
    config.data.train_dir = str(world / "train")
    config.data.eval_dir = str(world / "heldout")
    config.init_from.tokenizer = str(world / "tokenizer")
    config.train.steps = steps
    config.train.eval_every = steps
    config.checkpoint.every_steps = steps
    config.optim.warmup_steps = max(1, steps // 10)
    return config


OUTPUTS = ("world", "stage1", "stage2", "stage3", "stage3_scratch", "report.txt", "report.html", "explanations.json")


def clear(root: Path) -> None:
    """Delete what an earlier demo wrote under ``root``, and nothing else (``--workdir`` may be shared)."""
    for name in OUTPUTS:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_losses(workdir: Path) -> tuple[float | None, float | None, float | None]:
    """(first logged train loss, last logged train loss, last eval loss) of a trainer workdir."""
    log = workdir / "metrics.jsonl"
    if not log.exists():
        return None, None, None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    evals = [r["train/eval_loss"] for r in records if "train/eval_loss" in r]
    return (train[0] if train else None, train[-1] if train else None, evals[-1] if evals else None)


def heldout_clips(world: Path, count: int) -> list[Any]:
    from data_pipelines.records import open_source
    from data_pipelines.schema import decode_record
    from xemogpt_jax.explainer import clip_from_record

    source = open_source(world / "heldout")
    return [clip_from_record(decode_record(source[i])) for i in range(min(count, len(source)))]


def chance_cues(ground_truth: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Each clip predicted with another clip's true cues: cue lists drawn from the same pools."""
    return {name: ground_truth[names[(i + 1) % len(names)]] for i, name in enumerate(names)}


def explain(model: Any, clips: list[Any], max_new_tokens: int) -> dict[str, str]:
    """Greedy explanations of ``clips``, eight at a time, by clip id."""
    from xemogpt_jax import explainer

    decoding = explainer.Decoding(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    texts = {}
    for start in range(0, len(clips), 8):
        chunk = clips[start : start + 8]
        texts.update(zip([c.clip_id for c in chunk], model.explain(chunk, decoding)))
    return texts


@dataclasses.dataclass
class Evaluation:
    """One model's explanations of the held-out clips and of their swaps, the cues taken from them, the
    ground truth of every explained clip, the clip ids of each table row and the clips' frames."""

    texts: dict[str, str]
    cues: dict[str, Any]
    truth: dict[str, Any]
    rows: dict[str, list[str]]
    frames: dict[str, Any]


ROW_NAMES = {"normal": "normal clips", "conflict": "conflict clips",
             "swap (a)": "swap (a): audio replaced", "swap (b)": "swap (b): frames replaced"}


def evaluate(stage3: Path, world: Path, count: int, max_new_tokens: int) -> Evaluation:
    """Explain the first ``count`` held-out clips and their swaps (:mod:`xemogpt_jax.faithfulness`: each
    agreeing audio+video clip with another clip's audio, then with another clip's frames), extract cues
    with the ``rules`` extractor and group them into the table's rows."""
    from xemogpt_jax import explainer, faithfulness
    from xemogpt_jax.cue_extraction import rules_cues

    ground_truth = json.loads((world / "heldout_cues.json").read_text())
    clips = {clip.clip_id: clip for clip in heldout_clips(world, count)}
    names = list(clips)
    truth = {name: ground_truth[name] for name in names}
    rows = {ROW_NAMES[group]: members for group, members in faithfulness.groups(ground_truth, names).items()}
    inputs = list(clips.values())
    for row, replace in faithfulness.SWAPS.items():
        made = faithfulness.swaps(ground_truth, names, replace)
        rows[ROW_NAMES[row]] = [swap.name for swap in made]
        for swap in made:
            seen = clips[swap.frames_from]  # its frames and subtitle, the other clip's audio
            inputs.append(dataclasses.replace(seen, clip_id=swap.name, audio=clips[swap.audio_from].audio))
            truth[swap.name] = faithfulness.swap_truth(swap, ground_truth)
    model = explainer.load(stage3, tokenizer=world / "tokenizer")
    texts = explain(model, inputs, max_new_tokens)
    cues = {name: rules_cues(text) for name, text in texts.items()}
    frames = {clip.clip_id: clip.frames for clip in inputs if clip.frames is not None}
    return Evaluation(texts, cues, truth, rows, frames)


def faithfulness_table(evaluation: Evaluation, embed: Any) -> tuple[dict[str, list], dict[str, int]]:
    """The table's cells and clip counts per row, plus a chance row (each normal clip scored with another
    normal clip's true cues)."""
    from xemogpt_jax import emocue360, faithfulness

    cells, counts = {}, {}
    normal = evaluation.rows[ROW_NAMES["normal"]]
    chance = chance_cues(evaluation.truth, normal)
    for row, members in [*evaluation.rows.items(), ("chance (normal clips)", normal)]:
        predicted = chance if row.startswith("chance") else {name: evaluation.cues[name] for name in members}
        truth = {name: evaluation.truth[name] for name in members}
        f1 = emocue360.score(predicted, truth, embed)["axes"]
        cells[row], counts[row] = faithfulness.table_row(f1, predicted, truth), len(members)
    return cells, counts


EXAMPLES_PER_ROW = 3


def html_report(evaluations: dict[str, Evaluation], tables: dict[str, tuple[dict[str, list], dict[str, int]]]) -> str:
    """The tables, then a few conflict and swap clips of the main run with frames and each cue marked."""
    from xemogpt_jax import faithfulness, report

    main_run = evaluations["stages 1-2-3"]
    sections = []
    for row, members in main_run.rows.items():
        if row == ROW_NAMES["normal"]:
            continue
        for name in members[:EXAMPLES_PER_ROW]:
            truth = main_run.truth[name]
            marks = faithfulness.verdicts(name, main_run.cues[name], truth)
            sections.append(report.verdict_section(name, row, main_run.frames.get(name), main_run.texts[name],
                                                   marks, faithfulness.missed(main_run.cues[name], truth)))
    return report.faithfulness_page("XEmoGPT demo: faithful to each modality", faithfulness.COLUMNS, tables, sections)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    root = Path(args.workdir)
    if args.fresh:
        clear(root)
    world = root / "world"
    steps = [int(s) for s in args.steps.split(",")]

    from configs import align_audio, align_video, sft
    from data_pipelines import synth
    from xemogpt_jax import stages, trainer

    if not synth.is_current_world(world, num_clips=args.clips):
        if world.exists():
            print(f"[demo] {world} was written by another generator version or --clips: starting over", flush=True)
            clear(root)
        print(f"[demo] writing the synthetic cue world ({args.clips} clips) to {world}", flush=True)
        synth.write_world(world, num_clips=args.clips)

    runs = {"stage 1 (VECB)": root / "stage1", "stage 2 (AECB)": root / "stage2", "stage 3 (SFT)": root / "stage3"}
    video = stage_config(align_video, world, steps[0])
    audio = stage_config(align_audio, world, steps[1])
    instruct = stage_config(sft, world, steps[2])
    scratch = stage_config(sft, world, steps[2])
    instruct.init_from.video_bridge = str(runs["stage 1 (VECB)"])
    instruct.init_from.audio_bridge = str(runs["stage 2 (AECB)"])
    configs = [video, audio, instruct]
    if args.ablate_pretraining:
        runs["stage 3 w/o 1-2"] = root / "stage3_scratch"
        configs.append(scratch)
    for (name, workdir), config in zip(runs.items(), configs):
        print(f"[demo] {name}: {config.train.steps} steps -> {workdir}", flush=True)
        trainer.run(config, workdir, stages.task_for(config))

    from xemogpt_jax import emocue360, faithfulness

    print("[demo] explaining held-out clips and their swaps, scoring them", flush=True)
    models = {"stages 1-2-3": runs["stage 3 (SFT)"]}
    if args.ablate_pretraining:
        models["stage 3 only (no stages 1-2, same stage-3 steps)"] = runs["stage 3 w/o 1-2"]
    evaluations = {name: evaluate(workdir, world, args.eval_clips, args.max_new_tokens)
                   for name, workdir in models.items()}
    embed = emocue360.jax_embedder(emocue360.default_embedder_dir())
    tables = {name: faithfulness_table(evaluation, embed) for name, evaluation in evaluations.items()}

    lines = ["", "=" * 72, "XEmoGPT demo report (synthetic cue world, tiny models, CPU)", "=" * 72]
    for name, workdir in runs.items():
        first, last, evaluated = read_losses(workdir)
        shown = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{name:<16} train loss {shown(first)} -> {shown(last)}   held-out loss {shown(evaluated)}")
    lines.append("")
    main_run = evaluations["stages 1-2-3"]
    for members in main_run.rows.values():
        for clip_id in members[:1]:
            lines.append(f"[{clip_id}] generated: {main_run.texts[clip_id].strip()[:400]}")
            lines.append(f"[{clip_id}] true cues: {json.dumps(main_run.truth[clip_id])[:400]}")
            lines.append("")
    for name, (cells, counts) in tables.items():
        lines.append(f"held-out clips, {name} (rules cue extractor; F1: EmoCue-360; exact: exact cue recall; "
                     "halluc: hallucination rate):")
        lines.append(faithfulness.format_table(cells, counts))
        lines.append("")
    lines.append(f"total wall time {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    print(text)
    (root / "report.txt").write_text(text + "\n")
    (root / "explanations.json").write_text(json.dumps(main_run.texts, indent=1))
    (root / "report.html").write_text(html_report(evaluations, tables), encoding="utf-8")
    print(f"[demo] wrote {root / 'report.txt'} and {root / 'report.html'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
