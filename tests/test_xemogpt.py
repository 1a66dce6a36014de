"""XEmoGPT end to end against a PyTorch composition of the same transformers modules and weights.

The reference builds each sample the way the release does (text pieces, per-sample token
concatenation, HF's own shifted-label loss), so it shares none of our layout or splicing code.
"""

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.clip.modeling_clip import CLIPEncoderLayer as TorchCLIPLayer
from transformers.models.hubert.modeling_hubert import HubertEncoderLayer as TorchHubertLayer

from configs import sft
from tests.xemogpt_fixtures import build_filled
from xemogpt_jax import prompt, run_config, sharding
from xemogpt_jax.models import lora, presets
from xemogpt_jax.models.attention import AttentionConfig
from xemogpt_jax.models.clip import CLIPVisionConfig
from xemogpt_jax.models.hubert import HubertConfig
from xemogpt_jax.models.qwen3 import Qwen3Config
from xemogpt_jax.models.xemogpt import XEmoGPT, XEmoGPTConfig
from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer
from xemogpt_jax.testing.torch_reference import TorchXEmoGPT, load_into, randomize, to_torch

FRAMES, IMAGE, MAX_SAMPLES, AUDIO_LEN = 4, 28, 360, 400
INSTRUCTION = "Describe the emotion."
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.05)
# (has_audio samples or None, has_video, subtitle, target): video-only, audio-only, audio+video, text-only
SAMPLES = [
    (None, True, "Hi there.", "She smiles."),
    (AUDIO_LEN, False, "No way!", "He shouts angrily."),
    (250, True, "Fine.", "A flat voice."),
    (None, False, "Hello?", "Calm."),
]


def hf_configs(tokenizer):
    clip = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE, patch_size=14, hidden_act="quick_gelu", attn_implementation="eager",
    )
    hubert = transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=True,
        num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True, attn_implementation="eager",
    )
    qwen = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, attn_implementation="eager",
    )
    return clip, hubert, qwen


def release_forward(reference: TorchXEmoGPT, tokenizer, frames, audio, audio_mask):
    """The release's sequence building, one sample at a time: text pieces around the feature tokens."""
    embed = reference.llm.get_input_embeddings()
    text_ids = lambda s: torch.tensor(tokenizer.encode(s, add_special_tokens=False), dtype=torch.long)  # noqa: E731
    video = reference.video_tokens(frames)
    sound, frame_mask = reference.audio_tokens(audio[:, :MAX_SAMPLES], audio_mask[:, :MAX_SAMPLES])
    rows, labels = [], []
    for b, (audio_len, has_video, subtitle, target) in enumerate(SAMPLES):
        text = prompt.PROMPT_TEMPLATE.format(subtitle=subtitle, instruction=INSTRUCTION)
        pieces: list = [text]
        valid_sound = sound[b, : int(frame_mask[b].sum())]
        slots = ((audio_len, "<AudioHere>", valid_sound), (has_video, "<VideoHere>", video[b]))
        for present, placeholder, tokens in slots:
            if present:
                before, after = pieces.pop().split(placeholder)
                pieces += [before, tokens, after]
        parts = [embed(torch.tensor([tokenizer.pad_token_id]))]
        parts += [embed(text_ids(p)) if isinstance(p, str) else p for p in pieces]
        condition = sum(p.shape[0] for p in parts)
        target_ids = torch.cat([text_ids(target), torch.tensor([tokenizer.eos_token_id])])
        rows.append(torch.cat(parts + [embed(target_ids)]))
        labels.append(torch.cat([torch.full((condition,), -100), target_ids]))
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
    mask = torch.stack([(torch.arange(length) < r.shape[0]).long() for r in rows])
    pad = torch.nn.functional.pad
    label_batch = torch.stack([pad(lab, (0, length - lab.shape[0]), value=-100) for lab in labels])
    out = reference.llm(inputs_embeds=embeds, attention_mask=mask, labels=label_batch)
    return out.loss, out.logits, [r.shape[0] for r in rows]


