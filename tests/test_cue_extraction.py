"""Cue extraction: the OpenAI-compatible client against a real loopback HTTP server, and the rules backend."""

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xemogpt_jax import cue_extraction, emocue360

GOOD_CUES = {"visual": ["He smiles."], "auditory": ["His voice is warm."], "emotional": ["He is happy."]}
SECRET = "sk-test-secret-do-not-print"


class FakeChatServer:
    """An OpenAI-style endpoint; its behaviour per request depends on the description it is sent."""

    def __init__(self):
        self.requests: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                description = body["messages"][-1]["content"]
                server.requests[description] += 1
                server.bodies.append(body)
                server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                if "SLOW" in description:
                    server.release.wait(5)
                    content = json.dumps(GOOD_CUES)
                elif "MALFORMED" in description:
                    content = "Sure! Here are the cues: {visual: [oops"
                elif "FLAKY" in description and server.requests[description] == 1:
                    self.send_error(500, "try again")
                    return
                else:
                    content = json.dumps(GOOD_CUES)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


def _write_descriptions(path):
    rows = [
        {"name": "good", "english": "In the video, he smiles."},
        {"name": "flaky", "english": "FLAKY but fine on retry."},
        {"name": "bad", "english": "MALFORMED reply expected."},
        {"name": "slow", "english": "SLOW server, times out."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _extract(tmp_path, *extra):
    return emocue360.main(
        ["extract", "--in", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "cues.json"), "--backend", "openai",
         "--retries", "1", "--backoff", "0.01", "--timeout", "0.5", "--workers", "4", *extra]
    )


def test_openai_backend_reports_failures_per_sample_and_completes(tmp_path, server, monkeypatch, capsys):
    _write_descriptions(tmp_path / "d.jsonl")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert _extract(tmp_path) == 3
    cues = json.loads((tmp_path / "cues.json").read_text())
    assert cues == {"good": GOOD_CUES, "flaky": GOOD_CUES}
    failures = json.loads((tmp_path / "cues.json.failures.json").read_text())
    assert set(failures) == {"bad", "slow"}
    assert "not JSON" in failures["bad"] and "timed out" in failures["slow"]
    output = capsys.readouterr()
    assert "FAILED bad" in output.err and "FAILED slow" in output.err
    assert SECRET not in output.out + output.err
    # one retry each for the failures and the flaky one, none for the good one
    assert server.requests["In the video, he smiles."] == 1
    assert server.requests["FLAKY but fine on retry."] == 2
    assert server.requests["MALFORMED reply expected."] == 2
    body, headers = server.bodies[0], server.headers[0]
    assert body["model"] == "deepseek-chat" and body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]  # one-shot example
    assert headers["Authorization"] == f"Bearer {SECRET}"

    # a rerun asks only for what failed; the cache answers the rest
    before = sum(server.requests.values())
    server.release.set()
    assert _extract(tmp_path, "--timeout", "5") == 3  # the malformed one still fails
    assert server.requests["In the video, he smiles."] == 1 and server.requests["FLAKY but fine on retry."] == 2
    assert sum(server.requests.values()) - before == 1 + 2  # slow once (now answered), malformed twice
    assert set(json.loads((tmp_path / "cues.json").read_text())) == {"good", "flaky", "slow"}


def test_prompt_file_replaces_system_prompt(tmp_path, server):
    _write_descriptions(tmp_path / "d.jsonl")
    (tmp_path / "prompt.txt").write_text("Custom system prompt.")
    _extract(tmp_path, "--base-url", server.base_url, "--prompt-file", str(tmp_path / "prompt.txt"))
    assert server.bodies[0]["messages"][0] == {"role": "system", "content": "Custom system prompt."}


def test_parse_cues_accepts_fences_and_refuses_wrong_shapes():
    assert cue_extraction.parse_cues('```json\n{"visual": ["a"], "emotional": []}\n```') == {
        "visual": ["a"], "emotional": []
    }
    with pytest.raises(cue_extraction.MalformedReply):
        cue_extraction.parse_cues('{"visual": "not a list"}')
    with pytest.raises(cue_extraction.MalformedReply):
        cue_extraction.parse_cues('{"answer": 1}')


def test_local_backend_needs_a_checkpoint():
    with pytest.raises(SystemExit, match="local backend needs --checkpoint"):
        cue_extraction.local_chat(None)


def test_rules_backend_on_known_descriptions(tmp_path):
    description = (
        "In the video, the man frowns; he looks away from the camera. His fists are clenched! "
        "In the audio, his voice is loud and sharp. He speaks quickly. "
        "Overall, he appears angry. Therefore, his emotional state is anger."
    )
    assert cue_extraction.rules_cues(description) == {
        "visual": ["The man frowns", "He looks away from the camera", "His fists are clenched"],
        "auditory": ["His voice is loud and sharp", "He speaks quickly"],
        "emotional": ["He appears angry", "His emotional state is anger"],
    }
    assert cue_extraction.rules_cues("A preamble without markers.") == {"visual": [], "auditory": [], "emotional": []}
    (tmp_path / "d.csv").write_text(f'name,english\nclip1,"{description}"\n')
    code = emocue360.main(
        ["extract", "--in", str(tmp_path / "d.csv"), "--out", str(tmp_path / "c.json"), "--backend", "rules"]
    )
    assert code == 0
    assert json.loads((tmp_path / "c.json").read_text())["clip1"] == cue_extraction.rules_cues(description)


def test_rules_backend_splits_clauses_and_finds_the_closing_inference():
    description = (
        "The video is not available. In the audio, the pitch is high, the pitch is rising, and the voice is soft. "
        "Surprise is suggested by the high, rising pitch as well as the wide eyes, "
        "so the person is most likely surprised."
    )
    assert cue_extraction.rules_cues(description) == {
        "visual": [],
        "auditory": ["The pitch is high", "The pitch is rising", "The voice is soft"],
        "emotional": [
            "Surprise is suggested by the high, rising pitch",
            "Surprise is suggested by the wide eyes",
            "The person is most likely surprised",
        ],
    }


def test_rules_backend_recovers_the_synthetic_worlds_ground_truth_cues():
    """On the cue world's target descriptions the extractor must give back synth's cue lists (order aside),
    so that ``make demo``'s EmoCue-360 measures the model and not the extractor."""
    from data_pipelines import synth

    for index in range(300):
        latents = synth.sample_latents(synth.clip_rng(5, "cues", index), f"c{index}")
        extracted = cue_extraction.rules_cues(synth.describe(latents))
        for axis, truth in synth.cue_lists(latents).items():
            assert sorted(cue[0].lower() + cue[1:] for cue in extracted[axis]) == sorted(truth), (axis, index)
