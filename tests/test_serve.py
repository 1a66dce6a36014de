"""The HTTP server with a scripted tiny model: concurrent batching, 4xx on bad input, and B3's extractor as a client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from infer_fixtures import build_model, save_tokenizer, script_reply, shared_clip, tiny_run_config, write_checkpoint

from xemogpt_jax import infer, serve

REPLY = '{"visual": ["She smiles."], "auditory": ["Her voice is bright."], "emotional": ["She is happy."]}'
ROOT = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 300_000  # below the shared mp4 (434,639 bytes), above its wav (149,430 bytes)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_ckpt")
    tokenizer = save_tokenizer(out / "tokenizer", [REPLY])
    config = tiny_run_config(out / "tokenizer", len(tokenizer), tied=False)
    model = build_model(config)
    script_reply(model, len(tokenizer) - 1, tokenizer.eos_token_id)
    write_checkpoint(out, model, config)
    limits = serve.Limits(max_upload_bytes=UPLOAD_LIMIT, max_json_bytes=200_000)
    defaults = infer.Decoding(max_new_tokens=4)
    s = serve.Server(infer.load_cached(str(out)), "127.0.0.1", 0, max_batch=8, batch_window_s=0.3, limits=limits,
                     defaults=defaults)
    thread = threading.Thread(target=s.serve_forever, daemon=True)
    thread.start()
    yield s
    s.close()


def post(url: str, data: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def chat(server, content: str, **fields) -> tuple[int, dict]:
    body = {"model": "xemogpt", "messages": [{"role": "user", "content": content}], **fields}
    return post(server.url + "/v1/chat/completions", json.dumps(body).encode(), "application/json")


def test_concurrent_requests_are_all_answered_and_batched(server):
    video, wav = shared_clip()
    wav_bytes = wav.read_bytes()
    requests = [lambda i=i: chat(server, f"question {i}", temperature=0, max_tokens=4) for i in range(6)]
    requests += [
        lambda: post(server.url + "/v1/explain?subtitle=hi", wav_bytes, "audio/wav"),
        lambda: post(server.url + "/v1/explain?subtitle=yo", wav_bytes, "audio/x-wav"),
        lambda: post(server.url + "/v1/explain", json.dumps({"video": str(video), "subtitle": "hey"}).encode(),
                     "application/json"),
        lambda: post(server.url + "/v1/explain", json.dumps({"audio": str(wav)}).encode(), "application/json"),
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda request: request(), requests))
    assert [status for status, _ in replies] == [200] * len(requests)
    assert [body["choices"][0]["message"]["content"] for _, body in replies[:6]] == [REPLY] * 6
    assert [body["explanation"] for _, body in replies[6:]] == [REPLY] * 4
    assert max(body["batch_size"] for _, body in replies[6:]) > 1, "concurrent clips were not batched"


def test_bad_requests_get_4xx_with_a_reason_and_the_server_keeps_serving(server):
    video, _ = shared_clip()
    status, body = post(server.url + "/v1/explain", video.read_bytes(), "video/mp4")
    assert status == 413 and "exceeds the limit" in body["error"]["message"]
    status, body = post(server.url + "/v1/explain", b"\x00not a video\x01" * 100, "video/mp4")
    assert status == 400 and "bad media" in body["error"]["message"]
    status, body = post(server.url + "/v1/explain", json.dumps({"video": "/nonexistent.mp4"}).encode(),
                        "application/json")
    assert status == 400 and "file not found" in body["error"]["message"]
    status, body = post(server.url + "/v1/chat/completions", b'{"messages": [', "application/json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = chat(server, "x", n=3)
    assert status == 400 and "n=1" in body["error"]["message"]
    status, body = post(server.url + "/v1/nothing", b"{}", "application/json")
    assert status == 404
    status, body = chat(server, "still there?", temperature=0)
    assert status == 200 and body["choices"][0]["message"]["content"] == REPLY


def test_emocue360_extract_openai_backend_against_our_server(server, tmp_path):
    descriptions = tmp_path / "descriptions.csv"
    descriptions.write_text('name,english\nclip_a,"In the video, she smiles."\nclip_b,"In the audio, she laughs."\n')
    out = tmp_path / "cues.json"
    result = subprocess.run(
        [sys.executable, "-m", "xemogpt_jax.emocue360", "extract", "--in", str(descriptions), "--out", str(out),
         "--backend", "openai", "--base-url", server.url + "/v1", "--model", "xemogpt", "--workers", "2",
         "--retries", "0", "--timeout", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {name: json.loads(REPLY) for name in ("clip_a", "clip_b")}
