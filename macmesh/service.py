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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import plistlib
import pwd
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from string import Template
from typing import Any

from mesh.paths import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, macmesh_home

log = logging.getLogger(__name__)

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


# ---------- rendering ----------


def template_dir() -> Path:
    """deploy/launchd of a source checkout, else `<prefix>/share/macmesh/launchd`."""
    here = Path(__file__).resolve().parents[1] / "deploy" / "launchd"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "macmesh" / "launchd"


def python_executable() -> Path:
    """This environment's python, absolute but not resolved: a venv's `bin/python` is a
    symlink, and only the link's own path makes Python pick the venv's site-packages."""
    if not sys.executable:
        raise ServiceError("cannot tell which python runs macmesh (sys.executable is empty)")
    return Path(sys.executable).absolute()


def service_path(python: Path) -> str:
    """PATH for the job: the venv's bin (its llama-server), Homebrew, then the system."""
    return ":".join(dict.fromkeys([str(python.parent), *SYSTEM_PATH]))


def log_file(home: Path, role: str) -> Path:
    """Where launchd sends a role's stdout and stderr."""
    return home / "logs" / f"macmesh-{role}.log"


def render_plist(
    role: str,
    *,
    home: Path,
    user_home: Path,
    args: Sequence[str],
    log_max_mb: float = DEFAULT_LOG_MAX_MB,
    python: Path | None = None,
    user: str | None = None,
    templates: Path | None = None,
) -> dict[str, Any]:
    """The launchd job for `role`, from its template, with every path absolute.

    `home` is MACMESH_HOME, `user_home` HOME, `args` the role's flags; `user` (for a
    LaunchDaemon) is the account the job runs as.
    """
    label = LABELS[role]
    python = python or python_executable()
    home, user_home = home.expanduser().absolute(), user_home.expanduser().absolute()
    path = (templates or template_dir()) / f"{label}.plist.in"
    try:
        template = plistlib.loads(path.read_bytes())
    except (OSError, plistlib.InvalidFileException) as exc:
        raise ServiceError(f"cannot read the launchd template {path}: {exc}") from None
    values = {
        "PYTHON": str(python),
        "MACMESH_HOME": str(home),
        "HOME": str(user_home),
        "PATH": service_path(python),
        "LOG_FILE": str(log_file(home, role)),
        "LOG_MAX_MB": f"{log_max_mb:g}",
    }
    try:
        plist = _fill(template, values, list(args))
    except (KeyError, ValueError) as exc:
        raise ServiceError(f"{path}: unknown or malformed placeholder {exc}") from None
    if not isinstance(plist, dict) or plist.get("Label") != label:
        raise ServiceError(f"{path}: expected a dict with Label {label}")
    if user is not None:
        plist["UserName"] = user
    return plist


def _fill(node: Any, values: dict[str, str], args: list[str]) -> Any:
    """Substitute ${NAME} in every string; an array element "${ARGS}" becomes `args`."""
    if isinstance(node, str):
        return Template(node).substitute(values)
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            if item == "${ARGS}":
                out.extend(args)
            else:
                out.append(_fill(item, values, args))
        return out
    if isinstance(node, dict):
        return {k: _fill(v, values, args) for k, v in node.items()}
    return node


def role_args(
    role: str,
    *,
    host: str,
    grpc_port: int,
    http_port: int,
    extra: Sequence[str] = (),
    both: bool = False,
) -> list[str]:
    """The role's flags; `extra` last, so a flag given there wins (argparse keeps the last)."""
    if role == "node":
        return ["--host", host, "--grpc-port", str(grpc_port), *extra]
    args = ["--host", host, "--port", str(http_port)]
    if both and grpc_port != DEFAULT_GRPC_PORT:
        # The coordinator's default peer is the local node on the default port.
        args += ["--peer", f"127.0.0.1:{grpc_port}"]
    return [*args, *extra]


# ---------- launchctl ----------


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
    plist = _read_plist(path)
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


def _read_plist(path: Path) -> dict[str, Any] | None:
    try:
        data = plistlib.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, plistlib.InvalidFileException, ValueError) as exc:
        raise ServiceError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def _bootout(ld: Launchd, label: str) -> None:
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


