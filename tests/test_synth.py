"""The synthetic cue world: deterministic, rule-consistent, and its cues are really in the pixels and samples."""

import itertools
import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data_pipelines import synth
from data_pipelines.records import load_manifest, open_source
from data_pipelines.schema import decode_record


def expected_emotion_from_face(v):
    """The docstring's face rules, written out again as an independent decision table."""
    table = [
        (lambda: v["mouth"] == "smiling", "happy"),
        (lambda: v["mouth"] == "frowning" and v["brows"] == "furrowed", "angry"),
        (lambda: v["mouth"] == "frowning", "sad"),
        (lambda: v["brows"] == "raised" and v["eyes"] == "wide", "surprised"),
        (lambda: v["brows"] == "furrowed", "worried"),
        (lambda: True, "neutral"),
    ]
    return next(emotion for fires, emotion in table if fires())


def expected_emotion_from_voice(a):
    table = [
        (lambda: a["laughter"] == "laughing", "happy"),
        (lambda: a["tremor"] == "trembling", "worried"),
        (lambda: a["pitch"] == "high" and a["contour"] == "rising", "surprised"),
        (lambda: a["loudness"] == "loud" and a["rate"] == "fast", "angry"),
        (lambda: a["loudness"] == "soft" and a["rate"] == "slow", "sad"),
        (lambda: True, "neutral"),
    ]
    return next(emotion for fires, emotion in table if fires())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth.write_world(out, num_clips=12, seed=3, frame_size=16)
    return out


def test_same_seed_gives_identical_shards_and_other_seed_differs(world, tmp_path):
    synth.write_world(tmp_path / "again", num_clips=12, seed=3, frame_size=16)
    synth.write_world(tmp_path / "other", num_clips=12, seed=4, frame_size=16)
    for split in ("train", "heldout"):
        files = [s["file"] for s in load_manifest(world / split)["shards"]]
        assert files
        for name in files:
            assert (world / split / name).read_bytes() == (tmp_path / "again" / split / name).read_bytes()
        assert (world / f"{split}_cues.json").read_text() == (tmp_path / "again" / f"{split}_cues.json").read_text()
    first = world / "train" / files[0]
    assert first.read_bytes() != (tmp_path / "other" / "train" / first.name).read_bytes()


def test_a_world_is_current_only_for_its_own_arguments_and_generator_version(world, tmp_path):
    assert synth.is_current_world(world, num_clips=12, seed=3, frame_size=16)
    assert not synth.is_current_world(world, num_clips=13, seed=3, frame_size=16)
    assert not synth.is_current_world(world, num_clips=12, seed=3, frame_size=64)
    assert not synth.is_current_world(tmp_path / "absent", num_clips=12, seed=3, frame_size=16)
    stale = tmp_path / "stale"
    shutil.copytree(world, stale)
    manifest = json.loads((stale / "heldout" / "manifest.json").read_text())
    manifest["fingerprint"]["version"] = synth.WORLD_VERSION - 1
    (stale / "heldout" / "manifest.json").write_text(json.dumps(manifest))
    assert not synth.is_current_world(stale, num_clips=12, seed=3, frame_size=16)


