"""tools/export_pytorch.py: our checkpoint -> transformers / release state dict / peft adapter, and back.

The checkpoint is imported from a release-style state dict whose adapters, bridges and heads are
all non-trivial, so a lost transpose, a dropped LoRA scale or a wrong name changes the numbers.
"""

import json

import jax
import ml_dtypes
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from configs import sft
from tests.weights_fixtures import (
    build_world,
    import_args,
    load_release_module,
    pixels,
    release_import,
    release_state,
    waveforms,
)
from xemogpt_jax import export_pytorch, import_weights, run_config, sharding
from xemogpt_jax.loading import load_model_checkpoint
from xemogpt_jax.models import hf_io, lora, xemogpt_params
from xemogpt_jax.models.xemogpt import XEmoGPT

IDS = np.array([[3, 17, 42, 8, 60, 11], [90, 2, 33, 33, 7, 1]], np.int32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "weights_world")


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, -1, 1))


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    return release_import(world, tmp_path_factory.getbasetemp())


def params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(ours: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert ours.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)


def export(checkpoint, out, fmt, dtype="f32", mesh="1,-1,1"):
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--format", fmt, "--dtype", dtype, "--mesh", mesh]
    export_pytorch.main(args)


def test_hf_export_loads_in_transformers_with_our_numbers(world, checkpoint, mesh, tmp_path):
    """LLM (trained LoRA merged), CLIP vision and HuBERT via from_pretrained match our unmerged model in fp32."""
    export(checkpoint, tmp_path, "hf")
    model, _ = load_model_checkpoint(checkpoint, mesh)
    load = dict(attn_implementation="eager")

    llm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llm", **load).eval()
    with torch.no_grad():
        theirs = llm(input_ids=torch.from_numpy(IDS).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.llm(IDS)), theirs, atol=1e-4, rtol=1e-4)
    source, written = hf_io.read_config(world["llm"]), hf_io.read_config(tmp_path / "llm")
    for key in ("model_type", "hidden_act", "rope_parameters", "tie_word_embeddings", "vocab_size", "head_dim"):
        assert written[key] == source[key], key
    assert (tmp_path / "llm" / "generation_config.json").is_file()

    clip = transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip", **load).eval()
    images = pixels(2)
    with torch.no_grad():
        theirs = clip(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    ours = model.vision_tower(images)
    np.testing.assert_allclose(np.asarray(ours.last_hidden_state), theirs.last_hidden_state.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours.pooler_output), theirs.pooler_output.numpy(), atol=1e-4)

    hubert = transformers.HubertModel.from_pretrained(tmp_path / "hubert", **load).eval()
    values, mask = waveforms()
    with torch.no_grad():
        theirs = hubert(torch.from_numpy(values), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    hidden, frames = model.audio_tower(values, mask)
    valid = np.asarray(frames)
    np.testing.assert_allclose(np.asarray(hidden)[valid], theirs[valid], atol=1e-4)
    assert json.loads((tmp_path / "bridges_config.json").read_text())["num_frames"] == 4


def test_import_of_hf_export_equals_the_merged_checkpoint(world, checkpoint, mesh, tmp_path):
    export(checkpoint, tmp_path / "hf", "hf")
    args = ["--llm", str(tmp_path / "hf" / "llm"), "--clip", str(tmp_path / "hf" / "clip"),
            "--hubert", str(tmp_path / "hf" / "hubert"), "--release-ckpt", str(tmp_path / "hf" / "bridges.safetensors"),
            "--config", f"{world['config']}:frozen", "--out", str(tmp_path / "again")]
    report = import_weights.main(args)
    assert not report.missing
    expected, _ = load_model_checkpoint(checkpoint, mesh)
    with jax.set_mesh(mesh):
        lora.merge_lora(expected)
    again, spec = load_model_checkpoint(tmp_path / "again", mesh)
    assert spec.lora is None
    assert_same_params(params(again), params(expected))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_xemogpt_export_reproduces_the_release_bit_for_bit_and_reimports(world, checkpoint, mesh, tmp_path, dtype):
    """Trainable parts only, release names, both files; bf16 equals the fp32 values rounded to bf16.

    The bf16 export restores onto a (2, 2, 2) mesh, so tensor-sharded slots are gathered one by one.
    """
    export(checkpoint, tmp_path / "x", "xemogpt", dtype, mesh="1,-1,1" if dtype == "f32" else "2,2,2")
    want = release_state(world)
    if dtype == "bf16":
        want = {k: v.astype(ml_dtypes.bfloat16) for k, v in want.items()}
    from_safetensors = safetensors.numpy.load_file(tmp_path / "x" / "xemogpt.safetensors")
    from_torch = {k: v.float().numpy().astype(want[k].dtype) for k, v in
                  torch.load(tmp_path / "x" / "xemogpt.ckpt", weights_only=True).items()}
    for got in (from_safetensors, from_torch):
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            np.testing.assert_array_equal(got[name].view(np.uint8), value.view(np.uint8), err_msg=name)
    if dtype == "f32":
        release = load_release_module(world, state=None)
        loaded = release.load_state_dict(torch.load(tmp_path / "x" / "xemogpt.ckpt", weights_only=True), strict=False)
        assert not loaded.unexpected_keys
        assert loaded.missing_keys and not set(loaded.missing_keys) & want.keys()  # only frozen backbones missing
        exported = str(tmp_path / "x" / "xemogpt.ckpt")
        import_weights.main(import_args(world, tmp_path / "again", "--release-ckpt", exported))
        again, _ = load_model_checkpoint(tmp_path / "again", mesh)
        assert_same_params(params(again), params(load_model_checkpoint(checkpoint, mesh)[0]))


def test_peft_export_loads_with_peft_and_reimports(world, checkpoint, mesh, tmp_path):
    export(checkpoint, tmp_path / "adapter", "peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(world["llm"], attn_implementation="eager")
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = tuned(input_ids=torch.from_numpy(IDS).long()).logits.numpy()
    model, _ = load_model_checkpoint(checkpoint, mesh)
    np.testing.assert_allclose(np.asarray(model.llm(IDS)), theirs, atol=1e-4, rtol=1e-4)

    import_weights.main(import_args(world, tmp_path / "again", "--adapter", str(tmp_path / "adapter")))
    again, spec = load_model_checkpoint(tmp_path / "again", mesh)
    assert spec.lora["rank"] == 4
    llm_only = lambda p: {k: v for k, v in p.items() if k.startswith("llm/")}  # noqa: E731
    assert_same_params(llm_only(params(again)), llm_only(params(model)))


def test_release_names_invert_over_the_paper_scale_tree():
    """Every parameter (and stacked layer slot: LLM, CLIP and HuBERT towers) of the paper-scale model has one release
    name that maps back to it."""
    paper = run_config.xemogpt_config(sft.get_config())
    model = nnx.eval_shape(lambda: XEmoGPT(paper, rngs=nnx.Rngs(0)))
    names = set()
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = variable.get_value().shape
        stacked = xemogpt_params.is_stacked(tuple(path))
        for index in range(shape[0]) if stacked else [None]:
            name, to_release = xemogpt_params.release_name(tuple(path), index)
            target = xemogpt_params.release_key_map(name)
            assert (target.path, target.index) == (tuple(path), index), name
            ours = np.broadcast_to(np.zeros((), np.uint8), shape[1:] if stacked else shape)
            released = to_release(ours) if to_release else ours
            assert (target.transform(released) if target.transform else released).shape == ours.shape, name
            names.add(name)
    assert "llm_model.base_model.model.model.layers.35.self_attn.v_proj.lora_B.default.weight" in names
    assert "visual_encoder.temporal_disc_head.2.weight" in names
    assert "visual_encoder.clip.vision_model.encoder.layers.23.mlp.fc2.weight" in names
    assert "audio_encoder.audio_encoder.encoder.layers.23.final_layer_norm.bias" in names
    assert "visual_encoder.visual_alignment_layer.1.self_attn.out_proj.weight" in names
    assert "audio_encoder.audio_encoder.encoder.pos_conv_embed.conv.parametrizations.weight.original0" in names
