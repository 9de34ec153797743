r"""Authentication of mesh links: a shared secret on every call, optional mTLS.

Every Mac of a mesh shares one secret (`MACMESH_SECRET`, or the key file
`macmesh init` writes to `~/.macmesh/secret`; copy it to every Mac). The raw
secret never travels. Per call the client sends

    x-macmesh-ts     unix seconds
    x-macmesh-nonce  16 random bytes, hex
    x-macmesh-auth   hex HMAC-SHA256(secret, b"client|ts|nonce|/pkg.Service/Method")

The node checks the MAC in constant time, refuses timestamps more than
`WINDOW_S` off its clock and nonces it has seen within that window (replay),
and answers in its initial metadata `x-macmesh-proof` = HMAC(secret,
b"server|" + nonce). The client interceptors check that proof before the
caller sees a response: a node with another secret refuses us, a stray machine
cannot prove anything, and either way the call fails with UNAUTHENTICATED
(`mesh.errors.Unauthenticated` through NodeClient). So a coordinator treats an
announcement as an address to try, and routes to a node only once its
WatchState stream has delivered a (thus verified) state; UNAUTHENTICATED
there means "rejected". Other errors (UNAVAILABLE...) pass through unchanged.

What this does not do: the MAC covers no message body and nothing is
encrypted, so an active man in the middle can read or relay traffic. Where
the network is not trusted, add mTLS (`server_credentials` /
`channel_credentials`; both layers can run together). A lab makes its
certificates once, with one CA (keep ca.key off the Macs):

    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=macmesh-ca \
        -addext basicConstraints=critical,CA:TRUE -keyout ca.key -out ca.pem
    # per Mac: the SANs name what coordinators dial (Bonjour: NAME.local and its IP)
    printf 'subjectAltName=DNS:mac1.local,IP:10.0.0.11\nextendedKeyUsage=serverAuth,clientAuth\n' \
        > mac1.ext
    openssl req -newkey rsa:2048 -nodes -subj /CN=mac1 -keyout mac1.key -out mac1.csr
    openssl x509 -req -in mac1.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
        -extfile mac1.ext -out mac1.pem

Rotation without downtime (`MeshSecret`, `rotate_secret`): `macmesh init --rotate` moves
`secret` to `secret.previous` (with an expiry, default an hour) and writes a new `secret`;
running processes see both files change (checked at most once a second). Until the expiry a
process signs with the new secret and also sends `x-macmesh-auth-previous`, the MAC under
the old one; it accepts a call whose either MAC verifies under either secret and proves
itself with the secret that matched, and accepts a proof under either. So Macs that have
rotated and Macs that have not yet rotated keep talking, in any order, for the whole
window; after it the old secret is refused. Calls already open (WatchState streams) are
not cut. `MACMESH_SECRET` (the environment) is fixed for the process's life.

Each Mac then runs with `--tls-cert mac1.pem --tls-key mac1.key --tls-ca ca.pem`;
its certificate serves as server and as client certificate. Where addresses
change (DHCP), give every certificate one fixed SAN (`DNS:macmesh-node`) and
set the channel option `("grpc.ssl_target_name_override", "macmesh-node")`.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import inspect
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc

log = logging.getLogger(__name__)

ENV_VAR = "MACMESH_SECRET"
KEY_FILE = "secret"
# The secret before the last rotation, accepted until its `expires=` time.
PREVIOUS_FILE = "secret.previous"
ROTATION_WINDOW_S = 3600
# Key files are re-read when they change, checked at most this often.
RELOAD_S = 1.0
MIN_SECRET_CHARS = 16
WINDOW_S = 120
MAX_REMEMBERED_NONCES = 1_000_000

TS_KEY, NONCE_KEY, AUTH_KEY = "x-macmesh-ts", "x-macmesh-nonce", "x-macmesh-auth"
PROOF_KEY = "x-macmesh-proof"
# During a rotation window: the MAC under the previous secret, for nodes not yet rotated.
PREVIOUS_AUTH_KEY = "x-macmesh-auth-previous"
MISSING = "missing mesh credentials: set MACMESH_SECRET or run `macmesh init` (same on every Mac)"
WRONG = "wrong mesh secret"

# Server side: a tuple of pairs; client side: a grpc.aio.Metadata.
Metadata: TypeAlias = "Iterable[tuple[str, str | bytes]] | grpc.aio.Metadata"


class AuthConfigError(ValueError):
    """The secret or a TLS file is missing, unreadable or unsafe; the message says how to fix it."""


# ---------- the secret ----------


def load_secret(home: Path, env: Mapping[str, str] = os.environ) -> bytes | None:
    """The mesh secret: `$MACMESH_SECRET`, else `home/secret`, else None (open mode)."""
    if ENV_VAR in env:
        # Set but empty or short is a mistake, never a silent fall back to open mode.
        return _checked(env[ENV_VAR], f"${ENV_VAR}")
    path = home / KEY_FILE
    text = _read_private(path)
    return None if text is None else _checked(text, f"key file {path}")


def _read_private(path: Path) -> str | None:
    """A key file's text; None if it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    # Like ssh: a secret others can read is no secret.
    if os.name == "posix" and st.st_mode & 0o077:
        raise AuthConfigError(
            f"key file {path} is readable by others (mode {st.st_mode & 0o777:o}); "
            f"fix with: chmod 600 {path}"
        )
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read key file {path}: {exc}") from None


