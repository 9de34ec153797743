"""`macmesh service`: keep this Mac's node (and coordinator) running under launchd.

    install    render deploy/launchd/<label>.plist.in for this machine, write it to
               ~/Library/LaunchAgents (--system: /Library/LaunchDaemons), then
               `launchctl bootout` (if loaded), `enable`, `bootstrap`
    uninstall  `launchctl bootout`, remove the plist
    status     `launchctl print`, parsed to state / pid / last exit
    logs       `tail` of the job's log file
    restart    `launchctl kickstart -k` (after an upgrade)

launchd never rotates StandardOutPath/StandardErrorPath, so the rendered command
line carries `--log-max-mb`: the process bounds its own log (macmesh/logbound.py).

Test-only escape hatch (Linux has no launchd): `MACMESH_LAUNCHCTL` names a
launchctl stand-in and lifts the macOS-only check; `MACMESH_LAUNCHD_DIR` is where
the plists go instead of the LaunchAgents/LaunchDaemons folder.

Modules, one job each: `common` (labels, paths, the error), `plist` (rendering
the job definitions), `launchctl` (driving and reading launchd), `install`
(what install/uninstall/status/logs/restart do), `cli` (the argparse surface).
"""

from macmesh.service.common import ServiceError
from macmesh.service.install import (
    InstallOptions,
    install,
    logs,
    restart,
    status,
    uninstall,
)
from macmesh.service.launchctl import parse_print
from macmesh.service.plist import render_plist

__all__ = [
    "InstallOptions",
    "ServiceError",
    "install",
    "logs",
    "parse_print",
    "render_plist",
    "restart",
    "status",
    "uninstall",
]
