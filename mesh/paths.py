"""Where macmesh keeps its state, and its well-known ports."""

from __future__ import annotations

import os
from pathlib import Path


def macmesh_home() -> Path:
    """The state dir: `$MACMESH_HOME`, default `~/.macmesh`."""
    env = os.environ.get("MACMESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".macmesh"


# A node's gRPC port unless told otherwise (`--grpc-port`).
DEFAULT_GRPC_PORT = 50151
# A coordinator's HTTP port unless told otherwise (`--port` / `--http-port`).
DEFAULT_HTTP_PORT = 1234

# The seed's (MLX Studio's) config files in `$MACMESH_HOME`: coordinators resolve
# names with the first two; nodes also serve the models they name by path.
ALIASES_FILE = "model_aliases.json"
ROUTING_FILE = "claude_routing.json"
