"""Server counters in the Prometheus text format, kept by hand: a handful of numbers needs no client library."""

from __future__ import annotations

import collections
import threading
import time

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Thread-safe counters: the event loop records requests, the batching thread records batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._batch_sizes = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
        self._batches = 0
        self._batched_requests = 0
        self._generated_tokens = 0
        self._model_seconds = 0.0
        self._last_tokens_per_second = 0.0
        self._started = time.time()

    def request(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._requests[(method, path, status)] += 1

    def batch(self, size: int, generated_tokens: int, seconds: float) -> None:
        with self._lock:
            self._batches += 1
            self._batched_requests += size
            self._batch_sizes[next((i for i, b in enumerate(BATCH_SIZE_BUCKETS) if size <= b),
                                   len(BATCH_SIZE_BUCKETS))] += 1
            self._generated_tokens += generated_tokens
            self._model_seconds += seconds
            self._last_tokens_per_second = generated_tokens / seconds if seconds > 0 else 0.0

    def render(self, queue_depth: int, in_flight: int) -> str:
        """The exposition text for ``GET /metrics``."""
        with self._lock:
            lines = [
                "# HELP xemogpt_requests_total HTTP requests answered, by method, path and status.",
                "# TYPE xemogpt_requests_total counter",
            ]
            for (method, path, status), count in sorted(self._requests.items()):
                lines.append(f'xemogpt_requests_total{{method="{method}",path="{path}",status="{status}"}} {count}')
            lines += [
                "# HELP xemogpt_batch_size Requests per model batch.",
                "# TYPE xemogpt_batch_size histogram",
            ]
            cumulative = 0
            for bound, count in zip((*map(str, BATCH_SIZE_BUCKETS), "+Inf"), self._batch_sizes):
                cumulative += count
                lines.append(f'xemogpt_batch_size_bucket{{le="{bound}"}} {cumulative}')
            lines += [
                f"xemogpt_batch_size_sum {self._batched_requests}",
                f"xemogpt_batch_size_count {self._batches}",
                "# HELP xemogpt_generated_tokens_total Tokens generated (EOS included).",
                "# TYPE xemogpt_generated_tokens_total counter",
                f"xemogpt_generated_tokens_total {self._generated_tokens}",
                "# HELP xemogpt_model_seconds_total Wall time the batching thread spent in the model.",
                "# TYPE xemogpt_model_seconds_total counter",
                f"xemogpt_model_seconds_total {self._model_seconds:.6f}",
                "# HELP xemogpt_tokens_per_second Generated tokens per second of the last batch.",
                "# TYPE xemogpt_tokens_per_second gauge",
                f"xemogpt_tokens_per_second {self._last_tokens_per_second:.3f}",
                "# HELP xemogpt_queue_depth Requests waiting for the batching thread.",
                "# TYPE xemogpt_queue_depth gauge",
                f"xemogpt_queue_depth {queue_depth}",
                "# HELP xemogpt_in_flight_requests HTTP requests being served.",
                "# TYPE xemogpt_in_flight_requests gauge",
                f"xemogpt_in_flight_requests {in_flight}",
                "# HELP xemogpt_start_time_seconds Unix time the server started.",
                "# TYPE xemogpt_start_time_seconds gauge",
                f"xemogpt_start_time_seconds {self._started:.3f}",
            ]
        return "\n".join(lines) + "\n"
