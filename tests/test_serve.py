"""The HTTP server through the official ``openai`` client on loopback, against ``infer`` on the same clip.

A random tiny checkpoint makes the answers depend on every input, so a server that dropped the
video, the audio or the instruction, or decoded differently, would disagree with ``infer --json``.
A scripted checkpoint (fixed reply) serves the cue extractor's round trip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from infer_fixtures import save_tokenizer, script_reply, shared_clip, tiny_run_config

from xemogpt_jax import infer, serve
from xemogpt_jax.explainer import Decoding
from xemogpt_jax.serving.app import ServingState, Settings, build_app
from xemogpt_jax.serving.metrics import Metrics
from xemogpt_jax.testing.run_checkpoint import build_model, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
INSTRUCTION = "How does the speaker feel?"
NEW_TOKENS = 5
BODY_LIMIT = 1_000_000  # above the shared clip as base64 parts (~790 kB), far below the oversize body
REPLY = '{"visual": ["She smiles."], "auditory": ["Her voice is bright."], "emotional": ["She is happy."]}'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random model whose LM head can only favour letters (other tokens' logits are 0), so its greedy
    answers are visible text that still depends on every input."""
    out = tmp_path_factory.mktemp("serve_random")
    tokenizer = save_tokenizer(out / "tokenizer")
    config = tiny_run_config(out / "tokenizer", len(tokenizer), tied=False)
    model = build_model(config)
    letters = sorted(set(tokenizer.encode(string.ascii_letters, add_special_tokens=False)))
    head = np.asarray(model.llm.lm_head.kernel[...])
    kept = np.zeros_like(head)
    kept[:, letters] = 4.0 * head[:, letters]
    model.llm.lm_head.kernel[...] = jnp.asarray(kept)
    return write_checkpoint(out, model, config)


@pytest.fixture(scope="module")
def server(checkpoint):
    video, _ = shared_clip()
    settings = Settings(defaults=Decoding(max_new_tokens=8), max_body_bytes=BODY_LIMIT, media_root=video.parent,
                        api_key=KEY, request_timeout_s=600)
    s = serve.Server(infer.load_cached(str(checkpoint)), max_batch=8, batch_window_s=0.1, settings=settings).start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)