def test_emotion_and_cue_lists_follow_the_rules_from_the_latents():
    seen_emotions, seen_modalities, conflicts = set(), set(), 0
    for index in range(600):
        latents = synth.sample_latents(synth.clip_rng(7, "rules", index), f"c{index}")
        seen_emotions.add(latents.face)
        seen_modalities.add((latents.visual is not None, latents.audio is not None))
        assert latents.visual is not None or latents.audio is not None
        if latents.visual is not None:
            assert expected_emotion_from_face(latents.visual) == latents.face
        if latents.audio is not None:
            assert expected_emotion_from_voice(latents.audio) == latents.voice
            assert not (latents.audio["laughter"] == "laughing" and latents.audio["tremor"] == "trembling")
        cues = synth.cue_lists(latents)
        description = synth.describe(latents)
        if latents.visual is None:
            assert cues["visual"] == [] and "In the video," not in description
        else:
            v = latents.visual
            assert ("the person is smiling" in cues["visual"]) == (v["mouth"] == "smiling")
            assert f"the brows are {v['brows']}" in cues["visual"]
            assert f"the lighting is {v['lighting']}" in cues["visual"]
            assert description.startswith("In the video, ")
        if latents.audio is None:
            assert cues["auditory"] == [] and "In the audio," not in description
        else:
            a = latents.audio
            assert f"the pitch is {a['pitch']}" in cues["auditory"]
            assert ("there is laughter" in cues["auditory"]) == (a["laughter"] == "laughing")
            assert ("the voice is trembling" in cues["auditory"]) == (a["tremor"] == "trembling")
            assert "In the audio, " in description
        assert not any("text" in cue for cue in cues["auditory"])  # EmoCue-360 drops those
        if latents.face != latents.voice:
            conflicts += 1
            assert latents.visual is not None and latents.audio is not None
            face, voice = NOUN[latents.face], NOUN[latents.voice]
            template = f"the face suggests {face} while the voice suggests {voice}"
            assert cues["emotional"][-1] == template
            assert description.endswith(f", so {template}.")
            assert {latents.face, latents.voice} not in [set(pair) for pair in UNSEEN]
        else:
            assert cues["emotional"][0] == f"the person is most likely {latents.face}"
            assert description.endswith(f"the person is most likely {latents.face}.")
    assert seen_emotions == set(synth.EMOTIONS)
    assert seen_modalities == {(True, True), (True, False), (False, True)}
    assert 0.28 < conflicts / 600 < 0.39  # about a third


NOUN = {"happy": "happiness", "sad": "sadness", "angry": "anger", "surprised": "surprise", "worried": "worry",
        "neutral": "a calm state"}
UNSEEN = [("happy", "worried"), ("sad", "surprised"), ("angry", "neutral")]


def test_heldout_conflicts_cover_every_pair_and_training_never_shows_the_unseen_ones():
    heldout = [synth.draw_emotions(synth.clip_rng(0, "heldout", i), "heldout", i) for i in range(45)]
    conflicts = [pair for pair in heldout if pair[0] != pair[1]]
    assert [i for i, pair in enumerate(heldout) if pair[0] != pair[1]] == list(range(0, 45, 3))
    assert {frozenset(pair) for pair in conflicts} == {frozenset(p) for p in itertools.combinations(
        ["happy", "sad", "angry", "surprised", "worried", "neutral"], 2)}
    train = {synth.draw_emotions(synth.clip_rng(0, "train", i), "train", i) for i in range(3000)}
    assert not {frozenset(pair) for pair in train} & {frozenset(pair) for pair in UNSEEN}
    assert len({pair for pair in train if pair[0] != pair[1]}) == 30 - 6  # every other ordered pair occurs


def test_records_and_ground_truth_json_agree(world):
    for split in ("train", "heldout"):
        source = open_source(world / split)
        records = [decode_record(source[i]) for i in range(len(source))]
        ground_truth = json.loads((world / f"{split}_cues.json").read_text())
        assert sorted(ground_truth) == sorted(r["clip_id"] for r in records)
        for record in records:
            assert ground_truth[record["clip_id"]] == record["cues"]
            assert record["split"] == split
            assert all(NOUN[emotion] in record["description"].lower() for emotion in record["emotion"].split("/"))
            if record["has_video"]:
                assert record["frames"].shape == (16, 16, 16, 3)
                assert record["captions"][0].startswith("A ") and "face" in record["captions"][0]
            if record["has_audio"]:
                assert 2.0 * 16000 <= record["audio_length"] <= 3.0 * 16000
                assert "voice" in record["captions"][-1]


