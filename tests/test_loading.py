"""The one loader on a trained stage-3 run: export to transformers / PEFT / the release format, sharded inference.

A tiny stage-3 run trains two steps from tiny HF folders (so a real base LLM folder exists) with
LoRA rank 4 at a learning rate high enough that the adapters move the logits. Every greedy token of its
explanation must beat the runner-up by more than the logit tolerance the loads are held to (checked), so
"the same explanation" is a real comparison, not luck on a near-tie. References are
transformers and peft over the base folder, the checkpoint as Orbax stores it, and a one-device load.
"""

from __future__ import annotations

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from configs import sft
from data_pipelines import synth
from tests.command_fixtures import stored_state, tiny_hf_folders
from tests.infer_fixtures import shared_clip
from xemogpt_jax import (
    checkpoint,
    explainer,
    export_pytorch,
    import_weights,
    loading,
    run_config,
    sharding,
    stages,
    trainer,
)

IDS = np.array([[3, 17, 42, 8, 60, 11], [90, 2, 33, 33, 7, 1]], np.int32)
SUBTITLE = "Be there or be square. Oh, okay, goodbye."
GREEDY = explainer.Decoding(max_new_tokens=6, num_beams=1, do_sample=False)
LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj"))
MARGIN = 1e-3  # 10x the 1e-4 to which the loads' logits are shown equal
AUDIO_SECONDS = 1.0  # the audio window sets the prompt's audio token count: the re-import config must match
RUN_CONFIG = f'''
from configs import sft


def get_config(variant=""):
    c = sft.get_config("tiny")
    c.model.lora.rank, c.model.lora.alpha = {LORA["rank"]}, {LORA["alpha"]}
    c.data.max_audio_seconds = {AUDIO_SECONDS}
    return c
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("trained_sft")
    synth.write_world(root / "world", num_clips=12, seed=3)
    hf = tiny_hf_folders(root / "hf", root / "world" / "tokenizer")
    config = sft.get_config("tiny")
    config.model.lora = LORA
    config.data.train_dir = str(root / "world" / "train")
    config.data.max_audio_seconds = AUDIO_SECONDS
    config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 0
    config.train.steps, config.train.show_progress = 2, False
    config.checkpoint.async_save, config.perf.flops_from = False, "params"
    for part in ("llm", "clip", "hubert"):
        config.init_from[part] = str(hf[part])
    trainer.run(config, root / "stage3", stages.task_for(config))
    (root / "config.py").write_text(RUN_CONFIG)
    return dict(workdir=root / "stage3", hf=hf, config=root / "config.py")


def explain(model: explainer.Explainer) -> tuple[list[int], str]:
    """The greedy explanation of the shared clip, as token ids and text."""
    video, audio = shared_clip()
    clip = explainer.read_clip("clip", video, audio, SUBTITLE, frame_size=model.frame_size)
    generation = model.explain_generations([clip], GREEDY)[0]
    return generation.token_ids, generation.text


def decisive_explanation(model: explainer.Explainer) -> tuple[list[int], str]:
    """:func:`explain`, after checking that each greedy token beats the runner-up by a clear log-prob margin,
    so that another load agreeing with it is not luck on a near-tie."""
    video, audio = shared_clip()
    clip = explainer.read_clip("clip", video, audio, SUBTITLE, frame_size=model.frame_size)
    generation = model.explain_generations([clip], GREEDY, top_logprobs=2)[0]
    margins = [best[1] - second[1] for best, second in generation.top_logprobs]
    assert min(margins) > MARGIN, f"near-tied greedy tokens {generation.token_ids}, margins {margins}: train longer"
    return generation.token_ids, generation.text


def params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def unmerged_llm_logits(path) -> np.ndarray:
    """Our LLM with its LoRA adapters applied as adapters (not folded), on one device."""
    found = loading.open_checkpoint(path)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = loading.load_xemogpt(found, run_config.xemogpt_config(found.run), mesh)
    return np.asarray(model.llm(IDS))


def base_llm(run: dict) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(run["hf"]["llm"], attn_implementation="eager").eval()


def torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS).long()).logits.numpy()


def test_hf_export_of_a_trained_run_loads_in_transformers_with_our_logits(run, tmp_path):
    export_pytorch.main(["--checkpoint", str(run["workdir"]), "--out", str(tmp_path), "--format", "hf"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llm", attn_implementation="eager")
    ours = unmerged_llm_logits(run["workdir"])
    np.testing.assert_allclose(torch_logits(exported.eval()), ours, atol=1e-4, rtol=1e-4)
    assert np.max(np.abs(torch_logits(base_llm(run)) - ours)) > 1e-3, "the trained adapters should move the logits"
    assert (tmp_path / "llm" / "tokenizer_config.json").is_file()


def test_peft_export_of_a_trained_run_holds_the_trained_adapters(run, tmp_path):
    checkpoints = run["workdir"] / "checkpoints"
    export_pytorch.main(["--checkpoint", str(checkpoints), "--out", str(tmp_path), "--format", "peft"])
    tuned = peft.PeftModel.from_pretrained(base_llm(run), tmp_path).eval()
    np.testing.assert_allclose(torch_logits(tuned), unmerged_llm_logits(checkpoints), atol=1e-4, rtol=1e-4)
    stored = stored_state(checkpoints)["model"]["llm"]["layers"]["self_attn"]["q_proj"]["lora_b"]
    adapter = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"],
                                  stored[1].T)


def test_release_export_reimported_explains_the_clip_like_the_trained_run(run, tmp_path):
    workdir = str(run["workdir"])
    export_pytorch.main(["--checkpoint", workdir, "--out", str(tmp_path / "hf"), "--format", "hf"])
    export_pytorch.main(["--checkpoint", workdir, "--out", str(tmp_path / "release"), "--format", "xemogpt"])
    import_weights.main([
        "--llm", str(run["hf"]["llm"]), "--clip", str(tmp_path / "hf" / "clip"),
        "--hubert", str(tmp_path / "hf" / "hubert"),
        "--release-ckpt", str(tmp_path / "release" / "xemogpt.safetensors"),
        "--config", str(run["config"]), "--out", str(tmp_path / "imported"),
    ])
    trained, again = explainer.load(workdir), explainer.load(tmp_path / "imported")
    ours, theirs = params(trained.model), params(again.model)  # LoRA merged in both
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        np.testing.assert_allclose(theirs[name], value, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(again.model.llm(IDS)), np.asarray(trained.model.llm(IDS)), atol=1e-4)
    assert explain(again) == decisive_explanation(trained)


def test_inference_model_is_sharded_and_explains_like_one_device(run):
    sharded = explainer.load(run["workdir"], mesh=sharding.make_mesh((1, 8, 1)))
    splittable = 0
    for path, variable in nnx.to_flat_state(nnx.state(sharded.model, nnx.Param)):
        value = variable.get_value()
        axes = variable.get_metadata().get("logical_axes") or ()
        if any(name == "embed" and dim % 8 == 0 for name, dim in zip(axes, value.shape)):
            splittable += 1
            shard = value.addressable_shards[0].data
            assert shard.size * 8 == value.size, f"{'/'.join(map(str, path))} is not split over fsdp"
    assert splittable > 20
    one_device = explainer.load(run["workdir"], mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    assert explain(sharded) == decisive_explanation(one_device)


def test_stage_1_2_runs_are_refused_with_a_clear_message(tmp_path):
    saver = checkpoint.Checkpointer(tmp_path / "checkpoints", every_steps=1, keep=1, keep_best=False, async_save=False)
    saver.save(1, {"model": {"w": np.zeros(2, np.float32)}}, "{}", {"stage": "align_video"}, force=True)
    saver.close()
    with pytest.raises(ValueError, match="stage-1/2 run"):
        loading.open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        loading.open_checkpoint(tmp_path / "absent")