def _load_previous(path: Path) -> tuple[bytes, float] | None:
    """`secret.previous`: the old secret and until when it is accepted (`expires=` line;
    without one, `ROTATION_WINDOW_S` after the file was written)."""
    text = _read_private(path)
    if text is None:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise AuthConfigError(f"key file {path} is empty")
    until: float | None = None
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if not sep or key.strip() != "expires" or not value.strip().isdigit():
            raise AuthConfigError(f"key file {path}: expected `expires=UNIX_SECONDS`, got {line!r}")
        until = float(value.strip())
    if until is None:
        until = path.stat().st_mtime + ROTATION_WINDOW_S
    return _checked(lines[0], f"key file {path}"), until


class MeshSecret:
    """The secret this process signs with, and the ones it accepts.

    `current` signs; `accepted()` is the current one plus, until its expiry, the previous
    one (a rotation window). Built from a home (`from_home`), it follows `secret` and
    `secret.previous` on disk: both are re-stat'ed at most once a second, a change is
    re-read, and a file that fails to read keeps what was in force (logged). Built from
    bytes, it is fixed. Thread-safe.
    """

    def __init__(
        self,
        current: bytes,
        previous: bytes | None = None,
        *,
        previous_until: float = float("inf"),
        home: Path | None = None,
    ) -> None:
        self._current = current
        self._previous = previous
        self._until = previous_until
        self._home = home
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._stat() if home is not None else None

    @classmethod
    def from_home(cls, home: Path, env: Mapping[str, str] = os.environ) -> MeshSecret | None:
        """`$MACMESH_SECRET` (fixed), else `home/secret` (+ `secret.previous`, followed on
        disk), else None (open mode)."""
        if ENV_VAR in env:
            return cls(_checked(env[ENV_VAR], f"${ENV_VAR}"))
        current = load_secret(home, env={})
        if current is None:
            return None
        previous = _load_previous(home / PREVIOUS_FILE)
        if previous is None:
            return cls(current, home=home)
        return cls(current, previous[0], previous_until=previous[1], home=home)

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        assert self._home is not None
        out: list[tuple[int, int, int] | None] = []
        for name in (KEY_FILE, PREVIOUS_FILE):
            try:
                st = (self._home / name).stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _refresh(self) -> None:
        if self._home is None:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._checked < RELOAD_S:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a bad file is reported once, and re-read once changed
            try:
                current = load_secret(self._home, env={})
                previous = _load_previous(self._home / PREVIOUS_FILE)
            except (AuthConfigError, OSError) as exc:
                log.error("mesh secret unchanged: %s", exc)
                return
            if current is None:
                log.error("mesh secret file %s is gone; keeping the secret in force",
                          self._home / KEY_FILE)  # fmt: skip
                return
            if current != self._current:
                log.warning("mesh secret changed (%s); signing with the new one", KEY_FILE)
            self._current = current
            self._previous, self._until = previous if previous else (None, 0.0)

    @property
    def current(self) -> bytes:
        """The secret calls are signed with."""
        self._refresh()
        return self._current

    def previous(self) -> bytes | None:
        """The previous secret while its window lasts, else None."""
        self._refresh()
        if self._previous is None or time.time() >= self._until or self._previous == self._current:
            return None
        return self._previous

    def accepted(self) -> tuple[bytes, ...]:
        """Secrets a peer may use now: the current one, then the previous one in its window."""
        previous = self.previous()
        return (self._current,) if previous is None else (self._current, previous)


