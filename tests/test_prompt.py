"""Sequence layout: slots where the spec puts them, pad-as-BOS, labels, truncation and buckets.

The tokenizer is a byte-level one with no merges (one token per UTF-8 byte), so every expected
token sequence is computed by hand from the template text.
"""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from xemogpt_jax import prompt
from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer

SUBTITLE = "I can't believe it."
INSTRUCTION = "Describe the emotion."
TARGET = "In the video, she frowns."


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


def byte_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())
    return ids


def filled(subtitle: str = SUBTITLE, instruction: str = INSTRUCTION) -> str:
    return prompt.PROMPT_TEMPLATE.format(subtitle=subtitle, instruction=instruction)


def test_template_is_verbatim():
    assert prompt.PROMPT_TEMPLATE.endswith("###Assistant: ")
    assert prompt.PROMPT_TEMPLATE.startswith("###Human: The audio content is as follows: <Audio><AudioHere></Audio>.")
    assert "{instruction} ###Assistant: " in prompt.PROMPT_TEMPLATE


def test_audio_video_slots_replace_placeholders(tokenizer):
    sample = prompt.build_sample(
        tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION, target=TARGET, num_audio_tokens=7, has_video=True
    )
    text = filled()
    head, rest = text.split("<AudioHere>")
    middle, tail = rest.split("<VideoHere>")
    expected_ids = (
        [tokenizer.pad_token_id]
        + byte_ids(tokenizer, head)
        + [0] * 7
        + byte_ids(tokenizer, middle)
        + [0] * 16
        + byte_ids(tokenizer, tail)
        + byte_ids(tokenizer, TARGET)
        + [tokenizer.eos_token_id]
    )
    expected_kind = (
        [0] * (1 + len(head.encode()))
        + [1] * 7
        + [0] * len(middle.encode())
        + [2] * 16
        + [0] * (len(tail.encode()) + len(TARGET.encode()) + 1)
    )
    np.testing.assert_array_equal(sample.token_ids, expected_ids)
    np.testing.assert_array_equal(sample.kind, expected_kind)
    np.testing.assert_array_equal(sample.feature_index[sample.kind == 1], np.arange(7))
    np.testing.assert_array_equal(sample.feature_index[sample.kind == 2], np.arange(16))
    assert not sample.feature_index[sample.kind == 0].any()
    assert sample.condition_length == len(text.encode()) - len("<AudioHere><VideoHere>") + 7 + 16
    assert sample.token_ids.dtype == np.int32 and sample.kind.dtype == np.int8


def test_missing_modality_keeps_placeholder_text(tokenizer):
    video_only = prompt.build_sample(tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION, has_video=True)
    head, tail = filled().split("<VideoHere>")
    np.testing.assert_array_equal(
        video_only.token_ids,
        [tokenizer.pad_token_id] + byte_ids(tokenizer, head) + [0] * 16 + byte_ids(tokenizer, tail),
    )
    assert (video_only.kind == 1).sum() == 0 and (video_only.kind == 2).sum() == 16
    assert "<AudioHere>" in tokenizer.decode(video_only.token_ids[video_only.kind == 0][1:])

    text_only = prompt.build_sample(tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION)
    np.testing.assert_array_equal(text_only.token_ids, [tokenizer.pad_token_id] + byte_ids(tokenizer, filled()))
    assert not text_only.kind.any()


def test_placeholder_inside_subtitle_stays_text(tokenizer):
    sample = prompt.build_sample(tokenizer, subtitle="say <VideoHere>", instruction=INSTRUCTION, has_video=True)
    assert (sample.kind == 2).sum() == 16


def test_labels_mark_exactly_the_target(tokenizer):
    sample = prompt.build_sample(
        tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION, target=TARGET, num_audio_tokens=3
    )
    target_ids = byte_ids(tokenizer, TARGET) + [tokenizer.eos_token_id]
    start = 1 + sample.condition_length  # BOS plus condition: where the target starts
    assert len(sample) == start + len(target_ids)
    expected = np.full(len(sample), -100)
    expected[start - 1 : -1] = target_ids
    np.testing.assert_array_equal(sample.labels, expected)
    supervised = np.nonzero(sample.labels != -100)[0]
    np.testing.assert_array_equal(sample.labels[supervised], sample.token_ids[supervised + 1])

    prompt_only = prompt.build_sample(tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION, num_audio_tokens=3)
    assert (prompt_only.labels == -100).all()
    np.testing.assert_array_equal(prompt_only.token_ids, sample.token_ids[:start])


def test_truncation_keeps_the_end_of_the_condition(tokenizer):
    long_subtitle = "la " * 400
    sample = prompt.build_sample(
        tokenizer,
        subtitle=long_subtitle,
        instruction=INSTRUCTION,
        target=TARGET,
        num_audio_tokens=50,
        has_video=True,
        max_context=300,
    )
    assert sample.condition_length == 300
    assert len(sample) == 1 + 300 + len(TARGET.encode()) + 1
    assert sample.token_ids[0] == tokenizer.pad_token_id
    tail = filled(long_subtitle).split("<VideoHere>")[1]
    np.testing.assert_array_equal(sample.token_ids[1:301], byte_ids(tokenizer, tail)[-300:])

    cut_in_audio = prompt.build_sample(
        tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION, num_audio_tokens=500, max_context=600
    )
    audio_index = cut_in_audio.feature_index[cut_in_audio.kind == 1]
    full_condition = len(filled().encode()) - len("<AudioHere>") + 500
    dropped = full_condition - 600
    head = filled().split("<AudioHere>")[0]
    np.testing.assert_array_equal(audio_index, np.arange(dropped - len(head.encode()), 500))