def _face(**overrides):
    cues = {"mouth": "neutral", "brows": "relaxed", "eyes": "wide", "head": "still", "lighting": "bright"}
    return {**cues, **overrides}


def _mouth_rows(frame, gain=1.0):
    """Row of the mouth's centre line, at the face's middle column and near its corners (``gain``: lighting)."""
    mouth = (np.abs(frame.astype(int) - gain * np.array([130, 25, 40])).sum(-1) < 40 * gain)
    ys, xs = np.nonzero(mouth)
    middle = ys[np.abs(xs - xs.mean()) <= 1].mean()
    corners = ys[np.abs(xs - xs.mean()) >= 0.7 * np.abs(xs - xs.mean()).max()].mean()
    return middle, corners


def test_face_pixels_carry_the_visual_cues():
    rng = lambda: np.random.default_rng(0)  # noqa: E731 - the same nuisance draws for every variant
    smile = synth.render_frames(_face(mouth="smiling"), rng())[0]
    frown = synth.render_frames(_face(mouth="frowning"), rng())[0]
    middle, corners = _mouth_rows(smile)
    assert middle > corners + 2  # image rows grow downwards: a smile's middle sits below its corners
    middle, corners = _mouth_rows(frown)
    assert middle < corners - 2

    def dark_pixels(frames):
        return int((frames[0].astype(int).sum(-1) < 120).sum())

    assert dark_pixels(synth.render_frames(_face(eyes="wide"), rng())) > 2 * dark_pixels(
        synth.render_frames(_face(eyes="narrowed"), rng()))
    bright = synth.render_frames(_face(lighting="bright"), rng()).mean()
    assert synth.render_frames(_face(lighting="dim"), rng()).mean() < 0.6 * bright

    def face_centre(frames):
        """Per-frame centroid (row, column) of every pixel that differs from the background corner."""
        drawn = np.abs(frames.astype(int) - frames[:, :1, :1].astype(int)).sum(-1) > 30
        return np.array([[ys.mean(), xs.mean()] for ys, xs in (np.nonzero(f) for f in drawn)])

    nod = face_centre(synth.render_frames(_face(head="nodding"), rng()))
    shake = face_centre(synth.render_frames(_face(head="shaking"), rng()))
    assert np.ptp(nod[:, 0]) > 4 * max(np.ptp(nod[:, 1]), 0.5)
    assert np.ptp(shake[:, 1]) > 4 * max(np.ptp(shake[:, 0]), 0.5)


def _voice(**overrides):
    cues = {"pitch": "high", "contour": "rising", "loudness": "loud", "rate": "slow",
            "tremor": "steady", "laughter": "none"}
    return {**cues, **overrides}


def dominant_frequency(samples, rate=16000):
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)]


