"""The node's models on disk, kept current by a watcher thread.

What it watches: the models dir (MLX dirs and `*.gguf` files), the Hugging
Face cache (MLX repos and GGUF files), `~/.cache/huggingface/gguf` (where MLX
Studio keeps GGUF files), the `model_dirs` of `gguf_config.json`, and models
that config files name by path. A thread scans them at start, then polls a
stat-only fingerprint every `poll_seconds` and rescans when it moved (and every
`full_rescan_seconds` regardless), so a model copied in is advertised within
seconds without a restart.

The event loop only ever reads the published snapshot: `entries()` and
`get()` never scan and never take a lock. `refresh()` scans in a worker
thread, single-flight, for a request naming a model the snapshot lacks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from mesh.errors import ModelNotFound
from node.models.entry import CatalogEntry
from node.models.gguf_catalog import scan_gguf_dir
from node.models.scan import (
    default_hf_cache,
    fingerprint,
    hf_home,
    scan_hf_cache,
    scan_models_dir,
    scan_named_paths,
)

__all__ = ["Catalog", "CatalogEntry"]

log = logging.getLogger(__name__)

# A request for a model the snapshot lacks rescans at most this often.
_REFRESH_SECONDS = 1.0


class Catalog:
    """The node's models on disk; see the module docstring."""

    def __init__(
        self,
        models_dir: Path,
        *,
        hf_cache: bool = True,
        hf_cache_dir: Path | None = None,
        gguf_dirs: Callable[[], tuple[Path, ...]] = tuple,
        named_paths: Callable[[], Iterable[Path]] = tuple,
        poll_seconds: float = 1.0,
        full_rescan_seconds: float = 60.0,
    ) -> None:
        """`gguf_dirs` and `named_paths` are called at each scan: configs change while
        the node runs. `hf_cache` False also skips `~/.cache/huggingface/gguf`."""
        self.models_dir = models_dir
        self.hf_cache = hf_cache
        self.hf_cache_dir = hf_cache_dir
        self.gguf_dirs = gguf_dirs
        self.named_paths = named_paths
        self.poll_seconds = poll_seconds
        self.full_rescan_seconds = full_rescan_seconds
        self._entries: Mapping[str, CatalogEntry] = MappingProxyType({})
        # Serializes scans (thread side only: the event loop never takes it).
        self._scan_lock = threading.Lock()
        self._scanned_at = float("-inf")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._refreshing: asyncio.Future[None] | None = None
        self.scans = 0
        self.last_scan_seconds = 0.0

    # ---------- reading (any thread, the event loop included) ----------

    def entries(self) -> Mapping[str, CatalogEntry]:
        """All models by id, as of the last scan (read-only, no scan, no lock)."""
        return self._entries

    def get(self, model_id: str) -> CatalogEntry:
        """The entry for `model_id`; ModelNotFound lists what is available."""
        entries = self._entries
        entry = entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id, entries)
        return entry

    # ---------- scanning ----------

    def _gguf_folders(self) -> list[Path]:
        folders = list(self.gguf_dirs())
        if self.hf_cache:
            folders.insert(0, hf_home() / "gguf")  # MLX Studio's GGUF folder
        return folders

    def _hub(self) -> Path:
        return self.hf_cache_dir if self.hf_cache_dir is not None else default_hf_cache()

    def _fingerprint(self, named: list[Path]) -> int:
        watched = [(self.models_dir, 2), *((d, 2) for d in self._gguf_folders())]
        return fingerprint(watched, named, self._hub() if self.hf_cache else None)

    def _collect(self, named: list[Path]) -> dict[str, CatalogEntry]:
        """One pass; later places shadow earlier ones (the models dir wins)."""
        found: dict[str, CatalogEntry] = {}
        steps: list[tuple[str, Callable[[], dict[str, CatalogEntry]]]] = []
        if self.hf_cache:
            steps.append(("the Hugging Face cache", lambda: scan_hf_cache(self.hf_cache_dir)))
        for folder in self._gguf_folders():
            steps.append((str(folder), functools.partial(scan_gguf_dir, folder, "gguf-dir")))
        steps += [
            ("paths named in config files", lambda: scan_named_paths(named)),
            (str(self.models_dir), lambda: scan_gguf_dir(self.models_dir, "models-dir")),
            (str(self.models_dir), lambda: scan_models_dir(self.models_dir)),
        ]
        for where, step in steps:
            try:
                found.update(step())
            except OSError as exc:  # one unreadable place never stops the scan
                log.warning("catalog: cannot scan %s: %s", where, exc)
        return found

    def _named(self) -> list[Path]:
        try:
            return sorted({Path(p).expanduser() for p in self.named_paths()})
        except OSError as exc:
            log.warning("catalog: cannot read the config files' model paths: %s", exc)
            return []

    def scan(self) -> Mapping[str, CatalogEntry]:
        """Scan now (blocking; call from a thread, never the event loop) and publish."""
        with self._scan_lock:
            return self._scan_locked(self._named())

    def _scan_locked(self, named: list[Path]) -> Mapping[str, CatalogEntry]:
        t0 = time.perf_counter()
        found = self._collect(named)
        self.last_scan_seconds = time.perf_counter() - t0
        self.scans += 1
        self._scanned_at = time.monotonic()
        old = self._entries
        if found != dict(old):
            added = sorted(set(found) - set(old))
            gone = sorted(set(old) - set(found))
            if added or gone:
                log.info(
                    "catalog: %d models%s%s",
                    len(found),
                    f"; new: {', '.join(added)}" if added else "",
                    f"; gone: {', '.join(gone)}" if gone else "",
                )
            self._entries = MappingProxyType(found)
            self._on_change()
        return self._entries

    async def refresh(self) -> Mapping[str, CatalogEntry]:
        """Rescan in a worker thread unless one finished under a second ago; single-flight."""
        if time.monotonic() - self._scanned_at < _REFRESH_SECONDS:
            return self._entries
        pending = self._refreshing
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._refresh_if_old))
            pending.add_done_callback(self._refreshed)
            self._refreshing = pending
        await asyncio.shield(pending)
        return self._entries

    def _refreshed(self, done: asyncio.Future[None]) -> None:
        if self._refreshing is done:
            self._refreshing = None

    def _refresh_if_old(self) -> None:
        with self._scan_lock:
            if time.monotonic() - self._scanned_at >= _REFRESH_SECONDS:
                self._scan_locked(self._named())

    # ---------- the watcher ----------

    def start(self, on_change: Callable[[], None] = lambda: None) -> None:
        """Start the watcher thread; `on_change` runs on it after each published change."""
        if self._thread is not None:
            return
        self._on_change = on_change
        self._stopping.clear()
        self._thread = threading.Thread(target=self._watch, name="catalog-watcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Rescan soon (a config naming model paths changed)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop the watcher (it finishes the scan under way, if any)."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    def _watch(self) -> None:
        last_print: int | None = None
        full_due = 0.0
        while not self._stopping.is_set():
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                named = self._named()
                now_print = self._fingerprint(named)
                if woken or now_print != last_print or time.monotonic() >= full_due:
                    with self._scan_lock:
                        self._scan_locked(named)
                    last_print = now_print
                    full_due = time.monotonic() + self.full_rescan_seconds
            except Exception:
                log.exception("catalog: scan failed; retrying")
            self._wake.wait(self.poll_seconds)
