"""Typed coordinator configuration (the CLI builds it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HTTP_PORT = 1234


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    """Everything `create_app` needs."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    home: Path
    # Nodes reached directly (`host:port`), until/besides discovery.
    peers: tuple[str, ...] = ()
    # Model for names nothing else resolves (`--default-model`).
    default_model: str | None = None
    # When non-empty, every route but health needs one of these keys.
    api_keys: frozenset[str] = frozenset()
    # Seconds between Anthropic `ping` events while the prompt is processed.
    ping_interval: float = 2.0
    # gRPC deadline for one generation (None: no deadline).
    request_timeout: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
