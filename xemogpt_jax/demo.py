"""``make demo``: the whole pipeline on the synthetic cue world, on a CPU, in minutes.

1. generate the synthetic world (records, ground-truth cues, tokenizer) unless it is already there;
2. stage 1 (VECB) and stage 2 (AECB) on the tiny configs, then stage 3 initialised from both;
3. explain the held-out clips with the trained model (greedy decoding), extract cues with the ``rules``
   extractor and score them with EmoCue-360 against the world's ground-truth cues;
4. print a short report (losses per stage, sample explanations, EmoCue-360 table with exact cue recall, a
   chance row, the visual cues named from the frames alone, wall time).

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
    parser.add_argument("--steps", default="1000,300,800", help="train steps of stages 1, 2 and 3")
    parser.add_argument("--eval-clips", type=int, default=64, help="held-out clips to explain and score")
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


OUTPUTS = ("world", "stage1", "stage2", "stage3", "stage3_scratch", "report.txt", "explanations.json")


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


def exact_cue_recall(predicted: dict[str, Any], ground_truth: dict[str, Any]) -> dict[str, float]:
    """Per axis, the share of true cues an explanation states word for word (case and full stops aside).

    Stricter than EmoCue-360, whose sentence embeddings put "the pitch is rising" close to "the pitch is
    falling": this line shows whether the model perceived the cue, not only how it phrased it.
    """
    def normal(cue: str) -> str:
        return cue.strip().rstrip(".").lower()

    found: dict[str, list[float]] = {}
    for name, truth in ground_truth.items():
        if name not in predicted:
            continue
        for axis, cues in truth.items():
            said = {normal(c) for c in predicted[name].get(axis, [])}
            found.setdefault(axis, []).extend(normal(c) in said for c in cues)
    return {axis: sum(hits) / len(hits) for axis, hits in found.items() if hits}


def explain(model: Any, clips: list[Any], max_new_tokens: int) -> dict[str, str]:
    """Greedy explanations of ``clips``, eight at a time, by clip id."""
    from xemogpt_jax import explainer

    decoding = explainer.Decoding(max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    texts = {}
    for start in range(0, len(clips), 8):
        chunk = clips[start : start + 8]
        texts.update(zip([c.clip_id for c in chunk], model.explain(chunk, decoding)))
    return texts


def evaluate(stage3: Path, world: Path, count: int, max_new_tokens: int,
             frames_only: bool = False) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """Explanations of held-out clips, the cue lists the ``rules`` extractor takes from them, and (with
    ``frames_only``) the cue lists of the clips with video explained again with their audio withheld.

    In this world a clip's modalities always agree, so a model could name visual cues from the voice
    instead of seeing them; the frames-only pass shows what it sees.
    """
    from xemogpt_jax import explainer
    from xemogpt_jax.cue_extraction import rules_cues

    model = explainer.load(stage3, tokenizer=world / "tokenizer")
    clips = heldout_clips(world, count)
    texts = explain(model, clips, max_new_tokens)
    silent = [dataclasses.replace(c, audio=None) for c in clips if c.frames is not None] if frames_only else []
    seen = explain(model, silent, max_new_tokens)
    cues = {name: rules_cues(text) for name, text in texts.items()}
    seen_cues = {name: rules_cues(text) for name, text in seen.items()}
    return texts, cues, seen_cues


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

    from xemogpt_jax import emocue360

    print("[demo] explaining held-out clips and scoring them with EmoCue-360", flush=True)
    texts, predicted, frames_only = evaluate(runs["stage 3 (SFT)"], world, args.eval_clips, args.max_new_tokens,
                                             frames_only=True)
    ground_truth = json.loads((world / "heldout_cues.json").read_text())
    tables = {"stages 1-2-3": predicted}
    if args.ablate_pretraining:
        tables["stage 3 only (no stages 1-2, same stage-3 steps)"] = evaluate(
            runs["stage 3 w/o 1-2"], world, args.eval_clips, args.max_new_tokens
        )[1]
    tables["chance (each clip scored with another clip's true cues)"] = chance_cues(ground_truth, list(texts))
    embed = emocue360.jax_embedder(emocue360.default_embedder_dir())
    scores = {name: emocue360.score(cues, ground_truth, embed) for name, cues in tables.items()}

    lines = ["", "=" * 72, "XEmoGPT demo report (synthetic cue world, tiny models, CPU)", "=" * 72]
    for name, workdir in runs.items():
        first, last, evaluated = read_losses(workdir)
        shown = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"{name:<16} train loss {shown(first)} -> {shown(last)}   held-out loss {shown(evaluated)}")
    lines.append("")
    for clip_id, text in list(texts.items())[:3]:
        lines.append(f"[{clip_id}] generated: {text.strip()[:400]}")
        truth = ground_truth.get(clip_id, {})
        lines.append(f"[{clip_id}] true cues: {json.dumps(truth)[:400]}")
        lines.append("")
    for name, result in scores.items():
        lines.append(f"EmoCue-360 on {len(texts)} held-out clips (rules cue extractor), {name}:")
        lines.append(emocue360.format_table(result))
        recall = exact_cue_recall(tables[name], ground_truth)
        lines.append("exact cue recall (stated word for word): "
                     + ", ".join(f"{axis} {value:.3f}" for axis, value in recall.items()))
        lines.append("")
    seen = exact_cue_recall(frames_only, ground_truth)["visual"]
    lines.append(f"visual cues of the {len(frames_only)} clips with video, exact recall: {seen:.3f} from the frames "
                 f"alone (audio withheld), {exact_cue_recall(predicted, ground_truth)['visual']:.3f} with their audio")
    lines.append("")
    lines.append(f"total wall time {time.perf_counter() - start:.0f} s")
    report = "\n".join(lines)
    print(report)
    (root / "report.txt").write_text(report + "\n")
    (root / "explanations.json").write_text(json.dumps(texts, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
