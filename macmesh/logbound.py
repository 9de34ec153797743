"""`--log-max-mb`: a process that bounds its own stdout/stderr log files.

launchd opens StandardOutPath/StandardErrorPath append-only and never rotates
them, so a job started by `macmesh service install` checks its own log files
and copies them to `<file>.1` and truncates them past the bound.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LOG_CHECK_INTERVAL_S = 30.0


def _fd_path(fd: int) -> Path | None:
    """The file `fd` writes to (macOS: F_GETPATH; Linux: /proc), if it is still there."""
    try:
        if sys.platform == "darwin":
            import fcntl

            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            path = Path(os.fsdecode(raw.split(b"\0", 1)[0]))
        else:
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        st, mine = path.stat(), os.fstat(fd)
    except OSError:
        return None
    return path if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) else None


def _appending_files(fds: Iterable[int]) -> list[tuple[int, Path]]:
    """The regular files among `fds` opened O_APPEND (as launchd opens them), one fd each."""
    import fcntl
    import stat

    seen: set[tuple[int, int]] = set()
    found = []
    for fd in fds:
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        # Truncating a file not opened O_APPEND would leave the writer at its old offset.
        if not stat.S_ISREG(st.st_mode) or not flags & os.O_APPEND:
            continue
        path = _fd_path(fd)
        if path is not None and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            found.append((fd, path))
    return found


def rotate_if_big(fd: int, path: Path, max_bytes: int) -> bool:
    """Past `max_bytes`: copy the file to `<path>.1` (replacing it) and truncate it.

    Every writer appends (O_APPEND), so after the truncate they carry on at the new,
    empty end. Lines written between the copy and the truncate are lost.
    """
    if os.fstat(fd).st_size <= max_bytes:
        return False
    backup = path.with_name(path.name + ".1")
    tmp = path.with_name(path.name + ".1.tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, backup)
    os.ftruncate(fd, 0)
    return True


def bound_log_streams(
    max_bytes: int, *, interval: float = LOG_CHECK_INTERVAL_S, fds: Sequence[int] = (1, 2)
) -> threading.Thread | None:
    """Keep this process's stdout/stderr log files near `max_bytes` (`--log-max-mb`).

    Acts only on regular files opened for appending: launchd's StandardOutPath /
    StandardErrorPath, or `>>` by hand. Checks at once (a crash loop restarts through
    here) and then every `interval` seconds from a daemon thread; one `.1` is kept.
    """
    files = _appending_files(fds)
    if not files:
        return None

    def check() -> None:
        for fd, path in files:
            try:
                rotate_if_big(fd, path, max_bytes)
            except OSError as exc:
                log.warning("cannot rotate %s: %s", path, exc)

    def watch() -> None:
        while True:
            time.sleep(interval)
            check()

    check()
    thread = threading.Thread(target=watch, name="log-bound", daemon=True)
    thread.start()
    return thread
