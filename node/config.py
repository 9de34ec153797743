"""Typed node configuration (the CLI builds it; the core never parses argv)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_GRPC_PORT = 50151


def macmesh_home() -> Path:
    """The state dir: `$MACMESH_HOME`, default `~/.macmesh`."""
    env = os.environ.get("MACMESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".macmesh"


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingDefaults:
    """What a request gets for sampling fields it leaves unset."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 4096
    repetition_penalty: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything `serve()` needs to run a node."""

    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    home: Path = field(default_factory=macmesh_home)
    models_dir: Path | None = None
    # Also offer MLX models found in the Hugging Face cache.
    scan_hf_cache: bool = True
    # None: huggingface_hub's default (`HF_HUB_CACHE`, `HF_HOME`).
    hf_cache_dir: Path | None = None
    # Generations stepped together on the model thread; the rest wait.
    max_running: int = 4
    # Waiting generations beyond this are refused (RESOURCE_EXHAUSTED).
    max_waiting: int = 256
    # Models to load at start (ids from the catalog).
    preload: tuple[str, ...] = ()
    # Seconds in-flight streams get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    @property
    def resolved_models_dir(self) -> Path:
        """`--models-dir`, else `$MACMESH_HOME/models`."""
        return self.models_dir if self.models_dir is not None else self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"
