"""Every console command as a user runs it: ``--help``, a run on tiny checkpoints, and clean usage errors.

One module fixture writes the tiny inputs with the commands themselves: ``xemogpt-import`` turns random
HF folders into a model checkpoint, ``xemogpt-train`` runs two stage-1 steps (a workdir of the wrong stage
for inference and export). The console scripts are the ones installed beside the running interpreter.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from configs import sft
from data_pipelines import synth
from tests.command_fixtures import tiny_hf_folders, tree_hashes
from xemogpt_jax import checkpoint, cli_checks, config_checks, export_pytorch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VIDEO = ROOT.parent / "shared/media/sample_00000007.mp4"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
QUIET = ["--config.train.show_progress=False", "--config.checkpoint.async_save=False",
         "--config.perf.flops_from=params"]
DECODE = ["--max-new-tokens", "2", "--num-beams", "1", "--greedy"]


def start(command: str, *args: object) -> subprocess.Popen:
    """``xemogpt-<command> args`` on this checkout, offline, its stdout and stderr kept apart."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([str(BIN / f"xemogpt-{command}"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(command: str, *args: object, expect: int = 0) -> tuple[str, str]:
    """Run to the end; fail with its output unless it exits ``expect``."""
    process = start(command, *args)
    out, err = process.communicate(timeout=600)
    assert process.returncode == expect, f"xemogpt-{command} exited {process.returncode}:\n{out[-3000:]}{err[-3000:]}"
    return out, err


def assert_usage_error(err: str, *named: str) -> None:
    """Only ``error: ...`` lines, no traceback, each of ``named`` in them."""
    assert "Traceback" not in err, err
    assert err.strip() and all(line.startswith("error: ") for line in err.strip().splitlines()), err
    for text in named:
        assert text in err, f"{text!r} not in:\n{err}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("commands")
    world = out / "world"
    synth.write_world(world, num_clips=12, seed=5)
    hf = tiny_hf_folders(out / "hf", world / "tokenizer")
    paths = {"world": world, "hf": out / "hf", **hf, "imported": out / "imported", "stage1": out / "stage1"}
    processes = [
        start("import", "--llm", hf["llm"], "--clip", hf["clip"], "--hubert", hf["hubert"],
              "--config", "configs/sft.py:tiny", "--out", paths["imported"]),
        start("train", "--config=configs/align_video.py:tiny", f"--workdir={paths['stage1']}",
              f"--config.data.train_dir={world / 'train'}", f"--config.init_from.tokenizer={world / 'tokenizer'}",
              "--config.data.batch_size=4", "--config.train.steps=2", *QUIET),
    ]
    for process in processes:
        output, errors = process.communicate(timeout=600)
        assert process.returncode == 0, f"{process.args} exited {process.returncode}:\n{output[-3000:]}{errors[-3000:]}"
    return paths


def test_every_script_names_a_function_that_returns_an_exit_status():
    for name, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        main = getattr(importlib.import_module(module), function)
        assert inspect.signature(main).return_annotation in ("int", "None"), name
        assert (BIN / name).is_file(), f"{name} is not installed beside {sys.executable}: pip install -e ."


def test_every_command_prints_its_help():
    processes = {name: start(name.removeprefix("xemogpt-"), "--help") for name in SCRIPTS}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name} --help exited {process.returncode}: {err[-2000:]}"
        assert "--" in out and len(out) > 200, f"{name} --help printed too little:\n{out}"


def test_import_and_train_wrote_their_checkpoints(tiny):
    assert checkpoint.steps(tiny["imported"]) == [0]
    assert checkpoint.steps(tiny["stage1"] / "checkpoints")[-1] == 2
    assert checkpoint.restore_config(tiny["stage1"] / "checkpoints")["stage"] == "align_video"


def test_infer_explains_a_clip_with_the_imported_model(tiny):
    run("infer", "--checkpoint", tiny["imported"], "--video", VIDEO, *DECODE)


