"""Typed node configuration (the CLI builds it; the core never parses argv)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.auth import MeshSecret
from mesh.paths import DEFAULT_GRPC_PORT, macmesh_home
from routing.prefix import DEFAULT_BLOCK_SIZE

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_GRPC_PORT",
    "DEFAULT_MAX_SLOTS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MIN_REUSE",
    "DEFAULT_NUM_DRAFT_TOKENS",
    "NUM_DRAFT_TOKENS_ENV",
    "CacheConfig",
    "NodeConfig",
    "SamplingDefaults",
    "SimModelSpec",
    "default_max_bytes",
    "macmesh_home",
    "resolve_num_draft_tokens",
]

BLOCK_SIZE_ENV = "MLX_CACHE_BLOCK_SIZE"
MAX_SLOTS_ENV = "MLX_CACHE_MAX_SLOTS"
MIN_REUSE_ENV = "MLX_CACHE_MIN_REUSE"
MAX_TOKENS_ENV = "MLX_CACHE_MAX_TOKENS"
MAX_BYTES_ENV = "MLX_CACHE_MAX_BYTES"

# MLX batching defaults (docs/benchmarks.md, "Continuous batching").
DEFAULT_MAX_RUNNING = 16
DEFAULT_PREFILL_CHUNK = 512

DEFAULT_MAX_SLOTS = 4
DEFAULT_MIN_REUSE = 512
DEFAULT_MAX_TOKENS = 65536
# Share of physical memory the KV arrays of all idle slots may take by default.
DEFAULT_MEMORY_FRACTION = 0.25


def default_max_bytes() -> int:
    """25% of physical memory (1 GiB where it cannot be read)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total * DEFAULT_MEMORY_FRACTION)
    except Exception:  # noqa: BLE001 - any failure: a conservative fixed budget
        return 1 << 30


