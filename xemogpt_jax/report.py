"""A self-contained HTML page for reading EmoCue-360 results clip by clip.

``python -m xemogpt_jax.report --scores R.json --pred P.json --gt G.json [--explanations E.jsonl]
[--frames DIR] --out report.html``

One file, nothing fetched: CSS inline, the per-axis P/R/F1 bar plot as inline SVG, frames as base64
PNG. Per clip: a strip of frames (when given), the subtitle, the model's explanation, and per axis
each predicted cue with its best ground-truth match and cosine, beside the ground-truth cues with
theirs. ``--frames`` is either built records (a folder with ``manifest.json``, as written by
``data_pipelines.build``; its subtitles are used too) or a folder of images, ``DIR/<clip>/*.png|jpg``
or ``DIR/<clip>*.png|jpg``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xemogpt_jax import cli_checks

AXES = ("visual", "auditory", "emotional")
METRICS = (("precision", "P", "#4c72b0"), ("recall", "R", "#dd8452"), ("f1", "F1", "#55a868"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
STRIP_FRAMES = 6
FRAME_HEIGHT = 96

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin: 0 0 6px 0; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f3f3f3; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.clip { border: 1px solid #ccc; border-radius: 6px; padding: 12px; margin: 16px 0; }
.frames img { height: 96px; margin-right: 4px; border-radius: 3px; }
.label { margin-top: 10px; color: #666; font-size: 12px; text-transform: uppercase; letter-spacing: 0.05em; }
.text { margin: 2px 0 8px 0; white-space: pre-wrap; }
.axis { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-top: 8px; }
.cue td { font-size: 13px; } .missing { color: #999; font-style: italic; }
.verdict-right { background: #d4efcf; } .verdict-hallucinated { background: #f4b6b6; }
.verdict-wrong { background: #f6dfb0; } .verdict-missed { background: #e4e4e4; color: #555; }
"""
VERDICT_SIGNS = {"right": "&#10003;", "hallucinated": "&#10007; hallucinated", "wrong": "&#10007;",
                 "missed": "missed"}


def _score_color(score: float | None) -> str:
    """Background from red (0) to green (1) for a cosine."""
    if score is None:
        return "#eeeeee"
    t = min(max(score, 0.0), 1.0)
    return f"hsl({int(120 * t)}, 60%, 85%)"


