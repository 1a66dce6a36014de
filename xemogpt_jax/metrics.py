"""Progress bar, TensorBoard events and a JSONL log for training runs, plus FLOP accounting for MFU.

Only process 0 writes; the others keep silent counters so every process runs the same code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.extend as jex
import tqdm
from tensorboardX import SummaryWriter

from xemogpt_jax.models.layers import remat_off


def step_flops_from_params(total_params: int, trainable_params: int, tokens: int) -> float:
    """Model FLOPs of one train step by the parameter-count rule.

    Forward ``2 N`` per token; backward ``2 N`` for activation gradients through every layer plus
    ``2 N_trainable`` for weight gradients (frozen weights get none), so ``(4 N + 2 N_trainable) T``.
    """
    return float((4 * total_params + 2 * trainable_params) * tokens)


def jaxpr_flops(jaxpr: jex.core.Jaxpr | jex.core.ClosedJaxpr) -> float:
    """FLOPs of the matmuls and convolutions in a jaxpr, a scan's body counted once per iteration.

    XLA's cost analysis counts a loop body once, so a model whose layers run under ``lax.scan``
    would show a fraction of its FLOPs (one layer's worth). Elementwise work is left out, as MFU
    conventionally counts it. A ``cond`` counts its costliest branch, a ``while`` loop one trip.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contracting)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) / out_features
        inner = [jaxpr_flops(sub) for sub in jex.core.jaxprs_in_params(eqn.params)]
        if name == "cond":
            total += max(inner, default=0.0)
        else:
            trips = eqn.params["length"] if name == "scan" else 1
            total += trips * sum(inner)
    return total


# jax.checkpoint's primitive, by its name in a jaxpr (``checkpoint`` in older JAX releases).
REMAT_PRIMITIVES = ("remat2", "checkpoint")


def rematerialises(jaxpr: jex.core.Jaxpr | jex.core.ClosedJaxpr) -> bool:
    """Whether a jaxpr runs anything under ``jax.checkpoint``: a train step that recomputes in its backward."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(eqn.primitive.name in REMAT_PRIMITIVES or any(map(rematerialises, jex.core.jaxprs_in_params(eqn.params)))
               for eqn in jaxpr.eqns)


def model_flops(jaxpr: jex.core.Jaxpr | jex.core.ClosedJaxpr, retrace: Callable[[], float]) -> float:
    """A traced step's FLOPs without remat's recomputation (MFU counts none): its own count, or where it
    rematerialises, ``retrace()``'s, a fresh trace's count made under ``remat_off``."""
    if not rematerialises(jaxpr):
        return jaxpr_flops(jaxpr)
    with remat_off():
        return retrace()


def traced_flops(jitted: Any, *args: Any) -> float:
    """:func:`jaxpr_flops` of ``jitted(*args)`` (traced only: nothing is compiled or run)."""
    return jaxpr_flops(jitted.trace(*args).jaxpr)


def mfu(flops_per_step: float | None, step_seconds: float, peak_flops_per_device: float, num_devices: int) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the peak of all devices (0 when unknown)."""
    if not flops_per_step or step_seconds <= 0 or peak_flops_per_device <= 0:
        return 0.0
    return flops_per_step / step_seconds / (peak_flops_per_device * num_devices)


class MetricsWriter:
    """A tqdm bar with loss, lr, step time, tokens/s and MFU; TensorBoard and ``metrics.jsonl`` in the workdir."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        total_steps: int,
        initial_step: int,
        flops_per_step: float | None,
        peak_flops_per_device: float,
        show_progress: bool = True,
    ):
        self.enabled = jax.process_index() == 0
        self.flops_per_step = flops_per_step
        self.peak = peak_flops_per_device
        self.last_time: float | None = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
        self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not show_progress, dynamic_ncols=True)

    def step_seconds(self) -> float:
        """Wall time since the previous call (0 on the first)."""
        now = time.perf_counter()
        elapsed = 0.0 if self.last_time is None else now - self.last_time
        self.last_time = now
        return elapsed

    def write(
        self, step: int, metrics: dict[str, float], *, tokens: int, seconds: float, prefix: str = "train"
    ) -> dict[str, float]:
        """Log one step's scalars (``step`` is the count of completed steps); returns what was logged."""
        record = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        if seconds > 0:
            record["perf/step_seconds"] = seconds
            record["perf/tokens_per_second"] = tokens / seconds
            record["perf/mfu"] = mfu(self.flops_per_step, seconds, self.peak, jax.device_count())
        if not self.enabled:
            return record
        for name, value in record.items():
            if math.isfinite(value):
                self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        return record

    def progress(self, step: int, record: dict[str, float]) -> None:
        """Advance the bar to ``step`` and show the headline numbers."""
        if not self.enabled:
            return
        shown = {
            "loss": record.get("train/loss"),
            "lr": record.get("train/learning_rate"),
            "s/step": record.get("perf/step_seconds"),
            "tok/s": record.get("perf/tokens_per_second"),
            "mfu": record.get("perf/mfu"),
        }
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.tensorboard.close()
        self.jsonl.close()
