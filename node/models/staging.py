"""A model being copied in: its hidden staging dir, resume bookkeeping, room on disk, install.

The receiving side of a copy (node.models.copy) streams files into
`<root>/.macmesh-partial/<model>/data/` (root: the models dir, or the Hugging
Face cache for hf-cache models; the same filesystem as the destination, so the
final move is a rename) next to `copy.json`, the manifest those partial files
belong to. `Staging.prepare` reconciles the two for a resume; `Staging.install`
moves verified files into place, the model's id unchanged. Everything here
blocks: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mesh.errors import BackendError, ModelLoadError, Overloaded
from node.config import NodeConfig
from node.models.files import PARTIAL_DIR, staging_dir

log = logging.getLogger(__name__)

STATE_FILE = "copy.json"
# Unfinished copies nobody resumed for this long are removed at the next copy.
STALE_PARTIAL_SECONDS = 7 * 24 * 3600.0


class CopyFailed(BackendError):
    """The copy itself went wrong (bad data, a file that changed): the message says how."""


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a source's manifest: path relative to the model, size, hex SHA-256."""

    path: str
    size: int
    sha256: str


def safe_rel(path: str) -> str:
    """A manifest path, refused unless it stays inside the model."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or any(s.startswith(".") for s in p.parts):
        raise CopyFailed(f"the source's manifest names an unsafe path {path!r}")
    return p.as_posix()


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_room(config: NodeConfig, root: Path, need: int, what: str) -> None:
    """Overloaded (RESOURCE_EXHAUSTED) naming both numbers when `need` bytes do not fit."""
    free = _free_bytes(root)
    usable = free - config.min_free_disk_bytes
    if need > usable:
        raise Overloaded(
            f"not enough disk space for {what}: {need / 1e6:,.1f} MB still to copy, "
            f"{max(usable, 0) / 1e6:,.1f} MB usable on {root} ({free / 1e6:,.1f} MB free, "
            f"{config.min_free_disk_bytes / 1e6:,.1f} MB kept free)"
        )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _drop_stale(partials: Path, keep: Path) -> None:
    """Remove unfinished copies nobody resumed for STALE_PARTIAL_SECONDS."""
    cutoff = time.time() - STALE_PARTIAL_SECONDS
    with contextlib.suppress(OSError):
        for d in partials.iterdir():
            if d != keep and d.is_dir() and d.stat().st_mtime < cutoff:
                state = d / STATE_FILE
                if not state.exists() or state.stat().st_mtime < cutoff:
                    log.info("removing an unfinished copy nobody resumed: %s", d)
                    shutil.rmtree(d, ignore_errors=True)


class Staging:
    """The staging dir of `model` under `root`; see the module docstring."""

    def __init__(self, root: Path, models_dir: Path, model: str) -> None:
        self.root = root
        self.models_dir = models_dir
        self.model = model
        self.dir = staging_dir(root, model)
        self.data = self.dir / "data"

    def staged_bytes(self) -> int:
        """Bytes the partial files hold now."""
        if not self.data.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.data.rglob("*") if p.is_file())

    def prepare(self, record: dict[str, Any], files: list[ManifestFile]) -> dict[str, int]:
        """Ready for a copy of `files`; bytes already there per file, to resume from.

        Partial files of a manifest entry that changed (or of no known manifest)
        are deleted; `record` (source, layout...) is saved with the manifest.
        """
        _drop_stale(self.root / PARTIAL_DIR, keep=self.dir)
        state_path = self.dir / STATE_FILE
        try:
            old = json.loads(state_path.read_text())
            kept = {f["path"]: (f["size"], f["sha256"]) for f in old["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            kept = {}
            shutil.rmtree(self.data, ignore_errors=True)
        self.data.mkdir(parents=True, exist_ok=True)
        wanted = {f.path: f for f in files}
        for rel, (size, sha) in kept.items():
            f = wanted.get(rel)
            if f is None or (f.size, f.sha256) != (size, sha):
                (self.data / rel).unlink(missing_ok=True)  # the source's file changed
        have: dict[str, int] = {}
        for f in files:
            part = self.data / f.path
            n = part.stat().st_size if part.is_file() else 0
            if n > f.size:
                part.unlink()
                n = 0
            have[f.path] = n
        state = {
            **record,
            "model": self.model,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        }
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)
        return have

    def install(self, layout: str, repo: str, revision: str, files: list[ManifestFile]) -> Path:
        """Move the verified files into place; where the model now is."""
        if self.root != self.models_dir:
            path = self._install_hf(layout, repo, revision, files)
        elif layout == "dir":
            path = self.models_dir / self.model
            if path.exists() or path.is_symlink():
                raise ModelLoadError(f"{path} already exists; not overwritten")
            os.rename(self.data, path)
        else:
            targets = [self.models_dir / f.path for f in files]
            taken = [str(t) for t in targets if t.exists() or t.is_symlink()]
            if taken:
                raise ModelLoadError(f"{', '.join(taken)} already exist(s); not overwritten")
            for f, target in reversed(list(zip(files, targets, strict=True))):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.data / f.path, target)  # the first shard (the id) last
            path = targets[0]
        _fsync_dir(path.parent)
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the last copy under way leaves no trace
            self.dir.parent.rmdir()
        return path

    def _install_hf(
        self, layout: str, repo_id: str, revision: str, files: list[ManifestFile]
    ) -> Path:
        if not repo_id or not revision:
            raise CopyFailed(f"the source's manifest of {self.model!r} names no repo/revision")
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        rev = safe_rel(revision)
        first = files[0].path
        if not repo.exists():
            build = self.dir / "repo"
            (build / "snapshots").mkdir(parents=True, exist_ok=True)
            (build / "refs").mkdir(exist_ok=True)
            os.rename(self.data, build / "snapshots" / rev)
            (build / "refs" / "main").write_text(rev)
            os.rename(build, repo)
            snapshot = repo / "snapshots" / rev
            return snapshot if layout == "dir" else snapshot / first
        # The repo exists (other files of it, another revision): files go in one by one,
        # config.json / the first shard last; an MLX repo then serves this revision.
        ref = repo / "refs" / "main"
        with contextlib.suppress(OSError):
            current = ref.read_text().strip()
            if layout == "file" and current and (repo / "snapshots" / current).is_dir():
                rev = current  # keep the repo's other GGUF files served
        snapshot = repo / "snapshots" / rev
        order = sorted(files, key=lambda f: f.path == "config.json")
        if layout == "file":
            order = list(reversed(files))
        for f in order:
            target = snapshot / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.data / f.path, target)
        ref.parent.mkdir(parents=True, exist_ok=True)
        if layout == "dir" or not ref.exists():
            tmp = ref.with_name(".main.tmp")
            tmp.write_text(rev)
            os.replace(tmp, ref)
        return snapshot if layout == "dir" else snapshot / first
