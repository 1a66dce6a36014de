"""A synthetic "cue world": procedurally drawn clips whose emotional cues are known exactly.

It is the built-in data of ``make demo`` and of the tests: small enough that a tiny model learns it in
minutes on a CPU, and built so that a model can only be right by perceiving the cues.

Latent cues (each drawn from a small pool, so descriptions are compositional):

- visual: mouth (smiling / frowning / neutral), brows (raised / furrowed / relaxed), eyes (wide /
  narrowed), head (nodding / shaking / still), lighting (bright / dim); the background colour and the
  skin tone are nuisance variables that carry no cue.
- auditory: pitch (high / low), contour (rising / falling), loudness (loud / soft), rate (fast / slow),
  tremor (trembling / steady), laughter (laughing / none). Laughter and tremor never occur together.

Rendering: a face drawn on 16 frames of ``S x S`` pixels (head motion: nodding moves the face up and
down, shaking left and right; brows sit higher when raised and slant inwards when furrowed; the mouth
is a parabola whose corners bend up for a smile and down for a frown; dim lighting scales every pixel
by 0.45; features are sized so that a 64 px frame cut into 16 px patches still shows them). Audio: 2-3 s
of 16 kHz voiced syllables, fundamental 240 Hz (high) or 120 Hz (low) with
6 harmonics, gliding +/-25 % over the clip (rising / falling), peak 0.5 (loud) or 0.06 (soft) with
harmonics decaying by 0.85 (loud: vocal effort brightens the voice) or 0.3 (soft) per step, so loudness
survives the per-clip zero-mean / unit-variance normalisation of the HuBERT feature extractor, 6 or 2.5
syllables per second, 7 Hz pitch vibrato of depth 15 % when trembling, and a 0.8 s burst of breathy
"ha" pulses when laughing.

Emotion rules (a modality's emotion = the first of its rules that fires):

- from the face: smiling -> happy; frowning with furrowed brows -> angry; frowning otherwise -> sad;
  raised brows with wide eyes -> surprised; furrowed brows -> worried; otherwise -> neutral.
  Head motion and lighting are described but never decide the emotion.
- from the voice: laughter -> happy; tremor -> worried; high rising pitch -> surprised; loud and fast
  -> angry; soft and slow -> sad; otherwise -> neutral.

The generator draws the face's and the voice's emotion, then draws the visual and auditory cues
uniformly among the combinations that the rules map to each, so each modality alone determines its own.
A third of the clips are conflict clips (world version 3): face and voice follow two different emotions,
and both modalities are present, so a model can only name the face's cues by looking at the frames.
The other clips agree, 70 % audio+video, 15 % video-only, 15 % audio-only. Training clips draw their
conflict pair among all ordered pairs except those of ``UNSEEN_PAIRS`` (either order), which only
held-out clips show; held-out clip ``i`` is a conflict clip when ``i % 3 == 0``, and its pair follows
``HELDOUT_PAIRS`` (every unordered pair once, then every pair reversed), so the first 45 held-out
clips cover every pair of emotions.

Text per clip: an emotion-free subtitle; a description in the reference's style ("In the video, ...
In the audio, ..." and a closing inference naming the deciding cues); for a conflict clip the closing
inference names both, by the fixed template "<Face noun> is suggested by <visual reason>, and <voice
noun> is suggested by <auditory reason>, so the face suggests <face noun> while the voice suggests
<voice noun>." (e.g. "... so the face suggests happiness while the voice suggests sadness."); short
captions (the visual one first when the clip has video, then the auditory one when it has audio); and
EmoCue-360 ground-truth cue lists per axis {visual, auditory, emotional}.

CLI: ``python -m data_pipelines.synth --out DIR [--num-clips N] [--seed S] [--frame-size 64]`` writes
``DIR/train`` and ``DIR/heldout`` (ArrayRecord shards + manifest), ``DIR/<split>_cues.json`` and a
tokenizer trained on this world's text at ``DIR/tokenizer``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import schema
from data_pipelines.records import MANIFEST_NAME, shard_name
from data_pipelines.tokenizer import train_world_tokenizer

VISUAL_AXES: dict[str, tuple[str, ...]] = {
    "mouth": ("smiling", "frowning", "neutral"),
    "brows": ("raised", "furrowed", "relaxed"),
    "eyes": ("wide", "narrowed"),
    "head": ("nodding", "shaking", "still"),
    "lighting": ("bright", "dim"),
}
AUDIO_AXES: dict[str, tuple[str, ...]] = {
    "pitch": ("high", "low"),
    "contour": ("rising", "falling"),
    "loudness": ("loud", "soft"),
    "rate": ("fast", "slow"),
    "tremor": ("trembling", "steady"),
    "laughter": ("laughing", "none"),
}
EMOTIONS = ("happy", "sad", "angry", "surprised", "worried", "neutral")
MODALITY_WEIGHTS = {(True, True): 0.70, (True, False): 0.15, (False, True): 0.15}  # (has_video, has_audio)
CONFLICT_SHARE = 1 / 3  # clips whose face and voice follow two different emotions
# Pairs no training clip shows together (either order): held-out conflict clips test them unseen.
UNSEEN_PAIRS = (("happy", "worried"), ("sad", "surprised"), ("angry", "neutral"))

SAMPLE_RATE = schema.AUDIO_SAMPLE_RATE
NUM_FRAMES = schema.NUM_FRAMES
AUDIO_SECONDS = (2.0, 3.0)
PITCH_HZ = {"high": 240.0, "low": 120.0}
PEAK = {"loud": 0.5, "soft": 0.06}
HARMONIC_DECAY = {"loud": 0.85, "soft": 0.3}
SYLLABLES_PER_SECOND = {"fast": 6.0, "slow": 2.5}
LIGHT_GAIN = {"bright": 1.0, "dim": 0.45}
TREMOR_HZ, TREMOR_DEPTH = 7.0, 0.15
# Bump when rendering, text or sampling change: a saved world with another version is stale.
WORLD_VERSION = 3

Cues = dict[str, str]

_SUBJECTS = ("I", "We", "She", "He", "They", "My brother", "Our neighbour", "The teacher")
_VERBS = ("talked about", "walked to", "looked at", "thought about", "waited for", "wrote about", "asked about")
_OBJECTS = ("the old house", "the train", "the letter", "the garden", "the meeting", "the new shop", "the river")
_TIMES = ("this morning", "yesterday", "last week", "after dinner", "on Sunday", "before work")

_VISUAL_REASON = {
    "happy": "the smile",
    "angry": "the frown and the furrowed brows",
    "sad": "the frown",
    "surprised": "the raised brows and the wide eyes",
    "worried": "the furrowed brows",
    "neutral": "the calm face",
}
_AUDIO_REASON = {
    "happy": "the laughter",
    "worried": "the trembling voice",
    "surprised": "the high, rising pitch",
    "angry": "the loud, fast speech",
    "sad": "the soft, slow speech",
    "neutral": "the even voice",
}
_EMOTION_NOUN = {
    "happy": "happiness",
    "sad": "sadness",
    "angry": "anger",
    "surprised": "surprise",
    "worried": "worry",
    "neutral": "a calm state",
}


def visual_emotion(visual: Cues) -> str:
    """The emotion the face shows (module docstring, first rule that fires)."""
    if visual["mouth"] == "smiling":
        return "happy"
    if visual["mouth"] == "frowning":
        return "angry" if visual["brows"] == "furrowed" else "sad"
    if visual["brows"] == "raised" and visual["eyes"] == "wide":
        return "surprised"
    if visual["brows"] == "furrowed":
        return "worried"
    return "neutral"


def audio_emotion(audio: Cues) -> str:
    """The emotion the voice shows (module docstring, first rule that fires)."""
    if audio["laughter"] == "laughing":
        return "happy"
    if audio["tremor"] == "trembling":
        return "worried"
    if audio["pitch"] == "high" and audio["contour"] == "rising":
        return "surprised"
    if audio["loudness"] == "loud" and audio["rate"] == "fast":
        return "angry"
    if audio["loudness"] == "soft" and audio["rate"] == "slow":
        return "sad"
    return "neutral"


def _combinations(axes: dict[str, tuple[str, ...]]) -> Iterator[Cues]:
    for values in itertools.product(*axes.values()):
        yield dict(zip(axes, values))


def _by_emotion(axes: dict[str, tuple[str, ...]], rule, allowed=lambda cues: True) -> dict[str, list[Cues]]:
    table: dict[str, list[Cues]] = {emotion: [] for emotion in EMOTIONS}
    for cues in _combinations(axes):
        if allowed(cues):
            table[rule(cues)].append(cues)
    return table


VISUAL_BY_EMOTION = _by_emotion(VISUAL_AXES, visual_emotion)
AUDIO_BY_EMOTION = _by_emotion(
    AUDIO_AXES, audio_emotion, allowed=lambda a: not (a["laughter"] == "laughing" and a["tremor"] == "trembling")
)


_UNORDERED_PAIRS = list(itertools.combinations(EMOTIONS, 2))
# (face, voice) of held-out conflict clip k (k = index // 3): every unordered pair, then each reversed.
HELDOUT_PAIRS = tuple(_UNORDERED_PAIRS + [(voice, face) for face, voice in _UNORDERED_PAIRS])
TRAIN_PAIRS = tuple(
    (face, voice) for face, voice in itertools.permutations(EMOTIONS, 2)
    if (face, voice) not in UNSEEN_PAIRS and (voice, face) not in UNSEEN_PAIRS
)


@dataclass(frozen=True)
class ClipLatents:
    """Everything the generator decided for one clip; the rendering and the text follow from it."""

    clip_id: str
    face: str  # the emotion the face's cues follow
    voice: str  # the emotion the voice's cues follow (the face's unless a conflict clip)
    visual: Cues | None  # None: the clip has no video
    audio: Cues | None  # None: the clip has no audio
    subtitle: str

    @property
    def conflict(self) -> bool:
        return self.face != self.voice

    @property
    def emotion(self) -> str:
        """The record's label: the emotion, or "face/voice" for a conflict clip."""
        return f"{self.face}/{self.voice}" if self.conflict else self.face


