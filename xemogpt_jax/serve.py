"""An HTTP server around one loaded checkpoint: OpenAI-compatible chat with clip media, clip explanations.

    python -m xemogpt_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--media-root DIR]
    XEMOGPT_API_KEY=secret python -m xemogpt_jax.serve --checkpoint DIR     # Bearer token required

Endpoints (JSON replies; errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status):

- ``POST /v1/chat/completions``: OpenAI's chat format (``messages``, ``max_tokens``,
  ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stream``, ``logprobs``, ``top_logprobs``;
  ``n`` must be 1). A single user message with media content parts is a clip explanation whose
  instruction is the message's text: ``{"type": "input_audio", "input_audio": {"data": BASE64,
  "format": "wav"}}`` and ``{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}``
  (or ``file:///path`` under ``--media-root``); extensions ``subtitle`` and ``num_beams``.
  Streaming sends ``chat.completion.chunk`` server-sent events ending with ``data: [DONE]``.
- ``POST /v1/explain`` with a clip upload: the raw file as the body (``Content-Type: video/...``,
  ``audio/...`` or ``application/octet-stream``; a video's own audio track is used when present)
  and ``subtitle``, ``instruction`` plus optional decoding fields (``max_new_tokens``, ``num_beams``,
  ``temperature``, ``top_p``, ``seed``, ``greedy``) in the query string. Or ``Content-Type:
  application/json`` with ``{"video": PATH, "audio": PATH, "subtitle": TEXT, ...decoding fields}``
  naming files under ``--media-root``. Reply: ``{"explanation", "seconds", "batch_size"}``.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Requests are validated (422 naming the field), media decoded, then handed to one batching thread
(:mod:`xemogpt_jax.serving.batcher`) that groups compatible requests arriving within
``--batch-window-ms`` into batches of up to ``--max-batch``. Bodies over ``--max-body-mb`` get 413;
a request not answered within ``--request-timeout-s`` gets 504. SIGTERM (or SIGINT) drains: new
requests get 503 while admitted ones finish (at most ``--drain-timeout-s``), then the server exits;
a second signal exits at once. The server binds to loopback unless told otherwise. When the
environment variable named by ``--api-key-env`` (default ``XEMOGPT_API_KEY``) is set, every
``/v1`` request needs ``Authorization: Bearer <key>``; the key is never logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn

from xemogpt_jax import cli_checks, infer
from xemogpt_jax.explainer import Explainer
from xemogpt_jax.serving.app import ServingState, Settings, build_app
from xemogpt_jax.serving.batcher import Batcher
from xemogpt_jax.serving.metrics import Metrics

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Uvicorn(uvicorn.Server):
    """uvicorn whose first exit signal starts our drain instead of closing connections at once."""

    def __init__(self, config: uvicorn.Config, owner: Server):
        super().__init__(config)
        self.owner = owner

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.owner.state.draining:
            self.should_exit = self.force_exit = True
        else:
            self.owner.begin_shutdown()


class Server:
    """The app on uvicorn plus its batching thread: ``serve_forever`` (main thread, signals) or ``start`` (a
    thread, for tests and embedding), ``begin_shutdown`` to drain, ``close`` to drain and stop."""

    def __init__(self, model: Explainer, host: str = "127.0.0.1", port: int = 0, *, max_batch: int = 8,
                 batch_window_s: float = 0.02, settings: Settings = Settings(), drain_timeout_s: float = 600.0,
                 log_level: str = "warning"):
        self.batcher = Batcher(model, max_batch, batch_window_s, Metrics())
        self.state = ServingState()
        self.drain_timeout_s = drain_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # queue clients that connect before uvicorn starts accepting
        app = build_app(model, self.batcher, settings, self.state)
        config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_keep_alive=5,
                                timeout_graceful_shutdown=drain_timeout_s)
        self.uvicorn = _Uvicorn(config, self)
        self._thread: threading.Thread | None = None
        self._drainer: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve in this thread until drained (uvicorn installs the signal handlers when it is the main thread)."""
        self.uvicorn.run(sockets=[self.socket])
        self.batcher.close()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="uvicorn", daemon=True)
        self._thread.start()
        while not self.uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            time.sleep(0.01)
        return self

    def begin_shutdown(self) -> None:
        """Turn new requests away with 503, let admitted ones finish, then stop uvicorn."""
        if self.state.draining:
            return
        self.state.draining = True
        logging.info("draining: %d request(s) in flight", self.state.active)

        def drain() -> None:
            deadline = time.monotonic() + self.drain_timeout_s
            while self.state.active and time.monotonic() < deadline:
                time.sleep(0.05)
            self.uvicorn.should_exit = True

        self._drainer = threading.Thread(target=drain, name="drain", daemon=True)
        self._drainer.start()

    def close(self) -> None:
        self.begin_shutdown()
        if self._thread is not None:
            self._thread.join()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m xemogpt_jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    infer.add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="larger request bodies get 413")
    parser.add_argument("--request-timeout-s", type=float, default=600.0, help="unanswered by then: 504")
    parser.add_argument("--drain-timeout-s", type=float, default=600.0, help="longest wait for in-flight requests")
    parser.add_argument("--media-root", type=Path, help="folder that file:// URLs and /v1/explain paths may read")
    parser.add_argument("--api-key-env", default="XEMOGPT_API_KEY",
                        help="environment variable holding the API key (unset or empty: no key required)")
    parser.add_argument("--model-name", default="xemogpt")
    infer.add_decoding_arguments(parser)
    return parser


@cli_checks.command
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = cli_checks.Problems()
    problems.explainer_checkpoint("--checkpoint", args.checkpoint, "serve")
    problems.tokenizer_folder("--tokenizer", args.tokenizer)
    problems.folder("--media-root", args.media_root)
    problems.raise_if_any()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        defaults = infer.decoding_from(args)
    except ValueError as error:
        parser.error(str(error))
    model = infer.load_cached(str(args.checkpoint), args.tokenizer, None, args.mesh, args.dtype)
    settings = Settings(
        model_name=args.model_name, defaults=defaults, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        request_timeout_s=args.request_timeout_s, media_root=args.media_root,
        api_key=os.environ.get(args.api_key_env) or None,
    )
    server = Server(model, args.host, args.port, max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                    settings=settings, drain_timeout_s=args.drain_timeout_s, log_level="info")
    if args.host not in LOOPBACK:
        logging.warning("listening on %s: anyone who can reach it can run the model%s", args.host,
                        "" if settings.api_key else " (no API key set)")
    print(f"serving {args.checkpoint} on {server.url}" + (" (API key required)" if settings.api_key else ""),
          flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
