"""``infer --json`` log-probs and ``infer --score`` against the PyTorch reference composition on the shared clip.

The checkpoint's weights come from a random :class:`TorchXEmoGPT`; the reference lays each prompt
out the release's way (text pieces around the feature tokens, one sample at a time, no cache), so
it shares none of our layout, splicing, batching or decoding code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from infer_fixtures import save_tokenizer, shared_clip, tiny_run_config
from xemogpt_fixtures import build_filled

from xemogpt_jax import checkpoint as checkpoint_lib
from xemogpt_jax import explainer as explainer_lib
from xemogpt_jax import infer, prompt, run_config
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.preprocessing import audio as audio_pre
from xemogpt_jax.preprocessing import image as image_pre
from xemogpt_jax.run_config import xemogpt_config
from xemogpt_jax.testing.run_checkpoint import write_checkpoint
from xemogpt_jax.testing.torch_reference import TorchXEmoGPT, load_into, randomize

INSTRUCTION = "What does the speaker feel, and why?"
SUBTITLE = "I can't believe it."
ANSWERS = ["In the video, he frowns. In the audio, his voice is tense.", "She is happy."]
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint holding the weights of a random reference, the reference, and the shared clip as both see it."""
    out = tmp_path_factory.mktemp("reference_ckpt")
    tokenizer = save_tokenizer(out / "tokenizer")
    config = tiny_run_config(out / "tokenizer", len(tokenizer))
    model_cfg = config.model
    qwen = transformers.Qwen3Config(**run_config.architecture(config, "llm"), pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
    clip = transformers.CLIPVisionConfig(**run_config.architecture(config, "clip")["vision_config"],
                                         attn_implementation="eager")
    hubert = transformers.HubertConfig(**run_config.architecture(config, "hubert"), attn_implementation="eager")
    torch.manual_seed(0)
    reference = TorchXEmoGPT(clip, hubert, qwen, num_frames=model_cfg.num_frames,
                             bridge_layers=model_cfg.bridge_layers).eval()
    randomize(reference, seed=0)
    model = build_filled(lambda: XEmoGPT(xemogpt_config(checkpoint_lib.to_json(config)), rngs=nnx.Rngs(0)))
    assert load_into(model, reference) == []
    write_checkpoint(out, model, config)

    video, _ = shared_clip()
    explainer = infer.load_cached(str(out))
    decoded = explainer_lib.read_clip("c", video, None, SUBTITLE, frame_size=explainer.frame_size)
    limit = explainer.config.max_audio_samples
    values, mask = audio_pre.preprocess_audio([decoded.audio[:limit]], max_samples=limit)
    with torch.no_grad():
        sound, frame_mask = reference.audio_tokens(torch.from_numpy(values), torch.from_numpy(mask).long())
        video_tokens = reference.video_tokens(torch.from_numpy(image_pre.normalize(decoded.frames))[None])
    media = {"<AudioHere>": sound[0, : int(frame_mask[0].sum())], "<VideoHere>": video_tokens[0]}
    return dict(checkpoint=out, reference=reference, tokenizer=tokenizer, media=media, video=video)


def release_prompt(world) -> torch.Tensor:
    """``[1, L, D]`` embeddings of BOS + the filled template with the clip's feature tokens, the release's way."""
    reference, tokenizer = world["reference"], world["tokenizer"]
    embed = reference.llm.get_input_embeddings()
    text = prompt.PROMPT_TEMPLATE.format(subtitle=SUBTITLE, instruction=INSTRUCTION)
    pieces: list = [text]
    for placeholder, tokens in world["media"].items():
        before, after = pieces.pop().split(placeholder)
        pieces += [before, tokens, after]
    ids = lambda s: torch.tensor(tokenizer.encode(s, add_special_tokens=False), dtype=torch.long)  # noqa: E731
    parts = [embed(torch.tensor([tokenizer.pad_token_id]))]
    parts += [embed(ids(p)) if isinstance(p, str) else p for p in pieces]
    return torch.cat(parts)[None]


def reference_log_softmax(world, embeds: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(world["reference"].llm(inputs_embeds=embeds).logits[0].double(), dim=-1)


def run_infer(world, capsys, *flags: str) -> dict:
    base = ["--checkpoint", str(world["checkpoint"]), "--video", str(world["video"]), "--subtitle", SUBTITLE,
            "--instruction", INSTRUCTION]
    assert infer.main([*base, *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_score_equals_reference_teacher_forced_log_likelihood(world, capsys):
    record = run_infer(world, capsys, "--score", ANSWERS[0], "--score", ANSWERS[1])
    tokenizer, condition = world["tokenizer"], release_prompt(world)
    embed = world["reference"].llm.get_input_embeddings()
    assert [s["text"] for s in record["scores"]] == ANSWERS
    for answer, score in zip(ANSWERS, record["scores"]):
        target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        with torch.no_grad():
            embeds = torch.cat([condition, embed(torch.tensor(target))[None]], dim=1)
        log_probs = reference_log_softmax(world, embeds)
        start = condition.shape[1] - 1
        expected = log_probs[start : start + len(target)].gather(1, torch.tensor(target)[:, None])[:, 0].numpy()
        assert score["token_ids"] == target
        np.testing.assert_allclose(score["token_logprobs"], expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(score["logprob"], expected.sum(), atol=1e-4, rtol=0)
    assert record["scores"][0]["logprob"] != pytest.approx(record["scores"][1]["logprob"])


def test_json_greedy_token_logprobs_equal_reference_log_softmax(world, capsys):
    record = run_infer(world, capsys, "--json", "--greedy", "--num-beams", "1", "--max-new-tokens", str(NEW_TOKENS))
    embeds, embed = release_prompt(world), world["reference"].llm.get_input_embeddings()
    eos = world["tokenizer"].eos_token_id
    tokens, logprobs = [], []
    for _ in range(NEW_TOKENS):
        step = reference_log_softmax(world, embeds)[-1]
        token = int(step.argmax())
        tokens.append(token)
        if token == eos:
            break
        logprobs.append(float(step[token]))
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
    assert record["token_ids"] == [t for t in tokens if t != eos]
    np.testing.assert_allclose(record["token_logprobs"], logprobs, atol=1e-4, rtol=0)
    assert record["generated_tokens"] == len(tokens) and record["prompt_tokens"] == release_prompt(world).shape[1]
    assert set(record) == {"explanation", "token_ids", "token_logprobs", "prompt_tokens", "generated_tokens", "seconds"}


def test_batch_mode_writes_json_and_score_records_and_resumes(world, tmp_path):
    rows = "name,video,subtitle\n" + "".join(f"c{i},{world['video']},{SUBTITLE}\n" for i in range(3))
    (tmp_path / "ann.csv").write_text(rows)
    base = ["--checkpoint", str(world["checkpoint"]), "--batch", str(tmp_path / "ann.csv"), "--no-progress",
            "--instruction", INSTRUCTION, "--batch-size", "2"]
    json_out, score_out = tmp_path / "json.jsonl", tmp_path / "scores.jsonl"
    greedy = ["--greedy", "--num-beams", "1", "--max-new-tokens", str(NEW_TOKENS)]
    assert infer.main([*base, "--out", str(json_out), "--json", *greedy]) == 0
    (tmp_path / "answers.txt").write_text("\n".join(ANSWERS) + "\n")
    assert infer.main([*base, "--out", str(score_out), "--score-file", str(tmp_path / "answers.txt")]) == 0
    assert infer.main([*base, "--out", str(score_out), "--score-file", str(tmp_path / "answers.txt")]) == 0
    generated = [json.loads(line) for line in json_out.read_text().splitlines()]
    scored = [json.loads(line) for line in score_out.read_text().splitlines()]
    assert [r["id"] for r in generated] == [r["id"] for r in scored] == ["c0", "c1", "c2"]
    assert len({tuple(r["token_ids"]) for r in generated}) == 1  # the same clip, batched or alone
    np.testing.assert_allclose([r["token_logprobs"] for r in generated], [generated[0]["token_logprobs"]] * 3,
                               atol=1e-5)
    assert all([s["text"] for s in r["scores"]] == ANSWERS for r in scored)
    np.testing.assert_allclose([r["scores"][0]["logprob"] for r in scored], scored[0]["scores"][0]["logprob"],
                               atol=1e-4)
