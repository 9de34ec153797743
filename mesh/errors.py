"""The one error tree of macmesh.

Each API maps these once, at its edge: the node's gRPC service to status
codes, the coordinator's HTTP APIs to their own envelopes. `code` is the name
of the matching gRPC status code, so this module needs no grpc import.

    MeshError
     ├── InvalidRequest          INVALID_ARGUMENT   (names the field)
     │    ├── PromptTooLong      INVALID_ARGUMENT   (tokens > context)
     │    └── RequestTooLarge    INVALID_ARGUMENT   (body over the size limit: HTTP 413)
     ├── ModelNotFound           NOT_FOUND          (names what is available)
     ├── Unauthenticated         UNAUTHENTICATED
     ├── PermissionDenied        PERMISSION_DENIED  (an API key's role or models forbid it)
     ├── RateLimited             RESOURCE_EXHAUSTED (an API key's concurrency cap: HTTP 429)
     ├── ModelLoadError          FAILED_PRECONDITION
     ├── Unavailable             UNAVAILABLE        (shutting down, no node)
     ├── Overloaded              RESOURCE_EXHAUSTED (queue full)
     ├── Cancelled               CANCELLED
     └── BackendError            INTERNAL           (the engine failed)
"""

from __future__ import annotations

from collections.abc import Iterable


class MeshError(Exception):
    """Base of every error macmesh raises on purpose."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(MeshError):
    """The request is malformed; `field` names the offending field."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class PromptTooLong(InvalidRequest):
    """The rendered prompt does not fit the model's context."""

    def __init__(self, tokens: int, maximum: int) -> None:
        super().__init__(f"prompt is too long: {tokens} tokens > {maximum} maximum")
        self.tokens = tokens
        self.maximum = maximum


class RequestTooLarge(InvalidRequest):
    """The HTTP request body is larger than the coordinator accepts (`limit` bytes)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body is too large: the limit is {limit} bytes ({limit / 2**20:g} MB)"
        )
        self.limit = limit


class ModelNotFound(MeshError):
    """No model of that name here; the message lists what is available."""

    code = "NOT_FOUND"

    def __init__(self, model: str, available: Iterable[str] = ()) -> None:
        names = sorted(available)
        listing = ", ".join(names) if names else "none"
        super().__init__(f"model {model!r} not found; available: {listing}")
        self.model = model
        self.available = tuple(names)


class Unauthenticated(MeshError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    """The caller is known but may not do this (an API key's role or allowed models)."""

    code = "PERMISSION_DENIED"


class RateLimited(MeshError):
    """The caller has too many requests running (an API key's `max_concurrent`).

    Not an `Overloaded`: the mesh has room, this caller has used its share."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadError(MeshError):
    """The model exists but cannot be loaded (bad files, out of memory)."""

    code = "FAILED_PRECONDITION"


class Unavailable(MeshError):
    """Nobody can serve this now (node shutting down, no node has the model)."""

    code = "UNAVAILABLE"


class Overloaded(MeshError):
    """The node's queue is full; retry later or elsewhere."""

    code = "RESOURCE_EXHAUSTED"


class Cancelled(MeshError):
    code = "CANCELLED"


class BackendError(MeshError):
    """The inference engine failed while serving a request."""

    code = "INTERNAL"


_BY_CODE: dict[str, type[MeshError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "FAILED_PRECONDITION": ModelLoadError,
    "UNAVAILABLE": Unavailable,
    "RESOURCE_EXHAUSTED": Overloaded,
    "CANCELLED": Cancelled,
    "INTERNAL": BackendError,
}


def from_code(code: str, message: str) -> MeshError:
    """Rebuild an error received over the wire (NOT_FOUND keeps the text as is)."""
    if code == "NOT_FOUND":
        err = ModelNotFound.__new__(ModelNotFound)
        MeshError.__init__(err, message)
        err.model = ""
        err.available = ()
        return err
    cls = _BY_CODE.get(code, BackendError)
    if cls is InvalidRequest:
        return InvalidRequest(message)
    return cls(message)
