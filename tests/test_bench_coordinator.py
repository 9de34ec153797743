"""The coordinator-overhead benchmark runs end to end (simulated engine, real processes).

Speed is not asserted (the machine is shared and noisy); only that the script
produces its report and that the three paths generated the same text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "coordinator_overhead.py"
PATHS = ("direct", "anthropic", "openai")


@pytest.mark.slow
def test_coordinator_overhead_bench_small_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    max_tokens = 16
    args = ["--engine", "sim", "--rounds", "3", "--max-tokens", str(max_tokens)]
    args += ["--cold", "1", "--b2b", "2", "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # 0 = PASS, 1 = FAIL on speed (not asserted here); 2 = mismatch or failed request.
    assert proc.returncode in (0, 1), f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "SIMULATED engine" in proc.stdout
    assert "| direct node gRPC |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["judged_engine"] == "sim"
    assert report["verdict"] in ("PASS", "FAIL")
    assert report["mismatches"] == []
    assert report["targets"] == {"max_added_ttft_p50_ms": 5.0, "min_ratio": 0.98}
    for key in ("platform", "cpu_count", "python", "grpcio", "httpx", "loadavg_start"):
        assert report["machine"][key], key
    assert list(report["engines"]) == ["sim"]

    sim = report["engines"]["sim"]
    assert sim["judged"] is True
    assert sim["config"]["max_tokens"] == max_tokens
    assert sim["config"]["rounds"] == 3
    summary = sim["summary"]
    for path in PATHS:
        assert summary[path]["median_ttft_ms"] > 0, path
        assert summary[path]["median_decode_tps"] > 0, path
        assert summary[path]["cold_median_ttft_ms"] > 0, path
        assert summary[path]["median_e2e_ms"] > 0, path
    for path in ("anthropic", "openai"):
        for key in ("added_ttft_p50_ms", "added_ttft_p90_ms", "median_ratio", "added_e2e_p50_ms"):
            assert isinstance(summary[path][key], float), (path, key)
        assert summary[path]["median_ratio"] > 0

    b2b = sim["back_to_back"]
    for path in PATHS:
        assert b2b[path]["median_ttft_ms"] > 0, path
    for path in ("anthropic", "openai"):
        assert isinstance(b2b[path]["added_ttft_p50_ms"], float), path
    assert len(sim["b2b_rounds"]) == 2
    for r in sim["b2b_rounds"]:
        assert r["mismatch"] == ""
        assert all(r["samples"][p]["text"] == sim["text"] for p in PATHS)

    assert sim["probes"]["render_rpc_ms"] > 0
    assert sim["probes"]["http_health_ms"] > 0

    assert len(sim["rounds"]) == 3
    assert len(sim["warmup_rounds"]) == 2
    orders = [r["order"] for r in sim["warmup_rounds"] + sim["rounds"]]
    assert len(set(orders)) == len(orders)  # the order rotates every round
    text = sim["text"]
    assert text.strip()
    for r in sim["rounds"]:
        assert r["mismatch"] == ""
        samples = r["samples"]
        assert set(samples) == set(PATHS)
        for path in PATHS:
            s = samples[path]
            assert s["text"] == text, path  # identical output on every path
            assert s["deltas"] == s["completion_tokens"] == max_tokens, path
            assert s["finish_reason"] == "length", path
            assert len(s["arrivals"]) == max_tokens, path
            assert 0 < s["ttft_s"] < s["total_s"], path
    cold = sim["cold"]
    assert sorted(s["path"] for s in cold) == sorted(PATHS)
    assert all(s["cold"] and s["text"] == text for s in cold)
