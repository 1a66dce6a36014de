"""Grain pipelines: process sharding, resumable iterators, stage-3 layout, buckets, global arrays."""

import hashlib
import itertools
import json

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from data_pipelines import pipelines, synth
from data_pipelines.records import open_source
from data_pipelines.schema import decode_record
from xemogpt_jax import prompt
from xemogpt_jax.sharding import batch_sharding, make_mesh

FRAME_SIZE = 16
MAX_AUDIO = 48_000
BUCKETS = (192, 256, 320, 384)


def audio_tokens_for(num_samples):
    """A stand-in audio encoder: one token per 1,600 samples (10 per second)."""
    return num_samples // 1600


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth.write_world(out, num_clips=44, seed=5, frame_size=FRAME_SIZE, heldout_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(str(world / "tokenizer"))


@pytest.fixture(scope="module")
def records(world):
    source = open_source(world / "train")
    return [decode_record(source[i]) for i in range(len(source))]


def stage3(world, tokenizer, **config):
    config = {"batch_size": 4, "seed": 11, "process_index": 0, "process_count": 1, "read_threads": 2, **config}
    return pipelines.stage3_dataset(
        world / "train", tokenizer, pipelines.LoaderConfig(**config), frame_size=FRAME_SIZE,
        max_audio_samples=MAX_AUDIO, audio_tokens_for=audio_tokens_for, buckets=BUCKETS)


def row_keys(batch):
    """One fingerprint per row from its unpadded tokens and its media (noise makes every clip unique)."""
    keys = []
    for row in range(batch["token_ids"].shape[0]):
        digest = hashlib.sha1()
        digest.update(batch["token_ids"][row][batch["attention_mask"][row] == 1].tobytes())
        digest.update(batch["pixel_values"][row].tobytes())
        digest.update(batch["input_values"][row].tobytes())
        keys.append(digest.hexdigest())
    return keys


def take(dataset_or_iterator, count):
    return list(itertools.islice(iter(dataset_or_iterator), count))


def test_two_processes_get_disjoint_halves_of_each_global_batch(world, tokenizer):
    steps = 14  # 36 clips / 8 per global batch: crosses into the second epoch
    whole = take(stage3(world, tokenizer, batch_size=8), steps)
    halves = [take(stage3(world, tokenizer, process_index=p, process_count=2), steps) for p in (0, 1)]
    for step in range(steps):
        first, second = set(row_keys(halves[0][step])), set(row_keys(halves[1][step]))
        assert len(first) == len(second) == 4
        assert not first & second
        assert first | second == set(row_keys(whole[step]))
    epoch_one = [k for b in whole[:4] for k in row_keys(b)]
    epoch_two = [k for b in whole[5:9] for k in row_keys(b)]
    assert epoch_one != epoch_two  # a fresh permutation each epoch


def test_restored_iterator_state_reproduces_the_following_batches(world, tokenizer):
    iterator = iter(stage3(world, tokenizer))
    take(iterator, 5)
    saved = json.dumps(iterator.get_state())  # as the trainer's checkpoint stores it
    expected = take(iterator, 6)
    resumed = iter(stage3(world, tokenizer))
    resumed.set_state(json.loads(saved))
    for want, got in zip(expected, take(resumed, 6), strict=True):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(want[name], got[name])


def test_read_threads_do_not_change_the_batches(world, tokenizer):
    one = take(stage3(world, tokenizer, read_threads=1), 3)
    four = take(stage3(world, tokenizer, read_threads=4), 3)
    assert [row_keys(b) for b in one] == [row_keys(b) for b in four]


def test_stage3_layout_targets_flags_and_buckets(world, tokenizer, records):
    by_description = {}
    for record in records:
        by_description.setdefault(record["description"], []).append(record)
    rows_seen = {(True, True): 0, (True, False): 0, (False, True): 0}
    for batch in take(stage3(world, tokenizer, num_epochs=1, drop_remainder=False), 20):
        width = batch["token_ids"].shape[1]
        lengths = batch["attention_mask"].sum(1)
        assert width in BUCKETS and width == min(b for b in BUCKETS if b >= lengths.max())
        for row in range(batch["token_ids"].shape[0]):
            ids, labels, kind = batch["token_ids"][row], batch["labels"][row], batch["kind"][row]
            has_video, has_audio = bool(batch["has_video"][row]), bool(batch["has_audio"][row])
            rows_seen[(has_video, has_audio)] += 1
            # the target: the clip's description + EOS, predicted from the position before each target token
            candidates = by_description[_decoded_description(tokenizer, labels)]
            target = tokenizer.encode(candidates[0]["description"], add_special_tokens=False)
            target.append(tokenizer.eos_token_id)
            start = batch["condition_length"][row]
            expected = np.full(width, prompt.IGNORE_INDEX)
            expected[start : start + len(target)] = target
            np.testing.assert_array_equal(labels, expected)
            np.testing.assert_array_equal(ids[start + 1 : start + 1 + len(target)], target)
            assert lengths[row] == 1 + start + len(target)
            assert ids[0] == tokenizer.pad_token_id
            # modality slots and flags agree with the arrays
            assert ((kind == prompt.VIDEO).sum() == 16) == has_video
            assert (np.abs(batch["pixel_values"][row]).sum() > 0) == has_video
            audio_samples = batch["audio_mask"][row].sum()
            assert (audio_samples > 0) == has_audio
            assert (kind == prompt.AUDIO).sum() == (audio_tokens_for(audio_samples) if has_audio else 0)
            condition = ids[1 : start + 1][kind[1 : start + 1] == prompt.TEXT]
            text = tokenizer.decode(condition)
            assert text.endswith("###Assistant: ")
            assert any(f"<Subtitle>{r['subtitle']}</Subtitle>" in text and (r["has_video"], r["has_audio"])
                       == (has_video, has_audio) for r in candidates)
            assert ("<VideoHere>" in text) != has_video and ("<AudioHere>" in text) != has_audio
    assert all(rows_seen.values()), rows_seen


def _decoded_description(tokenizer, labels):
    return tokenizer.decode(labels[labels != prompt.IGNORE_INDEX][:-1])


def test_stage1_and_stage2_batches(world, tokenizer, records):
    config = pipelines.LoaderConfig(batch_size=4, seed=2, process_index=0, process_count=1)
    batch = next(iter(pipelines.stage1_dataset(world / "train", tokenizer, config, frame_size=FRAME_SIZE,
                                                text_max_length=32)))
    assert batch["pixel_values"].shape == (4, 16, FRAME_SIZE, FRAME_SIZE, 3)
    visual_captions = {r["captions"][0] for r in records if r["has_video"]}
    for ids, mask in zip(batch["text_ids"], batch["text_mask"]):
        valid = ids[mask == 1]
        assert valid[-1] == tokenizer.eos_token_id and (ids[mask == 0] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(valid[:-1]) in visual_captions
    by_frames = {r["frames"].tobytes(): r for r in records if r["has_video"]}
    for row in range(4):
        frames = (batch["pixel_values"][row] * np.asarray([0.26862954, 0.26130258, 0.27577711])
                  + np.asarray([0.48145466, 0.4578275, 0.40821073])) * 255
        assert np.rint(frames).astype(np.uint8).tobytes() in by_frames

    batch = next(iter(pipelines.stage2_dataset(world / "train", tokenizer, config, max_audio_samples=MAX_AUDIO,
                                                text_max_length=32)))
    audio_lengths = {r["audio_length"] for r in records if r["has_audio"]}
    auditory_captions = {r["captions"][-1] for r in records if r["has_audio"]}
    assert batch["input_values"].shape == (4, MAX_AUDIO)
    for values, mask, ids, text_mask in zip(batch["input_values"], batch["audio_mask"], batch["text_ids"],
                                            batch["text_mask"]):
        assert mask.sum() in audio_lengths and (values[mask == 0] == 0).all()
        valid = values[mask == 1]
        assert abs(valid.mean()) < 1e-3 and abs(valid.std() - 1) < 1e-2  # per-utterance normalisation
        assert tokenizer.decode(ids[text_mask == 1][:-1]) in auditory_captions


def test_padding_to_an_agreed_bucket_matches_collating_at_that_bucket(tokenizer):
    samples = [prompt.build_sample(tokenizer, subtitle=s, instruction="Describe.", target=t, has_video=v,
                                   num_audio_tokens=a)
               for s, t, v, a in (("Hi.", "In the video, a smile.", True, 7), ("Yes.", "Calm.", False, 3))]
    small = prompt.collate(samples, buckets=(128, 256), pad_id=tokenizer.pad_token_id)
    large = prompt.collate(samples, buckets=(256,), pad_id=tokenizer.pad_token_id)
    assert small["token_ids"].shape[1] == 128
    pad_values = pipelines.stage3_pad_values(tokenizer.pad_token_id)
    padded = pipelines.pad_to_widths(small, {name: 256 for name in pad_values}, pad_values)
    for name in large:
        np.testing.assert_array_equal(padded[name], large[name])


def test_make_global_batch_places_rows_on_the_batch_axis(world, tokenizer):
    mesh = make_mesh((-1, 1, 1))
    local = next(iter(stage3(world, tokenizer, batch_size=8)))
    global_batch = pipelines.make_global_batch(local, mesh, pipelines.stage3_pad_values(tokenizer.pad_token_id))
    assert global_batch.keys() == local.keys()
    for name, value in global_batch.items():
        assert isinstance(value, jax.Array)
        assert value.sharding == batch_sharding(mesh, local[name].ndim)
        np.testing.assert_array_equal(np.asarray(value), local[name])
    shard = global_batch["token_ids"].addressable_shards[3]
    np.testing.assert_array_equal(np.asarray(shard.data), local["token_ids"][3:4])