def randomize_lora_and_merge_into(model: XEmoGPT, reference: TorchXEmoGPT, seed: int) -> None:
    """Give the adapters non-zero weights and fold the same update into the reference's base weights."""
    rng = np.random.default_rng(seed)
    attn = model.llm.layers.self_attn
    for name in LORA.targets:
        proj = getattr(attn, name)
        proj.lora_a[...] = rng.normal(0, 0.2, proj.lora_a.shape).astype(np.float32)
        proj.lora_b[...] = rng.normal(0, 0.2, proj.lora_b.shape).astype(np.float32)
        delta = LORA.scale * np.einsum("lir,lro->lio", np.asarray(proj.lora_a[...]), np.asarray(proj.lora_b[...]))
        with torch.no_grad():
            for i, layer in enumerate(reference.llm.model.layers):
                getattr(layer.self_attn, name).weight.add_(to_torch(delta[i].T))


@pytest.fixture(scope="module")
def setup():
    tokenizer = byte_tokenizer()
    clip_hf, hubert_hf, qwen_hf = hf_configs(tokenizer)
    torch.manual_seed(0)
    reference = TorchXEmoGPT(clip_hf, hubert_hf, qwen_hf, num_frames=FRAMES).eval()
    randomize(reference, seed=0)
    config = XEmoGPTConfig(
        vision=CLIPVisionConfig.from_hf(clip_hf.to_dict()),
        hubert=HubertConfig.from_hf(hubert_hf.to_dict()),
        llm=Qwen3Config.from_hf(qwen_hf.to_dict(), lora=LORA),
        num_frames=FRAMES, max_audio_samples=MAX_SAMPLES, align_dim=16, video_text_dim=8, audio_text_dim=8,
        loss_chunk=100,  # the 384 positions in 4 chunks of 96
    )
    model = build_filled(lambda: XEmoGPT(config, rngs=nnx.Rngs(0)))
    assert not [name for name in load_into(model, reference) if "/lora_" not in name]
    randomize_lora_and_merge_into(model, reference, seed=1)

    rng = np.random.default_rng(0)
    frames = rng.normal(size=(len(SAMPLES), FRAMES, IMAGE, IMAGE, 3)).astype(np.float32)
    audio = np.zeros((len(SAMPLES), AUDIO_LEN), np.float32)
    audio_mask = np.zeros((len(SAMPLES), AUDIO_LEN), np.int32)
    samples = []
    for b, (audio_len, has_video, subtitle, target) in enumerate(SAMPLES):
        if audio_len:
            audio[b, :audio_len] = rng.normal(size=audio_len)
            audio_mask[b, :audio_len] = 1
        samples.append(
            prompt.build_sample(
                tokenizer, subtitle=subtitle, instruction=INSTRUCTION, target=target, has_video=has_video,
                num_audio_tokens=config.num_audio_tokens(audio_len) if audio_len else None, num_video_tokens=FRAMES,
            )
        )
    batch = prompt.collate(samples, buckets=(128, 384, 512), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        want_loss, want_logits, lengths = release_forward(
            reference, tokenizer, to_torch(frames), to_torch(audio), to_torch(audio_mask)
        )
    inputs = {k: v for k, v in batch.items() if k != "condition_length"}
    return dict(
        model=model, inputs=inputs, frames=frames, audio=audio, audio_mask=audio_mask, samples=samples,
        want_loss=float(want_loss), want_logits=want_logits.numpy(), lengths=lengths,
    )


@nnx.jit
def forward(model, inputs, media):
    """The loss, and the LLM's logits on the same input embeddings (the loss never builds them whole)."""
    embeds = model.input_embeddings(inputs["token_ids"], inputs["kind"], inputs["feature_index"], **media)
    return model(**inputs, **media), model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def with_attention(model: XEmoGPT, impl: str, dtype=None) -> XEmoGPT:
    """The same weights in a model whose LLM, towers and bridges all run attention backend ``impl``
    (and compute in ``dtype``, when given)."""
    attention = AttentionConfig(impl)
    c = model.config
    precision = {} if dtype is None else {"dtype": dtype}
    config = dataclasses.replace(
        c, **precision, vision=dataclasses.replace(c.vision, attention=attention),
        hubert=dataclasses.replace(c.hubert, attention=attention, **precision),
        llm=c.llm.replace(attention=attention, **precision),
    )
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: XEmoGPT(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("impl", ["auto", "blocked", "xla"])
def test_loss_matches_pytorch_composition(setup, impl, caplog):
    """Every CPU attention backend (auto = blocked here) gives the PyTorch reference's loss and logits."""
    caplog.set_level(logging.INFO, logger="xemogpt_jax.models.attention")
    s = setup
    assert [len(x) for x in s["samples"]] == s["lengths"]
    assert s["inputs"]["token_ids"].shape[1] == 384
    media = dict(frames=s["frames"], audio=s["audio"], audio_mask=s["audio_mask"])
    model = s["model"] if impl == "auto" else with_attention(s["model"], impl)
    loss, logits = forward(model, s["inputs"], media)
    np.testing.assert_allclose(float(loss), s["want_loss"], atol=1e-4, rtol=0)
    for row, n in enumerate(s["lengths"]):
        np.testing.assert_allclose(np.asarray(logits)[row, :n], s["want_logits"][row, :n], atol=2e-4, rtol=0)
    if impl == "xla":  # the LLM and the encoders/bridges said which backend they traced
        assert {"attention: llm runs xla", "attention: encoder runs xla"} <= {r.getMessage() for r in caplog.records}


@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cudnn attention needs a GPU (run with XEMOGPT_TEST_PLATFORMS=cuda,cpu)"
)
def test_bf16_loss_with_cudnn_everywhere_on_gpu(setup, caplog):
    """cuDNN in the LLM, the towers and the bridges: the bf16 loss of ``xla`` and the f32 reference's."""
    caplog.set_level(logging.INFO, logger="xemogpt_jax.models.attention")
    s = setup
    media = dict(frames=s["frames"], audio=s["audio"], audio_mask=s["audio_mask"])
    losses = {impl: float(forward(with_attention(s["model"], impl, jnp.bfloat16), s["inputs"], media)[0])
              for impl in ("cudnn", "xla")}
    assert abs(losses["cudnn"] - losses["xla"]) < 2e-2, losses
    assert abs(losses["cudnn"] - s["want_loss"]) < 5e-2, (losses, s["want_loss"])
    assert {"attention: llm runs cudnn", "attention: encoder runs cudnn"} <= {r.getMessage() for r in caplog.records}


@nnx.jit
def encode(model, frames, audio, audio_mask):
    return model.clip_features(frames), *model.audio_features(audio, audio_mask)


@nnx.jit
def from_precomputed(model, inputs, features):
    """Loss from precomputed features, and LLM logits from ``input_embeddings`` (where generation starts)."""
    loss = model(**inputs, **features)
    embeds = model.input_embeddings(inputs["token_ids"], inputs["kind"], inputs["feature_index"], **features)
    return loss, model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])


