"""Fields every stage shares, with their documented defaults.

Values marked [reconstructed] are not published by the paper; they are our choices, kept here so a
run can override them (``--config.optim.learning_rate=...``).
"""

from __future__ import annotations

import ml_collections

# Peak dense bf16 FLOP/s per chip, for the MFU estimate (configurable: perf.peak_flops_per_device).
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu-v4": 275e12, "tpu-v5e": 197e12, "cpu": 1e11}

VARIANTS = ("paper", "tiny")


def check_variant(variant: str) -> str:
    variant = variant or "paper"
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {VARIANTS}")
    return variant


def base_config(stage: str) -> ml_collections.ConfigDict:
    """Run, mesh, optimizer, checkpoint and logging fields at paper scale."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    # Compute dtype; parameters (the master copy) stay float32.
    c.dtype = "bfloat16"

    # (data, fsdp, tensor); one entry may be -1 = all remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

    # Pretrained weights and earlier-stage checkpoints (local paths; "" = random init, for tests/demo).
    c.init_from = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.train_dir = ""
    c.data.eval_dir = ""
    c.data.batch_size = 64  # GLOBAL batch, split over processes and the (data, fsdp) mesh axes [reconstructed]
    c.data.eval_batch_size = 64
    c.data.shuffle_seed = 0
    c.data.worker_count = 0  # Grain worker processes per host (0 = in-process)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4  # [reconstructed]
    c.optim.warmup_steps = 500  # optimizer updates [reconstructed]
    c.optim.end_lr_ratio = 0.1  # cosine decays to this fraction of the peak [reconstructed]
    c.optim.weight_decay = 0.05  # AdamW, not on norms/biases/positional tables [reconstructed]
    c.optim.clip_norm = 1.0  # global gradient norm [reconstructed]
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.accum_steps = 1  # micro-batches per optimizer update (optax.MultiSteps)
    # {path part: factor}: parameters whose path names the part learn at factor x the schedule's rate.
    c.optim.lr_multipliers = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000  # train steps (micro-batches) [reconstructed]
    c.train.log_every = 10
    c.train.eval_every = 1000  # also attaches eval_loss to the checkpoint of that step
    c.train.eval_steps = 20
    c.train.show_progress = True

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3  # latest K
    c.checkpoint.keep_best = True  # plus the best by eval loss
    c.checkpoint.async_save = True

    c.perf = ml_collections.ConfigDict()
    c.perf.peak_flops_per_device = PEAK_FLOPS["h100"]
    # "traced" (matmuls + convolutions of the traced step) or "params" (parameter-count rule)
    c.perf.flops_from = "traced"
    return c


def runtime_options(model: ml_collections.ConfigDict) -> None:
    """``model.*`` fields that pick kernels and remat, not the architecture (every stage)."""
    # One switch for the LLM and every encoder and bridge: auto | blocked | xla | splash | cudnn
    # (auto: splash on TPU, cudnn on GPU, blocked on CPU).
    model.attention = "auto"
    model.splash_block_q = 512  # splash query / key blocks (multiples of 128; shorter sequences use one block)
    model.splash_block_kv = 512
    # Remat of each CLIP / HuBERT tower layer and bridge layer: none | full | dots_saveable |
    # dots_with_no_batch_dims_saveable | save_qkv_proj (or a jax.checkpoint_policies name).
    model.remat_towers = "none"
    # True unrolls the layer scans (LLM, CLIP and HuBERT towers; and the stage-3 loss's chunks): faster at a few
    # layers, slower to compile.
    model.unroll_layers = False


def tiny_overrides(c: ml_collections.ConfigDict) -> None:
    """Run-level settings sized for a 2-core CPU."""
    c.dtype = "float32"
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.train.log_every = 5
    c.train.eval_every = 50
    c.train.eval_steps = 2
    c.checkpoint.every_steps = 50
    c.perf.peak_flops_per_device = PEAK_FLOPS["cpu"]
