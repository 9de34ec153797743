"""Typed node configuration (the CLI builds it; the core never parses argv)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mesh.paths import DEFAULT_GRPC_PORT, macmesh_home

__all__ = ["DEFAULT_GRPC_PORT", "NodeConfig", "SamplingDefaults", "SimModelSpec", "macmesh_home"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingDefaults:
    """What a request gets for sampling fields it leaves unset."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 4096
    repetition_penalty: float = 1.0


@dataclass(frozen=True, slots=True)
class SimModelSpec:
    """A simulated model: name and the rates it runs at."""

    name: str
    prefill_tps: float = 2000.0
    decode_tps: float = 50.0
    context_length: int = 32768

    @classmethod
    def parse(cls, spec: str) -> SimModelSpec:
        """`NAME[:PREFILL_TPS[:DECODE_TPS[:CONTEXT]]]`, e.g. `sim-7b:1500:40`."""
        parts = spec.split(":")
        if not parts[0]:
            raise ValueError(f"simulated model spec {spec!r} has no name")
        try:
            nums = [float(p) for p in parts[1:4]]
        except ValueError:
            raise ValueError(f"simulated model spec {spec!r}: rates must be numbers") from None
        if any(n <= 0 for n in nums):
            raise ValueError(f"simulated model spec {spec!r}: rates must be > 0")
        kwargs: dict[str, float | int] = {}
        for key, value in zip(("prefill_tps", "decode_tps"), nums[:2], strict=False):
            kwargs[key] = value
        if len(nums) > 2:
            kwargs["context_length"] = int(nums[2])
        return cls(parts[0], **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything `serve()` needs to run a node."""

    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    # Prometheus `/metrics` over plain HTTP on `host`; 0 = any free port, None = off.
    metrics_port: int | None = None
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
    # Speculative decoding: tokens a draft model proposes per round.
    # None: `$MACMESH_NUM_DRAFT_TOKENS`, else 3 (node.backends.mlx).
    num_draft_tokens: int | None = None
    # Models to load at start (ids from the catalog).
    preload: tuple[str, ...] = ()
    # Seconds in-flight streams get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # SIMULATED models (benchmarks, routing tests): served by node.backends.sim.
    sim_models: tuple[SimModelSpec, ...] = ()
    # Mesh secret (mesh.auth); None = open, allowed only on loopback unless `insecure`.
    secret: bytes | None = None
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Bonjour: announce this node to coordinators of the same mesh name.
    announce: bool = False
    mesh: str = "default"
    # Interfaces Bonjour uses (IPs); empty = all.
    bonjour_interfaces: tuple[str, ...] = ()

    @property
    def resolved_models_dir(self) -> Path:
        """`--models-dir`, else `$MACMESH_HOME/models`."""
        return self.models_dir if self.models_dir is not None else self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"
