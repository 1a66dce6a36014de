"""The FastAPI application: routes, authentication, error replies, draining and request metrics.

Routes parse and validate on the event loop, decode media in the thread pool, then wait (with the
per-request timeout) on the batching thread's Future; the model never runs on the event loop. A
streamed one-beam chat gets its tokens from the batching thread as the batch decodes them.
Every error reply is OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), except
the framework's own 413 for an oversized body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pydantic
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xemogpt_jax.explainer import Decoding, Explainer
from xemogpt_jax.serving import media_parts
from xemogpt_jax.serving.batcher import Batcher, Result
from xemogpt_jax.serving.errors import RequestError, error_body
from xemogpt_jax.serving.openai_format import Completion
from xemogpt_jax.serving.schemas import ChatRequest, DecodingFields, ExplainPaths

TOP_LOGPROBS = 20  # alternatives computed whenever any are asked for: one compiled program for every k
KNOWN_PATHS = ("/v1/chat/completions", "/v1/explain", "/v1/models", "/health", "/metrics")


@dataclasses.dataclass(frozen=True)
class Settings:
    model_name: str = "xemogpt"
    defaults: Decoding = Decoding()
    max_body_bytes: int = 64 << 20
    request_timeout_s: float = 600.0
    media_root: Path | None = None
    api_key: str | None = None


@dataclasses.dataclass
class ServingState:
    """Shared with the server's shutdown: ``draining`` turns new requests away, ``active`` counts admitted ones."""

    draining: bool = False
    active: int = 0


class Gate:
    """ASGI middleware around every HTTP request: 503 while draining, the admitted-request count, metrics."""

    def __init__(self, app: ASGIApp, state: ServingState, batcher: Batcher):
        self.app = app
        self.state = state
        self.batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.state.draining:
                reply = JSONResponse(error_body(503, "server is shutting down"), 503, headers={"Retry-After": "5"})
                await reply(scope, receive, send_counted)
                return
            self.state.active += 1
            try:
                await self.app(scope, receive, send_counted)
            finally:
                self.state.active -= 1
        finally:
            self.batcher.metrics.request(scope["method"], path, status)


def _validation_message(errors: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)


def _chat_decoding(body: ChatRequest, defaults: Decoding) -> Decoding:
    limit = body.max_completion_tokens or body.max_tokens
    try:
        return Decoding(
            max_new_tokens=min(limit, defaults.max_new_tokens) if limit else defaults.max_new_tokens,
            num_beams=body.num_beams, do_sample=body.temperature > 0,
            temperature=body.temperature if body.temperature > 0 else 1.0, top_p=body.top_p,
            repetition_penalty=defaults.repetition_penalty, seed=defaults.seed if body.seed is None else body.seed,
        )
    except ValueError as error:
        raise RequestError(400, f"bad sampling option: {error}") from None


def _explain_decoding(fields: DecodingFields, defaults: Decoding) -> Decoding:
    changes = {name: getattr(fields, name) for name in ("max_new_tokens", "num_beams", "temperature", "top_p", "seed")
               if getattr(fields, name) is not None}
    if fields.greedy is not None:
        changes["do_sample"] = not fields.greedy
    if changes.get("max_new_tokens", 0) > defaults.max_new_tokens:
        raise RequestError(400, f"max_new_tokens is at most {defaults.max_new_tokens} on this server")
    try:
        return dataclasses.replace(defaults, **changes)
    except ValueError as error:
        raise RequestError(400, f"bad decoding option: {error}") from None


