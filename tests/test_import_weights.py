"""tools/import_weights.py: tiny HF directories and a release-style PyTorch state dict -> our checkpoint.

Every check compares against the PyTorch modules that hold the same weights (transformers + peft),
never against our own output.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from configs import sft
from tests.weights_fixtures import (
    ALIGN,
    build_world,
    import_args,
    load_release_module,
    pixels,
    release_import,
    waveforms,
)
from xemogpt_jax import import_weights, prompt, run_config, sharding
from xemogpt_jax.loading import load_model_checkpoint
from xemogpt_jax.models import xemogpt_params

IDS = np.array([[3, 17, 42, 8, 60, 11], [90, 2, 33, 33, 7, 1]], np.int32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.getbasetemp() / "weights_world")


@pytest.fixture(scope="module")
def release_model(world, tmp_path_factory):
    """Our model imported from the HF dirs plus the release file, restored onto an 8-device fsdp mesh."""
    path = release_import(world, tmp_path_factory.getbasetemp())
    model, _ = load_model_checkpoint(path, sharding.make_mesh((1, -1, 1)))
    return model


@pytest.fixture(scope="module")
def torch_release(world):
    return load_release_module(world)


def close(ours, theirs, atol=1e-4):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy() if torch.is_tensor(theirs) else theirs,
                               atol=atol, rtol=1e-4)


def test_release_import_matches_pytorch_backbones(release_model, torch_release):
    """The LLM with its PEFT adapters, the CLIP vision tower and HuBERT all compute what PyTorch computes."""
    with torch.no_grad():
        theirs = torch_release.llm_model(input_ids=torch.from_numpy(IDS).long()).logits
    close(nnx.jit(lambda m, ids: m(ids))(release_model.llm, IDS), theirs)

    images = pixels(3)
    with torch.no_grad():
        theirs = torch_release.visual_encoder.clip.vision_model(torch.from_numpy(images).permute(0, 3, 1, 2))
    close(release_model.vision_tower(images).last_hidden_state, theirs.last_hidden_state)

    values, mask = waveforms()
    with torch.no_grad():
        hubert = torch_release.audio_encoder.audio_encoder
        theirs = hubert(torch.from_numpy(values), attention_mask=torch.from_numpy(mask))
    hidden, frames = release_model.audio_tower(values, mask)
    valid = np.asarray(frames)
    close(np.asarray(hidden)[valid], theirs.last_hidden_state.numpy()[valid])


def test_release_import_matches_pytorch_bridges_and_heads(release_model, torch_release):
    """Bridge layers, positional table, pooling vector, heads and projections land with the right layout."""
    rng = np.random.default_rng(5)
    video = torch_release.visual_encoder
    feats = rng.standard_normal((2, video.position_embedding.shape[1], 32)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(feats) + video.position_embedding
        for layer in video.visual_alignment_layer:
            x = layer(x, None)
        weights = torch.softmax(x @ video.attention_pooling.attn_vector, dim=-1)
        pooled = video.visual_project((weights[..., None] * x).sum(1))
        text = torch.from_numpy(rng.standard_normal((2, 16)).astype(np.float32))
        expected = dict(
            tokens=torch_release.visual_llm_project(x), pooled=pooled,
            temporal=video.temporal_disc_head(pooled)[..., 0], reconstructed=video.frame_reconstructor(x),
            text=video.text_project(text),
        )
    vecb = release_model.vecb
    hidden = vecb(feats)
    ours = dict(
        tokens=release_model.visual_llm_project(hidden), pooled=vecb.video_embedding(hidden),
        temporal=vecb.temporal_logit(vecb.video_embedding(hidden)), reconstructed=vecb.reconstruct(hidden),
        text=vecb.text_embedding(text.numpy()),
    )
    for name in expected:
        close(ours[name], expected[name])

    audio = torch_release.audio_encoder
    frames = rng.standard_normal((2, 5, 32)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    with torch.no_grad():
        m = torch.from_numpy(mask).float()
        x = torch.from_numpy(frames) * m[..., None]
        bias = (1.0 - m[:, None, None, :]) * torch.finfo(torch.float32).min
        for layer in audio.audio_alignment_layer:
            x = layer(x, attention_mask=bias)
        x = x * m[..., None]
        tokens = torch_release.audio_llm_project(x) * m[..., None]
        pooled = audio.audio_project((x * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        text = audio.text_project(torch.ones(2, 16))
    aecb = release_model.aecb
    hidden = aecb(frames, mask)
    close(np.where(mask[..., None], release_model.audio_llm_project(hidden), 0), tokens)
    close(aecb.audio_embedding(hidden, mask), pooled)
    close(aecb.text_embedding(np.ones((2, 16), np.float32)), text)


def test_hf_dirs_alone_report_unused_and_missing_keys(world, tmp_path, capsys):
    """Without a release file: the LLM equals the HF model (fresh adapters are inert), bridges are reported missing."""
    report = import_weights.main(import_args(world, tmp_path / "ck"))
    printed = capsys.readouterr().out
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in printed  # CLIP text tower: not part of XEmoGPT
    assert any(name.startswith("vecb/visual_alignment_layer/0/") for name in report.missing)
    assert "visual_llm_project/kernel" in report.missing
    base_missing = [m for m in report.missing if m.startswith(("llm/", "vision_tower/", "audio_tower/"))]
    assert base_missing and all("/lora_" in m for m in base_missing)  # only the fresh adapters
    model, spec = load_model_checkpoint(tmp_path / "ck", sharding.make_mesh((1, -1, 1)))
    hf = load_release_module(world, state=None).llm_model.get_base_model()
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(IDS).long()).logits
    close(model.llm(IDS), theirs)
    assert spec.lora["rank"] == 4 and spec.bridge_layers == 2 and spec.num_frames == 4


def test_shape_mismatch_is_refused_naming_key_and_shapes(world, tmp_path):
    state = torch.load(world["release"], weights_only=True)
    state["visual_llm_project.weight"] = torch.zeros(33, 32)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"'visual_llm_project.weight'.*\(32, 33\).*\(32, 32\)"):
        import_weights.main(import_args(world, tmp_path / "ck", "--release-ckpt", str(tmp_path / "bad.ckpt")))


def _params(path: Path) -> dict[str, np.ndarray]:
    model, _ = load_model_checkpoint(path, sharding.make_mesh((1, -1, 1)))
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


LIGHTNING_EXTRAS = dict(epoch=3, global_step=1200, optimizer_states=[], lr_schedulers=[], hyper_parameters={"lr": 1e-4})


@pytest.mark.parametrize("extras", [{}, LIGHTNING_EXTRAS], ids=["state_dict", "lightning"])
def test_release_file_under_state_dict_imports_the_same_model(world, tmp_path, tmp_path_factory, extras):
    """The older release files (``{"state_dict": ...}``, Lightning-style) give what the bare state dict gives."""
    torch.save({"state_dict": torch.load(world["release"], weights_only=True), **extras}, tmp_path / "old.ckpt")
    import_weights.main(import_args(world, tmp_path / "ck", "--release-ckpt", str(tmp_path / "old.ckpt")))
    ours, bare = _params(tmp_path / "ck"), _params(release_import(world, tmp_path_factory.getbasetemp()))
    assert ours.keys() == bare.keys()
    for name, value in bare.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_release_around_a_512_wide_clip_text_tower_imports_without_config_override(world, tmp_path):
    """The VECB text head is sized by the release's own tensor, not by the config or the --clip folder (16 wide)."""
    state = torch.load(world["release"], weights_only=True)
    wide = torch.randn(ALIGN, 512, generator=torch.Generator().manual_seed(7))
    state["visual_encoder.text_project.weight"] = wide
    torch.save(state, tmp_path / "wide.ckpt")
    import_weights.main(import_args(world, tmp_path / "ck", "--release-ckpt", str(tmp_path / "wide.ckpt")))
    model, spec = load_model_checkpoint(tmp_path / "ck", sharding.make_mesh((1, -1, 1)))
    assert spec.video_text_dim == 512
    close(model.vecb.text_project.kernel.get_value(), wide.numpy().T, atol=0)