def test_precomputed_features_and_input_embeddings(setup):
    s = setup
    model = s["model"]
    clip_features, audio_features, frame_mask = encode(model, s["frames"], s["audio"], s["audio_mask"])
    assert clip_features.shape == (len(SAMPLES), FRAMES, 32)
    assert not np.asarray(audio_features)[~np.asarray(frame_mask)].any()
    features = dict(clip_features=clip_features, audio_features=audio_features, audio_frame_mask=frame_mask)
    loss, logits = from_precomputed(model, s["inputs"], features)
    np.testing.assert_allclose(float(loss), s["want_loss"], atol=1e-4, rtol=0)
    raw, _ = forward(model, s["inputs"], dict(frames=s["frames"], audio=s["audio"], audio_mask=s["audio_mask"]))
    np.testing.assert_allclose(float(loss), float(raw), atol=1e-6, rtol=0)
    for row, n in enumerate(s["lengths"]):
        np.testing.assert_allclose(np.asarray(logits)[row, :n], s["want_logits"][row, :n], atol=2e-4, rtol=0)


@nnx.jit
def bridge_gradients(model, inputs, features):
    def loss_fn(model):
        return model(**inputs, **features)

    trainable = nnx.Any(nnx.PathContains("vecb"), nnx.PathContains("aecb"))
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.All(nnx.Param, trainable)))(model)
    return [sum(jax.numpy.abs(g).sum() for g in jax.tree.leaves(grads[name])) for name in ("vecb", "aecb")]


