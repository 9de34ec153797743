"""The `macmesh service` command line: argparse, stopping at the install options."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from macmesh.service.common import DEFAULT_LOG_MAX_MB, ROLES, ServiceError
from macmesh.service.install import InstallOptions, install, logs, restart, status, uninstall
from mesh.paths import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT


def cmd_service(args: argparse.Namespace) -> int:
    """`macmesh service ACTION`; a ServiceError is printed and exits 1."""
    roles = ROLES if args.role == "both" else (args.role,)
    action = args.service_command
    try:
        if action == "install":
            opts = InstallOptions(
                roles=roles,
                system=args.system,
                user=args.user,
                host=args.host,
                grpc_port=args.grpc_port,
                http_port=args.http_port,
                log_max_mb=args.service_log_max_mb,
                extra=tuple(args.extra),
                dry_run=args.dry_run,
            )
            return install(opts)
        if action == "status":
            return status(roles, system=args.system, as_json=args.json)
        if action == "logs":
            return logs(roles, system=args.system, lines=args.lines, follow=args.follow)
        return {"uninstall": uninstall, "restart": restart}[action](roles, system=args.system)
    except ServiceError as exc:
        print(f"macmesh service: {exc}", file=sys.stderr)
        return 1


def _common(p: argparse.ArgumentParser, role_default: str) -> None:
    p.add_argument(
        "--role",
        choices=(*ROLES, "both"),
        default=role_default,
        help=f"which job (default {role_default})",
    )
    p.add_argument(
        "--system",
        action="store_true",
        help="a LaunchDaemon in /Library/LaunchDaemons: starts at boot with nobody logged in "
        "(headless Mac minis; needs sudo)",
    )


def add_service_parser(sub: Any) -> None:
    """Register `macmesh service ...` on the top-level subparsers."""
    p = sub.add_parser(
        "service",
        help="run the node (and coordinator) under launchd: at boot, restarted (macOS)",
        description="Install this Mac's node and/or coordinator as launchd jobs that start at "
        "login (or at boot with --system) and restart when they exit. See docs/launchd.md.",
    )
    p.set_defaults(func=cmd_service)
    ssub = p.add_subparsers(dest="service_command", required=True, metavar="ACTION")

    q = ssub.add_parser(
        "install",
        help="write the launchd plist(s) and load them (again: replaces cleanly)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags after -- go to the role's command, after the ones above (they win):\n"
        "  macmesh service install --role node -- --preload qwen3 --mesh lab",
    )
    _common(q, "node")
    q.add_argument("--user", help="with --system: the account the jobs run as (default: sudo's)")
    q.add_argument(
        "--host",
        default="0.0.0.0",
        help="bind address of the node (gRPC) and coordinator (HTTP); default 0.0.0.0, the lab "
        "can reach them (needs the mesh secret)",
    )
    q.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="node gRPC port")
    q.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="coordinator port")
    q.add_argument(
        "--log-max-mb",
        dest="service_log_max_mb",
        type=float,
        default=DEFAULT_LOG_MAX_MB,
        metavar="MB",
        help=f"bound of each job's log; one .1 is kept (default {DEFAULT_LOG_MAX_MB:g})",
    )
    q.add_argument("--dry-run", action="store_true", help="print the plist(s), change nothing")
    q.add_argument("extra", nargs="*", metavar="-- FLAGS", help="more flags for the role")

    q = ssub.add_parser("uninstall", help="unload and remove the job(s)")
    _common(q, "both")

    q = ssub.add_parser("status", help="running / pid / last exit (exit 3 if not all running)")
    _common(q, "both")
    q.add_argument("--json", action="store_true", help="machine-readable output")

    q = ssub.add_parser("logs", help="tail the job log(s)")
    _common(q, "both")
    q.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    q.add_argument("-f", "--follow", action="store_true", help="keep following")

    q = ssub.add_parser("restart", help="kickstart -k the installed job(s), e.g. after upgrade")
    _common(q, "both")