def as_mesh_secret(secret: bytes | MeshSecret) -> MeshSecret:
    return secret if isinstance(secret, MeshSecret) else MeshSecret(secret)


def rotate_secret(home: Path, new: str | None = None, *, window: float = ROTATION_WINDOW_S) -> Path:
    """Start a rotation: `secret` becomes `secret.previous` (accepted for `window` more
    seconds), and `new` (None: a fresh random one) the current secret."""
    old = load_secret(home, env={})
    if old is None:
        raise AuthConfigError(f"no secret in {home / KEY_FILE} to rotate; run `macmesh init`")
    fresh = _checked(new, "the new secret") if new is not None else None
    if fresh == old:
        raise AuthConfigError("the new secret is the current one; nothing to rotate")
    expires = int(time.time() + max(window, 0))
    _write_private(home, PREVIOUS_FILE, f"{old.decode()}\nexpires={expires}\n")
    text = fresh.decode() if fresh is not None else secrets.token_hex(32)
    return _write_private(home, KEY_FILE, text + "\n")


def _write_private(home: Path, name: str, text: str) -> Path:
    """Write `home/name` (mode 0600) atomically, replacing it."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / name
    fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{name}-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _checked(text: str, where: str) -> bytes:
    text = text.strip()
    if len(text) < MIN_SECRET_CHARS:
        raise AuthConfigError(
            f"{where} is too short ({len(text)} chars, need {MIN_SECRET_CHARS}+); "
            "`macmesh init` makes a good one"
        )
    return text.encode("utf-8")


def init_secret(home: Path, *, force: bool = False) -> Path:
    """Write a fresh random secret to `home/secret` (mode 0600), atomically."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / KEY_FILE
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".secret-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            # link() fails if the name exists: never overwrites, even a racing init.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AuthConfigError(f"{path} already exists; use --force to replace it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


# ---------- MACs ----------


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _same(expected: str, got: str) -> bool:
    return hmac.compare_digest(expected.encode(), got.encode("ascii", "replace"))


