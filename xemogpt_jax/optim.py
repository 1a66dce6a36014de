"""AdamW with warmup + cosine decay, global-norm clipping, a weight-decay mask and accumulation.

The optimizer only ever sees the trainable variables (the trainer builds
``nnx.Optimizer(model, tx, wrt=trainable)``),
so frozen encoders and the frozen base LLM carry no Adam moments. Parameters stay fp32 (the
master copy); the models cast them to the bf16 compute dtype at use.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

NO_DECAY_NAME_PARTS = ("position", "pos_embed", "pos_table", "norm", "bias", "logit_scale")


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``learning_rate * end_lr_ratio``.

    Counted in optimizer updates (``total_steps`` train steps / ``accum_steps``).
    """
    updates = max(total_steps // config.accum_steps, 1)
    warmup = min(config.warmup_steps, updates)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(updates, warmup + 1),
        end_value=config.learning_rate * config.end_lr_ratio,
    )


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path).lower()


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: matrices, but not norms, biases, positional tables or scales."""

    def decays(path: tuple[Any, ...], leaf: Any) -> bool:
        name = _path_name(path)
        return getattr(leaf, "ndim", 0) >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def contains_mask(name_part: str):
    """Params tree -> True for the leaves whose path names ``name_part``."""

    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: name_part.lower() in _path_name(path), params)

    return mask


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The stage's transformation from ``config.optim`` (fields documented in configs/common.py)."""
    tx = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate=learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        ),
        *(optax.masked(optax.scale(factor), contains_mask(part))
          for part, factor in dict(config.get("lr_multipliers", {})).items()),
    )
    if config.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accum_steps)
    return tx


def learning_rate_at_step(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Train step (0-based, traceable) -> the learning rate its update applies (for logging)."""
    schedule = learning_rate_schedule(config, total_steps)
    return lambda step: schedule(step // config.accum_steps)
