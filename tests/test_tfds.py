"""The TFDS ArrayRecord builder yields exactly the records of the direct ArrayRecord source, without TensorFlow."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import tfds_builder
from data_pipelines.build import BuildConfig, build
from data_pipelines.records import open_source
from data_pipelines.schema import decode_record

CLIP = Path(__file__).parents[2] / "shared/media/sample_00000007.mp4"


def test_tfds_data_source_matches_direct_source(tmp_path):
    if not CLIP.exists():
        pytest.fail(f"reference media missing: {CLIP}")
    media = tmp_path / "media"
    media.mkdir()
    names = ["b_clip", "a_clip", "c_clip"]
    for name in names:
        shutil.copy(CLIP, media / f"{name}.mp4")
    annotations = tmp_path / "a.jsonl"
    annotations.write_text("".join(
        f'{{"name": "{n}", "english": "about {n}", "captions": ["{n} smiles"], "split": "train"}}\n' for n in names))
    records_dir = tmp_path / "records"
    manifest = build(BuildConfig(annotations=annotations, media_root=media, out=records_dir, num_shards=2,
                                 workers=2, frame_size=16), show_progress=False)
    assert manifest["num_records"] == 3

    source = tfds.data_source("xemogpt_clips", split="train", data_dir=tmp_path / "tfds",
                              download_and_prepare_kwargs=tfds_builder.prepare_kwargs(records_dir))
    direct = open_source(records_dir)
    assert len(source) == len(direct) == 3
    for index in range(len(direct)):
        example = source[index]
        assert example["record"] == direct[index]
        ours, theirs = decode_record(direct[index]), decode_record(example["record"])
        assert example["clip_id"].decode() == theirs["clip_id"] == names[index]
        np.testing.assert_array_equal(theirs["frames"], ours["frames"])
        np.testing.assert_array_equal(theirs["audio"], ours["audio"])
        assert theirs["captions"] == [f"{names[index]} smiles"]