def test_serve_answers_health(tiny):
    server = start("serve", "--checkpoint", tiny["imported"], "--port", "0")
    try:
        line = server.stdout.readline()
        assert line.startswith("serving"), line + server.stderr.read()
        with urllib.request.urlopen(line.split()[-1] + "/health", timeout=60) as response:
            assert response.status == 200
    finally:
        server.terminate()
        server.communicate(timeout=60)


def test_export_writes_a_whole_new_folder(tiny, tmp_path):
    out = tmp_path / "exported"
    run("export", "--checkpoint", tiny["imported"], "--out", out, "--format", "xemogpt")
    assert sorted(p.name for p in out.iterdir()) == ["xemogpt.ckpt", "xemogpt.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_aot_compiles_a_tiny_step():
    out, _ = run("aot", "--config", "configs/sft.py:tiny", "--mesh", "1,1", "--batch-size", "2", "--seq-len", "128",
                 "--audio-seconds", "1", "--cost", "once")
    assert "compiled" in out


def test_score_then_report(tiny, tmp_path):
    cues = tiny["world"] / "heldout_cues.json"
    run("emocue360", "score", "--pred", cues, "--gt", cues, "--out", tmp_path / "scores.json")
    run("report", "--scores", tmp_path / "scores.json", "--pred", cues, "--gt", cues, "--out", tmp_path / "r.html")
    assert json.loads((tmp_path / "scores.json").read_text())["samples"]
    assert (tmp_path / "r.html").read_text().startswith("<!")


def test_build_data_decodes_a_clip(tmp_path):
    annotations = tmp_path / "a.csv"
    annotations.write_text(f"name,english,subtitle\n{VIDEO.stem},A smile.,hi\n")
    run("build-data", "--annotations", annotations, "--media-root", VIDEO.parent, "--out", tmp_path / "records",
        "--frame-size", "64", "--workers", "1")
    assert json.loads((tmp_path / "records/manifest.json").read_text())["num_records"] == 1


# ---------------------------------------------------------------- usage errors


def test_paper_configs_without_weights_say_what_to_download(tmp_path):
    _, err = run("train", "--config=configs/sft.py", f"--workdir={tmp_path}", expect=2)
    assert_usage_error(err, "--config.init_from.llm", "Qwen/Qwen3-4B", "--config.init_from.clip",
                       "openai/clip-vit-large-patch14", "--config.init_from.hubert",
                       "TencentGameMate/chinese-hubert-large", "--config.data.train_dir")
    _, err = run("train", "--config=configs/align_audio.py", f"--workdir={tmp_path}", expect=2)
    assert_usage_error(err, "--config.init_from.text_encoder", "sentence-transformers/LaBSE")
    _, err = run("train", "--config=configs/nope.py:tiny", f"--workdir={tmp_path}", expect=2)
    assert_usage_error(err, "--config: configs/nope.py: no such file")
    assert not any(tmp_path.iterdir())


def test_a_missing_data_folder_is_named_with_its_flag(tiny, tmp_path):
    _, err = run("train", "--config=configs/align_video.py:tiny", f"--workdir={tmp_path / 'run'}",
                 f"--config.data.train_dir={tmp_path / 'nope'}",
                 f"--config.init_from.tokenizer={tiny['world'] / 'tokenizer'}", expect=2)
    assert_usage_error(err, f"--config.data.train_dir: {tmp_path / 'nope'}: no such folder")
    assert len(err.strip().splitlines()) == 1


def test_infer_names_every_missing_input_at_once(tmp_path):
    _, err = run("infer", "--checkpoint", tmp_path / "nope", "--video", tmp_path / "clip.mp4", expect=2)
    assert_usage_error(err, "--checkpoint", "no such folder", "--video", "no such file")


def test_a_stage1_workdir_is_refused_by_infer_and_export(tiny, tmp_path, capsys):
    _, err = run("infer", "--checkpoint", tiny["stage1"], "--video", VIDEO, expect=2)
    assert_usage_error(err, "--checkpoint", "stage-1 align_video", "stage-3 sft")
    assert export_pytorch.main(["--checkpoint", str(tiny["stage1"]), "--out", str(tmp_path / "x"),
                                "--format", "hf"]) == 2
    assert_usage_error(capsys.readouterr().err, "--checkpoint", "stage-1 align_video")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- export safety


def test_export_refuses_a_folder_that_is_not_empty(tiny, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert export_pytorch.main(["--checkpoint", str(tiny["imported"]), "--out", str(tmp_path),
                                "--format", "xemogpt"]) == 2
    assert_usage_error(capsys.readouterr().err, "--out", "not empty", "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_export_never_writes_where_the_model_is_read_from(tiny, capsys):
    before = {folder: tree_hashes(tiny[folder]) for folder in ("hf", "imported")}
    for out in (tiny["hf"], tiny["llm"], tiny["llm"] / "sub", tiny["imported"]):
        assert export_pytorch.main(["--checkpoint", str(tiny["imported"]), "--out", str(out), "--format", "hf",
                                    "--overwrite"]) == 2
        assert_usage_error(capsys.readouterr().err, "--out", "overlaps")
    assert {folder: tree_hashes(tiny[folder]) for folder in ("hf", "imported")} == before
    assert not (tiny["llm"] / "sub").exists()


def test_an_export_killed_while_writing_leaves_no_model_at_out(tiny, tmp_path):
    out = tmp_path / "exported"
    args = ("--checkpoint", tiny["imported"], "--out", out, "--format", "xemogpt")
    export = start("export", *args)
    while not out.with_name(".exported.partial").exists():
        assert export.poll() is None, export.communicate()
        time.sleep(0.005)
    export.send_signal(signal.SIGKILL)
    export.communicate()
    assert export.returncode == -signal.SIGKILL and not out.exists()
    run("export", *args)  # clears the killed run's folder
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_an_export_that_fails_midway_leaves_out_as_it_was(tiny, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    args = ["--checkpoint", str(tiny["imported"]), "--out", str(out), "--format", "xemogpt"]
    assert export_pytorch.main(args) == 0
    earlier = tree_hashes(out)

    def dies_while_writing(path, tensors):
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(export_pytorch, "write_safetensors", dies_while_writing)
    with pytest.raises(OSError, match="disk full"):
        export_pytorch.main([*args, "--overwrite"])
    assert tree_hashes(out) == earlier
    with pytest.raises(OSError, match="disk full"):
        export_pytorch.main([*args[:3], str(tmp_path / "fresh"), *args[4:]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_train_checks_each_init_from_folder_and_the_workdir_it_resumes(tiny):
    config = sft.get_config("tiny")
    config.data.train_dir = str(tiny["world"] / "train")
    config.init_from.tokenizer = str(tiny["world"] / "tokenizer")
    config.init_from.model = str(tiny["imported"])
    config.init_from.video_bridge = str(tiny["stage1"])
    config_checks.check_train_config(config, str(tiny["world"]))

    config.init_from.model = str(tiny["stage1"])
    config.init_from.audio_bridge = str(tiny["stage1"])
    config.init_from.clip = str(tiny["world"])
    with pytest.raises(cli_checks.UsageError) as error:
        config_checks.check_train_config(config, str(tiny["stage1"]))
    assert [line.split(":")[0] for line in error.value.lines] == [
        "--config.init_from.model", "--config.init_from.clip", "--config.init_from.audio_bridge", "--workdir"]
    assert "no config.json" in error.value.lines[1] and "align_audio" in error.value.lines[2]


def test_train_refuses_a_loss_chunk_that_is_no_number_of_positions(tiny):
    config = sft.get_config("tiny")
    config.data.train_dir = str(tiny["world"] / "train")
    config.init_from.tokenizer = str(tiny["world"] / "tokenizer")
    config.model.loss_chunk = 0
    with pytest.raises(cli_checks.UsageError) as error:
        config_checks.check_train_config(config, str(tiny["world"]))
    assert [line.split(":")[0] for line in error.value.lines] == ["--config.model.loss_chunk"]