def _bootstrap(ld: Launchd, path: Path) -> None:
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


# ---------- install / uninstall / status / logs / restart ----------


@dataclass(frozen=True)
class Account:
    """Whose job it is: the user it runs as and where that user's state lives."""

    name: str
    uid: int
    gid: int
    home: Path
    macmesh_home: Path


def account(*, system: bool, user: str | None) -> Account:
    """The current user for a LaunchAgent; for a LaunchDaemon `user`, else sudo's caller."""
    if not system:
        if user:
            raise ServiceError("--user goes with --system (a LaunchAgent runs as you)")
        pw = pwd.getpwuid(os.getuid())
        return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, Path.home(), macmesh_home().absolute())
    name = user or os.environ.get("SUDO_USER")
    if not name or (name == "root" and not user):
        raise ServiceError(
            "--system: say which user the services run as, with --user NAME "
            "(run through sudo, your own account is the default; root only as --user root)"
        )
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ServiceError(f"--user: no such user {name!r}") from None
    env_home = os.environ.get("MACMESH_HOME")
    home = Path(env_home).expanduser() if env_home else Path(pw.pw_dir) / ".macmesh"
    return Account(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), home.absolute())


def _need_root(system: bool) -> None:
    if system and os.geteuid() != 0:
        raise ServiceError(
            "--system writes /Library/LaunchDaemons and the system domain: run it with sudo"
        )


def _is_loopback(host: str) -> bool:
    # The rule node.app.is_loopback applies when the node decides whether to refuse.
    return host in ("localhost", "::1") or host.startswith("127.")


