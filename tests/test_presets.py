"""Architecture presets: equal to the published config.json files, and what configs and old checkpoints name."""

import json
from pathlib import Path

import pytest

from configs import sft
from xemogpt_jax import run_config
from xemogpt_jax.models import presets
from xemogpt_jax.models.clip import CLIPConfig
from xemogpt_jax.models.hubert import HubertConfig
from xemogpt_jax.models.qwen3 import Qwen3Config

PUBLISHED = Path(__file__).parent / "fixtures" / "published_configs"  # sources: its README.md
PARSERS = {"llm": Qwen3Config.from_hf, "clip": CLIPConfig.from_hf, "hubert": HubertConfig.from_hf}


def _differences(ours: dict, published: dict, where: str = "") -> list[str]:
    """Every preset field (nested ones too) whose published value differs or is absent."""
    found = []
    for key, value in ours.items():
        if isinstance(value, dict):
            found += _differences(value, published.get(key, {}), f"{where}{key}.")
        elif key not in published or published[key] != value:
            found.append(f"{where}{key}: preset {value!r}, published {published.get(key, '<absent>')!r}")
    return found


@pytest.mark.parametrize("part, name", [("llm", "qwen3-4b"), ("clip", "clip-vit-l14"), ("hubert", "hubert-large")])
def test_preset_equals_the_published_config_field_by_field(part, name):
    published = json.loads((PUBLISHED / f"{name}.json").read_text())
    ours = presets.get(part, name)
    assert not _differences(ours, published)
    assert PARSERS[part](ours) == PARSERS[part](published)  # and the port reads nothing else from the file


def test_config_names_a_preset_and_old_checkpoints_hold_fields():
    """A preset name and the same fields as a dict (a run config stored by an older checkpoint) build one model."""
    named = sft.get_config("tiny")
    stored = run_config.as_dict(named)
    stored["model"].update(
        llm=presets.get("llm", "tiny"), clip=presets.get("clip", "tiny"), hubert=presets.get("hubert", "tiny"),
        video_text_dim=32, audio_text_dim=32,
    )
    del stored["model"]["text_encoder"]  # older run configs recorded the widths instead
    assert run_config.xemogpt_config(named) == run_config.xemogpt_config(stored)
    assert run_config.xemogpt_config(named).llm.hidden_size == presets.TINY_QWEN3["hidden_size"]


def test_bridge_text_heads_take_the_encoders_widths():
    paper = run_config.xemogpt_config(sft.get_config())
    assert paper.video_text_dim == presets.CLIP_VIT_L14["projection_dim"]
    assert paper.audio_text_dim == presets.LABSE["hidden_size"]
    config = sft.get_config("tiny")
    run_config.set_architecture(config, "clip", projection_dim=24)
    assert run_config.xemogpt_config(config).vecb.text_dim == 24


def test_unknown_preset_names_the_choices():
    config = sft.get_config("tiny")
    config.model.llm = "qwen3-8b"
    with pytest.raises(KeyError, match=r"unknown llm preset 'qwen3-8b'.*qwen2\.5-7b.*qwen3-4b.*tiny"):
        run_config.xemogpt_config(config)


def test_presets_are_copies():
    presets.get("llm", "tiny")["hidden_size"] = 1
    assert presets.get("llm", "tiny")["hidden_size"] == 64
