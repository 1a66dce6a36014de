"""Checkpoints flow between the real CLIs: synth world -> stages 1-2 -> stage 3 -> infer, and import -> train/infer.

One scenario, every command a subprocess as a user runs it:

- ``tools/import_weights.py`` turns tiny random HF folders (transformers, built from the tiny configs'
  architecture fields) into a model checkpoint, which ``infer --checkpoint`` explains a real clip with;
- stages 1 and 2 train a step each (``python -m xemogpt_jax.train``);
- stage 3 (``configs/sft.py:tiny``) starts from the imported model (``init_from.model``) and the stage
  1-2 workdirs (``init_from.video_bridge`` / ``audio_bridge``) at learning rate 0, so its checkpoint
  must hold exactly the HF LLM weights and the stage 1-2 bridge layers;
- ``infer --checkpoint`` explains the same clip with the stage-3 workdir.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.command_fixtures import stored_state, tiny_hf_folders
from xemogpt_jax.models import qwen3_params

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT.parent / "shared/media/sample_00000007.mp4"
QUIET = ["--config.train.show_progress=False", "--config.checkpoint.async_save=False",
         "--config.perf.flops_from=params"]
DECODE = ["--max-new-tokens", "3", "--num-beams", "1", "--greedy"]


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*processes: subprocess.Popen) -> list[str]:
    """Wait for every process; fail with its output if one did not exit 0."""
    outputs = []
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{process.args} exited {process.returncode}:\n{output[-4000:]}"
        outputs.append(output)
    return outputs


def _train(config: str, workdir: Path, *overrides: str) -> subprocess.Popen:
    return _start("-m", "xemogpt_jax.train", f"--config={config}", f"--workdir={workdir}", *QUIET, *overrides)


def _at(tree: dict, path: tuple) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    _finish(_start("-m", "data_pipelines.synth", "--out", str(out), "--num-clips", "12", "--seed", "5"))
    return out


def test_checkpoints_flow_through_the_clis(world, tmp_path):
    assert VIDEO.exists(), f"shared media missing: {VIDEO}"
    hf = tiny_hf_folders(tmp_path / "hf", world / "tokenizer")
    imported, video_run, audio_run, sft_run = (tmp_path / name for name in ("imported", "video", "audio", "sft"))
    data = [f"--config.data.train_dir={world / 'train'}", f"--config.init_from.tokenizer={world / 'tokenizer'}",
            "--config.data.batch_size=4", "--config.train.steps=1"]
    _finish(
        _start("tools/import_weights.py", "--llm", str(hf["llm"]), "--clip", str(hf["clip"]), "--hubert",
               str(hf["hubert"]), "--config", "configs/sft.py:tiny", "--out", str(imported)),
        _train("configs/align_video.py:tiny", video_run, *data),
        _train("configs/align_audio.py:tiny", audio_run, *data, "--config.data.max_audio_seconds=1.0"),
    )
    explained_import = _start("-m", "xemogpt_jax.infer", "--checkpoint", str(imported), "--video", str(VIDEO), *DECODE)
    stage3 = _train(
        "configs/sft.py:tiny", sft_run, *data, "--config.data.max_audio_seconds=1.0",
        "--config.optim.learning_rate=0.0", "--config.model.lora.rank=-1", f"--config.init_from.model={imported}",
        f"--config.init_from.video_bridge={video_run}", f"--config.init_from.audio_bridge={audio_run}",
    )
    _finish(explained_import, stage3)

    trained = stored_state(sft_run / "checkpoints")["model"]
    embed = qwen3_params.hf_key_map("model.embed_tokens.weight").path
    reference = load_file(hf["llm"] / "model.safetensors")["model.embed_tokens.weight"]
    np.testing.assert_array_equal(_at(trained["llm"], embed), reference)
    for workdir, bridge, layers in ((video_run, "vecb", "visual_alignment_layer"),
                                    (audio_run, "aecb", "audio_alignment_layer")):
        stage = stored_state(workdir / "checkpoints")["model"][bridge][layers]
        jax.tree.map(np.testing.assert_array_equal, trained[bridge][layers], stage)

    _finish(_start("-m", "xemogpt_jax.infer", "--checkpoint", str(sft_run), "--video", str(VIDEO), *DECODE))

