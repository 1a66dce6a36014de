"""The HTML report: self-contained, and rendered by headless Chromium into a non-blank page."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from data_pipelines import schema, synth
from xemogpt_jax import emocue360, report

FRAME_RGB = (210, 20, 170)
BAR_RGB = (0x4C, 0x72, 0xB0)  # the precision bars' colour in report.METRICS
VECTORS = {"smile": (1.0, 0.0), "grin": (0.8, 0.6), "calm voice": (0.0, 1.0), "happy": (1.0, 0.0), "glad": (0.6, 0.8)}
GT = {
    "clip_1": {"visual": ["smile"], "auditory": ["calm voice"], "emotional": ["happy"]},
    "clip_2": {"visual": ["smile"], "auditory": [], "emotional": ["happy"]},
}
PRED = {
    "clip_1": {"visual": ["grin", "smile"], "auditory": ["calm voice"], "emotional": ["glad"]},
    "clip_2": {"visual": [], "auditory": ["calm voice"], "emotional": ["glad"]},
}


def _inputs(tmp_path):
    scores = emocue360.score(PRED, GT, lambda texts: np.array([VECTORS[t] for t in texts]))
    paths = {name: tmp_path / f"{name}.json" for name in ("scores", "pred", "gt")}
    for name, data in (("scores", scores), ("pred", PRED), ("gt", GT)):
        paths[name].write_text(json.dumps(data))
    explanations = tmp_path / "explanations.jsonl"
    explanations.write_text(
        json.dumps({"name": "clip_1", "explanation": "He <b>grins</b> & smiles.", "subtitle": "Great news!"}) + "\n"
    )
    frames = np.zeros((16, 32, 32, 3), np.uint8) + np.array(FRAME_RGB, np.uint8)
    record = schema.make_record("clip_1", frames=frames, frame_indices=np.arange(16), subtitle="from the record")
    synth.write_split([record], num_records=1, out=tmp_path / "records", fingerprint={"test": True})
    return paths, explanations


def _write_report(tmp_path) -> str:
    paths, explanations = _inputs(tmp_path)
    out = tmp_path / "report.html"
    code = report.main([
        "--scores", str(paths["scores"]), "--pred", str(paths["pred"]), "--gt", str(paths["gt"]),
        "--explanations", str(explanations), "--frames", str(tmp_path / "records"), "--out", str(out),
    ])
    assert code == 0
    return out


def test_page_is_self_contained_and_escaped(tmp_path):
    page = _write_report(tmp_path).read_text()
    assert "He &lt;b&gt;grins&lt;/b&gt; &amp; smiles." in page
    assert "Great news!" in page  # the explanations file's subtitle wins over the record's
    assert page.count('src="data:image/png;base64,') == report.STRIP_FRAMES
    assert "<svg" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "<link" not in page and "<script" not in page
    assert "not scored" in page  # clip_2's auditory ground truth is empty
    assert "no predicted cues" in page  # clip_2's visual prediction is empty


def test_frames_from_an_image_folder(tmp_path):
    (tmp_path / "imgs" / "clip_1").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 10), FRAME_RGB).save(tmp_path / "imgs" / "clip_1" / f"{i:02d}.png")
    frames = report.frames_from_images(tmp_path / "imgs", {"clip_1", "clip_2"})
    assert list(frames) == ["clip_1"] and len(frames["clip_1"]) == 3
    assert frames["clip_1"][0].shape == (10, 20, 3)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is required: apt-get install -y chromium")


def test_renders_in_headless_chromium(tmp_path):
    page = _write_report(tmp_path)
    screenshot = tmp_path / "shot.png"
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1400", f"--screenshot={screenshot}", page.as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 10, "blank screenshot"
    assert len(np.unique(pixels, axis=0)) > 50
    assert (pixels == BAR_RGB).all(1).sum() > 100, "the SVG bar plot did not render"
    assert (pixels == FRAME_RGB).all(1).sum() > 1000, "the inlined frames did not render"


def test_faithfulness_page_marks_each_cue_and_shows_the_frame_strip():
    frames = np.zeros((16, 32, 32, 3), np.uint8) + np.array(FRAME_RGB, np.uint8)
    marks = {"visual": [("the person is smiling", "hallucinated"), ("the brows are <raised>", "right")],
             "auditory": [("the voice is loud", "wrong")], "emotional": []}
    missed = {"visual": ["the eyes are wide"], "auditory": [], "emotional": []}
    section = report.verdict_section("clip_1+audio:clip_2", "swap (a)", frames, "He smiles & laughs.", marks, missed)
    assert section.count('src="data:image/png;base64,') == report.STRIP_FRAMES
    assert '<tr class="cue verdict-hallucinated"><td>the person is smiling</td>' in section
    assert '<tr class="cue verdict-right"><td>the brows are &lt;raised&gt;</td>' in section
    assert '<tr class="cue verdict-wrong"><td>the voice is loud</td>' in section
    assert '<tr class="cue verdict-missed"><td>the eyes are wide</td>' in section
    assert "He smiles &amp; laughs." in section and "no cues" in section  # the emotional axis is empty
    tables = {"stages 1-2-3": ({"conflict clips": [0.5, None]}, {"conflict clips": 3})}
    page = report.faithfulness_page("demo", ("F1 vis", "halluc aud"), tables, [section])
    assert '<tr><td>conflict clips (3)</td><td class="num">0.500</td><td class="num">-</td></tr>' in page
    assert page.index("<table>") < page.index(section) and "<script" not in page