def _method(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def auth_metadata(
    secret: bytes,
    method: str | bytes,
    *,
    now: float | None = None,
    previous: bytes | None = None,
) -> tuple[list[tuple[str, str]], str]:
    """Metadata authenticating one call of `method`, and the nonce it uses (`previous`:
    also the MAC under the secret before a rotation, for peers that have not rotated)."""
    ts = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(16)
    method = _method(method)
    out = [(TS_KEY, ts), (NONCE_KEY, nonce), (AUTH_KEY, _mac(secret, "client", ts, nonce, method))]
    if previous is not None:
        out.append((PREVIOUS_AUTH_KEY, _mac(previous, "client", ts, nonce, method)))
    return out, nonce


def verify_proof(metadata: Metadata | None, secret: bytes | Sequence[bytes], nonce: str) -> bool:
    """Whether a server's initial metadata proves it knows `secret` (one of them, for a
    sequence) for this nonce."""
    got = _get(metadata or (), PROOF_KEY)
    if got is None:
        return False
    ok = False
    for s in (secret,) if isinstance(secret, bytes) else secret:
        ok |= _same(_mac(s, "server", nonce), got)
    return ok


def _get(metadata: Metadata, key: str) -> str | None:
    if isinstance(metadata, grpc.aio.Metadata):
        value = metadata.get(key)
    else:
        value = next((v for k, v in metadata if k == key), None)
    return value if isinstance(value, str) else None


# ---------- server ----------

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# A signed call's nonce, and the secrets its proof may use.
_Signed: TypeAlias = tuple[str, tuple[bytes, ...]]
# (request_streaming, response_streaming) -> the handler's attribute, its factory.
_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., Any]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class _Nonces:
    """Nonces seen in the window; each is forgotten once its timestamp is stale anyway."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []

    def add(self, nonce: str, expires: float, now: float) -> bool | None:
        """True if new, False if replayed, None if full (refuse rather than forget)."""
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._seen:
            return False
        if len(self._seen) >= self.limit:
            return None
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (expires, nonce))
        return True


class AuthServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without valid credentials; proves the node's secret on the others."""

    def __init__(
        self, secret: bytes | MeshSecret, *, max_nonces: int = MAX_REMEMBERED_NONCES
    ) -> None:
        self._secret = as_mesh_secret(secret)
        self._nonces = _Nonces(max_nonces)

    def check(self, method: str, metadata: Metadata) -> tuple[grpc.StatusCode, str] | str:
        """The call's nonce if it is authentic, else the status to refuse it with."""
        verdict = self.verify(method, metadata)
        return verdict if isinstance(verdict[0], grpc.StatusCode) else verdict[0]

    def verify(
        self, method: str, metadata: Metadata
    ) -> tuple[grpc.StatusCode, str] | tuple[str, bytes]:
        """The call's nonce and the secret it proved, if it is authentic, else the status to
        refuse it with. Either of the call's MACs (current, previous) may match either
        secret this node accepts (current, previous in its window)."""
        ts, nonce, mac = (_get(metadata, k) for k in (TS_KEY, NONCE_KEY, AUTH_KEY))
        if mac is None:
            return grpc.StatusCode.UNAUTHENTICATED, MISSING
        matched: bytes | None = None
        if ts is not None and nonce is not None:
            macs = [mac, _get(metadata, PREVIOUS_AUTH_KEY)]
            for secret in self._secret.accepted():
                expected = _mac(secret, "client", ts, nonce, method)
                if any(m is not None and _same(expected, m) for m in macs):
                    matched = secret
                    break
        if matched is None or ts is None or nonce is None:
            return grpc.StatusCode.UNAUTHENTICATED, WRONG
        # Past this point the caller knows the secret: it may learn more.
        now = time.time()
        if not (ts.isascii() and ts.isdigit() and abs(now - int(ts)) <= WINDOW_S):
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"stale mesh credentials (timestamp {ts}, node clock {int(now)}, "
                f"allowed skew {WINDOW_S}s): sync the clocks",
            )
        fresh = self._nonces.add(nonce, int(ts) + WINDOW_S, now)
        if fresh is None:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls to remember; retry"
        if not fresh:
            return grpc.StatusCode.UNAUTHENTICATED, "replayed mesh credentials"
        return nonce, matched

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = _method(handler_call_details.method)
        verdict = self.verify(method, handler_call_details.invocation_metadata or ())
        handler: _Handler | None = await continuation(handler_call_details)
        if isinstance(verdict[0], grpc.StatusCode):
            # Checked before the lookup result is used: unknown methods are not revealed.
            return _aborting(handler, verdict[0], str(verdict[1]))
        if handler is None:
            return None  # type: ignore[return-value]  # grpc answers UNIMPLEMENTED
        nonce, secret = verdict
        assert isinstance(nonce, str) and isinstance(secret, bytes)
        return _proving(handler, ((PROOF_KEY, _mac(secret, "server", nonce)),))


def _aborting(handler: _Handler | None, code: grpc.StatusCode, details: str) -> _Handler:
    async def abort(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, details)

    # Same shape as the real method, so grpc reads the call the way the client sent it.
    kind = (handler.request_streaming, handler.response_streaming) if handler else (False, False)
    result: _Handler = _KINDS[kind][1](abort)
    return result


