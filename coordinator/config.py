"""Typed coordinator configuration (the CLI builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.limits import DEFAULT_MAX_BODY_BYTES, SEND_TIMEOUT_SECONDS
from coordinator.request_log import DEFAULT_SIZE
from mesh.auth import MeshSecret
from mesh.paths import DEFAULT_HTTP_PORT

__all__ = ["DEFAULT_HTTP_PORT", "CoordinatorConfig"]


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
    # How a node is picked among those serving the model (routing.policy).
    routing_policy: str = "cache-aware"
    # When non-empty, every route but health needs one of these keys.
    api_keys: frozenset[str] = frozenset()
    # Named keys with roles, caps and models (coordinator.keys); None: $MACMESH_HOME/
    # api_keys.json if it exists. Given, the file must exist.
    api_keys_file: Path | None = None
    # Without keys, the web UI and /api/* answer only to loopback unless this is set
    # (`--ui-open`: anyone who can reach the port can then manage the mesh; docs/web.md).
    ui_open: bool = False
    # Recent requests kept in memory for /api/requests and the web UI's Requests page.
    request_log_size: int = DEFAULT_SIZE
    # Largest request body accepted (`--max-body-mb`); larger ones get a 413 (limits.py).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Seconds a write to a streaming client may block before the stream is dropped and
    # the node's generation cancelled (a client that stopped reading).
    send_timeout: float = SEND_TIMEOUT_SECONDS
    # Seconds between Anthropic `ping` events while the prompt is processed.
    ping_interval: float = 2.0
    # Mesh secret for node links (mesh.auth; a MeshSecret follows its key files through a
    # rotation); None = open links (loopback labs only).
    secret: bytes | MeshSecret | None = None
    # TLS to nodes: CA to verify them, and our client certificate for mTLS.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Bonjour: find nodes of this mesh name; interfaces (IPs) to use, empty = all.
    discovery: bool = False
    mesh: str = "default"
    bonjour_interfaces: tuple[str, ...] = ()
