"""``python -m xemogpt_jax.train --config=configs/sft.py[:tiny] --workdir=DIR [--config.x.y=...]``

Multi-host: pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or set
``JAX_COORDINATOR_ADDRESS`` etc.), or just ``--distributed`` on a TPU pod / SLURM cluster where JAX
finds them itself. Every process runs this same command and feeds its own shard of each global batch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from xemogpt_jax import cli_checks, config_checks, config_files

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/sft.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and metrics.jsonl go here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detected cluster).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
    """Join the multi-process job when asked to; before any other JAX call."""
    import jax

    if _COORDINATOR.value or _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
        )


def _config() -> ml_collections.ConfigDict:
    """The ``--config`` file's config; a file that did not load is a usage error (absl holds a stand-in that
    raises its traceback on first use)."""
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):
        file = config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0]
        problem = "does not load (run it with python to see why)" if Path(file).is_file() else "no such file"
        raise cli_checks.UsageError(f"--config: {file}: {problem}")
    return config


@cli_checks.command
def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    initialize_distributed()  # before the checks: reading a checkpoint's config starts JAX's backends
    config_checks.check_train_config(config := _config(), _WORKDIR.value)
    from xemogpt_jax import stages, trainer

    try:
        trainer.run(config, _WORKDIR.value, stages.task_for(config))
    except trainer.NonFiniteLossError as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The ``xemogpt-train`` command; ``--help`` shows this module's usage and flags (absl's shows the wrapper's)."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        print(flags.FLAGS.module_help(__name__))
        return
    app.run(main, argv=_with_located_config(sys.argv))


def _with_located_config(argv: list[str]) -> list[str]:
    """``--config=sft.py:tiny`` names the packaged config when no such file is here, as the other commands do."""
    return [f"--config={config_files.located(arg[len('--config='):])}" if arg.startswith("--config=") else arg
            for arg in argv]


if __name__ == "__main__":
    cli()
