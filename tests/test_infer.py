"""Inference on the real shared clip with tiny checkpoints: CLI modalities vs a cache-free reference, --batch resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from infer_fixtures import save_tokenizer, script_reply, shared_clip, tiny_run_config

from data_pipelines import build as build_lib
from xemogpt_jax import explainer as explainer_lib
from xemogpt_jax import infer
from xemogpt_jax.preprocessing import audio as audio_pre
from xemogpt_jax.preprocessing import image as image_pre
from xemogpt_jax.testing.run_checkpoint import build_model, write_checkpoint

REPLY = '{"visual": ["He frowns."], "auditory": ["His voice is tense."], "emotional": ["He is angry."]}'
NEW_TOKENS = 5
GREEDY = ["--greedy", "--num-beams", "1", "--max-new-tokens", str(NEW_TOKENS)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("random_ckpt")
    tokenizer = save_tokenizer(out / "tokenizer")
    config = tiny_run_config(out / "tokenizer", len(tokenizer))
    return write_checkpoint(out, build_model(config), config)


@pytest.fixture(scope="module")
def scripted_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scripted_ckpt")
    tokenizer = save_tokenizer(out / "tokenizer", [REPLY])
    config = tiny_run_config(out / "tokenizer", len(tokenizer), tied=False)
    model = build_model(config)
    script_reply(model, len(tokenizer) - 1, tokenizer.eos_token_id)
    return write_checkpoint(out, model, config)


@pytest.fixture(scope="module")
def video_only_clip(tmp_path_factory) -> Path:
    """The shared mp4 remuxed without its audio track (no re-encode)."""
    video, _ = shared_clip()
    out = tmp_path_factory.mktemp("media") / "video_only.mp4"
    with av.open(str(video)) as source, av.open(str(out), "w") as sink:
        stream = sink.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                sink.mux(packet)
    return out


def reference_greedy(model: explainer_lib.Explainer, clip: explainer_lib.Clip, steps: int) -> str:
    """A second path: one unpadded sample, exact-length audio, full forward per token (no cache), argmax."""
    sample = model.layout(clip)
    media = {}
    if clip.frames is not None:
        media["frames"] = jnp.asarray(image_pre.normalize(clip.frames))[None]
    if clip.audio is not None:
        values, mask = audio_pre.preprocess_audio([clip.audio], max_samples=model.config.max_audio_samples)
        media.update(audio=jnp.asarray(values), audio_mask=jnp.asarray(mask))
    embeds = model.model.input_embeddings(
        jnp.asarray(sample.token_ids)[None], jnp.asarray(sample.kind)[None], jnp.asarray(sample.feature_index)[None],
        **media,
    )
    llm, length, tokens = model.model.llm, embeds.shape[1], []
    embeds = jnp.pad(embeds, ((0, 0), (0, steps), (0, 0)))  # right padding cannot reach earlier positions

    @jax.jit
    def logits(embeds: jax.Array) -> jax.Array:
        return llm(inputs_embeds=embeds)[0]

    for step in range(steps):
        token = int(jnp.argmax(logits(embeds)[length + step - 1]))
        tokens.append(token)
        if token == model.tokenizer.eos_token_id:
            break
        embeds = embeds.at[0, length + step].set(llm.embed(jnp.asarray([token]))[0])
    if tokens[0] == 0:
        tokens = tokens[1:]
    if model.tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(model.tokenizer.eos_token_id)]
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_cli_video_audio_and_both_match_reference_and_batch_mixes_them(random_checkpoint, video_only_clip, capsys):
    video, wav = shared_clip()
    cases = {
        "video only": ["--video", str(video_only_clip)],
        "audio only": ["--audio", str(wav)],
        "both (track of the mp4)": ["--video", str(video), "--subtitle", "I can't believe it."],
    }
    printed = {}
    for name, flags in cases.items():
        assert infer.main(["--checkpoint", str(random_checkpoint), *flags, *GREEDY]) == 0
        printed[name] = capsys.readouterr().out.rstrip("\n")

    model = infer.load_cached(str(random_checkpoint))
    clips = {
        "video only": explainer_lib.read_clip("v", video_only_clip, frame_size=model.frame_size),
        "audio only": explainer_lib.read_clip("a", None, wav),
        "both (track of the mp4)": explainer_lib.read_clip("b", video, None, "I can't believe it.",
                                                           frame_size=model.frame_size),
    }
    assert clips["video only"].audio is None and clips["audio only"].frames is None
    assert clips["both (track of the mp4)"].audio is not None
    expected = {name: reference_greedy(model, clip, NEW_TOKENS) for name, clip in clips.items()}
    assert printed == expected
    decoding = explainer_lib.Decoding(max_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
    assert model.explain(list(clips.values()), decoding) == list(expected.values())


def test_release_decoding_rule_drops_leading_zero_cuts_at_eos_skips_special(random_checkpoint):
    model = infer.load_cached(str(random_checkpoint))
    tok = model.tokenizer
    ids = [0] + tok.encode("Hi", add_special_tokens=False) + [tok.pad_token_id] + tok.encode(" there") + [
        tok.eos_token_id] + tok.encode("tail")
    assert model.decode(np.asarray(ids), (tok.eos_token_id,)) == "Hi there"
    assert explainer_lib.Decoding() == explainer_lib.Decoding(
        max_new_tokens=756, num_beams=5, do_sample=True, temperature=0.3, top_p=0.9, repetition_penalty=1.0, seed=42
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_resumes_after_kill_without_duplicates_or_gaps(scripted_checkpoint, tmp_path):
    video, _ = shared_clip()
    ids = [f"clip{i}" for i in range(6)]
    rows = ["name,video,subtitle"] + [f"{i},{video},hello" for i in ids] + ["broken,missing.mp4,"]
    annotations = tmp_path / "ann.csv"
    annotations.write_text("\n".join(rows) + "\n")
    out = tmp_path / "preds.jsonl"
    command = [sys.executable, "-m", "xemogpt_jax.infer", "--checkpoint", str(scripted_checkpoint),
               "--batch", str(annotations), "--out", str(out), "--batch-size", "2", "--no-progress", *GREEDY]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (out.exists() and out.read_text().count("\n") >= 2) and process.poll() is None:
        assert time.monotonic() < deadline, "no batch written in time"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = _lines(out)
    assert 2 <= len(first) < len(ids), f"the run was not interrupted mid-way ({len(first)} lines)"
    with open(out, "a") as f:
        f.write('{"id": "clip5", "expla')  # a torn last line, as a kill during a write leaves

    assert infer.main(command[3:]) == 0
    lines = _lines(out)
    assert [line["id"] for line in lines[: len(first)]] == [line["id"] for line in first]
    assert sorted(line["id"] for line in lines) == sorted(ids + ["broken"])
    by_id = {line["id"]: line for line in lines}
    assert all(by_id[i]["explanation"] == REPLY and by_id[i]["seconds"] > 0 for i in ids)
    assert "missing.mp4" in by_id["broken"]["error"]


def test_batch_over_arrayrecord_folder_with_release_decoding(scripted_checkpoint, tmp_path):
    video, wav = shared_clip()
    (tmp_path / "media").mkdir()
    for name in ("a", "b"):
        os.symlink(video, tmp_path / "media" / f"{name}.mp4")
    os.symlink(wav, tmp_path / "media" / "a.wav")
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text('{"name": "a", "subtitle": "hi"}\n{"name": "b"}\n')
    records = tmp_path / "records"
    build_lib.build(build_lib.BuildConfig(annotations, tmp_path / "media", records, frame_size=64, workers=1),
                    show_progress=False)
    model = infer.load_cached(str(scripted_checkpoint))
    out = tmp_path / "preds.jsonl"
    counts = infer.run_batch(model, records, out, tmp_path, explainer_lib.Decoding(max_new_tokens=4), 8, False)
    assert counts == {"written": 2, "already_done": 0, "failed": 0}
    assert [(line["id"], line["explanation"]) for line in _lines(out)] == [("a", REPLY), ("b", REPLY)]


def test_local_cue_extraction_backend_uses_chat_completion(scripted_checkpoint):
    from xemogpt_jax import cue_extraction

    chat = cue_extraction.local_chat(str(scripted_checkpoint))
    reply = chat(cue_extraction.build_messages("In the video, he frowns."))
    assert cue_extraction.parse_cues(reply) == json.loads(REPLY)
