"""Peak host RSS of ``xemogpt-infer`` on a stage-3 checkpoint of ``bench/train.py``'s ``tiny`` and ``small`` sizes.

    python -m bench.infer_memory [--new-tokens 8] [--repeats 3] [--keep DIR]

Each size is written as a trainer checkpoint (random weights, a byte-level tokenizer), then explained
(the shared clip, greedy) by ``xemogpt-infer``, ``--repeats`` times, each in a process of its own that
reports its peak RSS; the smallest peak counts. The processes run with ``MALLOC_ARENA_MAX=2``: glibc's
per-thread malloc arenas otherwise move a peak by up to ~90 MiB from run to run (and add about that much).
The JAX runtime, the tokenizer and the compiled programs are about the same in both, and are most of the
tiny peak; so (small peak - tiny peak) / (small weights - tiny weights) is what loading and decoding hold
per byte of weights: 1.0 would be the weights alone. Numbers, not assertions: nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
from flax import nnx

from bench.train import widen
from configs import sft
from xemogpt_jax import run_config
from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer
from xemogpt_jax.testing.run_checkpoint import build_model, write_checkpoint

MEDIA = Path(__file__).resolve().parents[2] / "shared/media"
MIB = 2**20
# The child explains through the command's own entry point and prints its peak RSS in KiB last: VmHWM, its
# own (getrusage's maxrss would carry the forking parent's over the exec).
CHILD = ("import re, sys; from xemogpt_jax import infer; rc = infer.main(sys.argv[1:]); "
         "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]); sys.exit(rc)")


def write_run(folder: Path, size: str) -> int:
    """A stage-3 trainer checkpoint of ``size`` with its tokenizer; returns the bytes of its weights."""
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    config = sft.get_config("tiny")
    if size == "small":
        widen(config)
    config.init_from.tokenizer = str(folder / "tokenizer")
    run_config.set_architecture(config, "llm", vocab_size=len(tokenizer))
    config.data.max_audio_seconds = 2.0
    config.data.length_buckets = (512, 1024)
    model = build_model(config)
    write_checkpoint(folder, model, config)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def peak_rss(run: Path, new_tokens: int) -> int:
    """Peak RSS in bytes of one ``xemogpt-infer`` process explaining the shared clip with ``run``."""
    argv = ["--checkpoint", str(run), "--video", str(MEDIA / "sample_00000007.mp4"),
            "--audio", str(MEDIA / "sample_00000007.wav"), "--subtitle", "Be there or be square.",
            "--greedy", "--max-new-tokens", str(new_tokens), "--no-progress"]
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                         env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    if out.returncode:
        raise RuntimeError(f"xemogpt-infer failed on {run}:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", default="", help="write the checkpoints here and keep them (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        weights = {size: write_run(root / size, size) for size in ("tiny", "small")}
        peaks = {size: min(peak_rss(root / size, args.new_tokens) for _ in range(args.repeats)) for size in weights}
    for size in weights:
        print(f"{size:<6} weights {weights[size] / MIB:8.1f} MiB   peak RSS {peaks[size] / MIB:8.1f} MiB   "
              f"({peaks[size] / weights[size]:.2f}x its weights)")
    per_byte = (peaks["small"] - peaks["tiny"]) / (weights["small"] - weights["tiny"])
    print(f"held per byte of weights (small - tiny): {per_byte:.2f}")


if __name__ == "__main__":
    main()
