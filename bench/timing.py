"""Wall-clock timing for the side-by-side benchmarks.

Every callable is timed in turn, round after round, so load from other processes on a shared
machine falls on all of them alike and their ratio holds even when the machine's speed drifts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def alternating_seconds(runs: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each of ``repeats`` calls of every run (each called once first, to compile and warm up);
    each run must block until its work is done."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, bucket in zip(runs, times):
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
    return times


def best_seconds(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """The fastest of ``repeats`` alternating calls, per run: the figure least disturbed by other load."""
    return [min(t) for t in alternating_seconds(runs, repeats)]


def median_seconds(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """The median of ``repeats`` alternating calls, per run."""
    return [statistics.median(t) for t in alternating_seconds(runs, repeats)]
