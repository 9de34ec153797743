"""Driving launchd through `launchctl`: bootstrap, bootout, and reading `print`."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from macmesh.service.common import (
    AGENTS_DIR,
    BOOTOUT_WAIT_S,
    BOOTSTRAP_BUSY,
    BOOTSTRAP_TRIES,
    DAEMONS_DIR,
    ENV_LAUNCHCTL,
    ENV_LAUNCHD_DIR,
    LABELS,
    LAUNCHCTL,
    NO_LAUNCHD,
    ServiceError,
)


@dataclass(frozen=True)
class Launchd:
    """One launchd domain: `gui/<uid>` (LaunchAgents) or `system` (LaunchDaemons)."""

    launchctl: str
    plist_dir: Path
    domain: str

    def target(self, label: str) -> str:
        return f"{self.domain}/{label}"

    def plist_path(self, label: str) -> Path:
        return self.plist_dir / f"{label}.plist"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One launchctl call; its exit code and output are the caller's to judge."""
        return subprocess.run(
            [self.launchctl, *args], capture_output=True, text=True, timeout=60, check=False
        )


def launchd(*, system: bool) -> Launchd:
    """The launchd to drive, or ServiceError on a machine without one."""
    fake = os.environ.get(ENV_LAUNCHCTL)
    if not fake and (sys.platform != "darwin" or not Path(LAUNCHCTL).exists()):
        raise ServiceError(NO_LAUNCHD.format(platform=sys.platform))
    default_dir = DAEMONS_DIR if system else Path.home() / AGENTS_DIR
    plist_dir = Path(os.environ.get(ENV_LAUNCHD_DIR) or default_dir)
    domain = "system" if system else f"gui/{os.getuid()}"
    return Launchd(fake or LAUNCHCTL, plist_dir, domain)


@dataclass(frozen=True)
class ServiceStatus:
    """One role's job as launchd sees it."""

    role: str
    label: str
    plist: str
    installed: bool
    loaded: bool
    state: str | None = None
    pid: int | None = None
    last_exit: str | None = None
    runs: int | None = None
    log_file: str | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state == "running" and self.pid is not None


def parse_print(text: str) -> dict[str, str]:
    """The service's own `key = value` lines of `launchctl print`, nested blocks skipped.

    The output is `gui/501/label = {` then tab-indented fields (`state = running`,
    `pid = 1234`, `last exit code = (never exited)` or `= 78: EX_CONFIG`) and nested
    `name = {` ... `}` blocks (environment, endpoints) whose keys must not shadow them.
    """
    fields: dict[str, str] = {}
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("{"):
            depth += 1
        elif line.startswith("}"):
            depth = max(depth - 1, 0)
        elif depth <= 1 and " = " in line:
            key, value = line.split(" = ", 1)
            fields.setdefault(key.strip(), value.strip())
    return fields


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def service_status(ld: Launchd, role: str) -> ServiceStatus:
    """`launchctl print` of one role's job, with what its plist says."""
    label = LABELS[role]
    path = ld.plist_path(label)
    plist = read_plist(path)
    logs = plist.get("StandardOutPath") if plist else None
    result = ld.run("print", ld.target(label))
    base = ServiceStatus(
        role=role,
        label=label,
        plist=str(path),
        installed=plist is not None,
        loaded=result.returncode == 0,
        log_file=str(logs) if logs else None,
    )
    if result.returncode != 0:
        # 113: "Could not find service ... in domain for ...": not loaded.
        return replace(base, error=result.stderr.strip() or None)
    fields = parse_print(result.stdout)
    return replace(
        base,
        state=fields.get("state"),
        pid=_int(fields.get("pid")),
        last_exit=fields.get("last exit code"),
        runs=_int(fields.get("runs")),
    )


def read_plist(path: Path) -> dict[str, Any] | None:
    try:
        data = plistlib.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, plistlib.InvalidFileException, ValueError) as exc:
        raise ServiceError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def bootout(ld: Launchd, label: str) -> None:
    """Unload `label` if loaded and wait until launchd has let go of it.

    Not loaded is fine (exit 3 "No such process" or 113 "Could not find service"):
    success is judged by `print`, which fails once the job is gone.
    """
    result = ld.run("bootout", ld.target(label))
    deadline = time.monotonic() + BOOTOUT_WAIT_S
    while ld.run("print", ld.target(label)).returncode == 0:
        if time.monotonic() > deadline:
            why = result.stderr.strip() or f"exit {result.returncode}"
            raise ServiceError(f"{label} is still loaded after `launchctl bootout` ({why})")
        time.sleep(0.25)


def bootstrap(ld: Launchd, path: Path) -> None:
    for attempt in range(BOOTSTRAP_TRIES):
        result = ld.run("bootstrap", ld.domain, str(path))
        if result.returncode == 0:
            return
        if result.returncode not in BOOTSTRAP_BUSY or attempt == BOOTSTRAP_TRIES - 1:
            break
        time.sleep(1.0)
    why = result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}"
    raise ServiceError(
        f"`launchctl bootstrap {ld.domain} {path}` failed: {why}. "
        f"Check the plist with `plutil -lint {path}`."
    )
