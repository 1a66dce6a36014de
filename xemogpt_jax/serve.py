"""An HTTP server around one loaded checkpoint: clip explanations and an OpenAI-compatible text chat.

    python -m xemogpt_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000]

Endpoints (JSON replies; errors are ``{"error": {"message", "type"}}`` with a 4xx status):

- ``POST /v1/explain`` with a clip upload: the raw file as the body (``Content-Type: video/...``,
  ``audio/...`` or ``application/octet-stream``; a video's own audio track is used when present)
  and ``subtitle`` plus optional decoding fields (``max_new_tokens``, ``num_beams``, ``temperature``,
  ``top_p``, ``seed``, ``greedy``) in the query string. Or ``Content-Type: application/json`` with
  ``{"video": PATH, "audio": PATH, "subtitle": TEXT, ...decoding fields}`` naming server-side files.
  Reply: ``{"explanation", "seconds", "batch_size"}``.
- ``POST /v1/chat/completions``: OpenAI chat format, text only (``messages``, ``max_tokens``,
  ``temperature`` (0 = greedy), ``top_p``, ``seed``; ``n`` must be 1).
- ``GET /health``.

Requests are served by threads that hand their work to one batching thread: it waits up to
``--batch-window-ms`` for more requests, groups compatible ones (same kind and decoding options)
into batches of up to ``--max-batch`` and runs them on the model one batch at a time. Bodies
over ``--max-upload-mb`` (uploads) or ``--max-json-kb`` (JSON) get 413; bad JSON, bad fields and
undecodable media get 400 with the reason. The server binds to loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from data_pipelines import media
from xemogpt_jax import explainer as explainer_lib
from xemogpt_jax import infer
from xemogpt_jax.explainer import Clip, Decoding, Explainer

_DRAIN_LIMIT = 64 << 20  # an oversize body up to this size is read and dropped so the client sees the 413


class RequestError(Exception):
    """A client mistake: answered with ``status`` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class _Job:
    kind: str  # "explain" | "chat"
    payload: Any  # Clip or messages
    decoding: Decoding
    future: Future = dataclasses.field(default_factory=Future)


class Batcher:
    """One thread that runs queued jobs on the model in batches; callers wait on a Future."""

    def __init__(self, model: Explainer, max_batch: int, window_s: float):
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, kind: str, payload: Any, decoding: Decoding) -> Future:
        job = _Job(kind, payload, decoding)
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        batch, deadline = [first], time.monotonic() + self.window_s
        while len(batch) < self.max_batch * 4:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            jobs, closing = self._collect(first)
            groups: dict[tuple[str, Decoding], list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.kind, job.decoding), []).append(job)
            for (kind, decoding), group in groups.items():
                for start in range(0, len(group), self.max_batch):
                    self._run(kind, decoding, group[start : start + self.max_batch])
            if closing:
                return

    def _run(self, kind: str, decoding: Decoding, jobs: list[_Job]) -> None:
        began = time.perf_counter()
        try:
            payloads = [job.payload for job in jobs]
            texts = self.model.explain(payloads, decoding) if kind == "explain" else self.model.chat(payloads, decoding)
        except Exception as error:  # a failed batch fails its requests, never the server
            logging.exception("batch of %d %s requests failed", len(jobs), kind)
            for job in jobs:
                job.future.set_exception(error)
            return
        seconds = time.perf_counter() - began
        for job, text in zip(jobs, texts):
            job.future.set_result({"text": text, "seconds": seconds, "batch_size": len(jobs)})


def _decoding(fields: dict[str, Any], base: Decoding) -> Decoding:
    """``base`` with the request's decoding fields; RequestError on a bad value."""
    names = {"max_new_tokens": int, "num_beams": int, "temperature": float, "top_p": float, "seed": int}
    changes: dict[str, Any] = {}
    try:
        for name, cast in names.items():
            if fields.get(name) is not None:
                changes[name] = cast(fields[name])
        if fields.get("greedy") is not None:
            changes["do_sample"] = str(fields["greedy"]).lower() not in ("1", "true", "yes")
        if changes.get("max_new_tokens", 1) > base.max_new_tokens:
            raise ValueError(f"max_new_tokens is at most {base.max_new_tokens} on this server")
        return dataclasses.replace(base, **changes)
    except (TypeError, ValueError) as error:
        raise RequestError(400, f"bad decoding option: {error}") from None