def bar_plot_svg(axes: Mapping[str, Mapping[str, Any]], width: int = 520, height: int = 220) -> str:
    """Grouped bars of P, R, F1 per axis, values printed above each bar (an axis with no samples is empty)."""
    left, bottom, top = 40, 30, 20
    plot_h = height - bottom - top
    group_w = (width - left) / max(len(axes), 1)
    bar_w = group_w / (len(METRICS) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        parts.append(f'<line x1="{left}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick:.2f}</text>')
    for g, (axis, scores) in enumerate(axes.items()):
        x0 = left + g * group_w + bar_w / 2
        for m, (key, label, color) in enumerate(METRICS):
            value = scores.get(key)
            if value is None:
                continue
            bar_h = plot_h * min(max(value, 0.0), 1.0)
            x, y = x0 + m * bar_w, top + plot_h - bar_h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.9:.1f}" height="{bar_h:.1f}" fill="{color}">'
                f"<title>{html.escape(axis)} {label} {value:.4f}</title></rect>"
            )
            parts.append(
                f'<text x="{x + bar_w * 0.45:.1f}" y="{y - 3:.1f}" font-size="9" text-anchor="middle">'
                f"{value:.2f}</text>"
            )
        label_x = left + (g + 0.5) * group_w
        parts.append(f'<text x="{label_x:.1f}" y="{height - 10}" font-size="12" text-anchor="middle">{axis}</text>')
    for m, (_, label, color) in enumerate(METRICS):
        parts.append(f'<rect x="{left + 10 + m * 50}" y="2" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{left + 24 + m * 50}" y="11" font-size="11">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def png_data_uri(frame: np.ndarray, height: int = FRAME_HEIGHT) -> str:
    """An RGB uint8 [H,W,3] frame, scaled to ``height``, as a ``data:image/png;base64`` URI."""
    from PIL import Image

    image = Image.fromarray(np.asarray(frame, np.uint8))
    width = max(1, round(image.width * height / image.height))
    buffer = io.BytesIO()
    image.resize((width, height), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pick(frames: Sequence[np.ndarray], count: int = STRIP_FRAMES) -> list[np.ndarray]:
    if len(frames) <= count:
        return list(frames)
    return [frames[int(i)] for i in np.linspace(0, len(frames) - 1, count).astype(int)]


def frames_from_records(directory: Path, names: set[str]) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """Frames and subtitles of the wanted clips from built ArrayRecord shards."""
    from data_pipelines.records import open_source
    from data_pipelines.schema import decode_record

    frames: dict[str, list[np.ndarray]] = {}
    subtitles: dict[str, str] = {}
    source = open_source(directory)
    for index in range(len(source)):
        record = decode_record(source[index])
        name = record["clip_id"]
        if name not in names:
            continue
        subtitles[name] = record["subtitle"]
        if record["has_video"]:
            frames[name] = _pick(list(record["frames"]))
    return frames, subtitles


def frames_from_images(directory: Path, names: set[str]) -> dict[str, list[np.ndarray]]:
    """``DIR/<clip>/*`` or ``DIR/<clip>*`` image files, in name order."""
    from PIL import Image

    frames = {}
    for name in names:
        folder = directory / name
        files = sorted(folder.iterdir()) if folder.is_dir() else sorted(directory.glob(f"{name}*"))
        files = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
        if files:
            frames[name] = [np.asarray(Image.open(f).convert("RGB")) for f in _pick(files)]
    return frames


def read_explanations(path: Path, name_column: str, text_column: str) -> tuple[dict[str, str], dict[str, str]]:
    """Explanations and subtitles by clip from CSV / JSON / JSONL."""
    from data_pipelines.annotations import Annotation, Columns, read_annotations

    rows = [r for r in read_annotations(path, Columns(clip_id=name_column, description=text_column))]
    good = [r for r in rows if isinstance(r, Annotation)]
    return {r.clip_id: r.description for r in good}, {r.clip_id: r.subtitle for r in good if r.subtitle}


def _cue_table(title: str, matches: Iterable[Mapping[str, Any]], other: str) -> str:
    rows = [f'<tr><th>{html.escape(title)}</th><th>best {other} match</th><th class="num">cos</th></tr>']
    for match in matches:
        best = match.get("best")
        best_cell = html.escape(best) if best is not None else '<span class="missing">(no predicted cues)</span>'
        score = match.get("score")
        rows.append(
            f'<tr class="cue" style="background:{_score_color(score if best is not None else None)}">'
            f"<td>{html.escape(match['cue'])}</td><td>{best_cell}</td>"
            f'<td class="num">{score:.3f}</td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


def _axis_block(axis: str, result: Mapping[str, Any] | None, pred_cues: Any, gt_cues: Any) -> str:
    head = f'<div class="label">{axis}</div>'
    if result is None:
        shown = ", ".join(map(str, gt_cues or [])) or "none"
        note = f"not scored (ground truth empty after filtering: {html.escape(shown)})"
        return head + f'<div class="missing">{note}</div>'
    summary = f"P {result['precision']:.3f} &middot; R {result['recall']:.3f} &middot; F1 {result['f1']:.3f}"
    pred_table = (
        _cue_table("predicted cue", result["pred"], "ground-truth")
        if result["pred"]
        else f'<div class="missing">no predicted cues (raw: {html.escape(json.dumps(pred_cues))})</div>'
    )
    gt_table = _cue_table("ground-truth cue", result["gt"], "predicted")
    return (
        head
        + f"<div>{summary}</div>"
        + f'<div class="axis"><div>{pred_table}</div><div>{gt_table}</div></div>'
    )


def _clip_section(
    name: str,
    scores: Mapping[str, Any],
    pred: Mapping[str, Any],
    gt: Mapping[str, Any],
    frames: Sequence[np.ndarray],
    subtitle: str | None,
    explanation: str | None,
) -> str:
    parts = [f'<section class="clip" id="{html.escape(name, quote=True)}"><h2>{html.escape(name)}</h2>']
    if frames:
        images = "".join(f'<img alt="frame" src="{png_data_uri(f)}">' for f in frames)
        parts.append(f'<div class="frames">{images}</div>')
    for label, text in (("subtitle", subtitle), ("explanation", explanation)):
        if text:
            parts.append(f'<div class="label">{label}</div><div class="text">{html.escape(text)}</div>')
    pred_entry = pred.get(name) if isinstance(pred.get(name), Mapping) else {}
    gt_entry = gt.get(name) if isinstance(gt.get(name), Mapping) else {}
    for axis in AXES:
        parts.append(_axis_block(axis, scores.get(axis), pred_entry.get(axis), gt_entry.get(axis)))
    parts.append("</section>")
    return "".join(parts)


def render(
    scores: Mapping[str, Any],
    pred: Mapping[str, Any],
    gt: Mapping[str, Any],
    *,
    explanations: Mapping[str, str] | None = None,
    subtitles: Mapping[str, str] | None = None,
    frames: Mapping[str, Sequence[np.ndarray]] | None = None,
    title: str = "EmoCue-360 report",
) -> str:
    """The whole page as one string."""
    explanations, subtitles, frames = explanations or {}, subtitles or {}, frames or {}
    rows = ['<tr><th>axis</th><th class="num">P</th><th class="num">R</th><th class="num">F1</th>'
            '<th class="num">n</th><th class="num">skipped</th></tr>']
    for axis, s in scores["axes"].items():
        cells = "".join(
            f'<td class="num">{s[k]:.4f}</td>' if s[k] is not None else '<td class="num">-</td>'
            for k in ("precision", "recall", "f1")
        )
        rows.append(
            f'<tr><td>{axis}</td>{cells}<td class="num">{s["count"]}</td>'
            f'<td class="num">{s["skipped_empty_gt"]}</td></tr>'
        )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>embedder: {html.escape(str(scores.get('embedder', 'n/a')))}</p>",
        f'<div style="display:flex;gap:32px;align-items:flex-start"><table>{"".join(rows)}</table>'
        f"{bar_plot_svg(scores['axes'])}</div>",
    ]
    if scores.get("missing_in_gt"):
        missing = ", ".join(map(str, scores["missing_in_gt"]))
        body.append(f'<p class="missing">predicted but absent from the ground truth: {html.escape(missing)}</p>')
    for name, clip_scores in scores["samples"].items():
        body.append(
            _clip_section(
                name, clip_scores, pred, gt, frames.get(name, []), subtitles.get(name), explanations.get(name)
            )
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def verdict_section(name: str, row: str, frames: Sequence[np.ndarray] | None, explanation: str,
                    marks: Mapping[str, Sequence[tuple[str, str]]], missed: Mapping[str, Sequence[str]]) -> str:
    """One clip of the faithfulness view: its frame strip, explanation, and per axis each stated cue with its
    verdict (right, hallucinated, wrong: ``xemogpt_jax.faithfulness.verdicts``) and the true cues missed."""
    parts = [f'<section class="clip" id="{html.escape(name, quote=True)}"><h2>{html.escape(name)}</h2>',
             f"<div>{html.escape(row)}</div>"]
    if frames is not None and len(frames):
        images = "".join(f'<img alt="frame" src="{png_data_uri(f)}">' for f in _pick(list(frames)))
        parts.append(f'<div class="frames">{images}</div>')
    parts.append(f'<div class="label">explanation</div><div class="text">{html.escape(explanation)}</div>')
    for axis in AXES:
        cells = list(marks.get(axis, []))
        cells += [(cue, "missed") for cue in missed.get(axis, [])]
        rows = "".join(f'<tr class="cue verdict-{verdict}"><td>{html.escape(cue)}</td><td>{VERDICT_SIGNS[verdict]}</td>'
                       "</tr>" for cue, verdict in cells)
        parts.append(f'<div class="label">{axis}</div><table>{rows}</table>' if rows
                     else f'<div class="label">{axis}</div><div class="missing">no cues</div>')
    parts.append("</section>")
    return "".join(parts)


def faithfulness_page(title: str, columns: Sequence[str],
                      tables: Mapping[str, tuple[Mapping[str, Sequence[float | None]], Mapping[str, int]]],
                      sections: Sequence[str]) -> str:
    """A page of one table per model (rows of clips, ``columns`` of figures; None shown as "-") and the
    clip sections of :func:`verdict_section`."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for model, (cells, counts) in tables.items():
        head = "".join(f'<th class="num">{html.escape(c)}</th>' for c in columns)
        rows = [f"<tr><th>clips (n)</th>{head}</tr>"]
        for row, values in cells.items():
            shown = "".join(f'<td class="num">{"-" if v is None else f"{v:.3f}"}</td>' for v in values)
            rows.append(f"<tr><td>{html.escape(row)} ({counts[row]})</td>{shown}</tr>")
        body.append(f"<h2>{html.escape(model)}</h2><table>{''.join(rows)}</table>")
    body.extend(sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def _read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@cli_checks.command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xemogpt_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", required=True, help="output of `emocue360 score --out`")
    parser.add_argument("--pred", required=True, help="predicted cues JSON")
    parser.add_argument("--gt", required=True, help="ground-truth cues JSON")
    parser.add_argument("--explanations", help="model explanations (.jsonl, .json or .csv)")
    parser.add_argument("--name-column", default="name", help="clip name column of --explanations")
    parser.add_argument("--text-column", default="explanation", help="explanation column of --explanations")
    parser.add_argument("--frames", help="built records folder (with manifest.json) or a folder of images")
    parser.add_argument("--out", required=True, help="HTML file to write")
    args = parser.parse_args(argv)
    problems = cli_checks.Problems()
    for flag in ("--scores", "--pred", "--gt", "--explanations"):
        problems.file(flag, getattr(args, flag[2:]))
    problems.folder("--frames", args.frames)
    problems.raise_if_any()

    scores = _read_json(args.scores)
    names = set(scores["samples"])
    explanations: dict[str, str] = {}
    subtitles: dict[str, str] = {}
    frames: dict[str, list[np.ndarray]] = {}
    if args.frames:
        frames_dir = Path(args.frames)
        if (frames_dir / "manifest.json").is_file():
            frames, subtitles = frames_from_records(frames_dir, names)
        else:
            frames = frames_from_images(frames_dir, names)
    if args.explanations:
        explanations, explanation_subtitles = read_explanations(
            Path(args.explanations), args.name_column, args.text_column
        )
        subtitles = {**subtitles, **explanation_subtitles}
    pred, gt = _read_json(args.pred), _read_json(args.gt)
    page = render(scores, pred, gt, explanations=explanations, subtitles=subtitles, frames=frames)
    Path(args.out).write_text(page, encoding="utf-8")
    print(f"wrote {args.out}: {len(names)} clips, {sum(len(f) for f in frames.values())} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
