"""An XEmoGPT checkpoint (a stage-3 run or an imported model) -> files PyTorch users load.

    xemogpt-export --checkpoint DIR --out DIR --format hf|xemogpt|peft [--dtype f32|bf16] [--overwrite]
    (or python tools/export_pytorch.py ...)

- ``hf``: ``llm/`` (transformers causal LM, LoRA merged, config.json from the source config with
  the export dtype, tokenizer files copied from the source folder when it is still there),
  ``clip/`` (CLIPVisionModel), ``hubert/`` (HubertModel), ``bridges.safetensors`` (bridges, heads,
  projections under the release's names, docs/architecture.md section 7) and ``bridges_config.json``.
- ``xemogpt``: ``xemogpt.safetensors`` and ``xemogpt.ckpt`` (a torch state dict) with the release's
  key names, trainable parts only (LoRA in PEFT naming, bridges, positional table, pooling, heads,
  projections), for the authors' model to load with ``strict=False``.
- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained``.

``--out`` must be a new or empty folder (``--overwrite`` replaces an earlier export) outside every folder
the model is read from; files appear there only once all are written (:mod:`xemogpt_jax.export_target`).

The model is loaded sharded onto the mesh (``--mesh``) by :mod:`xemogpt_jax.loading`; a trained run's
HF configs, bridge sizes, LoRA and tokenizer source come from its run config
(:func:`xemogpt_jax.run_config.model_spec`). Safetensors files are written one
tensor at a time, each gathered alone, so no host ever holds the whole model. (The ``.ckpt`` file
is a single torch pickle and does hold the trainable parts in memory while it is written.)
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from xemogpt_jax import cli_checks, export_target, loading, run_config, sharding
from xemogpt_jax.models import lora as lora_lib
from xemogpt_jax.models import xemogpt_params
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.models.xemogpt_params import ExportTensor, ModelSpec
from xemogpt_jax.tensor_files import write_safetensors, write_torch

DTYPES = {"f32": (np.dtype(np.float32), "float32"), "bf16": (np.dtype(ml_dtypes.bfloat16), "bfloat16")}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template.jinja", "tokenizer.model",
)


def _strip(records: list[ExportTensor], prefix: str) -> list[ExportTensor]:
    return [r.renamed(r.name[len(prefix) :]) for r in records if r.name.startswith(prefix)]


def _write_config(directory: Path, config: dict[str, Any], dtype_name: str) -> None:
    config = {k: v for k, v in config.items() if k != "torch_dtype"}
    (directory / "config.json").write_text(json.dumps({**config, "dtype": dtype_name}, indent=2))


def export_hf(model: XEmoGPT, spec: ModelSpec, out: Path, dtype: str) -> None:
    np_dtype, dtype_name = DTYPES[dtype]
    lora_lib.merge_lora(model)
    records = list(xemogpt_params.release_tensors(model, np_dtype))
    parts = {"llm": xemogpt_params.LLM, "clip": xemogpt_params.CLIP, "hubert": xemogpt_params.HUBERT}
    configs = {"llm": spec.llm, "clip": spec.vision, "hubert": spec.hubert}
    for part, prefix in parts.items():
        directory = out / part
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / "model.safetensors", _strip(records, prefix))
        _write_config(directory, configs[part], dtype_name)
    source = spec.sources.get("llm") or spec.sources.get("tokenizer")
    for name in TOKENIZER_FILES:
        if source and (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, out / "llm" / name)
    bridges = [r for r in records if not r.name.startswith(tuple(parts.values()))]
    write_safetensors(out / "bridges.safetensors", bridges)
    bridge_config = {k: v for k, v in spec.to_json().items() if k not in ("llm", "vision", "hubert", "lora", "sources")}
    bridge_config.update(
        dtype=dtype_name,
        visual_alignment_layer="transformers CLIPEncoderLayer with clip/config.json",
        audio_alignment_layer="transformers HubertEncoderLayer (post-norm) with hubert/config.json",
    )
    (out / "bridges_config.json").write_text(json.dumps(bridge_config, indent=2))


def export_xemogpt(model: XEmoGPT, out: Path, dtype: str) -> None:
    np_dtype, _ = DTYPES[dtype]
    records = [
        r for r in xemogpt_params.release_tensors(model, np_dtype) if xemogpt_params.is_trainable_release_name(r.name)
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "xemogpt.safetensors", records)
    write_torch(out / "xemogpt.ckpt", records)


def export_peft(model: XEmoGPT, spec: ModelSpec, out: Path, dtype: str) -> None:
    lora = run_config.lora_config(spec.run_config())
    if lora is None:
        raise ValueError("this checkpoint has no LoRA adapters (lora rank <= 0); nothing to export as peft")
    np_dtype, _ = DTYPES[dtype]
    records = [
        r.renamed(xemogpt_params.to_peft_name(r.name))
        for r in xemogpt_params.release_tensors(model, np_dtype)
        if r.name.startswith(xemogpt_params.LLM) and xemogpt_params.is_trainable_release_name(r.name)
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", records)
    adapter_config = dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=spec.sources.get("llm"),
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=sorted(lora.targets),
        bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False, inference_mode=True,
        init_lora_weights=True, modules_to_save=None,
    )
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="stage-3 workdir, its checkpoints/ folder, or an imported model checkpoint")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, help="a new or empty folder (written whole, or not at all)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out, an earlier export")
    parser.add_argument("--format", required=True, choices=("hf", "xemogpt", "peft"))
    parser.add_argument("--dtype", default="f32", choices=tuple(DTYPES), help="dtype of the written tensors")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape to restore onto")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The checkpoint must hold a whole model and ``--out`` must be safe to write, before anything is loaded."""
    problems = cli_checks.Problems()
    stored = problems.explainer_checkpoint("--checkpoint", args.checkpoint, "export", args.step)
    sources = export_target.read_from(args.checkpoint, stored) if stored is not None else [Path(args.checkpoint)]
    export_target.check_out(problems, "--out", args.out, args.overwrite, sources)
    problems.raise_if_any()


@cli_checks.command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    mesh = sharding.make_mesh(tuple(int(s) for s in args.mesh.split(",")))
    with jax.set_mesh(mesh):
        found = loading.open_checkpoint(args.checkpoint, args.step)
        spec = loading.model_spec(found)
        if args.format == "peft" and spec.lora is None:
            raise cli_checks.UsageError(f"--format peft: {args.checkpoint} has no LoRA adapters (lora rank <= 0)")
        model = loading.load_xemogpt(found, run_config.xemogpt_config(found.run), mesh)
        with export_target.staged(args.out) as out:
            if args.format == "hf":
                export_hf(model, spec, out, args.dtype)
            elif args.format == "xemogpt":
                export_xemogpt(model, out, args.dtype)
            else:
                export_peft(model, spec, out, args.dtype)
    print(f"wrote {args.format} export ({args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
