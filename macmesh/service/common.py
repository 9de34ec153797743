"""What every `macmesh service` module shares: job labels, places, limits, the error."""

from __future__ import annotations

from pathlib import Path

ROLES = ("node", "coordinator")
LABELS = {"node": "io.macmesh.node", "coordinator": "io.macmesh.coordinator"}
LAUNCHCTL = "/bin/launchctl"
AGENTS_DIR = "Library/LaunchAgents"  # under the user's home
DAEMONS_DIR = Path("/Library/LaunchDaemons")
ENV_LAUNCHCTL = "MACMESH_LAUNCHCTL"  # test only
ENV_LAUNCHD_DIR = "MACMESH_LAUNCHD_DIR"  # test only
DEFAULT_LOG_MAX_MB = 10.0
# After PATH's own venv bin: Homebrew on Apple Silicon, then Intel, then the system.
SYSTEM_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
# `launchctl bootstrap` answers 5 (EIO) or 37 (EALREADY) while a booted-out job is still
# exiting; a second later the same call succeeds.
BOOTSTRAP_BUSY = frozenset({5, 37})
BOOTSTRAP_TRIES = 5
# bootout returns before the job has exited (`state = SIGTERMed`); wait out ExitTimeOut.
BOOTOUT_WAIT_S = 35.0
NO_LAUNCHD = (
    "launchd is macOS-only and this is {platform}: `macmesh service` cannot install anything "
    "here. On Linux run `macmesh node` / `macmesh coordinator` under systemd (Restart=always) "
    "or another supervisor."
)


class ServiceError(Exception):
    """Something `macmesh service` cannot do; the message says why and what to do."""
