"""Downloads and copies into this node: one record per job, for the node state.

Jobs (node.models.pull, node.models.copy) run in worker threads or tasks and
report progress here; `snapshot()` is what `NodeState.transfers` carries. A
second request for a target already in progress joins the running job instead
of starting another (single-flight per destination). Finished jobs stay
visible for a while so a CLI polling for the outcome sees it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

from mesh.types import Transfer

# Finished transfers kept in the state (newest first) and for how long.
KEEP_FINISHED = 20
KEEP_FINISHED_SECONDS = 3600.0
# Progress notifications to coordinators at most this often per job.
NOTIFY_SECONDS = 0.25


class TransferJob:
    """One transfer's live record; its methods are safe from any thread."""

    def __init__(self, owner: Transfers, record: Transfer, key: str) -> None:
        self._owner = owner
        self._record = record
        self.key = key
        self._notified = 0.0
        # Set when the job ends (done or failed): for callers that wait.
        self.finished = threading.Event()
        # The task doing the job when it runs on the event loop (node.models.copy):
        # held here because the loop keeps only weak references to its tasks.
        self.task: asyncio.Task[None] | None = None

    @property
    def record(self) -> Transfer:
        return self._record

    @property
    def id(self) -> str:
        return self._record.id

    def progress(self, done: int, total: int | None = None) -> None:
        """Bytes done so far (and the total once known)."""
        with self._owner.lock:
            self._record = replace(
                self._record,
                bytes_done=done,
                bytes_total=self._record.bytes_total if total is None else total,
            )
        now = time.monotonic()
        if now - self._notified >= NOTIFY_SECONDS:
            self._notified = now
            self._owner.changed()

    def done(self, path: str = "", model: str = "") -> None:
        """Finished: the model is complete at `path`."""
        with self._owner.lock:
            r = self._record
            self._record = replace(
                r,
                state="done",
                path=path or r.path,
                model=model or r.model,
                bytes_done=max(r.bytes_done, r.bytes_total),
                finished=time.time(),
            )
        self._owner.ended(self)

    def fail(self, error: str) -> None:
        """Failed: `error` says why, for the CLI and the admin API."""
        with self._owner.lock:
            self._record = replace(self._record, state="failed", error=error, finished=time.time())
        self._owner.ended(self)


class Transfers:
    """Every transfer into this node: running ones, then recent finished ones."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        """`on_change` runs on the event loop that created this (after each update)."""
        self.lock = threading.Lock()
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._running: dict[str, TransferJob] = {}
        self._finished: list[TransferJob] = []

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop `on_change` must run on (when this was made outside it)."""
        self._loop = loop

    def running(self, key: str) -> TransferJob | None:
        """The job now writing to destination `key`, if any."""
        with self.lock:
            return self._running.get(key)

    def start(self, kind: str, model: str, source: str, *, key: str, path: str = "") -> TransferJob:
        """A new job for destination `key` (callers check `running(key)` first to join)."""
        record = Transfer(
            id=f"{kind}-{uuid.uuid4().hex[:10]}",
            kind=kind,
            model=model,
            source=source,
            started=time.time(),
            path=path,
        )
        job = TransferJob(self, record, key)
        with self.lock:
            if key in self._running:
                raise RuntimeError(f"a transfer to {key} is already running")
            self._running[key] = job
        self.changed()
        return job

    def get(self, transfer_id: str) -> Transfer | None:
        """A transfer by id (running or kept)."""
        with self.lock:
            for job in (*self._running.values(), *self._finished):
                if job.id == transfer_id:
                    return job.record
        return None

    def snapshot(self) -> tuple[Transfer, ...]:
        """Running transfers, then finished ones, newest first."""
        cutoff = time.time() - KEEP_FINISHED_SECONDS
        with self.lock:
            self._finished = [j for j in self._finished if j.record.finished >= cutoff]
            running = sorted((j.record for j in self._running.values()), key=lambda r: -r.started)
            return (*running, *(j.record for j in self._finished))

    def ended(self, job: TransferJob) -> None:
        with self.lock:
            if self._running.get(job.key) is job:
                del self._running[job.key]
            self._finished.insert(0, job)
            del self._finished[KEEP_FINISHED:]
        job.finished.set()
        self.changed()

    def changed(self) -> None:
        """Tell state watchers (from any thread)."""
        loop = self._loop
        if loop is None:
            self._on_change()
            return
        try:
            if asyncio.get_running_loop() is loop:
                self._on_change()
                return
        except RuntimeError:
            pass
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._on_change)
