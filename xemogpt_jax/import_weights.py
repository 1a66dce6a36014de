"""Local HF directories (and optionally the authors' release checkpoint) -> one XEmoGPT Orbax checkpoint.

    xemogpt-import (or python tools/import_weights.py) --llm DIR --clip DIR --hubert DIR [--labse DIR] \
        [--release-ckpt FILE] [--adapter DIR] [--config configs/sft.py[:variant]] --out DIR

Model sizes come from the HF ``config.json`` files; the config file supplies bridge depth, frame
count, the pretraining width and LoRA settings (``--adapter``, a PEFT folder, supplies its own); the
bridges' text heads take the encoders' widths; a release file's own tensor shapes overrule all of
these. The release file may be a bare state dict or hold it under ``state_dict`` (older,
Lightning-style files with ``epoch``, ``global_step``, ...).
Every source is streamed tensor by tensor, each tensor placed straight into its sharding on the
mesh (``--mesh``), so no host holds the whole model; later sources override earlier ones (HF dirs,
then the release file, then the adapter). The release file is a torch pickle and is opened only with
``torch.load(..., weights_only=True)`` (safetensors files are read without pickle), so a file
that would run code on load is refused. Unused and missing keys are reported; a tensor whose
shape disagrees with the model stops the import, naming the key and both shapes. Parameters no
source sets keep their initial values (``--seed``); a stacked LLM adapter that a source sets for
only some layers gets zeros in the others (reported as missing slots).

The output is a model checkpoint (:mod:`xemogpt_jax.model_checkpoint`: every parameter plus the
:class:`ModelSpec` JSON, written through ``checkpoint.Checkpointer``): ``infer --checkpoint OUT``
explains with it, and stage 3 starts from it with ``--config.init_from.model=OUT``.
LaBSE is not part of the XEmoGPT tree (stage 2 runs it frozen); ``--labse`` is checked and its
path recorded in ``sources`` for the trainer's ``init_from``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from xemogpt_jax import cli_checks, config_files, loading, model_checkpoint, run_config, sharding
from xemogpt_jax.models import hf_io, xemogpt_params
from xemogpt_jax.models.xemogpt_params import ModelSpec

DEFAULT_CONFIG = config_files.packaged("sft.py")
# Parameters a HF directory must set; everything else (bridges, heads, adapters) may keep its init.
REQUIRED = ("llm", "vision_tower", "audio_tower")
_SOURCES = ("llm", "clip", "hubert", "labse", "release_ckpt", "adapter")


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """LoRA settings of a PEFT adapter folder (``adapter_config.json``)."""
    data = json.loads((Path(path) / "adapter_config.json").read_text())
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {data.get('peft_type')!r} is not LORA")
    targets = data["target_modules"]
    return dict(
        rank=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
        targets=sorted(targets) if isinstance(targets, list) else [targets],
    )


def bridge_sizes(args: argparse.Namespace, config: Any) -> dict[str, int]:
    """Bridge sizes: a release file's own tensor shapes, else the encoders' widths and the config's numbers.

    The text heads sit on CLIP's projection (``--clip``) and the sentence encoder (``--labse``, else
    the config's ``model.text_encoder``); a release checkpoint's tensors overrule both, since they
    are what gets loaded.
    """
    found = xemogpt_params.release_bridge_sizes(hf_io.tensor_shapes(args.release_ckpt)) if args.release_ckpt else {}
    model = {**run_config.as_dict(config).get("model", {}), "clip": hf_io.read_config(args.clip), **found}
    return run_config.bridge_settings({"model": model, "init_from": {"text_encoder": args.labse or ""}})


def build_spec(args: argparse.Namespace) -> ModelSpec:
    """Architectures from the HF folders; bridge sizes as :func:`bridge_sizes` finds them; LoRA from the config."""
    config = config_files.load(args.config)
    lora = read_adapter_config(args.adapter) if args.adapter else run_config.lora_settings(config)
    sources = {k: str(Path(v).absolute()) for k, v in vars(args).items() if k in _SOURCES and v}
    return ModelSpec(
        llm=hf_io.read_config(args.llm),
        vision=xemogpt_params.vision_hf_config(hf_io.read_config(args.clip)),
        hubert=hf_io.read_config(args.hubert),
        **bridge_sizes(args, config),
        lora=None if lora is None or lora["rank"] <= 0 else lora,
        sources=sources,
        prompt_layout=run_config.prompt_layout(config),
    )


def _prefixed(prefix: str, tensors: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    return ((prefix + name, array) for name, array in tensors)


def release_stream(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """Every source as release-named tensors, in override order."""
    streams = [
        _prefixed(xemogpt_params.LLM, hf_io.iter_tensors(args.llm)),
        _prefixed(xemogpt_params.CLIP, hf_io.iter_tensors(args.clip)),
        _prefixed(xemogpt_params.HUBERT, hf_io.iter_tensors(args.hubert)),
    ]
    if args.release_ckpt:
        streams.append(hf_io.iter_tensors(args.release_ckpt))
    return itertools.chain(*streams)


def key_map(name: str) -> hf_io.Target | None:
    """Release names plus PEFT adapter names (the adapter stream keeps its own prefix)."""
    return xemogpt_params.release_key_map(name) or xemogpt_params.peft_key_map(name)


def check_args(args: argparse.Namespace) -> None:
    """Every source folder of the right kind and the config loadable, all named at once, before any reading."""
    problems = cli_checks.Problems()
    for flag, what in (("--llm", "a HuggingFace Qwen3 causal-LM folder"), ("--clip", "a HuggingFace CLIP folder"),
                       ("--hubert", "a HuggingFace HuBERT folder")):
        problems.hf_folder(flag, getattr(args, flag[2:]), what)
    problems.sentence_transformers_folder("--labse", args.labse)
    problems.file("--release-ckpt", args.release_ckpt)
    problems.folder("--adapter", args.adapter, holding=("adapter_config.json",), kind="a PEFT LoRA adapter folder")
    problems.config("--config", args.config)
    problems.raise_if_any()


def import_weights(args: argparse.Namespace) -> tuple[ModelSpec, hf_io.LoadReport]:
    """Build, fill and save the model; returns its spec and what the load used."""
    check_args(args)
    spec = build_spec(args)
    config = run_config.xemogpt_config(spec.run_config())
    mesh = sharding.make_mesh(tuple(int(s) for s in args.mesh.split(",")))

    factory = loading.xemogpt_factory(config, args.seed)
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(factory)
        tensors = release_stream(args)
        if args.adapter:
            tensors = itertools.chain(tensors, hf_io.iter_tensors(Path(args.adapter) / "adapter_model.safetensors"))
        report = hf_io.assign(model, tensors, key_map, mesh)
        missing_base = [m for m in report.missing if m.startswith(REQUIRED) and "/lora_" not in m]
        if missing_base:
            raise ValueError(f"no tensor for {len(missing_base)} encoder/LLM parameters: {missing_base[:8]}")
        loading.log_seeded(loading.init_unset(model, factory, mesh), str(args.out), args.seed)
    model_checkpoint.save_model(args.out, model, spec)
    return spec, report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", required=True, help="HF Qwen3/Qwen2 causal-LM directory")
    parser.add_argument("--clip", required=True, help="HF CLIPModel or CLIPVisionModel directory")
    parser.add_argument("--hubert", required=True, help="HF HubertModel directory")
    parser.add_argument("--labse", help="sentence-transformers LaBSE folder (recorded for stage 2)")
    parser.add_argument("--release-ckpt", help="the authors' torch state dict (.ckpt/.pth/.bin) or a safetensors file")
    parser.add_argument("--adapter", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config FILE[:variant] (bridge depth, LoRA)")
    parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh shape for placing the weights")
    parser.add_argument("--seed", type=int, default=0, help="init seed of parameters no source sets")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> hf_io.LoadReport:
    args = parse_args(argv)
    spec, report = import_weights(args)
    print(report.summary())
    for title, names in (("unused keys", report.unused), ("missing (kept their init)", report.missing)):
        if names:
            print(f"{title}: {len(names)}")
            for name in names:
                print(f"  {name}")
    print(f"wrote {args.out} (lora={spec.lora})")
    return report


@cli_checks.command
def cli(argv: Sequence[str] | None = None) -> int:
    """The ``xemogpt-import`` command: :func:`main` with an exit status."""
    main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