def _proving(handler: _Handler, proof: Sequence[tuple[str, str]]) -> _Handler:
    """The same handler, sending `proof` as initial metadata before anything else."""
    name, factory = _KINDS[handler.request_streaming, handler.response_streaming]
    inner = getattr(handler, name)
    wrapped: Callable[..., Any]
    # grpc.aio dispatches on the function's kind: keep it (async generator or coroutine).
    if inspect.isasyncgenfunction(inner):

        async def wrapped_gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.send_initial_metadata(proof)
            async for response in inner(request, context):
                yield response

        wrapped = wrapped_gen
    elif inspect.iscoroutinefunction(inner):

        async def wrapped_coro(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.send_initial_metadata(proof)
            return await inner(request, context)

        wrapped = wrapped_coro
    else:
        raise TypeError(f"mesh auth needs async handlers; {inner!r} is not")
    result: _Handler = factory(wrapped, handler.request_deserializer, handler.response_serializer)
    return result


def server_interceptors(secret: bytes | MeshSecret) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    """Interceptors for `grpc.aio.server(interceptors=...)` (none in open mode: don't call)."""
    return [AuthServerInterceptor(secret)]


# ---------- client ----------


def _unverified() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "the node did not prove it knows the mesh secret (different secret, or not a macmesh node)",
        None,
    )


class _ClientAuth:
    def __init__(self, secret: bytes | MeshSecret) -> None:
        self.secret = as_mesh_secret(secret)

    def sign(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[grpc.aio.ClientCallDetails, _Signed]:
        """The call signed with the current secret (and the previous one in its window);
        what its proof is checked against."""
        current, previous = self.secret.current, self.secret.previous()
        extra, nonce = auth_metadata(current, details.method, previous=previous)
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
        signed = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        return signed, (nonce, (current,) if previous is None else (current, previous))


class _UnaryUnaryAuth(_ClientAuth, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        details, (nonce, secrets_) = self.sign(client_call_details)
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError:
            return call  # the node's own error reaches the caller as is
        except BaseException:
            call.cancel()
            raise
        if not verify_proof(await call.initial_metadata(), secrets_, nonce):
            raise _unverified()
        return call


class _UnaryStreamAuth(_ClientAuth, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> AsyncIterator[Any]:
        details, signed = self.sign(client_call_details)
        call = await continuation(details, request)
        return self._verified(call, *signed)

    async def _verified(
        self, call: Any, nonce: str, secrets_: tuple[bytes, ...]
    ) -> AsyncIterator[Any]:
        # Checked at the first message, not at the headers: a refused call keeps its own error.
        checked = False
        async for response in call:
            if not checked:
                if not verify_proof(await call.initial_metadata(), secrets_, nonce):
                    call.cancel()
                    raise _unverified()
                checked = True
            yield response
        if not checked and not verify_proof(await call.initial_metadata(), secrets_, nonce):
            raise _unverified()


def client_interceptors(secret: bytes | MeshSecret) -> list[Any]:
    """Interceptors for `grpc.aio.*_channel(interceptors=...)`: sign calls, verify the node."""
    return [_UnaryUnaryAuth(secret), _UnaryStreamAuth(secret)]


# ---------- mTLS ----------


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise AuthConfigError(f"TLS {what} {path} is not a PEM file")
    return data


def server_credentials(cert: Path, key: Path, ca: Path | None) -> grpc.ServerCredentials:
    """TLS for a node; with `ca`, clients must show a certificate that CA signed."""
    pair = (_read_pem(key, "key"), _read_pem(cert, "certificate"))
    roots = _read_pem(ca, "CA") if ca is not None else None
    return grpc.ssl_server_credentials([pair], roots, require_client_auth=ca is not None)


def channel_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials:
    """TLS for a client: trust `ca` (else system roots), show `cert`/`key` if given."""
    if (cert is None) != (key is None):
        raise AuthConfigError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "CA") if ca is not None else None,
        private_key=_read_pem(key, "key") if key is not None else None,
        certificate_chain=_read_pem(cert, "certificate") if cert is not None else None,
    )