def test_audio_samples_carry_the_auditory_cues():
    rng = lambda: np.random.default_rng(1)  # noqa: E731
    high = synth.render_audio(_voice(pitch="high"), rng())
    low = synth.render_audio(_voice(pitch="low"), rng())
    assert 200 <= dominant_frequency(high) <= 290
    assert 95 <= dominant_frequency(low) <= 145

    rising = synth.render_audio(_voice(contour="rising"), rng())
    falling = synth.render_audio(_voice(contour="falling"), rng())
    half = 8000
    assert dominant_frequency(rising[-half:]) > 1.15 * dominant_frequency(rising[:half])
    assert dominant_frequency(falling[-half:]) < 0.87 * dominant_frequency(falling[:half])

    def rms(x):
        return np.sqrt(np.mean(x.astype(np.float64) ** 2))

    assert rms(synth.render_audio(_voice(loudness="loud"), rng())) > 4 * rms(
        synth.render_audio(_voice(loudness="soft"), rng()))

    def high_band_share(samples):  # invariant to the feature extractor's per-clip scaling
        spectrum = np.abs(np.fft.rfft(samples.astype(np.float64))) ** 2
        return spectrum[np.fft.rfftfreq(len(samples), 1 / 16000) > 600].sum() / spectrum.sum()

    loud, soft = (synth.render_audio(_voice(loudness=level), rng()) for level in ("loud", "soft"))
    assert high_band_share(loud) > 3 * high_band_share(soft)

    def syllable_rate(samples):
        envelope = np.abs(samples.astype(np.float64))
        envelope = envelope[: len(envelope) // 160 * 160].reshape(-1, 160).mean(1)  # 100 Hz envelope
        spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
        return np.fft.rfftfreq(len(envelope), 1 / 100)[np.argmax(spectrum)]

    assert 5.0 <= syllable_rate(synth.render_audio(_voice(rate="fast"), rng())) <= 7.0
    assert 2.0 <= syllable_rate(synth.render_audio(_voice(rate="slow"), rng())) <= 3.0


def test_tokenizer_folder_loads_with_auto_tokenizer_and_round_trips(world):
    tokenizer = AutoTokenizer.from_pretrained(str(world / "tokenizer"))
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.unk_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert 256 < len(tokenizer) <= 2048
    source = open_source(world / "train")
    description = decode_record(source[0])["description"]
    for text in (description, "###Human: <Audio><AudioHere></Audio> ###Assistant: ", "字幕 ünïcödé 123"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # trained on this world's text, so a description takes few tokens per word
    assert len(tokenizer.encode(description, add_special_tokens=False)) < 1.5 * len(description.split())


def laughter_flatness(samples, rate=16000):
    """Highest spectral flatness over 0.2 s windows: breathy laughter is noise-like (flat), voiced speech is not."""
    window = rate // 5
    flatness = []
    for start in range(0, len(samples) - window, window // 2):
        power = np.abs(np.fft.rfft(samples[start:start + window].astype(np.float64) * np.hanning(window))) ** 2
        power = power[(np.fft.rfftfreq(window, 1 / rate) > 80) & (np.fft.rfftfreq(window, 1 / rate) < 4000)] + 1e-9
        flatness.append(np.exp(np.log(power).mean()) / power.mean())
    return max(flatness)


def test_laughter_is_measurable():
    rng = lambda: np.random.default_rng(2)  # noqa: E731
    laughing = synth.render_audio(_voice(laughter="laughing", rate="fast"), rng())
    plain = synth.render_audio(_voice(rate="fast"), rng())
    assert laughter_flatness(laughing) > 3 * laughter_flatness(plain)


def test_conflict_clips_carry_two_emotions_in_pixels_and_spectrum():
    """Held-out clips 0 and 45 pair a happy face with a sad voice and the reverse (module docstring)."""
    _, happy_face = synth.make_clip(0, "heldout", 0)
    _, sad_face = synth.make_clip(0, "heldout", 45)
    assert happy_face["emotion"] == "happy/sad" and sad_face["emotion"] == "sad/happy"
    def gain(record):
        return 0.45 if "the lighting is dim" in record["cues"]["visual"] else 1.0

    middle, corners = _mouth_rows(happy_face["frames"][0], gain(happy_face))
    assert middle > corners + 2  # a smile: the face is happy, whatever else it shows
    middle, corners = _mouth_rows(sad_face["frames"][0], gain(sad_face))
    assert middle < corners - 2  # a frown: not happy
    # only the voice paired with the sad face laughs: it is happy
    assert laughter_flatness(sad_face["audio"]) > 3 * laughter_flatness(happy_face["audio"])
    # the sad voice by the rules: no laughter and soft, slow speech (shown by the envelope's rate and level)
    envelope = np.abs(happy_face["audio"].astype(np.float64))
    envelope = envelope[: len(envelope) // 160 * 160].reshape(-1, 160).mean(1)
    spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
    assert 2.0 <= np.fft.rfftfreq(len(envelope), 1 / 100)[np.argmax(spectrum)] <= 3.0
    assert np.abs(happy_face["audio"]).max() < 0.1 * 32767