def test_bridges_learn_only_from_samples_with_their_modality(setup):
    """Stage 3's rule: the VECB gets gradient from video samples only, the AECB from audio samples only."""
    s = setup
    model = s["model"]
    clip_features, audio_features, frame_mask = encode(model, s["frames"], s["audio"], s["audio_mask"])
    features = dict(clip_features=clip_features, audio_features=audio_features, audio_frame_mask=frame_mask)

    def scored(rows):
        labels = np.where(np.isin(np.arange(len(SAMPLES)), rows)[:, None], s["inputs"]["labels"], -100)
        return {**s["inputs"], "labels": labels}

    no_video = bridge_gradients(model, scored([1, 3]), features)  # audio-only, text-only
    no_audio = bridge_gradients(model, scored([0, 3]), features)  # video-only, text-only
    both = bridge_gradients(model, scored([2]), features)  # audio+video
    assert float(no_video[0]) == 0.0 and float(no_video[1]) > 0.0
    assert float(no_audio[1]) == 0.0 and float(no_audio[0]) > 0.0
    assert float(both[0]) > 0.0 and float(both[1]) > 0.0


def _hf_param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count(state) -> int:
    return sum(math.prod(v.shape) for v in jax.tree.leaves(state))


def test_paper_scale_builds_abstractly_and_shards():
    config = run_config.xemogpt_config(sft.get_config())
    model = nnx.eval_shape(lambda: XEmoGPT(config, rngs=nnx.Rngs(0)))
    counts = {name: _count(nnx.state(getattr(model, name), nnx.Param)) for name in (
        "vision_tower", "audio_tower", "vecb", "aecb", "visual_llm_project", "audio_llm_project", "llm")}
    adapters = _count(nnx.state(model, lora.LoraParam))

    with torch.device("meta"):
        clip_hf = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**presets.get("clip", "clip-vit-l14")["vision_config"]))
        hubert_hf = transformers.HubertModel(transformers.HubertConfig(**config.hubert.to_hf()))
        qwen_hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config.llm.to_hf()))
        clip_layer = _hf_param_count(TorchCLIPLayer(clip_hf.config))
        hubert_layer = _hf_param_count(TorchHubertLayer(hubert_hf.config))
    d, hidden, r = 1024, 2560, 512
    assert counts["vision_tower"] == _hf_param_count(clip_hf)
    assert counts["audio_tower"] == _hf_param_count(hubert_hf)
    assert counts["llm"] == _hf_param_count(qwen_hf) + adapters
    assert adapters == 36 * r * ((hidden + 32 * 128) + 2 * (hidden + 8 * 128))
    heads = 16 * d + d + (d * 768 + 768) + (768 * 768 + 768) + (768 * 768 + 768 + 768 + 1) + (d * d + d)
    assert counts["vecb"] == 2 * clip_layer + heads
    assert counts["aecb"] == 2 * hubert_layer + 2 * (768 * 768 + 768) + (d * 768 - 768 * 768)
    assert counts["visual_llm_project"] == counts["audio_llm_project"] == d * hidden + hidden
    print("paper-scale parameter counts:", counts, "lora adapters:", adapters)

    mesh = sharding.make_mesh((2, 2, 2))
    state = nnx.state(model)
    shardings = sharding.state_shardings(state, mesh)
    total = per_device = 0
    for variable, named in zip(
        jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)), jax.tree.leaves(shardings)
    ):
        size = math.prod(variable.shape)
        total += size
        per_device += math.prod(named.shard_shape(variable.shape))
    assert per_device < 0.3 * total  # fsdp x tensor = 4-way split of nearly every byte
    embed_spec = shardings["llm"]["embed_tokens"]["embedding"].spec
    assert embed_spec == jax.sharding.PartitionSpec("tensor", "fsdp")