def test_file_that_is_no_state_dict_is_refused_naming_what_it_holds(world, tmp_path):
    torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"not a state dict.*found \{'epoch': int, 'model': dict\}"):
        import_weights.main(import_args(world, tmp_path / "ck", "--release-ckpt", str(tmp_path / "odd.ckpt")))


class _RunsCodeOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_not_executed(world, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"visual_llm_project.weight": _RunsCodeOnLoad(marker)}, tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        import_weights.main(import_args(world, tmp_path / "ck", "--release-ckpt", str(tmp_path / "evil.ckpt")))
    assert not marker.exists()


def test_paper_config_file_supplies_bridge_and_lora_settings(world):
    """The default config (configs/sft.py) gives the paper's LoRA r=512 and 16 frames over HF-sized backbones."""
    args = import_weights.parse_args(import_args(world, Path("unused")))
    args.config = import_weights.DEFAULT_CONFIG
    spec = import_weights.build_spec(args)
    assert spec.lora == dict(rank=512, alpha=512.0, dropout=0.05, targets=["q_proj", "k_proj", "v_proj"])
    assert (spec.num_frames, spec.bridge_layers) == (16, 2)
    assert run_config.xemogpt_config(spec.run_config()).llm.hidden_size == 32
    assert spec.sources["llm"] == str(world["llm"].absolute())


