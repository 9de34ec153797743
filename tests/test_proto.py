"""The checked-in gRPC code must match proto/*.proto (run `make proto` after editing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("node_pb2.py", "node_pb2.pyi", "node_pb2_grpc.py", "node_pb2_grpc.pyi")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "proto" / name).read_bytes() != (ROOT / "proto" / name).read_bytes()
    ]
    assert not stale, f"stale generated code: {stale}; run `make proto`"


def test_package_is_versioned() -> None:
    from proto import node_pb2

    assert node_pb2.DESCRIPTOR.package == "macmesh.v1"
    service = node_pb2.DESCRIPTOR.services_by_name["Node"]
    assert set(service.methods_by_name) == {
        "Generate",
        "RenderPrompt",
        "Tokenize",
        "ListModels",
        "LoadModel",
        "UnloadModel",
        "WatchState",
        "PullModel",
        "CopyModel",
        "DeleteModel",
        "ModelManifest",
        "ReadModelFile",
        "Transcribe",
        "Speak",
        "CheckGroupRank",
        "StartGroupRank",
        "StopGroupRank",
    }
