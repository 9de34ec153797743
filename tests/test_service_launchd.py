"""`macmesh service`: launchd plists, launchctl driving, the log bound, the rendered command.

Linux has no launchd, so these tests put a launchctl stand-in on MACMESH_LAUNCHCTL: a
small script that logs its argv and keeps launchd's state in a JSON file, answering
like the real one (bootstrap of a loaded job: exit 5; bootout: the job drains through
`state = SIGTERMed` before `print` stops finding it, exit 113).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import plistlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from macmesh.logbound import bound_log_streams
from macmesh.service import (
    InstallOptions,
    ServiceError,
    install,
    parse_print,
    render_plist,
    restart,
    uninstall,
)
from mesh.client import NodeClient
from mesh.errors import MeshError

PYTHON = str(Path(sys.executable).absolute())
MACMESH = str(Path(sys.executable).parent / "macmesh")
REPO = Path(__file__).resolve().parent.parent

FAKE_LAUNCHCTL = r'''#!{python}
"""A launchctl stand-in: logs argv, keeps launchd's state in a JSON file."""
import json, plistlib, sys
from pathlib import Path

STATE, LOG = Path({state!r}), Path({log!r})
with LOG.open("a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
state = json.loads(STATE.read_text()) if STATE.exists() else {{"jobs": {{}}, "next_pid": 4000}}
jobs = state["jobs"]
cmd, args = sys.argv[1], sys.argv[2:]


def save():
    STATE.write_text(json.dumps(state))


def not_found(target):
    domain, label = target.rsplit("/", 1)
    uid = domain.split("/")[1] if "/" in domain else "0"
    sys.stderr.write(f'Could not find service "{{label}}" in domain for uid: {{uid}}\n')
    sys.exit(113)


def spawn(job):
    state["next_pid"] += 1
    job.update(state="running", pid=state["next_pid"], runs=job.get("runs", 0) + 1)


if cmd == "bootstrap":
    domain, path = args
    if domain != "system" and not domain.startswith("gui/"):
        sys.stderr.write("Bootstrap failed: 125: Domain does not support specified action\n")
        sys.exit(125)
    plist = plistlib.loads(Path(path).read_bytes())
    target = f"{{domain}}/{{plist['Label']}}"
    if target in jobs or state.get("busy"):  # busy: the race right after a bootout
        state["busy"] = max(state.get("busy", 0) - 1, 0)
        save()
        sys.stderr.write("Bootstrap failed: 5: Input/output error\n"
                         "Try re-running the command as root for richer errors.\n")
        sys.exit(5)
    program = plist["ProgramArguments"][0]
    job = jobs[target] = {{"path": path, "state": "not running", "program": program}}
    if plist.get("RunAtLoad"):
        spawn(job)
    save()
elif cmd == "bootout":
    (target,) = args
    if target not in jobs or jobs[target].get("draining"):
        sys.stderr.write("Boot-out failed: 3: No such process\n")
        sys.exit(3)
    # The real one returns before the job has exited: print says SIGTERMed a while.
    jobs[target].update(state="SIGTERMed", draining=1)
    save()
elif cmd == "print":
    (target,) = args
    job = jobs.get(target)
    if job is None:
        not_found(target)
    if job.get("draining"):
        job["draining"] -= 1
        if not job["draining"]:
            del jobs[target]
        save()
    pid = f"\n\tpid = {{job['pid']}}" if job.get("state") in ("running", "SIGTERMed") else ""
    print(f"""{{target}} = {{{{
\tactive count = 1
\tpath = {{job['path']}}
\ttype = LaunchAgent
\tstate = {{job['state']}}

\tprogram = {{job['program']}}
\targuments = {{{{
\t\t{{job['program']}}
\t\t-m
\t\tmacmesh
\t}}}}

\tenvironment = {{{{
\t\tMACMESH_HOME => /somewhere
\t\tXPC_SERVICE_NAME => io.macmesh.node
\t}}}}

\tdomain = gui/501 [100008]
\tminimum runtime = 10
\texit timeout = 30
\truns = {{job.get('runs', 0)}}{{pid}}
\timmediate reason = speculative
\tforks = 0
\texecs = 1
\tlast exit code = {{job.get('last_exit', '(never exited)')}}

\tendpoints = {{{{
\t\t"io.macmesh.probe" = {{{{
\t\t\tport = 0x2a03
\t\t\tstate = active
\t\t\tpid = 1
\t\t}}}}
\t}}}}
\tproperties = keepalive | runatload | inferred program
}}}}""")
elif cmd == "enable":
    state.setdefault("enabled", []).append(args[0])
    save()
elif cmd == "kickstart":
    target = args[-1]
    if target not in jobs:
        not_found(target)
    spawn(jobs[target])
    save()
else:
    sys.stderr.write(f"Unrecognized subcommand: {{cmd}}\n")
    sys.exit(64)
'''


@dataclass
class Lab:
    """One machine's worth of temp state: HOME, MACMESH_HOME, the plist dir, launchd."""

    root: Path
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return Path(self.env["MACMESH_HOME"])

    @property
    def agents(self) -> Path:
        default = Path(self.env["HOME"]) / "Library" / "LaunchAgents"
        return Path(self.env.get("MACMESH_LAUNCHD_DIR", default))

    @property
    def calls(self) -> list[list[str]]:
        path = self.root / "launchctl.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def launchd(self) -> dict[str, Any]:
        path = self.root / "launchd.json"
        jobs: dict[str, Any] = json.loads(path.read_text())["jobs"] if path.exists() else {}
        return jobs

    def set_job(self, target: str, **fields: Any) -> None:
        path = self.root / "launchd.json"
        state = json.loads(path.read_text())
        state["jobs"][target].update(fields)
        path.write_text(json.dumps(state))

    def macmesh(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MACMESH, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**self.env, **env},
            cwd=self.root,
            check=False,
        )

    def service(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.macmesh("service", *args)

    def plist(self, role: str) -> dict[str, Any]:
        data: dict[str, Any] = plistlib.loads(
            (self.agents / f"io.macmesh.{role}.plist").read_bytes()
        )
        return data


def make_lab(root: Path, *, fake: bool = True) -> Lab:
    root.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root / "home"),
        "MACMESH_HOME": str(root / "home" / ".macmesh"),
        "HF_HUB_OFFLINE": "1",
    }
    if fake:  # the test-only escape hatch; without it, the real platform check
        env["MACMESH_LAUNCHD_DIR"] = str(root / "launchd-dir")
        script = root / "launchctl"
        script.write_text(
            FAKE_LAUNCHCTL.format(
                python=PYTHON, state=str(root / "launchd.json"), log=str(root / "launchctl.log")
            )
        )
        script.chmod(0o755)
        env["MACMESH_LAUNCHCTL"] = str(script)
    (root / "home").mkdir()
    return Lab(root, env)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return make_lab(tmp_path)


def init_secret(lab: Lab) -> None:
    result = lab.macmesh("init")
    assert result.returncode == 0, result.stderr


def uid_domain() -> str:
    return f"gui/{os.getuid()}"


def strings(node: Any) -> list[str]:
    """Every string in a plist, keys included."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (k, *strings(v))]
    return []


# ---------- rendering ----------


@pytest.mark.parametrize("role", ["node", "coordinator"])
def test_rendered_plist_carries_every_key_with_absolute_paths(role: str, tmp_path: Path) -> None:
    plist = render_plist(
        role,
        home=tmp_path / "mm",
        user_home=tmp_path,
        args=["--host", "0.0.0.0", "--mesh", "lab & <friends>"],
        log_max_mb=5,
    )
    # What launchd reads back is what we meant, odd characters included.
    assert plistlib.loads(plistlib.dumps(plist)) == plist
    assert plist["Label"] == f"io.macmesh.{role}"
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["ThrottleInterval"] == 10 and plist["ExitTimeOut"] == 30
    assert plist["ProcessType"] == ("Interactive" if role == "node" else "Standard")
    assert plist["SoftResourceLimits"]["NumberOfFiles"] == 10240
    assert plist["HardResourceLimits"]["NumberOfFiles"] == 10240
    args = plist["ProgramArguments"]
    assert args == [PYTHON, "-m", "macmesh", "--log-max-mb", "5", role,
                    "--host", "0.0.0.0", "--mesh", "lab & <friends>"]  # fmt: skip
    assert Path(args[0]).is_absolute() and Path(args[0]).exists()
    env = plist["EnvironmentVariables"]
    assert env["MACMESH_HOME"] == str(tmp_path / "mm") == plist["WorkingDirectory"]
    assert env["HOME"] == str(tmp_path)
    path = env["PATH"].split(":")
    assert path[0] == str(Path(PYTHON).parent)  # the venv's llama-server first
    assert path[1:] == ["/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin",
                        "/sbin"]  # fmt: skip
    assert set(env) == {"MACMESH_HOME", "HOME", "PATH", "PYTHONUNBUFFERED"}
    log = tmp_path / "mm" / "logs" / f"macmesh-{role}.log"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(log)
    for key in ("WorkingDirectory", "StandardOutPath", "StandardErrorPath"):
        assert Path(plist[key]).is_absolute(), key
    assert "UserName" not in plist
    assert not [s for s in strings(plist) if "${" in s]


def test_relative_home_renders_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plist = render_plist("node", home=Path("rel"), user_home=Path("~"), args=[], user="alice")
    assert plist["WorkingDirectory"] == str(tmp_path / "rel")
    assert Path(plist["EnvironmentVariables"]["HOME"]).is_absolute()
    assert plist["UserName"] == "alice"


def test_parse_print_reads_the_service_fields_not_nested_ones() -> None:
    text = """gui/501/io.macmesh.node = {
\tactive count = 1
\tstate = not running
\tenvironment = {
\t\tPATH => /usr/bin
\t}
\truns = 7
\tlast exit code = 78: EX_CONFIG
\tendpoints = {
\t\t"x" = {
\t\t\tstate = active
\t\t\tpid = 1
\t\t}
\t}
}"""
    fields = parse_print(text)
    assert fields["state"] == "not running"
    assert fields["runs"] == "7"
    assert fields["last exit code"] == "78: EX_CONFIG"
    assert "pid" not in fields


# ---------- install / uninstall / status / logs / restart ----------


def test_install_both_drives_launchctl_and_is_idempotent(lab: Lab) -> None:
    init_secret(lab)
    first = lab.service("install", "--role", "both", "--grpc-port", "50999")
    assert first.returncode == 0, first.stderr
    node, coord = lab.plist("node"), lab.plist("coordinator")
    assert node["ProgramArguments"][5:] == ["node", "--host", "0.0.0.0", "--grpc-port", "50999"]
    # The coordinator on the node's Mac finds the local node on its non-default port.
    assert coord["ProgramArguments"][5:] == [
        "coordinator", "--host", "0.0.0.0", "--port", "1234", "--peer", "127.0.0.1:50999",
    ]  # fmt: skip
    assert node["EnvironmentVariables"]["MACMESH_HOME"] == str(lab.home)
    assert (lab.home / "logs").is_dir()
    for role in ("node", "coordinator"):
        mode = (lab.agents / f"io.macmesh.{role}.plist").stat().st_mode & 0o777
        assert mode == 0o644  # launchd refuses group/other-writable plists
    d = uid_domain()
    assert lab.calls == [
        ["bootout", f"{d}/io.macmesh.node"],
        ["print", f"{d}/io.macmesh.node"],
        ["enable", f"{d}/io.macmesh.node"],
        ["bootstrap", d, str(lab.agents / "io.macmesh.node.plist")],
        ["bootout", f"{d}/io.macmesh.coordinator"],
        ["print", f"{d}/io.macmesh.coordinator"],
        ["enable", f"{d}/io.macmesh.coordinator"],
        ["bootstrap", d, str(lab.agents / "io.macmesh.coordinator.plist")],
    ]
    pids = {t: j["pid"] for t, j in lab.launchd().items()}
    assert set(pids) == {f"{d}/io.macmesh.node", f"{d}/io.macmesh.coordinator"}

    before = len(lab.calls)
    again = lab.service("install", "--role", "both", "--grpc-port", "50999")
    assert again.returncode == 0, again.stderr
    assert (lab.plist("node"), lab.plist("coordinator")) == (node, coord)
    calls = lab.calls[before:]
    # Loaded jobs are booted out and waited for (SIGTERMed, then gone) before bootstrap,
    # which the real launchd would otherwise answer with "5: Input/output error".
    assert calls[:5] == [
        ["bootout", f"{d}/io.macmesh.node"],
        ["print", f"{d}/io.macmesh.node"],
        ["print", f"{d}/io.macmesh.node"],
        ["enable", f"{d}/io.macmesh.node"],
        ["bootstrap", d, str(lab.agents / "io.macmesh.node.plist")],
    ]
    jobs = lab.launchd()
    assert set(jobs) == set(pids) and all(jobs[t]["pid"] != pids[t] for t in pids)
    assert all(j["state"] == "running" for j in jobs.values())
    assert sorted(p.name for p in lab.agents.iterdir()) == [
        "io.macmesh.coordinator.plist", "io.macmesh.node.plist",
    ]  # fmt: skip


def test_install_retries_bootstrap_while_launchd_is_busy(lab: Lab) -> None:
    init_secret(lab)
    (lab.root / "launchd.json").write_text(json.dumps({"jobs": {}, "next_pid": 1, "busy": 1}))
    result = lab.service("install")
    assert result.returncode == 0, result.stderr
    bootstraps = [c for c in lab.calls if c[0] == "bootstrap"]
    assert len(bootstraps) == 2 and f"{uid_domain()}/io.macmesh.node" in lab.launchd()


def test_extra_flags_go_to_the_role_and_win(lab: Lab) -> None:
    result = lab.service(
        "install", "--role", "node", "--", "--host", "127.0.0.1", "--preload", "smollm2"
    )
    assert result.returncode == 0, result.stderr  # loopback after all: no secret needed
    assert lab.plist("node")["ProgramArguments"][6:] == [
        "--host", "0.0.0.0", "--grpc-port", "50151", "--host", "127.0.0.1", "--preload", "smollm2",
    ]  # fmt: skip
    both = lab.service("install", "--role", "both", "--", "--mesh", "lab")
    assert both.returncode == 1 and "one at a time" in both.stderr


def test_install_refuses_a_lab_bind_without_the_secret_file(lab: Lab) -> None:
    result = lab.macmesh("service", "install", MACMESH_SECRET="x" * 32)
    assert result.returncode == 1
    assert "no mesh secret" in result.stderr and "macmesh init" in result.stderr
    assert "MACMESH_SECRET in your shell does not reach launchd" in result.stderr
    assert lab.calls == [] and not lab.agents.exists()
    # A secret others can read is refused the way the node would refuse it at boot.
    init_secret(lab)
    (lab.home / "secret").chmod(0o644)
    loose = lab.service("install")
    assert loose.returncode == 1 and "chmod 600" in loose.stderr
    (lab.home / "secret").chmod(0o600)
    assert lab.service("install").returncode == 0
    insecure = make_lab(lab.root / "other")
    assert insecure.service("install", "--", "--insecure").returncode == 0


def test_status_reports_running_pid_and_last_exit(lab: Lab) -> None:
    init_secret(lab)
    none = lab.service("status")
    assert none.returncode == 3 and "not installed" in none.stdout
    assert lab.service("install").returncode == 0
    result = lab.service("status", "--json")
    assert result.returncode == 0, result.stderr
    node, coord = json.loads(result.stdout)
    target = f"{uid_domain()}/io.macmesh.node"
    assert node == {
        "role": "node",
        "label": "io.macmesh.node",
        "plist": str(lab.agents / "io.macmesh.node.plist"),
        "installed": True,
        "loaded": True,
        "state": "running",
        "pid": lab.launchd()[target]["pid"],
        "last_exit": "(never exited)",
        "runs": 1,
        "log_file": str(lab.home / "logs" / "macmesh-node.log"),
        "error": None,
        "running": True,
    }
    assert coord["installed"] is False and coord["loaded"] is False
    assert "Could not find service" in coord["error"]
    text = lab.service("status")
    assert text.returncode == 0
    assert "io.macmesh.node" in text.stdout and "running" in text.stdout
    assert f"pid {node['pid']}" in text.stdout

    # A crash loop: launchd keeps the job but it is not running.
    lab.set_job(target, state="not running", last_exit="78: EX_CONFIG", runs=9)
    crashed = lab.service("status", "--role", "node")
    assert crashed.returncode == 3
    assert "not running" in crashed.stdout and "last exit 78: EX_CONFIG" in crashed.stdout
    assert "no pid" in crashed.stdout and "runs 9" in crashed.stdout


def test_uninstall_boots_out_removes_and_is_idempotent(lab: Lab) -> None:
    init_secret(lab)
    assert lab.service("install", "--role", "both").returncode == 0
    before = len(lab.calls)
    result = lab.service("uninstall")
    assert result.returncode == 0, result.stderr
    assert "uninstalled io.macmesh.node" in result.stdout
    assert lab.launchd() == {} and list(lab.agents.iterdir()) == []
    d = uid_domain()
    assert [c for c in lab.calls[before:] if c[0] == "bootout"] == [
        ["bootout", f"{d}/io.macmesh.node"],
        ["bootout", f"{d}/io.macmesh.coordinator"],
    ]
    again = lab.service("uninstall")
    assert again.returncode == 0, again.stderr
    assert "io.macmesh.node: not installed" in again.stdout
    assert lab.service("status").returncode == 3


def test_restart_kickstarts_installed_jobs(lab: Lab) -> None:
    nothing = lab.service("restart")
    assert nothing.returncode == 1 and "nothing installed" in nothing.stderr
    init_secret(lab)
    assert lab.service("install").returncode == 0
    target = f"{uid_domain()}/io.macmesh.node"
    pid = lab.launchd()[target]["pid"]
    result = lab.service("restart")
    assert result.returncode == 0, result.stderr
    assert lab.calls[-1] == ["kickstart", "-k", target]
    assert lab.launchd()[target]["pid"] != pid and lab.launchd()[target]["runs"] == 2


def test_logs_tails_the_job_log(lab: Lab) -> None:
    assert lab.service("logs").returncode == 1
    init_secret(lab)
    assert lab.service("install").returncode == 0
    log = Path(lab.plist("node")["StandardOutPath"])
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    result = lab.service("logs", "--role", "node", "-n", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line 97\nline 98\nline 99\n"


def test_system_install_is_a_daemon_run_as_a_user(lab: Lab) -> None:
    init_secret(lab)
    if os.geteuid() != 0:
        result = lab.service("install", "--system")
        assert result.returncode == 1 and "sudo" in result.stderr
        return
    nobody = lab.service("install", "--system")
    assert nobody.returncode == 1 and "--user NAME" in nobody.stderr
    result = lab.service("install", "--system", "--user", "root")
    assert result.returncode == 0, result.stderr
    plist = lab.plist("node")
    assert plist["UserName"] == "root"
    assert lab.calls[-1] == ["bootstrap", "system", str(lab.agents / "io.macmesh.node.plist")]
    assert "system/io.macmesh.node" in lab.launchd()
    assert lab.service("status", "--system").returncode == 0
    assert lab.service("uninstall", "--system").returncode == 0
    assert lab.launchd() == {}


def test_system_install_refuses_without_root(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here and other users cannot reach this python: fake only the euid.
    for key in ("MACMESH_LAUNCHCTL", "MACMESH_LAUNCHD_DIR", "MACMESH_HOME", "HOME"):
        monkeypatch.setenv(key, lab.env[key])
    monkeypatch.setattr(os, "geteuid", lambda: 501)
    opts = InstallOptions(roles=("node",), system=True, user="root")
    with pytest.raises(ServiceError, match=r"--system writes /Library/LaunchDaemons.*sudo"):
        install(opts)
    for action in (uninstall, restart):
        with pytest.raises(ServiceError, match="sudo"):
            action(("node",), system=True)
    assert lab.calls == [] and not lab.agents.exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="this machine has launchd")
@pytest.mark.parametrize(
    "action",
    [["install"], ["install", "--role", "both"], ["uninstall"], ["status"], ["logs"], ["restart"]],
)
def test_refuses_clearly_without_launchd(action: list[str], tmp_path: Path) -> None:
    lab = make_lab(tmp_path, fake=False)  # no escape hatch: the real platform check
    result = lab.service(*action)
    assert result.returncode == 1
    assert "launchd is macOS-only" in result.stderr and "systemd" in result.stderr
    assert not lab.agents.exists()


def test_dry_run_prints_the_plists_anywhere(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, fake=False)
    result = lab.service("install", "--role", "both", "--dry-run")
    assert result.returncode == 0, result.stderr
    docs = result.stdout.split("<?xml")[1:]
    labels = [plistlib.loads(("<?xml" + d).encode())["Label"] for d in docs]
    assert labels == ["io.macmesh.node", "io.macmesh.coordinator"]
    assert not lab.agents.exists()


# ---------- the log bound ----------

WRITER = """
import os, sys, time
from macmesh.logbound import bound_log_streams
bound_log_streams({limit}, interval=0.05)
for batch in range(20):
    for i in range(batch * 20, batch * 20 + 20):
        print(f"{{i:04d}} " + "x" * 94, file=sys.stderr if i % 2 else sys.stdout, flush=True)
    # Wait (bounded) for the watcher to cut the file: no race with a loaded machine.
    deadline = time.monotonic() + (20 if batch < 19 else 0)
    while os.fstat(1).st_size > {limit} and time.monotonic() < deadline:
        time.sleep(0.01)
"""


def test_log_bound_keeps_launchd_log_files_small(tmp_path: Path) -> None:
    log = tmp_path / "svc.log"
    log.write_text("old\n" * 2000)  # 8000 bytes before the process starts
    with log.open("ab") as out:  # O_APPEND, as launchd opens StandardOutPath
        subprocess.run(
            [PYTHON, "-c", WRITER.format(limit=3000)],
            stdout=out, stderr=out, cwd=REPO, timeout=60, check=True,
        )  # fmt: skip
    backup = log.with_name("svc.log.1")
    # 40 kB were written in 2 kB batches; the watcher cut the file back each time.
    assert log.stat().st_size <= 3000 + 100 * 20
    assert backup.exists() and backup.stat().st_size <= 3000 + 100 * 20
    assert "old" not in backup.read_text()  # the start-time cut happened long ago
    lines = log.read_text().splitlines()
    assert lines and lines[-1].startswith("0399 ")


def test_log_bound_leaves_non_append_streams_alone(tmp_path: Path) -> None:
    log = tmp_path / "plain.log"
    log.write_text("y" * 5000)
    with log.open("r+b") as f:
        fd = f.fileno()
        assert bound_log_streams(100, fds=(fd,)) is None
    assert log.stat().st_size == 5000 and not (tmp_path / "plain.log.1").exists()


# ---------- the rendered command line, run by hand ----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for_node(target: str, proc: subprocess.Popen[bytes], log: Path) -> list[str]:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"node exited {proc.returncode}:\n{log.read_text()}"
        try:
            async with NodeClient(target, timeout=5) as client:
                return [m.id for m in await client.list_models()]
        except MeshError:  # not listening yet (UNAVAILABLE): retry until the deadline
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


@contextlib.contextmanager
def run_like_launchd(plist: dict[str, Any]) -> Iterator[subprocess.Popen[bytes]]:
    """Exactly what launchd does with the job: those arguments, that environment and
    directory, the log opened for appending, a process group of its own. On exit the
    job gets SIGTERM (what bootout sends) and must leave no process behind."""
    out = open(plist["StandardOutPath"], "ab")  # noqa: SIM115 - held for the child's life
    err = open(plist["StandardErrorPath"], "ab")  # noqa: SIM115
    with out, err:
        proc = subprocess.Popen(
            plist["ProgramArguments"],
            env=plist["EnvironmentVariables"],
            cwd=plist["WorkingDirectory"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        yield proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of its process group is left


def test_plist_program_arguments_start_the_node(lab: Lab) -> None:
    port = free_port()
    result = lab.service(
        "install", "--role", "node", "--host", "127.0.0.1", "--grpc-port", str(port),
        "--log-max-mb", "0.004",
        "--", "--no-default-model", "--no-bonjour", "--no-hf-cache", "--shutdown-grace", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plist = lab.plist("node")
    log = Path(plist["StandardOutPath"])
    log.write_text("from an earlier run\n" * 300)  # 6000 bytes: past the 4000-byte bound
    with run_like_launchd(plist) as proc:
        models = asyncio.run(wait_for_node(f"127.0.0.1:{port}", proc, log))
        # No chat model (--no-default-model); the built-in voice engines may be there.
        assert set(models) <= {"pocketsphinx-en", "espeak-ng"}
        text = log.read_text()
        assert f"macmesh node listening on 127.0.0.1:{port}" in text
        assert "from an earlier run" not in text  # bounded at start: moved to .1
        assert "from an earlier run" in log.with_name(log.name + ".1").read_text()


def test_plist_program_arguments_start_the_coordinator(lab: Lab) -> None:
    port = free_port()
    result = lab.service(
        "install", "--role", "coordinator", "--host", "127.0.0.1", "--http-port", str(port),
        "--", "--no-bonjour",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plist = lab.plist("coordinator")
    log = Path(plist["StandardOutPath"])
    with run_like_launchd(plist) as proc:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert response.status_code == 200