def test_head_truncation_keeps_the_start_of_the_condition_as_the_release_does(tokenizer):
    long_subtitle = "la " * 400
    sample = prompt.build_sample(
        tokenizer, subtitle=long_subtitle, instruction=INSTRUCTION, target=TARGET, num_audio_tokens=50,
        has_video=True, max_context=300, truncate="head",
    )
    head, rest = filled(long_subtitle).split("<AudioHere>")
    middle, tail = rest.split("<VideoHere>")
    expected_ids = (byte_ids(tokenizer, head) + [0] * 50 + byte_ids(tokenizer, middle) + [0] * 16
                    + byte_ids(tokenizer, tail))[:300]
    expected_kind = ([0] * len(head.encode()) + [1] * 50 + [0] * len(middle.encode()) + [2] * 16
                     + [0] * len(tail.encode()))[:300]
    assert sample.condition_length == 300
    assert sample.token_ids[0] == tokenizer.pad_token_id
    np.testing.assert_array_equal(sample.token_ids[1:301], expected_ids)
    np.testing.assert_array_equal(sample.kind[1:301], expected_kind)
    np.testing.assert_array_equal(sample.feature_index[1:301][sample.kind[1:301] == 1], np.arange(50))
    target_ids = byte_ids(tokenizer, TARGET) + [tokenizer.eos_token_id]
    np.testing.assert_array_equal(sample.token_ids[301:], target_ids)
    np.testing.assert_array_equal(sample.labels[300:-1], target_ids)

    cut_in_audio = prompt.build_sample(
        tokenizer, subtitle=SUBTITLE, instruction=INSTRUCTION, num_audio_tokens=500, max_context=100, truncate="head"
    )
    audio_index = cut_in_audio.feature_index[cut_in_audio.kind == 1]
    np.testing.assert_array_equal(audio_index, np.arange(100 - len(head.encode())))
    short = dict(subtitle=SUBTITLE, instruction=INSTRUCTION, target=TARGET, num_audio_tokens=7, has_video=True)
    np.testing.assert_array_equal(prompt.build_sample(tokenizer, **short, truncate="head").token_ids,
                                  prompt.build_sample(tokenizer, **short).token_ids)
    with pytest.raises(ValueError, match="truncate"):
        prompt.build_sample(tokenizer, **short, truncate="middle")


def test_collate_right_pads_to_smallest_bucket(tokenizer):
    samples = [
        prompt.build_sample(tokenizer, subtitle="a", instruction=INSTRUCTION, target=TARGET, has_video=True),
        prompt.build_sample(tokenizer, subtitle="abc" * 30, instruction=INSTRUCTION, target=TARGET),
    ]
    longest = max(len(s) for s in samples)
    buckets = (64, longest - 1, longest + 5, longest + 50)
    batch = prompt.collate(samples, buckets=buckets, pad_id=tokenizer.pad_token_id)
    assert batch["token_ids"].shape == (2, longest + 5)
    for row, sample in enumerate(samples):
        n = len(sample)
        np.testing.assert_array_equal(batch["token_ids"][row, :n], sample.token_ids)
        np.testing.assert_array_equal(batch["labels"][row, :n], sample.labels)
        np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(longest + 5) < n)
        np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
        assert (batch["labels"][row, n:] == -100).all() and (batch["token_ids"][row, n:] == 0).all()
        assert batch["condition_length"][row] == sample.condition_length
    with pytest.raises(ValueError, match="largest bucket"):
        prompt.collate(samples, buckets=(longest - 1,))


def test_generation_collate_left_pads(tokenizer):
    samples = [
        prompt.build_sample(tokenizer, subtitle="a", instruction=INSTRUCTION, num_audio_tokens=4, has_video=True),
        prompt.build_sample(tokenizer, subtitle="abcdef" * 5, instruction=INSTRUCTION),
    ]
    bucket = max(len(s) for s in samples) + 3
    batch = prompt.collate_for_generation(samples, buckets=(bucket,), pad_id=0)
    for row, sample in enumerate(samples):
        n = len(sample)
        np.testing.assert_array_equal(batch["token_ids"][row, bucket - n :], sample.token_ids)
        np.testing.assert_array_equal(batch["kind"][row, bucket - n :], sample.kind)
        np.testing.assert_array_equal(batch["attention_mask"][row], np.arange(bucket) >= bucket - n)
        np.testing.assert_array_equal(batch["positions"][row, bucket - n :], np.arange(n))
    with_target = prompt.build_sample(tokenizer, subtitle="a", instruction=INSTRUCTION, target=TARGET)
    with pytest.raises(ValueError, match="target=None"):
        prompt.collate_for_generation([with_target], buckets=(bucket * 4,))