def draw_emotions(rng: np.random.Generator, split: str, index: int) -> tuple[str, str]:
    """(face, voice) emotions of a clip: held-out clips follow the fixed conflict schedule, others draw."""
    if split == "heldout" and index % 3 == 0:
        return HELDOUT_PAIRS[(index // 3) % len(HELDOUT_PAIRS)]
    if split != "heldout" and rng.random() < CONFLICT_SHARE:
        return TRAIN_PAIRS[rng.integers(len(TRAIN_PAIRS))]
    emotion = EMOTIONS[rng.integers(len(EMOTIONS))]
    return emotion, emotion


def sample_latents(rng: np.random.Generator, clip_id: str, emotions: tuple[str, str] | None = None) -> ClipLatents:
    """Draw one clip's modalities, cues and subtitle for (face, voice) ``emotions`` (drawn as for training
    when None). A conflict clip always has both modalities."""
    face, voice = emotions if emotions is not None else draw_emotions(rng, "train", 0)
    modalities = list(MODALITY_WEIGHTS)
    has_video, has_audio = modalities[rng.choice(len(modalities), p=list(MODALITY_WEIGHTS.values()))]
    if face != voice:
        has_video = has_audio = True
    visual_pool, audio_pool = VISUAL_BY_EMOTION[face], AUDIO_BY_EMOTION[voice]
    visual = dict(visual_pool[rng.integers(len(visual_pool))])
    audio = dict(audio_pool[rng.integers(len(audio_pool))])
    subtitle = " ".join(
        pool[rng.integers(len(pool))] for pool in (_SUBJECTS, _VERBS, _OBJECTS, _TIMES)
    ) + "."
    return ClipLatents(clip_id, face, voice, visual if has_video else None, audio if has_audio else None, subtitle)


# ---------------------------------------------------------------- rendering


def render_frames(visual: Cues, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """16 RGB frames ``uint8 [16, size, size, 3]`` of a face showing ``visual`` (vectorised over frames)."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy, xx = yy[None], xx[None]
    t = np.arange(NUM_FRAMES, dtype=np.float32)[:, None, None]
    swing = 0.07 * s * np.sin(2 * np.pi * t / 8)
    cx = s / 2 + (swing if visual["head"] == "shaking" else 0.0)
    cy = s / 2 + (swing if visual["head"] == "nodding" else 0.0)
    line = max(0.025 * s, 1.0)

    face = ((xx - cx) / (0.3 * s)) ** 2 + ((yy - cy) / (0.38 * s)) ** 2 <= 1.0
    eye_height = {"wide": 0.08 * s, "narrowed": max(0.012 * s, 0.75)}[visual["eyes"]]
    brow_lift = {"raised": 0.2 * s, "relaxed": 0.13 * s, "furrowed": 0.1 * s}[visual["brows"]]
    brow_slant = 0.5 if visual["brows"] == "furrowed" else 0.0
    eyes = np.zeros_like(face)
    brows = np.zeros_like(face)
    for side in (-1.0, 1.0):
        ex, ey = cx + side * 0.12 * s, cy - 0.08 * s
        eyes |= ((xx - ex) / (0.07 * s)) ** 2 + ((yy - ey) / eye_height) ** 2 <= 1.0
        brow_y = ey - brow_lift - side * brow_slant * (xx - ex)
        brows |= (np.abs(yy - brow_y) <= 1.5 * line) & (np.abs(xx - ex) <= 0.085 * s)
    bend = {"smiling": 0.09 * s, "frowning": -0.09 * s, "neutral": 0.0}[visual["mouth"]]
    u = (xx - cx) / (0.13 * s)
    mouth_y = cy + 0.17 * s + bend * (1.0 - u**2)
    mouth = (np.abs(yy - mouth_y) <= line) & (np.abs(u) <= 1.0)

    background = rng.uniform(40, 200, size=3)
    skin = np.array([225, 185, 145]) + rng.uniform(-15, 15, size=3)
    palette = np.array([background, skin, (25, 25, 30), (60, 40, 20), (130, 25, 40)], np.float32)
    palette *= LIGHT_GAIN[visual["lighting"]]
    labels = np.zeros((NUM_FRAMES, size, size), np.uint8)
    for value, mask in enumerate((face, eyes, brows, mouth), start=1):
        labels[np.broadcast_to(mask, labels.shape)] = value
    image = palette[labels] + 3.0 * rng.standard_normal((*labels.shape, 3), dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_audio(audio: Cues, rng: np.random.Generator) -> np.ndarray:
    """2-3 s of 16 kHz mono ``int16`` speech-like sound with the prosody in ``audio``."""
    num_samples = int(rng.uniform(*AUDIO_SECONDS) * SAMPLE_RATE)
    t = np.arange(num_samples, dtype=np.float64) / SAMPLE_RATE
    progress = t / t[-1]
    glide = 0.75 + 0.5 * progress if audio["contour"] == "rising" else 1.25 - 0.5 * progress
    f0 = PITCH_HZ[audio["pitch"]] * rng.uniform(0.95, 1.05) * glide
    if audio["tremor"] == "trembling":
        f0 = f0 * (1.0 + TREMOR_DEPTH * np.sin(2 * np.pi * TREMOR_HZ * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    decay = HARMONIC_DECAY[audio["loudness"]]
    voice = sum(decay**k * np.sin((k + 1) * phase) for k in range(6))
    rate = SYLLABLES_PER_SECOND[audio["rate"]]
    envelope = np.abs(np.sin(np.pi * rate * t + rng.uniform(0, np.pi))) ** 1.5
    signal = voice * envelope
    if audio["laughter"] == "laughing":
        start = int(rng.uniform(0.1, 0.6) * (num_samples - 0.8 * SAMPLE_RATE))
        span = slice(start, start + int(0.8 * SAMPLE_RATE))
        tl = t[span] - t[span][0]
        pulses = np.abs(np.sin(np.pi * 5.0 * tl)) ** 4
        breath = rng.normal(0.0, 0.5, size=tl.shape) + 0.5 * np.sin(2 * np.pi * 1.8 * f0[span] * tl)
        signal[span] = breath * pulses
    signal = PEAK[audio["loudness"]] * signal / max(np.abs(signal).max(), 1e-6)
    signal += rng.normal(0.0, 0.003, size=num_samples)
    return np.clip(np.rint(signal * 32767.0), -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------- text


def visual_cue_phrases(visual: Cues) -> list[str]:
    """Atomic visual cues, one per axis, in a fixed order."""
    mouth = {"smiling": "the person is smiling", "frowning": "the person is frowning",
             "neutral": "the mouth is neutral"}[visual["mouth"]]
    head = {"nodding": "the head is nodding", "shaking": "the head is shaking",
            "still": "the head is still"}[visual["head"]]
    return [mouth, f"the brows are {visual['brows']}", f"the eyes are {visual['eyes']}", head,
            f"the lighting is {visual['lighting']}"]


def auditory_cue_phrases(audio: Cues) -> list[str]:
    """Atomic auditory cues; tremor and laughter are mentioned only when present."""
    phrases = [f"the pitch is {audio['pitch']}", f"the pitch is {audio['contour']}",
               f"the voice is {audio['loudness']}", f"the speech is {audio['rate']}"]
    if audio["tremor"] == "trembling":
        phrases.append("the voice is trembling")
    if audio["laughter"] == "laughing":
        phrases.append("there is laughter")
    return phrases


def emotional_cue_phrases(latents: ClipLatents) -> list[str]:
    """The inference as atomic statements: the emotion and what points to it in each present modality;
    for a conflict clip, each modality's emotion and the template naming both."""
    if latents.conflict:
        face, voice = _EMOTION_NOUN[latents.face], _EMOTION_NOUN[latents.voice]
        return [f"{face} is suggested by {_VISUAL_REASON[latents.face]}",
                f"{voice} is suggested by {_AUDIO_REASON[latents.voice]}",
                f"the face suggests {face} while the voice suggests {voice}"]
    noun = _EMOTION_NOUN[latents.face]
    phrases = [f"the person is most likely {latents.face}"]  # worded as the description hedges it
    if latents.visual is not None:
        phrases.append(f"{noun} is suggested by {_VISUAL_REASON[latents.face]}")
    if latents.audio is not None:
        phrases.append(f"{noun} is suggested by {_AUDIO_REASON[latents.face]}")
    return phrases


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + ", and " + phrases[-1]


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def conclusion(latents: ClipLatents) -> str:
    """The description's closing inference (module docstring: the conflict template)."""
    if latents.conflict:
        face_reason, voice_reason, both = emotional_cue_phrases(latents)
        return f"{_capital(face_reason)}, and {voice_reason}, so {both}."
    reasons = []
    if latents.visual is not None:
        reasons.append(_VISUAL_REASON[latents.face])
    if latents.audio is not None:
        reasons.append(_AUDIO_REASON[latents.face])
    noun = _EMOTION_NOUN[latents.face]
    return (f"{_capital(noun)} is suggested by {' as well as '.join(reasons)}, "
            f"so the person is most likely {latents.face}.")


def describe(latents: ClipLatents) -> str:
    """The target description: video part, audio part, then the emotion inference."""
    parts = []
    if latents.visual is not None:
        parts.append(f"In the video, {_join(visual_cue_phrases(latents.visual))}.")
    else:
        parts.append("The video is not available.")
    if latents.audio is not None:
        parts.append(f"In the audio, {_join(auditory_cue_phrases(latents.audio))}.")
    else:
        parts.append("The audio is not available.")
    parts.append(conclusion(latents))
    return " ".join(parts)


def visual_caption(visual: Cues) -> str:
    """A short stage-1 caption of the face."""
    mouth = {"smiling": "A smiling face", "frowning": "A frowning face", "neutral": "A neutral face"}[visual["mouth"]]
    head = {"nodding": "nodding", "shaking": "shaking its head", "still": "holding still"}[visual["head"]]
    return f"{mouth} with {visual['brows']} brows and {visual['eyes']} eyes, {head}, in {visual['lighting']} light."


def auditory_caption(audio: Cues) -> str:
    """A short stage-2 caption of the voice."""
    extras = [w for w, on in (("trembling", audio["tremor"] == "trembling"),
                              ("with laughter", audio["laughter"] == "laughing")) if on]
    tail = (", " + ", ".join(extras)) if extras else ""
    return f"A {audio['pitch']}, {audio['contour']} voice, {audio['loudness']} and {audio['rate']}{tail}."


def cue_lists(latents: ClipLatents) -> dict[str, list[str]]:
    """EmoCue-360 ground truth: an empty list for an absent modality."""
    return {
        "visual": visual_cue_phrases(latents.visual) if latents.visual is not None else [],
        "auditory": auditory_cue_phrases(latents.audio) if latents.audio is not None else [],
        "emotional": emotional_cue_phrases(latents),
    }


def captions(latents: ClipLatents) -> list[str]:
    """Visual caption first (with video), then the auditory one (with audio)."""
    out = []
    if latents.visual is not None:
        out.append(visual_caption(latents.visual))
    if latents.audio is not None:
        out.append(auditory_caption(latents.audio))
    return out


def _phrase_table(combos: Iterable[Cues], phrases) -> dict[tuple[str, ...], Cues]:
    return {tuple(phrases(cues)): cues for cues in combos}


_VISUAL_FROM_PHRASES = _phrase_table(_combinations(VISUAL_AXES), visual_cue_phrases)
_AUDIO_FROM_PHRASES = _phrase_table((a for pool in AUDIO_BY_EMOTION.values() for a in pool), auditory_cue_phrases)


def latents_from_cues(clip_id: str, visual: Sequence[str], auditory: Sequence[str]) -> ClipLatents:
    """The latents of a clip whose frames show the ground-truth ``visual`` cue list and whose audio the
    ``auditory`` one (an empty list: no such modality), read back through the rules; the subtitle is empty.

    The swap evaluation pairs one clip's frames with another's audio from the records alone, this way.
    """
    if not visual and not auditory:
        raise ValueError(f"{clip_id}: a clip needs visual or auditory cues")
    try:
        face_cues = _VISUAL_FROM_PHRASES[tuple(visual)] if visual else None
        voice_cues = _AUDIO_FROM_PHRASES[tuple(auditory)] if auditory else None
    except KeyError:
        raise ValueError(f"{clip_id}: not a cue list this world writes: {list(visual)} / {list(auditory)}") from None
    face = visual_emotion(face_cues) if face_cues is not None else None
    voice = audio_emotion(voice_cues) if voice_cues is not None else None
    return ClipLatents(clip_id, face or voice, voice or face, face_cues, voice_cues, "")


def telltale_cues(emotion: str) -> dict[str, set[str]]:
    """Per axis, the cues every face (voice) of ``emotion`` shows, i.e. what its rule requires.

    A model that reads an emotion from one modality and describes the other from it states these; when
    they are false of that other modality, that is a hallucination (``xemogpt_jax.faithfulness``).
    """
    return {
        "visual": set.intersection(*(set(visual_cue_phrases(v)) for v in VISUAL_BY_EMOTION[emotion])),
        "auditory": set.intersection(*(set(auditory_cue_phrases(a)) for a in AUDIO_BY_EMOTION[emotion])),
    }


# ---------------------------------------------------------------- records and CLI


def clip_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each clip has its own stream, so a clip does not depend on how many clips come before it."""
    return np.random.default_rng([seed, sum(split.encode()), index])


def make_clip(seed: int, split: str, index: int, frame_size: int = 64) -> tuple[ClipLatents, dict[str, Any]]:
    """One clip's latents and its schema record."""
    rng = clip_rng(seed, split, index)
    latents = sample_latents(rng, f"synth_{split}_{index:05d}", draw_emotions(rng, split, index))
    frames = render_frames(latents.visual, rng, frame_size) if latents.visual is not None else None
    audio = render_audio(latents.audio, rng) if latents.audio is not None else None
    record = schema.make_record(
        latents.clip_id,
        frames=frames,
        frame_indices=np.arange(NUM_FRAMES, dtype=np.int32) if frames is not None else None,
        audio=audio,
        subtitle=latents.subtitle,
        description=describe(latents),
        captions=captions(latents),
        cues=cue_lists(latents),
        emotion=latents.emotion,
        split=split,
    )
    return latents, record


def write_split(records: Iterable[dict[str, Any]], num_records: int, out: Path, fingerprint: dict[str, Any],
                records_per_shard: int = 256) -> dict[str, Any]:
    """Stream records into ArrayRecord shards plus ``manifest.json`` in the layout of ``data_pipelines.build``."""
    out.mkdir(parents=True, exist_ok=True)
    records = iter(records)
    num_shards = max(1, -(-num_records // records_per_shard))
    shards = []
    for index in range(num_shards):
        span = (index * records_per_shard, min(num_records, (index + 1) * records_per_shard))
        name = shard_name(index, num_shards)
        writer = ArrayRecordWriter(str(out / name), "group_size:1")
        for record in itertools.islice(records, span[1] - span[0]):
            writer.write(schema.encode_record(record))
        writer.close()
        shards.append({"index": index, "file": name, "positions": list(span), "num_records": span[1] - span[0],
                       "skipped": [], "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()})
    manifest = {"schema_version": schema.SCHEMA_VERSION, "complete": True, "num_annotation_rows": num_records,
                "num_records": num_records, "num_skipped": 0, "writer_options": "group_size:1",
                "fingerprint": fingerprint, "shards": shards}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def split_records(seed: int, split: str, count: int, frame_size: int,
                  ground_truth: dict[str, dict[str, list[str]]]) -> Iterator[dict[str, Any]]:
    """The split's records in order (generated lazily), noting each clip's cue lists in ``ground_truth``."""
    for index in range(count):
        latents, record = make_clip(seed, split, index, frame_size)
        ground_truth[latents.clip_id] = record["cues"]
        yield record


def corpus(seed: int = 0, num_clips: int = 2000) -> list[str]:
    """This world's text (subtitles, descriptions, captions) for training the tokenizer."""
    texts = []
    for index in range(num_clips):
        latents = sample_latents(clip_rng(seed, "corpus", index), f"corpus_{index}")
        texts += [latents.subtitle, describe(latents), *captions(latents)]
        texts += [" ".join(phrases) for phrases in cue_lists(latents).values()]
    return texts


def world_fingerprint(split: str, num_clips: int, seed: int, frame_size: int) -> dict[str, Any]:
    """What a split's manifest records about how it was made; a different one means a different world."""
    return {"generator": "data_pipelines.synth", "version": WORLD_VERSION, "num_clips": num_clips, "seed": seed,
            "split": split, "frame_size": frame_size}


def is_current_world(out: Path, num_clips: int = 1000, seed: int = 0, frame_size: int = 64) -> bool:
    """Whether ``out`` holds a complete world that this generator would write with these arguments."""
    if not (out / "heldout_cues.json").exists() or not (out / "tokenizer").is_dir():
        return False
    for split in ("train", "heldout"):
        manifest = out / split / MANIFEST_NAME
        if not manifest.exists():
            return False
        if json.loads(manifest.read_text()).get("fingerprint") != world_fingerprint(split, num_clips, seed, frame_size):
            return False
    return True


def write_world(out: Path, num_clips: int = 1000, seed: int = 0, frame_size: int = 64,
                heldout_fraction: float = 0.1, records_per_shard: int = 256) -> dict[str, int]:
    """Write both splits, their cue JSON files and the tokenizer; return the clip count per split."""
    out.mkdir(parents=True, exist_ok=True)
    num_heldout = max(1, int(round(num_clips * heldout_fraction))) if num_clips > 1 else 0
    counts = {"train": num_clips - num_heldout, "heldout": num_heldout}
    for split, count in counts.items():
        ground_truth: dict[str, dict[str, list[str]]] = {}
        fingerprint = world_fingerprint(split, num_clips, seed, frame_size)
        records = split_records(seed, split, count, frame_size, ground_truth)
        write_split(records, count, out / split, fingerprint, records_per_shard)
        (out / f"{split}_cues.json").write_text(json.dumps(ground_truth, indent=1))
    train_world_tokenizer(out / "tokenizer", corpus(seed))
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-clips", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frame-size", type=int, default=64)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = write_world(args.out, args.num_clips, args.seed, args.frame_size, args.heldout_fraction)
    print(f"wrote {counts} clips to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
