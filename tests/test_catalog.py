"""Model discovery: the models dir, a real Hugging Face cache layout, the watcher."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest

from mesh.errors import ModelNotFound
from node.models.catalog import Catalog
from node.models.scan import safetensors_problem, scan_hf_cache, scan_models_dir
from tests.gguf_fixtures import make_tiny, write_tiny_gguf


def safetensors_bytes(n_floats: int = 4) -> bytes:
    """A complete one-tensor safetensors file."""
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * n_floats)


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
    (path / "model.safetensors").write_bytes(safetensors_bytes())
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
        {"config.json": config, "model.safetensors": safetensors_bytes(), "tokenizer.json": b"{}"},
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
    assert catalog.entries() == {}  # nothing is scanned until asked: no I/O in lookups
    catalog.scan()
    assert catalog.get("a").id == "a"
    make_model_dir(models / "b")
    with pytest.raises(ModelNotFound):
        catalog.get("b")  # a lookup never scans
    catalog.scan()
    assert catalog.get("b").id == "b"
    shutil.rmtree(models / "b")
    catalog.scan()
    with pytest.raises(ModelNotFound) as info:
        catalog.get("b")
    assert info.value.available == ("a",)
    assert "available: a" in info.value.message


def wait_for(predicate: object, timeout: float = 10.0) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_watcher_publishes_models_copied_in_and_removed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    changes = threading.Semaphore(0)
    catalog = Catalog(models, hf_cache=False, poll_seconds=0.1)
    catalog.start(changes.release)
    try:
        tiny = write_tiny_gguf(tmp_path / "tiny.gguf", make_tiny())
        shutil.copy(tiny, models / "copied.gguf")
        wait_for(lambda: "copied.gguf" in catalog.entries(), 5)
        assert changes.acquire(timeout=1)
        assert catalog.get("copied.gguf").backend == "gguf"
        make_model_dir(models / "mlx-model")
        wait_for(lambda: "mlx-model" in catalog.entries(), 5)
        (models / "copied.gguf").unlink()
        wait_for(lambda: "copied.gguf" not in catalog.entries(), 5)
    finally:
        catalog.stop()


def test_half_copied_and_corrupt_files_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", make_tiny()).read_bytes()
    (models / "half.gguf").write_bytes(tiny[: len(tiny) // 2])  # a copy under way
    (models / "junk.gguf").write_bytes(b"not a gguf at all")
    (models / "good.gguf").write_bytes(tiny)
    half = make_model_dir(models / "half-mlx")
    full = safetensors_bytes(64)
    (half / "model.safetensors").write_bytes(full[:-100])
    make_model_dir(models / "ok-mlx")
    catalog = Catalog(models, hf_cache=False, poll_seconds=0.1)
    with caplog.at_level("WARNING"):
        found = catalog.scan()
    assert sorted(found) == ["good.gguf", "ok-mlx"]
    logged = caplog.text
    assert "half.gguf" in logged
    assert "junk.gguf" in logged and "half-mlx" in logged
    # The copy finishes: the next pass serves it.
    catalog.start()
    try:
        (models / "half.gguf").write_bytes(tiny)
        (half / "model.safetensors").write_bytes(full)
        wait_for(lambda: {"half.gguf", "half-mlx"} <= set(catalog.entries()), 5)
    finally:
        catalog.stop()


def test_safetensors_checks() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.safetensors"
        f.write_bytes(safetensors_bytes(8))
        assert safetensors_problem(f) is None
        f.write_bytes(safetensors_bytes(8)[:-1])
        assert "truncated" in (safetensors_problem(f) or "")
        f.write_bytes(b"\xff" * 16)
        assert "header length" in (safetensors_problem(f) or "")
        f.write_bytes(b"")
        assert safetensors_problem(f) == "shorter than a safetensors header"


def test_named_paths_and_the_hf_gguf_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLX Studio's `~/.cache/huggingface/gguf` is scanned; config paths serve where they exist."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "hf" / "gguf").mkdir(parents=True)
    write_tiny_gguf(tmp_path / "hf" / "gguf" / "Seed-Q4_K_M.gguf", make_tiny())
    (tmp_path / "elsewhere").mkdir()
    elsewhere = write_tiny_gguf(tmp_path / "elsewhere" / "named.gguf", make_tiny())
    named = [elsewhere, tmp_path / "not-on-this-mac.gguf", tmp_path / "no-such-dir"]
    catalog = Catalog(tmp_path / "models", named_paths=lambda: named)
    found = catalog.scan()
    assert found["Seed-Q4_K_M.gguf"].source == "gguf-dir"
    assert found["named.gguf"].source == "config" and found["named.gguf"].path == elsewhere
    assert "not-on-this-mac.gguf" not in found
    # --no-hf-cache turns the seed's GGUF folder off too.
    assert "Seed-Q4_K_M.gguf" not in Catalog(tmp_path / "m", hf_cache=False).scan()
