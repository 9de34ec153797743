"""Where macmesh keeps its state."""

from __future__ import annotations

import os
from pathlib import Path


def macmesh_home() -> Path:
    """The state dir: `$MACMESH_HOME`, default `~/.macmesh`."""
    env = os.environ.get("MACMESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".macmesh"
