"""The coordinator's config files: validation, atomic writes, reload on change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coordinator import settings as settings_mod
from coordinator.settings import SettingsStore, parse_inference_settings
from mesh.errors import InvalidRequest


@pytest.fixture(autouse=True)
def no_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_mod, "_CHECK_SECONDS", 0.0)


def test_defaults_without_files(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path, default_model="smollm2")
    cfg = store.routing()
    assert cfg.aliases == {} and cfg.default_model == "smollm2"
    assert store.inference().sampling.temperature is None


def test_replace_validates_writes_and_applies(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path)
    store.replace("aliases", {"fast": "qwen3-4b"})
    assert json.loads((tmp_path / "model_aliases.json").read_text()) == {"fast": "qwen3-4b"}
    assert store.routing().aliases["fast"].model == "qwen3-4b"
    with pytest.raises(InvalidRequest):
        store.replace("aliases", {"bad": 7})
    assert json.loads((tmp_path / "model_aliases.json").read_text()) == {"fast": "qwen3-4b"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp files left"


def test_hand_edits_reload_and_bad_edits_keep_last_good(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path)
    path = tmp_path / "inference_settings.json"
    path.write_text(json.dumps({"temperature": 0.2, "max_tokens": 100}))
    assert store.inference().sampling.temperature == 0.2
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    assert store.inference().sampling.temperature == 0.2
    assert "invalid JSON" in store.errors()["inference"]
    path.write_text(json.dumps({"temperature": 0.9, "enable_thinking": False}))
    os.utime(path, ns=(2, 2))
    inf = store.inference()
    assert inf.sampling.temperature == 0.9 and inf.enable_thinking is False
    assert store.errors() == {}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"top_k": True}, "top_k"),
        ({"enable_thinking": "no"}, "enable_thinking"),
    ],
)
def test_bad_inference_settings(data: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_inference_settings(data)
    assert info.value.field == field
