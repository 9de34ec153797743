"""A short run of the load-and-chaos suite (bench/soak.py; the full one is `make soak`):
real `macmesh` processes, streaming clients on both APIs, every fault once; no stream may
be cut without an error or carry tokens that are not its own, and nothing stays in flight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_short_soak_loses_nothing(tmp_path: Path, llama_server_binary: Path) -> None:
    out = tmp_path / "soak.json"
    args = [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "40", "--clients"]
    args += ["8", "--capacity", "", "--json", str(out)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=380, check=False)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    chaos = result["chaos"]
    assert chaos["cut"] == 0 and chaos["mixed"] == 0, json.dumps(chaos, indent=1)
    assert sum(result["in_flight_after"].values()) == 0
    assert len(chaos["faults"]) >= 4  # kill -9, SIGSTOP, llama-server, coordinator restart
    assert chaos["intact"] > 50
    assert run.returncode == 0, run.stdout[-2000:]
