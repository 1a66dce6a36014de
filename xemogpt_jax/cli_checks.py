"""Checks every command runs on its flags before any work, and the one way a user mistake ends a command.

A command collects every problem with its inputs in a :class:`Problems` (the flag that sets the input, and
what is wrong with it), then raises them together, so a user fixes all of them after one run instead of one
per run. :func:`command` wraps a ``main``: a :class:`UsageError` becomes ``error: ...`` lines on stderr and
exit status 2 instead of a traceback. Only the checkpoint checks import JAX/Orbax, and only when called.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

EXIT_USAGE = 2
HF_CONFIG = "config.json"
SENTENCE_TRANSFORMERS = "modules.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
RECORDS_MANIFEST = "manifest.json"
# What each stage's checkpoint is, for messages about a checkpoint given where another stage's is needed.
STAGE_NAMES = {"align_video": "stage-1 align_video", "align_audio": "stage-2 align_audio", "sft": "stage-3 sft"}

Main = TypeVar("Main", bound=Callable[..., Any])


class UsageError(Exception):
    """A user mistake in a command's flags, paths or config; one line per problem."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class Problems:
    """Problems found with a command's inputs, each as (the flag that sets it, what is wrong)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []

    def add(self, flag: str, problem: str) -> None:
        self.found.append((flag, problem))

    def raise_if_any(self) -> None:
        if self.found:
            raise UsageError(*(f"{flag}: {problem}" for flag, problem in self.found))

    def file(self, flag: str, path: str | Path | None) -> bool:
        """``path`` must be an existing file (``None``: the flag is unset and optional)."""
        if path is None or str(path) == "":
            return True
        if not Path(path).is_file():
            self.add(flag, f"{path}: no such file" if not Path(path).exists() else f"{path} is not a file")
            return False
        return True

    def folder(self, flag: str, path: str | Path | None, *, holding: Iterable[str] = (), kind: str = "") -> bool:
        """``path`` must be an existing folder with one of the ``holding`` files (``kind`` names what it should be)."""
        if path is None or str(path) == "":
            return True
        path = Path(path)
        if not path.is_dir():
            self.add(flag, f"{path}: no such folder" if not path.exists() else f"{path} is not a folder")
            return False
        holding = tuple(holding)
        if holding and not any((path / name).is_file() for name in holding):
            self.add(flag, f"{path} has no {' or '.join(holding)}; expected {kind or 'another kind of folder'}")
            return False
        return True

    def hf_folder(self, flag: str, path: str | Path | None, what: str = "a HuggingFace model folder") -> bool:
        return self.folder(flag, path, holding=(HF_CONFIG,), kind=what)

    def sentence_transformers_folder(self, flag: str, path: str | Path | None) -> bool:
        return self.folder(flag, path, holding=(SENTENCE_TRANSFORMERS,), kind="a sentence-transformers folder")

    def tokenizer_folder(self, flag: str, path: str | Path | None) -> bool:
        return self.folder(flag, path, holding=TOKENIZER_FILES, kind="a HuggingFace tokenizer folder")

    def records_folder(self, flag: str, path: str | Path | None) -> bool:
        return self.folder(flag, path, holding=(RECORDS_MANIFEST,),
                           kind="ArrayRecord shards of python -m data_pipelines.build (or data_pipelines.synth)")

    def config(self, flag: str, spec: str) -> Any:
        """The ConfigDict of a ``FILE[:variant]`` config; ``None`` (the problem noted) when it does not load."""
        from xemogpt_jax import config_files

        try:
            return config_files.load(spec)
        except (FileNotFoundError, ValueError) as error:
            self.add(flag, str(error).removeprefix(f"{flag} "))
            return None

    def checkpoint(self, flag: str, path: str | Path | None, step: int | None = None,
                   step_flag: str = "--step") -> dict[str, Any] | None:
        """An Orbax checkpoint (a trainer workdir, its ``checkpoints/`` or an imported model): its stored config."""
        if path is None or str(path) == "" or not self.folder(flag, path):
            return None
        from xemogpt_jax import checkpoint

        directory = checkpoint.checkpoint_directory(path)
        steps = checkpoint.steps(directory)
        if not steps:
            self.add(flag, f"{path} holds no checkpoint; expected a trainer workdir, its checkpoints/ folder "
                           "or the output of xemogpt-import")
            return None
        if step is not None and step not in steps:
            self.add(step_flag, f"no step {step} in {path} (it has steps {steps})")
            return None
        return checkpoint.restore_config(directory, step)

    def explainer_checkpoint(self, flag: str, path: str | Path | None, command: str,
                             step: int | None = None) -> dict[str, Any] | None:
        """A checkpoint of the whole model (stage 3 or imported), whose frozen-weight folders still exist."""
        from xemogpt_jax.models.xemogpt_params import ModelSpec

        stored = self.checkpoint(flag, path, step)
        if stored is None or ModelSpec.describes(stored):
            return stored
        stage = stored.get("stage")
        if stage != "sft":
            found = STAGE_NAMES.get(stage, f"stage {stage!r}")
            self.add(flag, f"{path} is a {found} checkpoint (a bridge pretraining run); {command} needs the whole "
                           "model: a stage-3 sft workdir or an xemogpt-import output. A stage-1/2 workdir is the "
                           "input of stage 3 (--config.init_from.video_bridge / audio_bridge)")
            return None
        for key, source in stored.get("init_from", {}).items():
            if source and not Path(source).exists():
                self.add(flag, f"the run config of {path} names init_from.{key}={source}, which no longer exists "
                               "(weights not in the checkpoint are read from it)")
        return stored


def command(main: Main) -> Main:
    """``main`` with a :class:`UsageError` printed as ``error: ...`` lines and returned as exit status 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            for line in error.lines:
                print(f"error: {line}", file=sys.stderr)
            return EXIT_USAGE

    return wrapped  # type: ignore[return-value]