@pytest.mark.parametrize(
    "name, path, index",
    [
        # PEFT's wrapped base weights (Qwen2 has q/k/v biases) and the plain HF spelling
        ("llm_model.base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias",
         ("llm", "layers", "self_attn", "q_proj", "bias"), 1),
        ("llm_model.base_model.model.model.layers.0.self_attn.k_proj.weight",
         ("llm", "layers", "self_attn", "k_proj", "kernel"), 0),
        ("llm_model.base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight",
         ("llm", "layers", "self_attn", "v_proj", "lora_b"), 3),
        # older weight-norm names of the HuBERT positional conv (as chinese-hubert-large ships)
        ("audio_encoder.audio_encoder.encoder.pos_conv_embed.conv.weight_g",
         ("audio_tower", "encoder", "pos_conv_embed", "weight_g"), None),
        ("visual_encoder.clip.vision_model.pre_layrnorm.weight", ("vision_tower", "pre_layernorm", "scale"), None),
        ("audio_encoder.audio_alignment_layer.1.final_layer_norm.bias",
         ("aecb", "audio_alignment_layer", 1, "final_layer_norm", "bias"), None),
    ],
)
def test_release_key_spellings(name, path, index):
    target = xemogpt_params.release_key_map(name)
    assert (target.path, target.index) == (path, index)


def test_peft_adapter_names_map_to_adapters():
    target = xemogpt_params.peft_key_map("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight")
    assert (target.path, target.index) == (("llm", "layers", "self_attn", "q_proj", "lora_a"), 2)
    assert xemogpt_params.peft_key_map("model.layers.2.self_attn.q_proj.lora_A.weight") is None


def test_a_model_spec_keeps_the_prompt_layout_its_config_sets():
    """An imported (or exported) model reads prompts as the run it came from: audio window, context cut, buckets."""
    config = sft.get_config("tiny")
    config.data.max_audio_seconds, config.data.truncate = 1.0, "head"
    stored = json.loads(json.dumps(run_config.model_spec(config).to_json()))
    model = run_config.xemogpt_config(xemogpt_params.ModelSpec.from_json(stored).run_config())
    assert (model.max_audio_samples, model.max_context, model.truncate) == (16_000, config.data.max_context, "head")
    assert model.max_context != prompt.MAX_CONTEXT, "the tiny config's context must differ from the default to tell"
    unset = xemogpt_params.ModelSpec.from_json({**stored, "prompt_layout": {}})
    release = run_config.xemogpt_config(unset.run_config())
    assert (release.max_audio_samples, release.max_context) == (12 * 16_000, prompt.MAX_CONTEXT)
