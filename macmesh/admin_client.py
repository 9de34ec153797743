"""The CLI's client for a coordinator's admin API (`/api/...`): one place for the
URL, the API key and the error envelope, so every command reports failures alike."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import httpx

from mesh.paths import DEFAULT_HTTP_PORT


class AdminError(Exception):
    """The coordinator was unreachable or refused the call; the message says which."""


def add_coordinator_flags(p: argparse.ArgumentParser) -> None:
    """`--coordinator` and `--api-key`, as every admin command takes them."""
    p.add_argument(
        "--coordinator",
        default=os.environ.get("MACMESH_COORDINATOR", f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"),
        help="coordinator URL (default $MACMESH_COORDINATOR or http://127.0.0.1:1234)",
    )
    p.add_argument("--api-key", help="if the coordinator needs one (default: MACMESH_API_KEYS)")


class AdminClient:
    """Synchronous calls to one coordinator's admin API."""

    def __init__(self, coordinator: str, api_key: str | None = None, timeout: float = 30) -> None:
        key = api_key or next(
            (k.strip() for k in os.environ.get("MACMESH_API_KEYS", "").split(",") if k.strip()),
            None,
        )
        self.base = coordinator.rstrip("/")
        self.key = key
        self._http = httpx.Client(headers={"x-api-key": key} if key else {}, timeout=timeout)

    @classmethod
    def from_args(cls, args: argparse.Namespace, timeout: float = 30) -> AdminClient:
        return cls(args.coordinator, args.api_key, timeout)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of `method path`; AdminError with the server's message."""
        url = self.base + path
        try:
            resp = self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the coordinator at {self.base}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text
            raise AdminError(f"{method} {path}: HTTP {resp.status_code}: {message}")
        return resp.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any) -> Any:
        return self.call("POST", path, json=body)


def run_admin(
    args: argparse.Namespace, action: Callable[[AdminClient], int], timeout: float = 30
) -> int:
    """`action` with a client for `args`' coordinator: its exit status, or 1 with the
    coordinator's message on stderr when a call fails."""
    client = AdminClient.from_args(args, timeout)
    try:
        return action(client)
    except AdminError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
