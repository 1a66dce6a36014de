"""TFDS view of built records, stored as ArrayRecord and readable with ``tfds.data_source`` (no TensorFlow).

The builder re-packages a directory written by ``data_pipelines.build`` (passed as TFDS's manual_dir). Each
example keeps our serialised record as one opaque bytes tensor, so TFDS never needs TensorFlow to encode
features and the record schema stays the single source of truth: decode ``example["record"]`` with
:func:`data_pipelines.schema.decode_record`. All records form the ``train`` split, in build order.

    import data_pipelines.tfds_builder  # registers "xemogpt_clips"
    source = tfds.data_source("xemogpt_clips", split="train", data_dir=tfds_dir,
                              download_and_prepare_kwargs=prepare_kwargs(records_dir))
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.records import load_manifest, open_source
from data_pipelines.schema import decode_record


class XemogptClips(tfds.core.GeneratorBasedBuilder):
    """Clip records (schema in data_pipelines/schema.py) as a TFDS ArrayRecord dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of schema major version 1."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Build records with `python -m data_pipelines.build` and pass --out as manual_dir."

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("file_format", tfds.core.FileFormat.ARRAY_RECORD)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "clip_id": tfds.features.Text(),
                "record": tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

    def _generate_examples(self, records_dir: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        load_manifest(records_dir)
        source = open_source(records_dir)
        for index in range(len(source)):
            data = source[index]
            yield index, {"clip_id": decode_record(data)["clip_id"], "record": data}


def prepare_kwargs(records_dir: str | Path) -> dict[str, Any]:
    """download_and_prepare kwargs that point the builder at a records directory."""
    return {"download_config": tfds.download.DownloadConfig(manual_dir=str(records_dir))}
