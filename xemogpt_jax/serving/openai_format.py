"""Generations in OpenAI's chat-completion shapes: the completion object, stream chunks, ``logprobs`` content.

Streaming is chunked per token from a finished generation (the decode loop runs whole on the
device), so the joined deltas equal the non-streamed text by construction: each chunk carries the
growth of the decoded prefix, and a token that ends mid-character is held until the character is
complete.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from xemogpt_jax.explainer import Generation

Decode = Callable[[Sequence[int]], str]  # token ids -> text under the release's rule (Explainer.decode)


class Completion:
    """One answer being formatted: shared id, timestamps and token texts."""

    def __init__(self, generation: Generation, model: str, token_text: Callable[[int], str], decode: Decode,
                 logprobs: bool, top_logprobs: int):
        self.generation = generation
        self.model = model
        self.token_text = token_text
        self.decode = decode
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @property
    def finish_reason(self) -> str:
        return "stop" if self.generation.generated_tokens > len(self.generation.token_ids) else "length"

    @property
    def usage(self) -> dict[str, int]:
        g = self.generation
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.generated_tokens,
                "total_tokens": g.prompt_tokens + g.generated_tokens}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprob_entries(self, start: int, stop: int) -> list[dict[str, Any]]:
        g = self.generation
        entries = []
        for i in range(start, stop):
            entry = self._entry(g.token_ids[i], g.token_logprobs[i])
            entry["top_logprobs"] = [self._entry(t, v) for t, v in g.top_logprobs[i][: self.top_logprobs]] \
                if self.top_logprobs else []
            entries.append(entry)
        return entries

    def _logprobs_field(self, start: int, stop: int) -> dict[str, Any] | None:
        return {"content": self._logprob_entries(start, stop), "refusal": None} if self.logprobs else None

    def response(self) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.generation.text, "refusal": None},
            "logprobs": self._logprobs_field(0, len(self.generation.token_ids)),
            "finish_reason": self.finish_reason,
        }
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage}

    def _chunk(self, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def chunks(self, include_usage: bool) -> Iterator[dict[str, Any]]:
        """The stream: a role chunk, one chunk per completed piece of text, a finish chunk, optionally usage."""
        yield self._chunk({"role": "assistant", "content": ""}, None, None)
        ids, sent, first_unsent = self.generation.token_ids, "", 0
        for stop in range(1, len(ids) + 1):
            text = self.decode(ids[:stop])
            if text.endswith("\ufffd") or not text.startswith(sent) or text == sent:
                continue
            yield self._chunk({"content": text[len(sent):]}, self._logprobs_field(first_unsent, stop), None)
            sent, first_unsent = text, stop
        rest = self.generation.text[len(sent):] if self.generation.text.startswith(sent) else ""
        if rest or first_unsent < len(ids):
            yield self._chunk({"content": rest}, self._logprobs_field(first_unsent, len(ids)), None)
        yield self._chunk({}, None, self.finish_reason)
        if include_usage:
            yield {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [], "usage": self.usage}