def _env_int(environ: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = environ.get(name, "").strip().replace("_", "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Prompt-cache tuning (node.cache; the simulated engine uses the same); `max_slots=0`
    turns caching off. The entry point builds it once (`from_env`) and passes it down."""

    block_size: int = DEFAULT_BLOCK_SIZE
    max_slots: int = DEFAULT_MAX_SLOTS
    min_reuse: int = DEFAULT_MIN_REUSE
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_bytes: int = field(default_factory=lambda: default_max_bytes())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CacheConfig:
        """The `MLX_CACHE_*` settings of `environ` (default `os.environ`)."""
        env = os.environ if environ is None else environ
        max_bytes_raw = env.get(MAX_BYTES_ENV, "").strip()
        return cls(
            block_size=_env_int(env, BLOCK_SIZE_ENV, DEFAULT_BLOCK_SIZE, 1),
            max_slots=_env_int(env, MAX_SLOTS_ENV, DEFAULT_MAX_SLOTS, 0),
            min_reuse=_env_int(env, MIN_REUSE_ENV, DEFAULT_MIN_REUSE, 0),
            max_tokens=_env_int(env, MAX_TOKENS_ENV, DEFAULT_MAX_TOKENS, 0),
            max_bytes=(
                _env_int(env, MAX_BYTES_ENV, 0, 0) if max_bytes_raw else default_max_bytes()
            ),
        )

    @property
    def enabled(self) -> bool:
        return self.max_slots > 0 and self.max_tokens > 0 and self.max_bytes > 0


# Tokens a draft proposes per round when nothing else says (mlx-lm's server default).
DEFAULT_NUM_DRAFT_TOKENS = 3
NUM_DRAFT_TOKENS_ENV = "MACMESH_NUM_DRAFT_TOKENS"


def resolve_num_draft_tokens(value: int | None = None) -> int:
    """`value`, else `$MACMESH_NUM_DRAFT_TOKENS`, else 3; must be >= 1 (the entry point's
    rule: the core takes the resolved number from `NodeConfig`)."""
    source = "num_draft_tokens"
    if value is None:
        raw = os.environ.get(NUM_DRAFT_TOKENS_ENV, "").strip()
        if not raw:
            return DEFAULT_NUM_DRAFT_TOKENS
        source = NUM_DRAFT_TOKENS_ENV
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{source} must be >= 1, got {value}")
    return value


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
    """A simulated model: name, the rates it runs at, and how its decode scales with
    the batch (`batch_alpha`, node.backends.sim; None = the engine's default)."""

    name: str
    prefill_tps: float = 2000.0
    decode_tps: float = 50.0
    context_length: int = 32768
    batch_alpha: float | None = None
    # Set: a model that loads and unloads (starts unloaded), taking this many bytes
    # resident, and `load_seconds` to load. None: always loaded, takes nothing.
    memory_bytes: int | None = None
    load_seconds: float = 0.2

    @classmethod
    def parse(cls, spec: str) -> SimModelSpec:
        """`NAME[:PREFILL_TPS[:DECODE_TPS[:CONTEXT[:ALPHA]]]][,mem=GB][,load=S]`, e.g.
        `sim-7b:1500:40` or `sim-7b:1500:40:32768:0.15,mem=4,load=0.5` (ALPHA >= 0:
        1 = no batching gain; `mem`: starts unloaded, loads in `load` s and takes GiB)."""
        spec, *options = spec.split(",")
        extra: dict[str, float | int] = {}
        for option in options:
            key, _, raw = option.partition("=")
            if key not in ("mem", "load"):
                raise ValueError(f"simulated model option {option!r}: expected mem=GIB or load=S")
            try:
                number = float(raw)
            except ValueError:
                raise ValueError(f"simulated model option {option!r}: not a number") from None
            if number < 0 or (key == "mem" and number == 0):
                raise ValueError(f"simulated model option {option!r}: must be > 0")
            if key == "mem":
                extra["memory_bytes"] = int(number * 2**30)
            else:
                extra["load_seconds"] = number
        parts = spec.split(":")
        if not parts[0]:
            raise ValueError(f"simulated model spec {spec!r} has no name")
        if len(parts) > 5:
            raise ValueError(f"simulated model spec {spec!r}: at most 5 fields")
        try:
            nums = [float(p) for p in parts[1:5]]
        except ValueError:
            raise ValueError(f"simulated model spec {spec!r}: rates must be numbers") from None
        if any(n <= 0 for n in nums[:3]):
            raise ValueError(f"simulated model spec {spec!r}: rates must be > 0")
        if len(nums) > 3 and nums[3] < 0:
            raise ValueError(f"simulated model spec {spec!r}: ALPHA must be >= 0")
        kwargs: dict[str, float | int] = {}
        for key, value in zip(("prefill_tps", "decode_tps"), nums[:2], strict=False):
            kwargs[key] = value
        if len(nums) > 2:
            kwargs["context_length"] = int(nums[2])
        if len(nums) > 3:
            kwargs["batch_alpha"] = nums[3]
        return cls(parts[0], **kwargs, **extra)  # type: ignore[arg-type]


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
    # MLX: requests running at once (the batch limit; batched and one-at-a-time
    # together); the rest wait.
    max_running: int = DEFAULT_MAX_RUNNING
    # MLX: continuous batching (off: every request steps one token per turn).
    batching: bool = True
    # MLX: prompt tokens prefilled per engine step (batched requests); running
    # streams wait at most one such chunk per token.
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # MLX: bytes the running requests' KV caches may take (None: what the
    # machine has available, less a margin).
    kv_budget: int | None = None
    # Bytes macmesh may use on this machine (`--memory-budget`), reported to
    # coordinators for placement; None = no budget.
    memory_budget: int | None = None
    # Disk bytes a model copy into this node leaves free (`--min-free-disk`); a copy
    # that would eat into them is refused (node.models.copy).
    min_free_disk_bytes: int = 1 << 30
    # Waiting generations beyond this are refused (RESOURCE_EXHAUSTED).
    max_waiting: int = 256
    # Speculative decoding: tokens a draft proposes per round (`--num-draft-tokens`,
    # else `$MACMESH_NUM_DRAFT_TOKENS`, resolved by the entry point).
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    # The prompt caches (MLX, and the simulated engine; GGUF nodes use its block size).
    cache: CacheConfig = field(default_factory=CacheConfig)
    # Models to load at start (ids from the catalog).
    preload: tuple[str, ...] = ()
    # Seconds in-flight streams get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 10.0
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # SIMULATED models (benchmarks, routing tests): served by node.backends.sim.
    sim_models: tuple[SimModelSpec, ...] = ()
    # Voice models (node.backends.speech: PocketSphinx, eSpeak NG, MLX engines on Macs).
    # Off by default for embedded nodes; `macmesh node` / `up` turn it on (--no-audio: off).
    audio: bool = False
    # Mesh secret (mesh.auth; a MeshSecret follows its key files); None = open, allowed
    # only on loopback unless `insecure`.
    secret: bytes | MeshSecret | None = None
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Bonjour: announce this node to coordinators of the same mesh name.
    announce: bool = False
    mesh: str = "default"
    # Interfaces Bonjour uses (IPs); empty = all.
    bonjour_interfaces: tuple[str, ...] = ()
    # Node groups (node.backends.group): the IP this node's ranks listen on for the
    # ring ("" = the address the coordinator reaches the node at) and the ring port
    # (0 = any free port; rank 0's control port is the next one).
    group_host: str = ""
    group_port: int = 0

    @property
    def resolved_models_dir(self) -> Path:
        """`--models-dir`, else `$MACMESH_HOME/models`."""
        return self.models_dir if self.models_dir is not None else self.home / "models"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"
