"""The prompt-cache benchmark runs end to end (real node, MLX and a real llama-server).

Its verdict (warm TTFT <= 0.1 x cold) is asserted by the tests of each backend;
here only that the script runs, reports both backends and sees the cache used.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "prompt_cache.py"


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.usefixtures("llama_server_binary")
def test_prompt_cache_bench_small_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--rounds", "1", "--mlx-repeat", "12", "--gguf-repeat", "40", "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=540
    )
    assert proc.returncode in (0, 1), f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| backend | prompt tokens |" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["backends"]) == {"mlx", "gguf"}
    for backend, s in report["backends"].items():
        (r,) = s["rounds"]
        assert r["cold"]["cached_tokens"] == 0, backend
        assert r["warm"]["cached_tokens"] >= s["prompt_tokens"] - 64, backend
        assert s["warm_ms"] < s["cold_ms"], backend
