"""One thread that owns the model: request threads queue jobs, it runs them in batches and fulfils Futures.

JAX programs compile per shape and decoding, so the batching thread waits up to ``window_s`` for
more jobs, groups compatible ones (same kind, decoding options and number of top log-probs) and
runs each group in batches of up to ``max_batch``.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

from xemogpt_jax.explainer import Decoding, Explainer, Generation
from xemogpt_jax.serving.metrics import Metrics

Kind = Literal["explain", "chat"]
OnToken = Callable[[int, float, list[tuple[int, float]]], None]  # a job's answer token, its log-prob, top pairs


@dataclasses.dataclass(frozen=True)
class Result:
    generation: Generation
    seconds: float  # wall time of the whole batch
    batch_size: int


@dataclasses.dataclass
class _Job:
    kind: Kind
    payload: Any  # a Clip ("explain") or a message list ("chat")
    decoding: Decoding
    top_logprobs: int
    on_token: OnToken | None = None  # called on the batching thread as the answer decodes (one beam only)
    future: Future = dataclasses.field(default_factory=Future)


class Batcher:
    """Runs queued jobs on the model in batches; callers wait on the Future that :meth:`submit` returns."""

    def __init__(self, model: Explainer, max_batch: int, window_s: float, metrics: Metrics | None = None):
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.metrics = metrics or Metrics()
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, kind: Kind, payload: Any, decoding: Decoding, top_logprobs: int = 0,
               on_token: OnToken | None = None) -> Future:
        """Queue a job; ``on_token``, with one beam, gets its answer's tokens as they are decoded, before the
        Future's result."""
        job = _Job(kind, payload, decoding, top_logprobs, on_token)
        self.jobs.put(job)
        return job.future

    @property
    def queue_depth(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
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
            groups: dict[tuple[Kind, Decoding, int], list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel():
                    groups.setdefault((job.kind, job.decoding, job.top_logprobs), []).append(job)
            for (kind, decoding, top), group in groups.items():
                for start in range(0, len(group), self.max_batch):
                    self._run(kind, decoding, top, group[start : start + self.max_batch])
            if closing:
                return

    def _run(self, kind: Kind, decoding: Decoding, top_logprobs: int, jobs: list[_Job]) -> None:
        began = time.perf_counter()
        payloads = [job.payload for job in jobs]
        on_token = None
        if decoding.num_beams == 1 and any(job.on_token for job in jobs):
            def on_token(row: int, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
                if jobs[row].on_token is not None:
                    jobs[row].on_token(token, logprob, top)
        try:
            if kind == "explain":
                generations = self.model.explain_generations(payloads, decoding, top_logprobs, on_token)
            else:
                generations = self.model.chat_generations(payloads, decoding, top_logprobs, on_token)
        except Exception as error:  # a failed batch fails its requests, never the server
            logging.exception("batch of %d %s requests failed", len(jobs), kind)
            for job in jobs:
                job.future.set_exception(error)
            return
        seconds = time.perf_counter() - began
        self.metrics.batch(len(jobs), sum(g.generated_tokens for g in generations), seconds)
        for job, generation in zip(jobs, generations):
            job.future.set_result(Result(generation, seconds, len(jobs)))
