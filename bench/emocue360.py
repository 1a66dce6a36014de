"""Cues/s of EmoCue-360 scoring: our JAX MiniLM port vs sentence-transformers (PyTorch), same cue files.

Both runs go through the same ``emocue360.score`` (dedupe, embed, match); only the embedder differs.
The cue files are synthetic but cue-shaped (5-15 words, ~4 cues per axis). Ours is timed after one
warm-up run that compiles every (rows, length bucket) shape; the first-run time is printed too.

    python -m bench.emocue360 [--samples 300] [--batch-size 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from xemogpt_jax import emocue360

SUBJECTS = ["The man", "The woman", "She", "He", "The speaker", "The person", "The child", "Her voice", "His tone"]
VERBS = ["frowns", "smiles", "looks away", "speaks slowly", "raises her eyebrows", "sighs deeply", "trembles",
         "clenches his fists", "laughs nervously", "shouts", "whispers", "nods", "avoids eye contact", "pauses"]
DETAILS = ["while talking", "at the end", "several times", "with a low pitch", "in a quiet room", "quickly",
           "without looking at the camera", "as the music fades", "and then stops", "with a shaky breath", ""]
EMOTIONS = ["angry", "sad", "happy", "anxious", "surprised", "calm", "frustrated", "disappointed", "relieved"]


def synthetic_cue_files(samples: int, seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)

    def cue() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(DETAILS)}".strip() + "."

    def entry() -> dict[str, list[str]]:
        return {
            "visual": [cue() for _ in range(rng.randint(2, 6))],
            "auditory": [cue() for _ in range(rng.randint(1, 5))],
            "emotional": [f"{rng.choice(SUBJECTS)} seems {rng.choice(EMOTIONS)}." for _ in range(rng.randint(1, 3))],
        }

    names = [f"clip_{i:05d}" for i in range(samples)]
    return {n: entry() for n in names}, {n: entry() for n in names}


def cue_count(*files: dict) -> int:
    return sum(len(cues) for f in files for entry in f.values() for cues in entry.values())


def timed(run, repeats: int) -> tuple[float, float, dict]:
    """Best wall seconds, the process CPU seconds of that run (robust on a shared box), last result."""
    best, best_cpu, result = float("inf"), 0.0, {}
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    folder = emocue360.default_embedder_dir()
    pred, gt = synthetic_cue_files(args.samples)
    cues = cue_count(pred, gt)

    ours_embed = emocue360.jax_embedder(folder, args.batch_size)
    first_s, first_cpu, _ = timed(lambda: emocue360.score(pred, gt, ours_embed), 1)
    ours_s, ours_cpu, ours = timed(lambda: emocue360.score(pred, gt, ours_embed), args.repeats)

    model = SentenceTransformer(str(folder), device="cpu")
    st_embed = lambda texts: model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)  # noqa: E731
    st_s, st_cpu, reference = timed(lambda: emocue360.score(pred, gt, st_embed), args.repeats)

    keys = ("recall", "precision", "f1")
    diff = max(abs(ours["axes"][a][k] - reference["axes"][a][k]) for a in emocue360.AXES for k in keys)
    unique = len({c for f in (pred, gt) for e in f.values() for v in e.values() for c in v})
    print(f"{args.samples} samples, {cues} cues ({unique} unique), batch {args.batch_size}, best of {args.repeats}")
    print(f"{'embedder':<28} {'wall s':>8} {'cues/s':>9} {'CPU s':>8}")
    for label, wall, cpu in (
        ("ours (JAX, first run)", first_s, first_cpu),
        ("ours (JAX, compiled)", ours_s, ours_cpu),
        ("sentence-transformers", st_s, st_cpu),
    ):
        print(f"{label:<28} {wall:8.2f} {cues / wall:9.0f} {cpu:8.2f}")
    print(f"ratio ours/sentence-transformers: {st_s / ours_s:.2f}x; max |dataset score diff| {diff:.2e}")
    print("F1 per axis:", {a: round(float(np.float64(ours["axes"][a]["f1"])), 4) for a in emocue360.AXES})


if __name__ == "__main__":
    main()
