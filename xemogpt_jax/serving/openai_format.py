"""Generations in OpenAI's chat-completion shapes: the completion object, stream chunks, ``logprobs`` content.

A stream is fed one token at a time as the batch decodes (:meth:`Completion.add`), or from a finished
generation (beam search): each chunk carries the growth of the decoded prefix, a token that ends
mid-character is held until the character is complete, and the final flush adds whatever the
finished text has beyond what was sent, so the joined deltas equal the non-streamed text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from xemogpt_jax.explainer import Generation

Decode = Callable[[Sequence[int]], str]  # token ids -> text under the release's rule (Explainer.decode)


class Completion:
    """One answer being formatted: shared id and timestamp, and the stream's state (tokens so far, text sent)."""

    def __init__(self, model: str, token_text: Callable[[int], str], decode: Decode, logprobs: bool,
                 top_logprobs: int):
        self.model = model
        self.token_text = token_text
        self.decode = decode
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._ids: list[int] = []
        self._logprobs: list[float] = []
        self._tops: list[list[tuple[int, float]]] = []
        self._sent = ""
        self._first_unsent = 0

    @staticmethod
    def finish_reason(generation: Generation) -> str:
        return "stop" if generation.generated_tokens > len(generation.token_ids) else "length"

    @staticmethod
    def usage(generation: Generation) -> dict[str, int]:
        g = generation
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.generated_tokens,
                "total_tokens": g.prompt_tokens + g.generated_tokens}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs_field(self, ids: Sequence[int], logprobs: Sequence[float],
                        tops: Sequence[Sequence[tuple[int, float]]]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        entries = []
        for token, logprob, top in zip(ids, logprobs, tops):
            alternatives = [self._entry(t, v) for t, v in top[: self.top_logprobs]] if self.top_logprobs else []
            entries.append({**self._entry(token, logprob), "top_logprobs": alternatives})
        return {"content": entries, "refusal": None}

    def response(self, generation: Generation) -> dict[str, Any]:
        g = generation
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": g.text, "refusal": None},
            "logprobs": self._logprobs_field(g.token_ids, g.token_logprobs, g.top_logprobs),
            "finish_reason": self.finish_reason(g),
        }
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(g)}

    def _chunk(self, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def _unsent_logprobs(self, stop: int) -> dict[str, Any] | None:
        start = self._first_unsent
        return self._logprobs_field(self._ids[start:stop], self._logprobs[start:stop], self._tops[start:stop])

    def start(self) -> dict[str, Any]:
        """The stream's first chunk: the assistant role."""
        return self._chunk({"role": "assistant", "content": ""}, None, None)

    def add(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any] | None:
        """The next answer token; a chunk when the decoded text grew by whole characters."""
        self._ids.append(token)
        self._logprobs.append(logprob)
        self._tops.append(top)
        text = self.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._sent) or text == self._sent:
            return None
        chunk = self._chunk({"content": text[len(self._sent):]}, self._unsent_logprobs(len(self._ids)), None)
        self._sent, self._first_unsent = text, len(self._ids)
        return chunk

    def finish(self, generation: Generation, include_usage: bool) -> Iterator[dict[str, Any]]:
        """The stream's end once the answer is complete: held text, the finish reason, optionally usage."""
        sent, ids = self._sent, self._ids
        rest = generation.text[len(sent):] if generation.text.startswith(sent) else ""
        if rest or self._first_unsent < len(ids):
            yield self._chunk({"content": rest}, self._unsent_logprobs(len(ids)), None)
        yield self._chunk({}, None, self.finish_reason(generation))
        if include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage(generation)}

    def chunks(self, generation: Generation, include_usage: bool) -> Iterator[dict[str, Any]]:
        """The whole stream of a finished generation (beam search, whose tokens are final only at the end)."""
        yield self.start()
        g = generation
        for token, logprob, top in zip(g.token_ids, g.token_logprobs, g.top_logprobs):
            chunk = self.add(token, logprob, top)
            if chunk is not None:
                yield chunk
        yield from self.finish(g, include_usage)
