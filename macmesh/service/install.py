"""What `macmesh service install|uninstall|status|logs|restart` do (accounts, secrets, files)."""

from __future__ import annotations

import contextlib
import os
import plistlib
import pwd
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from macmesh.service.common import DEFAULT_LOG_MAX_MB, LABELS, ServiceError
from macmesh.service.launchctl import bootout, bootstrap, launchd, read_plist, service_status
from macmesh.service.plist import log_file, render_plist, role_args
from mesh.paths import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, macmesh_home


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
        bootout(ld, label)
        # A job once disabled (`launchctl disable`) would not load: clear that first.
        ld.run("enable", ld.target(label))
        bootstrap(ld, path)
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
        bootout(ld, label)
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
        plist = read_plist(ld.plist_path(LABELS[role]))
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
