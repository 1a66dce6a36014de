"""Record schema, media decoding and annotation reading, checked against independent references."""

import json
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from flax import serialization
from transformers import CLIPImageProcessorPil

from data_pipelines import schema
from data_pipelines.annotations import Annotation, AnnotationFileError, BadRow, Columns, read_annotations
from data_pipelines.build import BuildConfig, build_record
from data_pipelines.media import MediaError, decode_audio, decode_video

MEDIA = Path(__file__).parents[2] / "shared/media"
CLIP = MEDIA / "sample_00000007.mp4"
WAV = MEDIA / "sample_00000007.wav"
# linspace(0, 115, 16) cast to int, worked out by hand: 115 * k / 15 rounded down.
REFERENCE_INDICES = [0, 7, 15, 23, 30, 38, 46, 53, 61, 69, 76, 84, 92, 99, 107, 115]
FRAME_SIZE = 64


@pytest.fixture(scope="module")
def real_media() -> Path:
    if not CLIP.exists() or not WAV.exists():
        pytest.fail(f"reference media missing: expected {CLIP} and {WAV}")
    return MEDIA


def read_wav_int16(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)
        return np.frombuffer(f.readframes(f.getnframes()), np.int16)


def independent_frames(path: Path, indices: list[int], size: int) -> np.ndarray:
    """Single-threaded PyAV decode to PIL images, then transformers' CLIP resize + crop (no rescale/normalise)."""
    with av.open(str(path)) as container:
        images = [frame.to_image() for frame in container.decode(video=0)]
    assert len(images) == 116
    processor = CLIPImageProcessorPil(do_rescale=False, do_normalize=False, size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})
    pixels = processor(images=[images[i] for i in indices], return_tensors="np")["pixel_values"]
    return np.transpose(pixels, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def real_record(real_media) -> dict:
    config = BuildConfig(annotations=Path("unused.csv"), media_root=real_media, out=Path("unused"),
                         frame_size=FRAME_SIZE)
    annotation = Annotation(position=0, clip_id="sample_00000007", description="A person speaks.",
                            subtitle="hello", captions=["calm face"])
    return schema.decode_record(build_record(annotation, config))


def test_real_clip_frames_match_reference_indices_and_independent_decode(real_record):
    assert real_record["frame_indices"].tolist() == REFERENCE_INDICES
    assert real_record["frames"].shape == (16, FRAME_SIZE, FRAME_SIZE, 3)
    np.testing.assert_array_equal(real_record["frames"], independent_frames(CLIP, REFERENCE_INDICES, FRAME_SIZE))


def test_long_clip_two_pass_decode_gives_the_same_frames(real_record):
    """Past max_buffered_frames the decoder counts first and decodes again; the sampled frames must not change."""
    video = decode_video(CLIP, frame_size=FRAME_SIZE, max_buffered_frames=10)
    assert video.num_decoded_frames == 116
    np.testing.assert_array_equal(video.frame_indices, real_record["frame_indices"])
    np.testing.assert_array_equal(video.frames, real_record["frames"])


def test_real_clip_audio_matches_provided_wav(real_record):
    """The mp4's AAC track resampled by us vs the provided 16 kHz wav: within 2 LSB of int16, same alignment."""
    reference = read_wav_int16(WAV)
    audio = real_record["audio"]
    assert real_record["audio_length"] == len(audio) == len(reference)
    assert np.abs(audio.astype(np.int32) - reference).max() <= 2
    assert np.corrcoef(audio, reference)[0, 1] > 0.99999
    assert real_record["has_audio"] and real_record["has_video"]
    assert real_record["description"] == "A person speaks." and real_record["captions"] == ["calm face"]


def test_audio_is_cut_at_12_seconds_and_mixed_to_mono(tmp_path):
    rate, seconds = 22050, 13
    t = np.arange(rate * seconds) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.ones_like(t)
    path = tmp_path / "long.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(rate)
        f.writeframes((np.stack([left, right], 1) * 32767).astype(np.int16).tobytes())
    audio = decode_audio(path)
    assert audio.shape == (schema.MAX_AUDIO_SAMPLES,)
    t16 = np.arange(len(audio)) / 16000
    expected = (0.5 * np.sin(2 * np.pi * 440 * t16) + 0.25) / 2 * 32767
    assert np.abs(audio[1000:-1000] - expected[1000:-1000]).max() < 0.01 * 32767


@pytest.mark.parametrize("content, problem", [(b"", "empty file"), (b"not a video", "corrupt")])
def test_media_errors_name_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(MediaError, match=problem) as info:
        decode_video(path)
    assert str(path) in str(info.value)
    with pytest.raises(MediaError, match="file not found"):
        decode_video(tmp_path / "absent.mp4")


def small_record(**overrides) -> dict:
    record = schema.make_record("clip", frames=np.arange(16 * 4 * 4 * 3, dtype=np.uint8).reshape(16, 4, 4, 3),
                                frame_indices=np.arange(16), audio=np.array([1, -2, 3], np.int16),
                                subtitle="sub", description="desc", captions=["a", "b"],
                                cues={"visual": ["frown"], "auditory": [], "emotional": ["sad"]}, emotion="sad",
                                clip_cls=np.ones((16, 5), np.float32))
    record.update(overrides)
    return record


def test_round_trip_preserves_every_field():
    record = small_record()
    restored = schema.decode_record(schema.encode_record(record))
    assert set(restored) == set(record)
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            assert restored[key].dtype == value.dtype
            np.testing.assert_array_equal(restored[key], value)
        else:
            assert restored[key] == value, key


def test_record_without_video_or_audio():
    record = schema.decode_record(schema.encode_record(schema.make_record("a", audio=np.ones(4, np.int16))))
    assert not record["has_video"] and record["frames"].shape == (0, 0, 0, 3) and record["audio_length"] == 4
    record = schema.make_record("v", frames=np.zeros((16, 2, 2, 3), np.uint8), frame_indices=np.arange(16))
    assert record["has_video"] and not record["has_audio"]


@pytest.mark.parametrize("field, value, problem", [
    ("frames", np.zeros((15, 4, 4, 3), np.uint8), "expected \\[16, S, S, 3\\]"),
    ("frames", np.zeros((16, 4, 4, 3), np.float32), "dtype float32"),
    ("audio_length", 7, "!= len\\(audio\\)"),
    ("audio", np.zeros(3, np.float32), "dtype float32"),
    ("captions", "one caption", "list of strings"),
    ("clip_id", "", "empty"),
    ("hubert_frames", 3, "without hubert_hidden"),
    ("cues", {"visual": []}, "exactly the keys"),
])
def test_validation_names_the_field(field, value, problem):
    with pytest.raises(schema.RecordValidationError, match=problem) as info:
        schema.encode_record(small_record(**{field: value}))
    assert info.value.field == field


def test_missing_field_and_garbage_bytes_are_reported():
    record = small_record()
    del record["subtitle"]
    with pytest.raises(schema.RecordValidationError, match="'subtitle': missing"):
        schema.decode_record(serialization.msgpack_serialize(record))
    with pytest.raises(schema.RecordValidationError, match="not a msgpack record"):
        schema.decode_record(b"\xc1garbage")


def test_reader_refuses_newer_major_version_but_reads_newer_minor():
    newer_major = serialization.msgpack_serialize(small_record(version=f"{schema.SCHEMA_MAJOR + 1}.0"))
    with pytest.raises(schema.SchemaVersionError, match="newer than this reader"):
        schema.decode_record(newer_major)
    newer_minor = small_record(version=f"{schema.SCHEMA_MAJOR}.{schema.SCHEMA_MINOR + 1}", future_field=1)
    assert schema.decode_record(serialization.msgpack_serialize(newer_minor))["future_field"] == 1


def test_emer_csv_reads_as_is(tmp_path):
    path = tmp_path / "emer.csv"
    path.write_bytes('name,chinese,english\n'
                     'sample_00000007,中文,"In the video, a man frowns, then says ""fine""."\n'.encode())
    [entry] = read_annotations(path)
    assert entry == Annotation(position=0, clip_id="sample_00000007",
                               description='In the video, a man frowns, then says "fine".')


def test_json_forms_and_custom_columns(tmp_path):
    columns = Columns(clip_id="id", description="target", captions="caps")
    rows = [{"id": "a", "target": "t", "caps": ["x", "y"], "cues": {"visual": ["v"]}, "split": "train"},
            {"target": "no id"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"a": {"target": "t"}, "b": 5}))
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n")
    first, second = read_annotations(tmp_path / "a.json", columns)
    assert first.captions == ["x", "y"] and first.split == "train"
    assert first.cues == {"visual": ["v"], "auditory": [], "emotional": []}
    assert isinstance(second, BadRow) and "missing column 'id'" in second.reason
    by_name = read_annotations(tmp_path / "b.json", columns)
    assert by_name[0].clip_id == "a" and isinstance(by_name[1], BadRow)
    lines = read_annotations(tmp_path / "c.jsonl", columns)
    assert lines[0].clip_id == "a" and isinstance(lines[1], BadRow) and "line 2: bad JSON" in lines[1].reason


def test_non_utf8_row_is_reported_and_others_kept(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"name,english,subtitle\nok,fine,hi\nbad,fine,caf\xe9\n")
    ok, bad = read_annotations(path)
    assert ok.subtitle == "hi"
    assert bad == BadRow(1, "bad", "column 'subtitle': non-UTF-8 text")


def test_unreadable_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(AnnotationFileError, match="cannot read"):
        read_annotations(tmp_path / "absent.csv")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationFileError, match="unreadable JSON"):
        read_annotations(tmp_path / "bad.json")
    (tmp_path / "noid.csv").write_text("clip,english\na,b\n")
    with pytest.raises(AnnotationFileError, match="no clip id column 'name'"):
        read_annotations(tmp_path / "noid.csv")
