"""Following a pull or copy from the CLI: poll the coordinator's `GET /api/transfers/{id}`
and draw a progress bar on stderr (one line per 10% when stderr is not a terminal)."""

from __future__ import annotations

import time
from typing import Any, TextIO

from macmesh.admin_client import AdminClient, AdminError

POLL_SECONDS = 0.5
# A new transfer may take a moment to appear in the node state the coordinator holds.
NOT_LISTED_GRACE_SECONDS = 15.0
BAR_WIDTH = 30


def human_bytes(n: int | None) -> str:
    """1.2 GB, 850 MB, 12 kB; "?" when unknown."""
    if n is None:
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def progress_line(t: dict[str, Any], rate: float | None) -> str:
    """`[#####.....]  42.0%  41.9/99.8 MB  12.3 MB/s  MODEL` (no bar while the total is unknown)."""
    done = int(t.get("bytes_done") or 0)
    total = t.get("bytes_total")
    speed = f"{rate / 1e6:,.1f} MB/s" if rate is not None else "-- MB/s"
    name = t.get("model") or t.get("source") or ""
    if total:
        fraction = min(done / total, 1.0)
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (
            f"[{bar}] {100 * fraction:5.1f}%  {done / 1e6:,.1f}/{total / 1e6:,.1f} MB  "
            f"{speed}  {name}"
        )
    # No total yet: a pull asks the Hub for sizes, a copy waits for the source's hashes.
    return f"preparing  {done / 1e6:,.1f} MB  {speed}  {name}"


class ProgressBar:
    """Redraws one line on a terminal; elsewhere (a log) prints a line per 10%."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._step = -1
        self._last: tuple[float, int] | None = None
        self._rate: float | None = None

    def update(self, t: dict[str, Any]) -> None:
        now, done = time.monotonic(), int(t.get("bytes_done") or 0)
        if self._last is not None and now > self._last[0] and done >= self._last[1]:
            instant = (done - self._last[1]) / (now - self._last[0])
            # Smoothed: the node reports in chunks, so single polls jump.
            self._rate = instant if self._rate is None else 0.7 * self._rate + 0.3 * instant
        self._last = (now, done)
        line = progress_line(t, self._rate)
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
            return
        percent = t.get("percent")
        step = int(percent // 10) if isinstance(percent, int | float) else 0
        if step > self._step:
            self._step = step
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        """End the redrawn line (once)."""
        if self.tty and self._last is not None:
            self.out.write("\n")
            self.out.flush()
        self._last = None


def follow(
    client: AdminClient, transfer: dict[str, Any], bar: ProgressBar | None
) -> dict[str, Any]:
    """Poll the transfer until it ends; its last record. AdminError if it goes missing."""
    started = time.monotonic()
    tid = transfer["id"]
    while transfer.get("state") == "running":
        if bar is not None:
            bar.update(transfer)
        time.sleep(POLL_SECONDS)
        try:
            transfer = client.get(f"/api/transfers/{tid}")["transfer"]
        except AdminError as exc:
            missing = "HTTP 404" in str(exc)
            if missing and time.monotonic() - started < NOT_LISTED_GRACE_SECONDS:
                continue
            raise
    if bar is not None:
        bar.update(transfer)
    return transfer
