"""Whether an explanation takes each modality's cues from that modality, on the synthetic cue world.

EmoCue-360's sentence embeddings rate "the pitch is rising" close to "the pitch is falling", so they cannot
tell a cue the model perceived from one it inferred from the other modality's emotion. Here:

- **exact cue recall**: per axis, the share of true cues an explanation states word for word;
- **hallucination rate**: per axis, the share of stated visual (auditory) cues that are telltale cues of the
  voice's (face's) emotion (:func:`data_pipelines.synth.telltale_cues`) but false of this clip's frames
  (audio); counted over clips with both modalities, so it is 0 by construction where face and voice agree;
- **swap sets**: held-out agreeing audio+video clips whose audio (swap a) or frames (swap b) come from
  another such clip of a different emotion, with the ground truth of what the clip now shows, built from
  the records' cue lists (nothing is rendered again).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from data_pipelines import synth

CueFile = Mapping[str, Mapping[str, Sequence[str]]]
AXES = ("visual", "auditory", "emotional")
SWAPS = {"swap (a)": "audio", "swap (b)": "frames"}  # row name -> the modality taken from the partner
RIGHT, HALLUCINATED, WRONG = "right", "hallucinated", "wrong"


def normal(cue: str) -> str:
    """A cue as compared word for word: case, surrounding space and a final full stop aside."""
    return cue.strip().rstrip(".").lower()


def exact_cue_recall(predicted: CueFile, ground_truth: CueFile) -> dict[str, float]:
    """Per axis, the share of true cues an explanation states word for word (axes with no true cue omitted)."""
    found: dict[str, list[bool]] = {}
    for name, truth in ground_truth.items():
        if name not in predicted:
            continue
        for axis, cues in truth.items():
            said = {normal(c) for c in predicted[name].get(axis, [])}
            found.setdefault(axis, []).extend(normal(c) in said for c in cues)
    return {axis: sum(hits) / len(hits) for axis, hits in found.items() if hits}


def _latents(name: str, truth: Mapping[str, Sequence[str]]) -> synth.ClipLatents:
    return synth.latents_from_cues(name, truth.get("visual", []), truth.get("auditory", []))


def verdicts(name: str, stated: Mapping[str, Sequence[str]],
             truth: Mapping[str, Sequence[str]]) -> dict[str, list[tuple[str, str]]]:
    """Per axis, each stated cue with its verdict: right (true of the clip), hallucinated (a telltale cue of
    the other modality's emotion, false of this one) or wrong (any other false cue)."""
    latents = _latents(name, truth)
    telltale = {"visual": synth.telltale_cues(latents.voice)["visual"] if latents.audio is not None else set(),
                "auditory": synth.telltale_cues(latents.face)["auditory"] if latents.visual is not None else set()}
    out = {}
    for axis in AXES:
        true = {normal(c) for c in truth.get(axis, [])}
        out[axis] = [(cue, RIGHT if normal(cue) in true else
                      HALLUCINATED if normal(cue) in telltale.get(axis, set()) else WRONG)
                     for cue in stated.get(axis, [])]
    return out


def missed(stated: Mapping[str, Sequence[str]], truth: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Per axis, the true cues the explanation does not state word for word."""
    out = {}
    for axis in AXES:
        said = {normal(c) for c in stated.get(axis, [])}
        out[axis] = [cue for cue in truth.get(axis, []) if normal(cue) not in said]
    return out


def hallucination_rate(predicted: CueFile, ground_truth: CueFile) -> dict[str, float]:
    """Per modality axis, hallucinated stated cues over all stated cues, on clips with both modalities
    (an axis with no stated cue omitted)."""
    counts = {"visual": [0, 0], "auditory": [0, 0]}
    for name, truth in ground_truth.items():
        latents = _latents(name, truth)
        if name not in predicted or latents.visual is None or latents.audio is None:
            continue
        for axis, marked in verdicts(name, predicted[name], truth).items():
            if axis in counts:
                counts[axis][0] += sum(verdict == HALLUCINATED for _, verdict in marked)
                counts[axis][1] += len(marked)
    return {axis: bad / total for axis, (bad, total) in counts.items() if total}


def groups(ground_truth: CueFile, names: Sequence[str]) -> dict[str, list[str]]:
    """``names`` split into agreeing ("normal") and "conflict" clips, in order."""
    out: dict[str, list[str]] = {"normal": [], "conflict": []}
    for name in names:
        out["conflict" if _latents(name, ground_truth[name]).conflict else "normal"].append(name)
    return out


@dataclass(frozen=True)
class Swap:
    """A clip made of one held-out clip's frames and another's audio."""

    name: str
    frames_from: str
    audio_from: str


def swaps(ground_truth: CueFile, names: Sequence[str], replace: str) -> list[Swap]:
    """Each agreeing audio+video clip of ``names`` with its ``replace`` modality ("audio" or "frames") taken from
    the next such clip, in order and cyclically, whose emotion differs."""
    if replace not in SWAPS.values():
        raise ValueError(f"replace must be one of {tuple(SWAPS.values())}, got {replace!r}")
    emotion = {}
    for name in names:
        latents = _latents(name, ground_truth[name])
        if latents.visual is not None and latents.audio is not None and not latents.conflict:
            emotion[name] = latents.face
    order = list(emotion)
    out = []
    for i, name in enumerate(order):
        partner = next((other for other in order[i + 1:] + order[:i] if emotion[other] != emotion[name]), None)
        if partner is None:
            continue
        frames_from, audio_from = (name, partner) if replace == "audio" else (partner, name)
        out.append(Swap(f"{name}+{replace}:{partner}", frames_from, audio_from))
    return out


def swap_truth(swap: Swap, ground_truth: CueFile) -> dict[str, list[str]]:
    """The cue lists of what a swapped clip shows: the frames' visual cues, the audio's auditory cues, and
    the conflict conclusion naming both emotions."""
    latents = synth.latents_from_cues(swap.name, ground_truth[swap.frames_from]["visual"],
                                      ground_truth[swap.audio_from]["auditory"])
    return synth.cue_lists(latents)


COLUMNS = ("F1 vis", "F1 aud", "F1 emo", "exact vis", "exact aud", "exact emo", "halluc vis", "halluc aud")


def table_row(f1: Mapping[str, Any], predicted: CueFile, ground_truth: CueFile) -> list[float | None]:
    """One row's cells in :data:`COLUMNS` order; ``f1`` is EmoCue-360's per-axis result (``score()["axes"]``)."""
    exact = exact_cue_recall(predicted, ground_truth)
    hallucination = hallucination_rate(predicted, ground_truth)
    return ([f1[axis]["f1"] for axis in AXES] + [exact.get(axis) for axis in AXES]
            + [hallucination.get(axis) for axis in ("visual", "auditory")])


def format_table(rows: Mapping[str, Sequence[float | None]], counts: Mapping[str, int]) -> str:
    """The table as aligned text: one line per row, "-" where a cell has no cue to count."""
    width = max(len(name) for name in rows) + 6
    lines = [f"{'clips (n)':<{width}}" + "".join(f"{c:>11}" for c in COLUMNS)]
    for name, cells in rows.items():
        shown = "".join(f"{'-':>11}" if v is None else f"{v:>11.3f}" for v in cells)
        lines.append(f"{name + f' ({counts[name]})':<{width}}{shown}")
    return "\n".join(lines)
