"""A training run's config checked before anything is built: every ``init_from`` path and data folder.

Which ``init_from`` fields each stage reads is in :mod:`xemogpt_jax.stages`; an empty field means random
init, which the ``tiny`` variants run on, so only the ``paper`` variant requires the published weights.
Every stage needs a tokenizer: ``init_from.tokenizer``, or the folder that ships it with the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ml_collections

from xemogpt_jax.cli_checks import STAGE_NAMES, Problems

# The published models the paper's stages start from (docs/architecture.md, sections 2 and 4).
PUBLISHED = {
    "llm": "Qwen/Qwen3-4B",
    "clip": "openai/clip-vit-large-patch14",
    "hubert": "TencentGameMate/chinese-hubert-large",
    "text_encoder": "sentence-transformers/LaBSE",
}
# init_from fields each stage reads; the tokenizer's fallback folder.
HF_FIELDS = {"align_video": ("clip",), "align_audio": ("hubert",), "sft": ("llm", "clip", "hubert")}
TOKENIZER_FALLBACK = {"align_video": "clip", "align_audio": "text_encoder", "sft": "llm"}
BRIDGE_FIELDS = {"video_bridge": "align_video", "audio_bridge": "align_audio"}
SYNTH_TOKENIZER = "the tokenizer/ folder of `python -m data_pipelines.synth --out DIR`"


def flag(field: str) -> str:
    return f"--config.{field}"


def _download(field: str) -> str:
    return (f"download it (`huggingface-cli download {PUBLISHED[field]} --local-dir DIR`) "
            f"and pass {flag('init_from.' + field)}=DIR")


def _check_weights(problems: Problems, config: ml_collections.ConfigDict) -> None:
    """Set folders must be of the right kind; the paper variant must name the published weights."""
    init, stage = config.init_from, config.stage
    paper = config.get("variant", "paper") == "paper"
    imported = init.get("model", "")
    if imported:
        _check_imported_model(problems, flag("init_from.model"), imported)
    for field in HF_FIELDS[stage]:
        if init.get(field):
            problems.hf_folder(flag(f"init_from.{field}"), init[field], f"a HuggingFace folder of {PUBLISHED[field]}")
        elif paper and not imported:
            alternative = f", or an xemogpt-import output as {flag('init_from.model')}=DIR" if stage == "sft" else ""
            problems.add(flag(f"init_from.{field}"), f"not set; the paper config starts from {PUBLISHED[field]}: "
                                                     f"{_download(field)}{alternative}")
    if stage == "align_audio":
        if init.get("text_encoder"):
            problems.sentence_transformers_folder(flag("init_from.text_encoder"), init.text_encoder)
        elif paper:
            problems.add(flag("init_from.text_encoder"), f"not set; the paper config encodes captions with "
                                                         f"{PUBLISHED['text_encoder']}: {_download('text_encoder')}")
    for field, wanted in BRIDGE_FIELDS.items():
        if init.get(field):
            _check_bridge_workdir(problems, flag(f"init_from.{field}"), init[field], wanted)


def _check_imported_model(problems: Problems, name: str, folder: str) -> None:
    from xemogpt_jax.models.xemogpt_params import ModelSpec

    stored = problems.checkpoint(name, folder)
    if stored is not None and not ModelSpec.describes(stored):
        problems.add(name, f"{folder} holds a {stored.get('stage')!r} training run, not a model checkpoint of "
                           "xemogpt-import")


def _check_bridge_workdir(problems: Problems, name: str, workdir: str, wanted: str) -> None:
    stored = problems.checkpoint(name, workdir)
    if stored is not None and stored.get("stage") != wanted:
        problems.add(name, f"{workdir} is not a {STAGE_NAMES[wanted]} workdir (its stage is {stored.get('stage')!r})")


def _check_tokenizer(problems: Problems, config: ml_collections.ConfigDict) -> None:
    init = config.init_from
    fallback = TOKENIZER_FALLBACK[config.stage]
    if init.get("tokenizer"):
        problems.tokenizer_folder(flag("init_from.tokenizer"), init.tokenizer)
    elif any(name == flag(f"init_from.{fallback}") for name, _ in problems.found):
        return  # setting the weights it is missing gives the tokenizer too
    elif not init.get(fallback):
        problems.add(flag("init_from.tokenizer"),
                     f"not set, and neither is {flag('init_from.' + fallback)} whose folder would carry one; "
                     f"pass a tokenizer folder, e.g. {SYNTH_TOKENIZER}")
    elif Path(init[fallback]).is_dir():  # a missing folder is reported by the weight checks
        problems.tokenizer_folder(flag(f"init_from.{fallback}"), init[fallback])


def _check_data(problems: Problems, config: ml_collections.ConfigDict) -> None:
    if not config.data.train_dir:
        problems.add(flag("data.train_dir"), "not set; pass the records folder of python -m data_pipelines.build "
                                             "(or data_pipelines.synth's DIR/train)")
    else:
        problems.records_folder(flag("data.train_dir"), config.data.train_dir)
    problems.records_folder(flag("data.eval_dir"), config.data.get("eval_dir", ""))


def _check_workdir(problems: Problems, config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir that holds checkpoints is resumed, so they must be of this run's stage."""
    checkpoints = Path(workdir) / "checkpoints"
    if not checkpoints.is_dir():
        return
    stored = problems.checkpoint("--workdir", checkpoints)
    if stored is not None and stored.get("stage") != config.stage:
        problems.add("--workdir", f"{workdir} holds a {stored.get('stage')!r} run, which this {config.stage!r} run "
                                  "would resume; choose a new workdir")


def _check_model(problems: Problems, config: ml_collections.ConfigDict, spell: Callable[[str], str] = flag) -> None:
    """Model fields whose bad values would only fail deep inside the first step, named as ``spell`` writes a
    field's flag."""
    chunk = config.get("model", {}).get("loss_chunk", 1)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        problems.add(spell("model.loss_chunk"), f"{chunk!r} is not a number of positions; give a whole number >= 1")


def check_model_fields(config: ml_collections.ConfigDict, spell: Callable[[str], str]) -> None:
    """The model fields alone, for a command that builds the model but reads no paths (``xemogpt-aot``)."""
    problems = Problems()
    _check_model(problems, config, spell)
    problems.raise_if_any()


def check_train_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raise one :class:`~xemogpt_jax.cli_checks.UsageError` naming every unusable path the run reads or resumes."""
    problems = Problems()
    if config.get("stage") not in HF_FIELDS:
        problems.add("--config", f"unknown stage {config.get('stage')!r}; known: {sorted(HF_FIELDS)}")
        problems.raise_if_any()
    _check_weights(problems, config)
    _check_tokenizer(problems, config)
    _check_data(problems, config)
    _check_model(problems, config)
    _check_workdir(problems, config, workdir)
    problems.raise_if_any()