def _chat_decoding(body: dict[str, Any], base: Decoding) -> Decoding:
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported")
    temperature = body.get("temperature", 1.0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    try:
        temperature = float(temperature)
        return Decoding(
            max_new_tokens=min(int(max_tokens), base.max_new_tokens) if max_tokens is not None else base.max_new_tokens,
            num_beams=1,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=float(body.get("top_p", 1.0)),
            seed=int(body.get("seed", base.seed)),
        )
    except (TypeError, ValueError) as error:
        raise RequestError(400, f"bad sampling option: {error}") from None


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RequestError(400, f"messages[{i}] needs a string 'content' (text only)")
        out.append({"role": str(message.get("role", "user")), "content": message["content"]})
    return out


@dataclasses.dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 64 << 20
    max_json_bytes: int = 1 << 20
    request_timeout_s: float = 600.0


def make_handler(model: Explainer, batcher: Batcher, limits: Limits, defaults: Decoding,
                 model_name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            logging.info("%s %s", self.address_string(), format % args)

        def _reply(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, close: bool = False) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._reply(status, {"error": {"message": message, "type": kind}}, close=close)

        def _body(self, limit: int) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise RequestError(411, "a Content-Length header is required")
            try:
                length = int(length)
            except ValueError:
                raise RequestError(400, "bad Content-Length") from None
            if length > limit:
                if length <= _DRAIN_LIMIT:
                    self.rfile.read(length)
                else:
                    self.close_connection = True
                raise RequestError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
            return self.rfile.read(length)

        def _json(self) -> dict[str, Any]:
            try:
                body = json.loads(self._body(limits.max_json_bytes))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(400, f"body is not valid JSON: {error}") from None
            if not isinstance(body, dict):
                raise RequestError(400, "body must be a JSON object")
            return body

        def _wait(self, future: Future) -> dict[str, Any]:
            return future.result(timeout=limits.request_timeout_s)

        def do_GET(self) -> None:
            if urlsplit(self.path).path == "/health":
                self._reply(200, {"status": "ok", "model": model_name})
            else:
                self._error(404, f"no such endpoint: GET {self.path}")

        def do_POST(self) -> None:
            routes: dict[str, Callable[[], dict[str, Any]]] = {
                "/v1/explain": self._explain,
                "/v1/chat/completions": self._chat,
            }
            route = routes.get(urlsplit(self.path).path)
            try:
                if route is None:
                    raise RequestError(404, f"no such endpoint: POST {self.path}")
                payload = route()
            except RequestError as error:
                self._error(error.status, str(error), close=error.status in (411, 413))
                return
            except Exception as error:  # the model failed on this request; others keep being served
                logging.exception("request failed")
                self._error(500, f"internal error: {type(error).__name__}: {error}")
                return
            self._reply(200, payload)

        def _explain(self) -> dict[str, Any]:
            query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            content_type = (self.headers.get("Content-Type") or "application/octet-stream").split(";")[0].strip()
            if content_type == "application/json":
                fields = self._json()
                clip = self._clip_from_paths(fields)
            else:
                fields = query
                clip = self._clip_from_upload(self._body(limits.max_upload_bytes), content_type, query)
            result = self._wait(batcher.submit("explain", clip, _decoding(fields, defaults)))
            return {"explanation": result["text"], "seconds": result["seconds"], "batch_size": result["batch_size"]}

        def _clip_from_paths(self, fields: dict[str, Any]) -> Clip:
            video, audio = fields.get("video"), fields.get("audio")
            if video is None and audio is None:
                raise RequestError(400, "give 'video' and/or 'audio' (server-side paths) or upload the clip")
            subtitle = fields.get("subtitle", "")
            if not isinstance(subtitle, str):
                raise RequestError(400, "'subtitle' must be a string")
            try:
                return explainer_lib.read_clip("request", video, audio, subtitle, frame_size=model.frame_size)
            except media.MediaError as error:
                raise RequestError(400, f"bad media: {error}") from None

        def _clip_from_upload(self, data: bytes, content_type: str, query: dict[str, str]) -> Clip:
            if not data:
                raise RequestError(400, "empty upload: send the clip's bytes as the request body")
            with tempfile.NamedTemporaryFile(suffix=".media") as f:
                f.write(data)
                f.flush()
                try:
                    if content_type.startswith("audio/"):
                        return explainer_lib.read_clip("upload", None, f.name, query.get("subtitle", ""),
                                                       frame_size=model.frame_size)
                    return explainer_lib.read_clip("upload", f.name, None, query.get("subtitle", ""),
                                                   frame_size=model.frame_size)
                except media.MediaError as error:
                    raise RequestError(400, f"bad media upload: {error.problem}") from None

        def _chat(self) -> dict[str, Any]:
            body = self._json()
            messages = _messages(body)
            result = self._wait(batcher.submit("chat", messages, _chat_decoding(body, defaults)))
            text = result["text"]
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", model_name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": len(model.tokenizer.encode(model.chat_prompt(messages), add_special_tokens=False)),
                    "completion_tokens": len(model.tokenizer.encode(text, add_special_tokens=False)),
                },
            }

    return Handler


class Server:
    """The HTTP server and its batching thread; ``serve_forever`` in the caller's thread, ``close`` to stop."""

    def __init__(self, model: Explainer, host: str = "127.0.0.1", port: int = 0, *, max_batch: int = 8,
                 batch_window_s: float = 0.02, limits: Limits = Limits(), defaults: Decoding = Decoding(),
                 model_name: str = "xemogpt"):
        self.batcher = Batcher(model, max_batch, batch_window_s)
        handler = make_handler(model, self.batcher, limits, defaults, model_name)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xemogpt_jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    infer.add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--max-upload-mb", type=float, default=64.0)
    parser.add_argument("--max-json-kb", type=float, default=1024.0)
    parser.add_argument("--model-name", default="xemogpt")
    infer.add_decoding_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        defaults = infer.decoding_from(args)
    except ValueError as error:
        parser.error(str(error))
    model = infer.load_cached(str(args.checkpoint), args.tokenizer, None, args.mesh, args.dtype)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_json_bytes=int(args.max_json_kb * 1024))
    server = Server(model, args.host, args.port, max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                    limits=limits, defaults=defaults, model_name=args.model_name)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("listening on %s: anyone who can reach it can run the model and read media paths", args.host)
    print(f"serving {args.checkpoint} on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