def _last_value(args: Sequence[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _check_secret(home: Path, args: Sequence[str]) -> None:
    """Refuse what the node would refuse at boot: a non-loopback bind without a secret."""
    from mesh.auth import AuthConfigError, load_secret

    host = _last_value(args, "--host") or "127.0.0.1"
    if _is_loopback(host) or "--insecure" in args:
        return
    try:
        # launchd passes no MACMESH_SECRET from this shell: only the key file counts.
        secret = load_secret(home, env={})
    except AuthConfigError as exc:
        raise ServiceError(str(exc)) from None
    if secret is None:
        raise ServiceError(
            f"no mesh secret in {home / 'secret'}, and the service would listen on {host}. "
            "Run `macmesh init` on one Mac and copy that secret file to the same place on "
            "every Mac (chmod 600); MACMESH_SECRET in your shell does not reach launchd. "
            "(--host 127.0.0.1 keeps it on this Mac; `-- --insecure` serves without a secret.)"
        )


def _make_dirs(owner: Account, *dirs: Path) -> None:
    """Create `dirs`; as root, hand the new ones to the account the job runs as."""
    for d in dirs:
        missing = [p for p in (d, *d.parents) if not p.exists()]
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0 and owner.uid != 0:
            for p in missing:
                os.chown(p, owner.uid, owner.gid)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # launchd refuses plists that group or others can write.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class InstallOptions:
    """What `macmesh service install` was asked for."""

    roles: tuple[str, ...]
    system: bool = False
    user: str | None = None
    host: str = "0.0.0.0"
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    log_max_mb: float = DEFAULT_LOG_MAX_MB
    extra: tuple[str, ...] = ()
    dry_run: bool = False


def install(opts: InstallOptions) -> int:
    """Render, write and (re)load each role's job; installing again replaces it cleanly."""
    if opts.extra and len(opts.roles) > 1:
        raise ServiceError(
            "flags after -- would go to both roles: install them one at a time "
            "(--role node -- ..., then --role coordinator -- ...)"
        )
    if opts.log_max_mb <= 0:
        raise ServiceError("--log-max-mb must be > 0")
    ld = None if opts.dry_run else launchd(system=opts.system)
    if not opts.dry_run:
        _need_root(opts.system)
    who = account(system=opts.system, user=opts.user)
    ports = {"grpc_port": opts.grpc_port, "http_port": opts.http_port}
    plists = {
        role: render_plist(
            role,
            home=who.macmesh_home,
            user_home=who.home,
            args=role_args(
                role, host=opts.host, extra=opts.extra, both=len(opts.roles) > 1, **ports
            ),
            log_max_mb=opts.log_max_mb,
            user=who.name if opts.system else None,
        )
        for role in opts.roles
    }
    if ld is None:
        for plist in plists.values():
            sys.stdout.write(plistlib.dumps(plist, sort_keys=False).decode())
        return 0
    for plist in plists.values():
        _check_secret(who.macmesh_home, plist["ProgramArguments"])
    _make_dirs(who, who.macmesh_home, who.macmesh_home / "logs")
    for role, plist in plists.items():
        label = LABELS[role]
        path = ld.plist_path(label)
        _write_atomic(path, plistlib.dumps(plist, sort_keys=False))
        _bootout(ld, label)
        # A job once disabled (`launchctl disable`) would not load: clear that first.
        ld.run("enable", ld.target(label))
        _bootstrap(ld, path)
        print(f"installed {label}: {path}")
        print(f"  runs  {shlex.join(plist['ProgramArguments'])}")
        print(f"  log   {plist['StandardOutPath']}")
    if not opts.system:
        print("LaunchAgents run while you are logged in; --system starts them at boot.")
    return 0


def uninstall(roles: Iterable[str], *, system: bool) -> int:
    """Unload and remove each role's job; what is not installed is skipped."""
    ld = launchd(system=system)
    _need_root(system)
    for role in roles:
        label = LABELS[role]
        path = ld.plist_path(label)
        _bootout(ld, label)
        if path.exists():
            path.unlink()
            print(f"uninstalled {label}: removed {path}")
        else:
            print(f"{label}: not installed")
    return 0


def status(roles: Iterable[str], *, system: bool, as_json: bool = False) -> int:
    """Print each role's job; exit 0 when something is installed and all of it runs, else 3."""
    import json

    ld = launchd(system=system)
    found = [service_status(ld, role) for role in roles]
    if as_json:
        print(json.dumps([{**asdict(s), "running": s.running} for s in found], indent=2))
    for s in () if as_json else found:
        if not s.installed and not s.loaded:
            print(f"{s.label:<24} not installed")
            continue
        state = s.state or "not loaded"
        pid = f"pid {s.pid}" if s.pid is not None else "no pid"
        runs = f"runs {s.runs}" if s.runs is not None else ""
        exit_ = f"last exit {s.last_exit}" if s.last_exit else ""
        print("  ".join(x for x in (f"{s.label:<24}", f"{state:<12}", pid, runs, exit_) if x))
        print(f"  plist {s.plist}" + ("" if s.installed else " (missing: loaded from elsewhere)"))
        if s.log_file:
            print(f"  log   {s.log_file}")
    installed = [s for s in found if s.installed or s.loaded]
    return 0 if installed and all(s.running for s in installed) else 3


def logs(roles: Iterable[str], *, system: bool, lines: int, follow: bool) -> int:
    """`tail` the roles' log files (`-F` follows through the bound's truncation)."""
    ld = launchd(system=system)
    files = []
    for role in roles:
        plist = _read_plist(ld.plist_path(LABELS[role]))
        logged = plist.get("StandardOutPath") if plist else None
        path = Path(str(logged)) if logged else log_file(macmesh_home(), role)
        if path.exists():
            files.append(str(path))
    if not files:
        print("no service logs yet (is it installed? `macmesh service status`)", file=sys.stderr)
        return 1
    cmd = ["tail", "-n", str(lines), *(["-F"] if follow else []), *files]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def restart(roles: Iterable[str], *, system: bool) -> int:
    """`launchctl kickstart -k` each installed role: the new code runs (after an upgrade)."""
    ld = launchd(system=system)
    _need_root(system)
    done = 0
    for role in roles:
        label = LABELS[role]
        if not ld.plist_path(label).exists():
            continue
        result = ld.run("kickstart", "-k", ld.target(label))
        if result.returncode != 0:
            why = result.stderr.strip() or f"exit {result.returncode}"
            raise ServiceError(
                f"`launchctl kickstart -k {ld.target(label)}` failed: {why} "
                "(not loaded? `macmesh service install` loads it again)"
            )
        print(f"restarted {label}")
        done += 1
    if not done:
        raise ServiceError("nothing installed to restart (`macmesh service install` first)")
    return 0


# ---------- command line ----------


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
