"""Model discovery: the models dir and a real Hugging Face cache layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mesh.errors import ModelNotFound
from node.models.catalog import Catalog, scan_hf_cache, scan_models_dir


def make_model_dir(path: Path, context: int = 2048) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "max_position_embeddings": context,
                "quantization": {"group_size": 64, "bits": 4},
            }
        )
    )
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def make_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshots of symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(Path("../../blobs") / digest, snapshot / name)
    return snapshot


def test_models_dir_scan(tmp_path: Path) -> None:
    make_model_dir(tmp_path / "tiny", context=4096)
    (tmp_path / "not-a-model").mkdir()
    make_model_dir(tmp_path / ".tiny.importing-123")  # in-progress import: hidden
    (tmp_path / "loose.gguf").write_bytes(b"GGUF")
    found = scan_models_dir(tmp_path)
    assert list(found) == ["tiny"]
    entry = found["tiny"]
    assert (entry.backend, entry.source, entry.context_length) == ("mlx", "models-dir", 4096)
    assert entry.quantization == "q4 (group 64)" and entry.size_bytes > 16


def test_missing_models_dir_is_empty(tmp_path: Path) -> None:
    assert scan_models_dir(tmp_path / "nope") == {}
    assert scan_hf_cache(tmp_path / "no-cache") == {}


def test_hf_cache_scan(tmp_path: Path) -> None:
    config = json.dumps({"model_type": "qwen2", "max_position_embeddings": 32768}).encode()
    make_hf_cache(
        tmp_path / "hub",
        "mlx-community/Tiny-4bit",
        {"config.json": config, "model.safetensors": b"\0" * 8, "tokenizer.json": b"{}"},
    )
    make_hf_cache(tmp_path / "hub", "someone/not-mlx", {"README.md": b"hi"})
    found = scan_hf_cache(tmp_path / "hub")
    assert list(found) == ["mlx-community/Tiny-4bit"]
    assert found["mlx-community/Tiny-4bit"].source == "hf-cache"
    assert found["mlx-community/Tiny-4bit"].context_length == 32768


def test_catalog_lookup_and_rescan(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_model_dir(models / "a")
    catalog = Catalog(models, hf_cache=False)
    assert catalog.get("a").id == "a"
    make_model_dir(models / "b")  # dropped in while running: found on lookup
    catalog._scanned_at = float("-inf")  # skip the rescan throttle
    assert catalog.get("b").id == "b"
    shutil.rmtree(models / "b")
    catalog._scanned_at = float("-inf")
    with pytest.raises(ModelNotFound) as info:
        catalog.get("b")
    assert info.value.available == ("a",)
    assert "available: a" in info.value.message