def _parse(model: type[pydantic.BaseModel], data: bytes | dict[str, Any]) -> Any:
    """Validate like FastAPI does for declared bodies (a 422 naming the field), for routes that pick their input."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except pydantic.ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(chunks: Iterable[dict[str, Any]]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield _event(chunk)
    yield "data: [DONE]\n\n"


def build_app(model: Explainer, batcher: Batcher, settings: Settings, state: ServingState) -> FastAPI:
    app = FastAPI(title="xemogpt-jax", max_body_size=settings.max_body_bytes, docs_url=None, redoc_url=None)
    app.add_middleware(Gate, state=state, batcher=batcher)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error_body(error.status, str(error), error.code), error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(422, _validation_message(error.errors())), 422)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logging.error("request failed: %s: %s", type(error).__name__, error)
        return JSONResponse(error_body(500, f"internal error: {type(error).__name__}: {error}"), 500)

    def authorised(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise RequestError(401, "invalid or missing API key (send Authorization: Bearer <key>)", "invalid_api_key")

    async def result_of(future: Future) -> Result:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), settings.request_timeout_s)
        except TimeoutError:
            raise RequestError(504, f"no answer within the server's {settings.request_timeout_s:g} s limit") from None

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = batcher.metrics.render(batcher.queue_depth, state.active)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "xemogpt-jax"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat(body: ChatRequest) -> Any:
        if body.n != 1:
            raise RequestError(400, "only n=1 is supported")
        decoding = _chat_decoding(body, settings.defaults)
        top = TOP_LOGPROBS if body.logprobs and body.top_logprobs else 0
        with_media = [m for m in body.messages if m.media_parts]
        if with_media:
            if len(body.messages) != 1 or body.messages[0].role != "user":
                raise RequestError(400, "a chat with media parts is one user message: the clip and the question")
            message = body.messages[0]
            clip = await run_in_threadpool(
                media_parts.clip_from_parts, message.media_parts, subtitle=body.subtitle,
                instruction=message.text.strip() or None, frame_size=model.frame_size, media_root=settings.media_root,
            )
            kind, payload = "explain", clip
        else:
            kind, payload = "chat", [{"role": m.role, "content": m.text} for m in body.messages]
        completion = Completion(body.model or settings.model_name, lambda token: model.tokenizer.decode([token]),
                                lambda ids: model.decode(ids, ()), body.logprobs, body.top_logprobs)
        if not body.stream:
            result = await result_of(batcher.submit(kind, payload, decoding, top))
            return completion.response(result.generation)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if decoding.num_beams > 1:  # the best beam is known only at the end: stream the finished answer
            result = await result_of(batcher.submit(kind, payload, decoding, top))
            events = _sse(completion.chunks(result.generation, include_usage))
        else:
            events = _incremental(completion, batcher, (kind, payload, decoding, top), include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _incremental(completion: Completion, batcher: Batcher, job: tuple, include_usage: bool):
        """Server-sent events as the batch decodes: tokens reach this loop from the batching thread through a
        queue, and the job's end (its Future) follows its last token there."""
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        future = batcher.submit(*job, on_token=lambda *token: loop.call_soon_threadsafe(tokens.put_nowait, token))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
        deadline = loop.time() + settings.request_timeout_s
        yield _event(completion.start())
        while True:
            try:
                token = await asyncio.wait_for(tokens.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                yield _event(error_body(504, f"no answer within the server's {settings.request_timeout_s:g} s limit"))
                return
            if token is None:
                break
            chunk = completion.add(*token)
            if chunk is not None:
                yield _event(chunk)
        if future.exception() is not None:
            error = future.exception()
            yield _event(error_body(500, f"internal error: {type(error).__name__}: {error}"))
            return
        for chunk in completion.finish(future.result().generation, include_usage):
            yield _event(chunk)
        yield "data: [DONE]\n\n"

    @app.post("/v1/explain", dependencies=[Depends(authorised)])
    async def explain(request: Request) -> dict[str, Any]:
        content_type = (request.headers.get("content-type") or "application/octet-stream").split(";")[0].strip()
        if content_type == "application/json":
            fields: DecodingFields = _parse(ExplainPaths, await request.body())
            if fields.video is None and fields.audio is None:
                raise RequestError(400, "give 'video' and/or 'audio' (paths under --media-root) or upload the clip")
            root = settings.media_root
            video = None if fields.video is None else media_parts.under_root(fields.video, root, "video")
            audio = None if fields.audio is None else media_parts.under_root(fields.audio, root, "audio")
        else:
            fields = _parse(DecodingFields, dict(request.query_params))
            data = await request.body()
            if not data:
                raise RequestError(400, "empty upload: send the clip's bytes as the request body")
            is_audio = content_type.startswith("audio/")
            video, audio = (None, data) if is_audio else (data, None)
        decoding = _explain_decoding(fields, settings.defaults)
        clip = await run_in_threadpool(media_parts.read_media, video, audio, subtitle=fields.subtitle,
                                       instruction=fields.instruction, frame_size=model.frame_size)
        result = await result_of(batcher.submit("explain", clip, decoding))
        return {"explanation": result.generation.text, "seconds": result.seconds, "batch_size": result.batch_size}

    return app