def clip_parts() -> list[dict]:
    video, wav = shared_clip()
    return [
        {"type": "video_url",
         "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode(), "format": "wav"}},
        {"type": "text", "text": INSTRUCTION},
    ]


def ask(client: openai.OpenAI, parts: list[dict], **options):
    options = {"temperature": 0, "max_tokens": NEW_TOKENS, **options}
    return client.chat.completions.create(model="xemogpt", messages=[{"role": "user", "content": parts}], **options)


@pytest.fixture(scope="module")
def infer_record(checkpoint) -> dict:
    """``infer --json`` on the shared clip with the chat's decoding (greedy, one beam, NEW_TOKENS)."""
    video, wav = shared_clip()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert infer.main(["--checkpoint", str(checkpoint), "--video", str(video), "--audio", str(wav),
                           "--instruction", INSTRUCTION, "--json", "--greedy", "--num-beams", "1",
                           "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return json.loads(printed.getvalue())


def test_chat_with_clip_parts_equals_infer_json(client, infer_record):
    reply = ask(client, clip_parts(), logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert choice.message.content == infer_record["explanation"] != ""
    np.testing.assert_allclose([t.logprob for t in choice.logprobs.content], infer_record["token_logprobs"],
                               atol=1e-5, rtol=0)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6
               for t in choice.logprobs.content)
    assert reply.usage.prompt_tokens == infer_record["prompt_tokens"]
    assert reply.usage.completion_tokens == infer_record["generated_tokens"]
    assert choice.finish_reason == ("stop" if infer_record["generated_tokens"] > len(infer_record["token_ids"])
                                    else "length")


def test_streamed_chunks_join_to_the_same_text_and_logprobs(client, infer_record):
    stream = ask(client, clip_parts(), stream=True, logprobs=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    logprobs = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert text == infer_record["explanation"]
    np.testing.assert_allclose(logprobs, infer_record["token_logprobs"], atol=1e-5, rtol=0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == infer_record["generated_tokens"]


def test_stream_delivers_a_chunk_while_the_decode_is_still_running(client, server, monkeypatch, infer_record):
    """The decode is held inside its step callback at the first token that makes visible text, until the
    client has that text: a stream built from the finished answer could only deliver it after the decode
    returned, so the hold would run out (120 s) and the order below would be reversed."""
    real, shown, order = server.batcher.model, threading.Event(), []

    class HeldAtFirstText:
        def __getattr__(self, name):
            return getattr(real, name)

        def explain_generations(self, clips, decoding, top_logprobs=0, on_token=None):
            ids = []

            def held(row, token, *rest):
                on_token(row, token, *rest)
                ids.append(token)
                if not shown.is_set() and real.decode(ids, ()) and not real.decode(ids, ()).endswith("\ufffd"):
                    shown.wait(120)

            generations = real.explain_generations(clips, decoding, top_logprobs, held)
            order.append("decode returned")
            return generations

    monkeypatch.setattr(server.batcher, "model", HeldAtFirstText())
    video, _ = shared_clip()
    parts = [{"type": "video_url", "video_url": {"url": video.as_uri()}}, clip_parts()[1], clip_parts()[2]]
    pieces = []
    for chunk in ask(client, parts, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            if not pieces:
                order.append("first text received")
                shown.set()
            pieces.append(chunk.choices[0].delta.content)
    assert order == ["first text received", "decode returned"]
    assert "".join(pieces) == infer_record["explanation"]


def test_file_url_under_media_root_and_explain_upload(client, server, infer_record):
    video, wav = shared_clip()
    parts = [{"type": "video_url", "video_url": {"url": video.as_uri()}}, clip_parts()[1], clip_parts()[2]]
    assert ask(client, parts).choices[0].message.content == infer_record["explanation"]
    auth = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(server.url + "/v1/explain", params={"instruction": INSTRUCTION, "subtitle": "hi"},
                       content=wav.read_bytes(), headers={"Content-Type": "audio/wav", **auth},
                       timeout=600)
    assert reply.status_code == 200 and reply.json()["batch_size"] >= 1 and "explanation" in reply.json()
    request = {"video": video.name, "instruction": INSTRUCTION, "greedy": True, "num_beams": 1,
               "max_new_tokens": NEW_TOKENS}
    by_path = httpx.post(server.url + "/v1/explain", json=request,
                         headers=auth, timeout=600)
    assert by_path.status_code == 200 and by_path.json()["explanation"]
    outside = httpx.post(server.url + "/v1/explain", json={"video": "../../etc/passwd"}, headers=auth, timeout=60)
    assert outside.status_code == 403 and "outside --media-root" in outside.json()["error"]["message"]


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.chat.completions.create(model="xemogpt", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 401 and "API key" in error.value.message
    assert httpx.get(server.url + "/v1/models", timeout=60).status_code == 401
    assert httpx.get(server.url + "/health", timeout=60).json()["status"] == "ok"


def _status_and_message(call) -> tuple[int, str]:
    try:
        call()
    except openai.APIStatusError as error:
        return error.status_code, error.response.text  # the framework's own 413 is plain text
    raise AssertionError("the request was accepted")


def _disconnect_mid_stream(server) -> None:
    """Streaming requests whose client hangs up: once before any reply, once after the first bytes."""
    body = json.dumps({"model": "xemogpt", "stream": True, "max_tokens": NEW_TOKENS, "temperature": 0,
                       "messages": [{"role": "user", "content": "tell me a long story"}]}).encode()
    host, port = server.socket.getsockname()[:2]
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    with socket.create_connection((host, port), timeout=600) as conn:  # gone before the answer
        conn.sendall(request)
    with socket.create_connection((host, port), timeout=600) as conn:  # gone after the first bytes
        conn.sendall(request)
        assert conn.recv(64).startswith(b"HTTP/1.1 200")


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(client, server):
    video, wav = shared_clip()
    text = clip_parts()[2]
    truncated = {"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64," + base64.b64encode(video.read_bytes()[:20_000]).decode()}}
    not_audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + os.urandom(4000)).decode(),
                                                        "format": "wav"}}
    not_base64 = {"type": "input_audio", "input_audio": {"data": "this is not base64!", "format": "wav"}}
    unknown = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    outside = {"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}
    huge = {"type": "input_audio", "input_audio": {"data": "A" * (BODY_LIMIT + 10), "format": "wav"}}
    cases = {
        "truncated mp4": (lambda: ask(client, [truncated, text]), 400, "video_url"),
        "wav that is not audio": (lambda: ask(client, [not_audio, text]), 400, "input_audio"),
        "not base64": (lambda: ask(client, [not_base64, text]), 400, "not valid base64"),
        "unknown part type": (lambda: ask(client, [unknown, text]), 422, "image_url"),
        "over the body limit": (lambda: ask(client, [huge, text]), 413, "Too Large"),
        "file:// outside --media-root": (lambda: ask(client, [outside, text]), 403, "outside --media-root"),
        "n > 1": (lambda: ask(client, [text], n=2), 400, "n=1"),
        "bad field": (lambda: ask(client, [text], top_p=7), 422, "top_p"),
    }
    for name, (call, status, words) in cases.items():
        got_status, message = _status_and_message(call)
        assert (got_status, words in message) == (status, True), f"{name}: {got_status} {message}"
    _disconnect_mid_stream(server)
    assert ask(client, clip_parts()).choices[0].message.content
    metrics = httpx.get(server.url + "/metrics", timeout=60).text
    for name in ("xemogpt_requests_total", "xemogpt_batch_size_bucket", "xemogpt_tokens_per_second",
                 "xemogpt_queue_depth"):
        assert name in metrics
    assert 'path="/v1/chat/completions",status="422"' in metrics


async def _stream_text(client: openai.AsyncOpenAI, parts: list[dict]) -> tuple[str, str | None]:
    stream = await client.chat.completions.create(model="xemogpt", messages=[{"role": "user", "content": parts}],
                                                  temperature=0, max_tokens=NEW_TOKENS, stream=True)
    pieces, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def test_32_concurrent_streaming_clients_all_complete(server, infer_record):
    video, _ = shared_clip()
    parts = [{"type": "video_url", "video_url": {"url": video.as_uri()}}, clip_parts()[1], clip_parts()[2]]

    async def run(count: int, concurrent: bool) -> tuple[list, float]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600) as c:
            start = time.perf_counter()
            if concurrent:
                results = await asyncio.wait_for(asyncio.gather(*(_stream_text(c, parts) for _ in range(count))), 900)
            else:
                results = [await asyncio.wait_for(_stream_text(c, parts), 300) for _ in range(count)]
            return results, time.perf_counter() - start

    asyncio.run(run(32, True))  # compiles the batch shapes the measured round will use
    results, concurrent_s = asyncio.run(run(32, True))
    _, sequential_s = asyncio.run(run(4, False))
    assert [text for text, _ in results] == [infer_record["explanation"]] * 32
    assert all(finish in ("stop", "length") for _, finish in results)
    metrics = httpx.get(server.url + "/metrics", timeout=60).text
    single = int(metrics.split('xemogpt_batch_size_bucket{le="1"} ')[1].split()[0])
    assert single < int(metrics.split("xemogpt_batch_size_count ")[1].split()[0]), "concurrent clips were not batched"
    print(f"\n32 concurrent streaming clients: {32 / concurrent_s:.2f} answers/s ({concurrent_s:.1f} s); "
          f"one at a time: {4 / sequential_s:.2f} answers/s ({sequential_s / 4:.2f} s each)")


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(checkpoint, tmp_path):
    command = [sys.executable, "-m", "xemogpt_jax.serve", "--checkpoint", str(checkpoint), "--port", "0",
               "--batch-window-ms", "3000", "--greedy", "--num-beams", "1", "--max-new-tokens", "4"]
    env = {**os.environ, "XEMOGPT_API_KEY": ""}
    log = tmp_path / "serve.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = process.stdout.readline()
        assert "serving" in line, log.read_text()
        url = line.split(" on ")[1].split()[0]
        body = {"model": "xemogpt", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}
        answer: dict = {}
        worker = threading.Thread(target=lambda: answer.update(
            reply=httpx.post(url + "/v1/chat/completions", json=body, timeout=900)))
        worker.start()
        deadline = time.monotonic() + 60
        while "xemogpt_in_flight_requests 2" not in httpx.get(url + "/metrics", timeout=60).text:
            assert time.monotonic() < deadline, "the first request never arrived"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        worker.join(900)
        assert answer["reply"].status_code == 200 and answer["reply"].json()["choices"][0]["message"]["content"]
        assert process.wait(300) == 0
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def scripted_server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_scripted")
    tokenizer = save_tokenizer(out / "tokenizer", [REPLY])
    config = tiny_run_config(out / "tokenizer", len(tokenizer), tied=False)
    model = build_model(config)
    script_reply(model, len(tokenizer) - 1, tokenizer.eos_token_id)
    write_checkpoint(out, model, config)
    settings = Settings(defaults=Decoding(max_new_tokens=4))
    s = serve.Server(infer.load_cached(str(out)), max_batch=8, batch_window_s=0.3, settings=settings).start()
    yield s
    s.close()


def test_emocue360_extract_openai_backend_against_our_server(scripted_server, tmp_path):
    descriptions = tmp_path / "descriptions.csv"
    descriptions.write_text('name,english\nclip_a,"In the video, she smiles."\nclip_b,"In the audio, she laughs."\n')
    out = tmp_path / "cues.json"
    result = subprocess.run(
        [sys.executable, "-m", "xemogpt_jax.emocue360", "extract", "--in", str(descriptions), "--out", str(out),
         "--backend", "openai", "--base-url", scripted_server.url + "/v1", "--model", "xemogpt", "--workers", "2",
         "--retries", "0", "--timeout", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {name: json.loads(REPLY) for name in ("clip_a", "clip_b")}


class _StuckBatcher:
    """A batching thread that never answers: what a request sees when the model is too slow."""

    metrics = Metrics()
    queue_depth = 0

    def submit(self, *args, **kwargs) -> Future:
        return Future()


def test_request_timeout_gets_504_and_draining_gets_503():
    state = ServingState()
    app = build_app(None, _StuckBatcher(), Settings(request_timeout_s=0.2), state)
    body = {"model": "xemogpt", "messages": [{"role": "user", "content": "hello"}]}
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 504 and "0.2 s" in reply.json()["error"]["message"]
        state.draining = True
        assert client.post("/v1/chat/completions", json=body).status_code == 503
        assert client.get("/health").status_code == 503
