"""Mesh authentication against the real Node service (simulated model) over real gRPC."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from mesh import wire
from mesh.auth import (
    MISSING,
    WRONG,
    AuthConfigError,
    AuthServerInterceptor,
    _Nonces,
    auth_metadata,
    channel_credentials,
    client_interceptors,
    init_secret,
    load_secret,
    server_credentials,
    server_interceptors,
    verify_proof,
)
from mesh.errors import Unauthenticated
from mesh.types import GenerateRequest, SamplingParams, TextPrompt
from node.config import NodeConfig, SimModelSpec
from node.rpc import NodeServicer
from node.service import NodeCore
from proto import node_pb2 as pb
from proto import node_pb2_grpc as pb_grpc

SECRET = b"correct horse battery staple"
OTHER = b"another mesh, another secret"
LIST = "/macmesh.v1.Node/ListModels"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@asynccontextmanager
async def node(
    tmp_path: Path, secret: bytes | None, creds: grpc.ServerCredentials | None = None
) -> AsyncIterator[str]:
    """A real node service + health on port 0, as node/app.py builds it; yields the target."""
    core = NodeCore(
        NodeConfig(
            grpc_port=0,
            home=tmp_path / "home",
            models_dir=tmp_path / "models",
            scan_hf_cache=False,
            sim_models=(SimModelSpec("sim", 10000, 500),),
        )
    )
    server = grpc.aio.server(interceptors=server_interceptors(secret) if secret else None)
    pb_grpc.add_NodeServicer_to_server(NodeServicer(core), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    bind = "127.0.0.1:0"
    port = server.add_secure_port(bind, creds) if creds else server.add_insecure_port(bind)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await core.close(0)
        await server.stop(0)


@asynccontextmanager
async def channel(
    target: str,
    secret: bytes | None,
    creds: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> AsyncIterator[grpc.aio.Channel]:
    icp = client_interceptors(secret) if secret else None
    ch = (
        grpc.aio.secure_channel(target, creds, options=options, interceptors=icp)
        if creds
        else grpc.aio.insecure_channel(target, interceptors=icp)
    )
    async with ch:
        yield ch


def gen_request(model: str = "sim") -> pb.GenerateRequest:
    req = GenerateRequest(model, TextPrompt("hello"), SamplingParams(max_tokens=4))
    return wire.request_to_pb(req)


async def exercise(ch: grpc.aio.Channel) -> None:
    """ListModels, a streaming Generate, WatchState and health all work."""
    stub = pb_grpc.NodeStub(ch)
    # The caller's own metadata travels along with the credentials.
    models = await stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=[("x-trace", "1")])
    assert [m.id for m in models.models] == ["sim"]
    events = [e async for e in stub.Generate(gen_request(), timeout=10)]
    assert events and events[-1].WhichOneof("event") == "finish"
    watch = stub.WatchState(pb.WatchStateRequest(interval_ms=50))
    async for _state in watch:
        break
    watch.cancel()
    health = health_pb2_grpc.HealthStub(ch)
    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    hwatch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
    async for first in hwatch:
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        break
    hwatch.cancel()


def _same_bytes(b: bytes) -> bytes:
    return b


async def refused(awaitable: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(awaitable, "__aiter__"):
            async for _ in awaitable:
                pass
        else:
            await awaitable
    return info.value


# ---------- the shared secret ----------


async def test_correct_secret_works_and_node_proves_itself(tmp_path: Path) -> None:
    async with node(tmp_path, SECRET) as target:
        async with channel(target, SECRET) as ch:
            await exercise(ch)
        # The proof, checked by hand: right only for this secret and this nonce.
        async with channel(target, None) as ch:
            md, nonce = auth_metadata(SECRET, LIST)
            call = pb_grpc.NodeStub(ch).ListModels(pb.ListModelsRequest(), metadata=md)
            await call
            headers = await call.initial_metadata()
            assert verify_proof(headers, SECRET, nonce)
            assert not verify_proof(headers, OTHER, nonce)
            assert not verify_proof(headers, SECRET, auth_metadata(SECRET, LIST)[1])


async def test_errors_of_the_node_pass_through(tmp_path: Path) -> None:
    async with node(tmp_path, SECRET) as target, channel(target, SECRET) as ch:
        err = await refused(pb_grpc.NodeStub(ch).Generate(gen_request("nope"), timeout=5))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "nope" in (err.details() or "")
        err = await refused(pb_grpc.NodeStub(ch).LoadModel(pb.LoadModelRequest(model="nope")))
        assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_no_credentials_are_refused_clearly(tmp_path: Path) -> None:
    async with node(tmp_path, SECRET) as target, channel(target, None) as ch:
        stub = pb_grpc.NodeStub(ch)
        for call in (
            stub.ListModels(pb.ListModelsRequest()),
            stub.Generate(gen_request()),
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()),
            # Unknown methods are not revealed to strangers.
            ch.unary_unary("/macmesh.v1.Node/Nope", _same_bytes, _same_bytes)(b""),
        ):
            err = await refused(call)
            assert (err.code(), err.details()) == (UNAUTH, MISSING)
        # NodeClient's mapping turns it into the mesh error.
        assert isinstance(wire.error_from_status(err.code(), MISSING), Unauthenticated)


async def test_wrong_secret_is_refused(tmp_path: Path) -> None:
    async with node(tmp_path, SECRET) as target, channel(target, OTHER) as ch:
        stub = pb_grpc.NodeStub(ch)
        for call in (stub.ListModels(pb.ListModelsRequest()), stub.Generate(gen_request())):
            err = await refused(call)
            assert (err.code(), err.details()) == (UNAUTH, WRONG)


async def test_replayed_stale_and_misdirected_credentials_are_refused(tmp_path: Path) -> None:
    async with node(tmp_path, SECRET) as target, channel(target, None) as ch:
        stub = pb_grpc.NodeStub(ch)
        md, _ = auth_metadata(SECRET, LIST)
        await stub.ListModels(pb.ListModelsRequest(), metadata=md)
        err = await refused(stub.ListModels(pb.ListModelsRequest(), metadata=md))
        assert err.code() == UNAUTH and "replayed" in (err.details() or "")

        old, _ = auth_metadata(SECRET, LIST, now=time.time() - 1000)
        err = await refused(stub.ListModels(pb.ListModelsRequest(), metadata=old))
        assert err.code() == UNAUTH and "stale" in (err.details() or "")

        # Credentials are bound to the method they were made for.
        md, _ = auth_metadata(SECRET, LIST)
        err = await refused(stub.Generate(gen_request(), metadata=md))
        assert (err.code(), err.details()) == (UNAUTH, WRONG)


def test_nonce_memory_is_bounded_and_expires() -> None:
    nonces = _Nonces(limit=2)
    assert nonces.add("a", expires=100, now=0) is True
    assert nonces.add("a", expires=100, now=50) is False  # replay
    assert nonces.add("b", expires=200, now=50) is True
    assert nonces.add("c", expires=200, now=50) is None  # full: refuse rather than forget
    # Past its expiry (= its timestamp is stale, refused anyway) a nonce is forgotten.
    assert nonces.add("c", expires=200, now=101) is True
    assert nonces.add("a", expires=300, now=201) is True
    # Full, through the interceptor: RESOURCE_EXHAUSTED, never a forgotten replay.
    icp = AuthServerInterceptor(SECRET, max_nonces=1)
    assert isinstance(icp.check(LIST, auth_metadata(SECRET, LIST)[0]), str)
    verdict = icp.check(LIST, auth_metadata(SECRET, LIST)[0])
    assert isinstance(verdict, tuple) and verdict[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_stray_or_wrong_node_fails_the_proof(tmp_path: Path) -> None:
    # An open stray machine answers, but cannot prove it knows the secret.
    async with node(tmp_path / "open", None) as target, channel(target, SECRET) as ch:
        stub = pb_grpc.NodeStub(ch)
        for call in (
            stub.ListModels(pb.ListModelsRequest()),
            stub.WatchState(pb.WatchStateRequest(interval_ms=50)),
        ):
            err = await refused(call)
            assert err.code() == UNAUTH and "did not prove" in (err.details() or "")
        md, nonce = auth_metadata(SECRET, LIST)
        call = stub.ListModels(pb.ListModelsRequest(), metadata=md)
        assert not verify_proof(await call.initial_metadata(), SECRET, nonce)
    # A node of another mesh refuses us, so no proof either: rejected both ways.
    async with node(tmp_path / "other", OTHER) as target, channel(target, SECRET) as ch:
        err = await refused(pb_grpc.NodeStub(ch).WatchState(pb.WatchStateRequest()))
        assert (err.code(), err.details()) == (UNAUTH, WRONG)


# ---------- secret files ----------


def test_load_secret_env_beats_file(tmp_path: Path) -> None:
    assert load_secret(tmp_path, {}) is None
    path = init_secret(tmp_path)
    assert load_secret(tmp_path, {}) == path.read_text().strip().encode()
    assert load_secret(tmp_path, {"MACMESH_SECRET": "x" * 16}) == b"x" * 16
    for short in ("", "too short"):
        with pytest.raises(AuthConfigError, match="too short"):
            load_secret(tmp_path, {"MACMESH_SECRET": short})


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_key_file_must_be_private(tmp_path: Path) -> None:
    path = init_secret(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 64
    path.chmod(0o644)
    with pytest.raises(AuthConfigError, match=f"chmod 600 {path}"):
        load_secret(tmp_path, {})


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    path = init_secret(tmp_path / "new")
    before = path.read_text()
    with pytest.raises(AuthConfigError, match="--force"):
        init_secret(tmp_path / "new")
    assert path.read_text() == before
    assert init_secret(tmp_path / "new", force=True) == path
    assert path.read_text() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temp files left


# ---------- mTLS ----------

OPENSSL_CNF = """
[req]
distinguished_name = dn
prompt = no
[dn]
CN = macmesh
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
[leaf]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
"""


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and one leaf certificate (SAN 127.0.0.1, localhost) signed by it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("mTLS tests need the `openssl` CLI (the `cryptography` package is absent)")
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True, timeout=60)

    new_key = ("-newkey", "rsa:2048", "-nodes", "-config", "openssl.cnf")
    run("req", "-x509", *new_key, "-extensions", "ca", "-subj", "/CN=test-ca", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", *new_key, "-subj", "/CN=mac1", "-keyout", "mac1.key", "-out", "mac1.csr")
    run("x509", "-req", "-in", "mac1.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "openssl.cnf", "-extensions", "leaf",
        "-out", "mac1.pem")  # fmt: skip
    return Pki(d / "ca.pem", d / "mac1.pem", d / "mac1.key")


async def test_mtls_with_secret(tmp_path: Path, pki: Pki) -> None:
    server_creds = server_credentials(pki.cert, pki.key, pki.ca)
    async with node(tmp_path, SECRET, server_creds) as target:
        mine = channel_credentials(pki.ca, pki.cert, pki.key)
        async with channel(target, SECRET, mine) as ch:
            await exercise(ch)
        # The certificate opens the connection, the secret is still required.
        async with channel(target, None, mine) as ch:
            err = await refused(pb_grpc.NodeStub(ch).ListModels(pb.ListModelsRequest()))
            assert (err.code(), err.details()) == (UNAUTH, MISSING)
        # No client certificate: the handshake fails, the call never reaches the service.
        async with channel(target, SECRET, channel_credentials(pki.ca, None, None)) as ch:
            err = await refused(pb_grpc.NodeStub(ch).ListModels(pb.ListModelsRequest(), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_hostname_is_checked(tmp_path: Path, pki: Pki) -> None:
    async with node(tmp_path, None, server_credentials(pki.cert, pki.key, None)) as target:
        creds = channel_credentials(pki.ca, None, None)
        async with channel(target.replace("127.0.0.1", "localhost"), None, creds) as ch:
            await pb_grpc.NodeStub(ch).ListModels(pb.ListModelsRequest(), timeout=5)
        # A name the certificate does not carry is refused (override to test it).
        opts = [("grpc.ssl_target_name_override", "mac2.local")]
        async with channel(target, None, creds, opts) as ch:
            err = await refused(pb_grpc.NodeStub(ch).ListModels(pb.ListModelsRequest(), timeout=5))
            assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_file_errors_are_clear(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(AuthConfigError, match=r"cannot read TLS certificate .*missing\.pem"):
        server_credentials(tmp_path / "missing.pem", pki.key, None)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(AuthConfigError, match="not a PEM file"):
        channel_credentials(tmp_path / "junk.pem", None, None)
    with pytest.raises(AuthConfigError, match="go together"):
        channel_credentials(pki.ca, pki.cert, None)


def test_mtls_end_to_end_through_node_and_coordinator_config(tmp_path: Path, pki: Pki) -> None:
    """The --tls-* settings as `macmesh node` / `coordinator` use them, plus the secret."""
    import time

    import httpx

    from coordinator.config import CoordinatorConfig
    from node.config import NodeConfig, SimModelSpec
    from tests.conftest import start_coordinator, start_node

    secret = b"mtls-secret-0123456789"
    node = start_node(
        NodeConfig(
            grpc_port=0,
            home=tmp_path / "n",
            models_dir=tmp_path / "n" / "m",
            scan_hf_cache=False,
            sim_models=(SimModelSpec("tls-model", 50_000, 2000),),
            secret=secret,
            tls_cert=pki.cert,
            tls_key=pki.key,
            tls_ca=pki.ca,
        )
    )
    good = bad = None
    try:
        good = start_coordinator(
            CoordinatorConfig(
                home=tmp_path / "c1",
                peers=(node.target,),
                secret=secret,
                tls_ca=pki.ca,
                tls_cert=pki.cert,
                tls_key=pki.key,
            )
        )
        body = {
            "model": "tls-model",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "x"}],
        }
        r = httpx.post(good.base_url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # Trusts the CA but shows no client certificate: the node never becomes usable.
        bad = start_coordinator(
            CoordinatorConfig(
                home=tmp_path / "c2", peers=(node.target,), secret=secret, tls_ca=pki.ca
            ),
            wait_nodes=0,
        )
        deadline = time.monotonic() + 10
        while not (view := httpx.get(bad.base_url + "/api/nodes").json()["nodes"][0])["error"]:
            assert time.monotonic() < deadline, "the node never reported its refusal"
            time.sleep(0.05)
        assert view["status"] != "online"
    finally:
        for c in (good, bad):
            if c is not None:
                c.stop()
        node.stop()
