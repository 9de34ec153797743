#!/usr/bin/env bash
# Regenerates the checked-in gRPC/protobuf code from proto/*.proto.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repo root, i.e. in place)
# tests/test_proto.py runs this into a temp dir and fails when the checked-in
# code differs, so run it after every .proto change.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-python}
# protoc finds the mypy plugins on PATH: use the ones beside this interpreter.
export PATH="$(dirname "$(command -v "$py")"):$PATH"
mkdir -p "$out/proto"
cd "$root"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/node.proto
