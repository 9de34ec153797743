"""Named API keys with roles, per-key concurrency caps and allowed models.

Keys come from two places. `--api-key KEY` / `MACMESH_API_KEYS` give unnamed keys that may
do everything (named "default", role admin: the behaviour before key files). The key file,
`$MACMESH_HOME/api_keys.json` or `--api-keys-file PATH`, names each key:

    {"keys": [
      {"name": "alice", "key": "sk-alice-...", "role": "user",
       "max_concurrent": 4, "models": ["qwen3-*", "claude-*"]},
      {"name": "ops", "key": "sha256:<64 hex digits>", "role": "admin"}
    ]}

- `name`: 1-64 of `A-Z a-z 0-9 _ . -`, unique. It labels the key in the request log and in
  `macmesh_key_requests_total`; the key itself is never logged.
- `key`: the secret, at least 16 characters, unique; or `sha256:HEX`, its SHA-256, so the
  file need not hold the secret (`printf %s KEY | shasum -a 256`).
- `role`: `user` (default: the inference APIs) or `admin` (also `/api/*` and the web UI's data).
- `max_concurrent`: generation requests this key may have running at once (a stream counts
  until it ends); more get 429. Absent: no cap.
- `models`: `fnmatch` patterns; a request is allowed when the model name it sent or the
  model that name resolves to matches one. Absent: every model.

The file is checked strictly at start (a bad one stops the coordinator with a message naming
the field) and re-read when it changes (checked at most once a second). A file that turns
invalid, or is removed, is reported in the log and the last good keys stay in force: a
broken edit never opens the coordinator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from mesh.auth import AuthConfigError

log = logging.getLogger(__name__)

KEY_FILE = "api_keys.json"
ADMIN, USER = "admin", "user"
ROLES = (ADMIN, USER)
# The name of keys given by --api-key / MACMESH_API_KEYS.
DEFAULT_NAME = "default"
MIN_KEY_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HASHED = re.compile(r"sha256:[0-9a-fA-F]{64}")
_FIELDS = frozenset({"name", "key", "role", "max_concurrent", "models"})
_CHECK_SECONDS = 1.0


class KeyFileError(AuthConfigError):
    """The key file is invalid; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key: who it is, what it may do. `secret` is the key, or `sha256:HEX`."""

    name: str
    secret: str
    role: str = USER
    max_concurrent: int | None = None
    models: tuple[str, ...] | None = None  # None: every model

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    def allows(self, requested: str | None, resolved: str | None = None) -> bool:
        """Whether the key may use a model asked for as `requested`, resolving to `resolved`."""
        if self.models is None:
            return True
        names = [n for n in (requested, resolved) if n]
        return any(fnmatchcase(n, p) for p in self.models for n in names)

    def __repr__(self) -> str:  # never the secret, in logs or tracebacks
        return f"ApiKey(name={self.name!r}, role={self.role!r})"


def _fail(where: str, message: str) -> KeyFileError:
    return KeyFileError(f"{where}: {message}")


def parse_keys(data: Any, where: str = KEY_FILE) -> tuple[ApiKey, ...]:
    """Validate a key file's JSON; KeyFileError names the field (`keys[1].role: ...`)."""
    if not isinstance(data, dict) or set(data) != {"keys"}:
        raise _fail(where, 'expected a JSON object {"keys": [...]}')
    entries = data["keys"]
    if not isinstance(entries, list) or not entries:
        raise _fail(where, "keys: must be a non-empty list")
    out: list[ApiKey] = []
    names: set[str] = set()
    secrets: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{at}: must be an object")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise KeyFileError(f"{at}.{unknown[0]}: unknown field (allowed: {sorted(_FIELDS)})")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise KeyFileError(f"{at}.name: required, 1-64 of A-Z a-z 0-9 _ . -")
        if name in names:
            raise KeyFileError(f"{at}.name: {name!r} is used twice")
        secret = entry.get("key")
        if not isinstance(secret, str) or not secret.strip():
            raise KeyFileError(f"{at}.key: required string")
        if secret.startswith("sha256:"):
            if not _HASHED.fullmatch(secret):
                raise KeyFileError(f"{at}.key: sha256: must be followed by 64 hex digits")
            secret = secret.lower()
        elif len(secret) < MIN_KEY_CHARS or secret != secret.strip():
            raise KeyFileError(
                f"{at}.key: at least {MIN_KEY_CHARS} characters, no surrounding spaces"
            )
        if secret in secrets:
            raise KeyFileError(f"{at}.key: the same key as another entry")
        role = entry.get("role", USER)
        if role not in ROLES:
            raise KeyFileError(f"{at}.role: must be one of {', '.join(ROLES)}")
        cap = entry.get("max_concurrent")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise KeyFileError(f"{at}.max_concurrent: must be a positive integer")
        models = entry.get("models")
        if models is not None:
            if (
                not isinstance(models, list)
                or not models
                or not all(isinstance(m, str) and m.strip() for m in models)
            ):
                raise KeyFileError(f"{at}.models: must be a non-empty list of model names/patterns")
            models = tuple(models)
        names.add(name)
        secrets.add(secret)
        out.append(ApiKey(name, secret, role, cap, models))
    return tuple(out)


def load_keys(path: Path) -> tuple[ApiKey, ...]:
    """Read and validate a key file; KeyFileError says what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"cannot read API key file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeyFileError(f"{path}: invalid JSON ({exc})") from None
    return parse_keys(data, str(path))


def _digest(presented: str) -> str:
    return "sha256:" + hashlib.sha256(presented.encode()).hexdigest()


class KeyStore:
    """The coordinator's keys: who a presented key is, and each name's running requests.

    `plain`: keys from the command line (admin, named "default"). `path`: the key file;
    read now if it exists (or if `required`, when it must), then followed on disk.
    `enabled` is fixed at start: with no key at all the coordinator runs open (and its web
    UI loopback-only), as before key files.
    """

    def __init__(
        self, plain: Iterable[str] = (), path: Path | None = None, *, required: bool = False
    ):
        self._plain = tuple(ApiKey(DEFAULT_NAME, k, ADMIN) for k in dict.fromkeys(plain) if k)
        self.path = path
        self._file: tuple[ApiKey, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        if path is not None and (required or path.exists()):
            self._file = load_keys(path)
            self._stamp = self._stat()
            log.info("API keys: %d from %s", len(self._file), path)
        self.enabled = bool(self._plain or self._file)

    def _stat(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        if self.path is None or not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._checked < _CHECK_SECONDS:
                return
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            if stamp is None:
                log.error("API key file %s removed; keeping the keys in force", self.path)
                return
            try:
                self._file = load_keys(self.path)
            except KeyFileError as exc:
                log.error("%s; keeping the previous API keys", exc)
                return
            log.info("API keys: reloaded %d from %s", len(self._file), self.path)

    def keys(self) -> tuple[ApiKey, ...]:
        self._refresh()
        return self._plain + self._file

    def names(self) -> list[str]:
        """The names keys have now (the metrics' bounded `key` label values)."""
        return sorted({k.name for k in self.keys()})

    def authenticate(self, presented: str | None) -> ApiKey | None:
        """The key `presented` is, or None. Compared in constant time against every key,
        so timing says nothing about which matched, or how much of it."""
        if presented is None:
            return None
        raw = presented.encode()
        digest = _digest(presented).encode()
        found: ApiKey | None = None
        for key in self.keys():
            hashed = key.secret.startswith("sha256:")
            if hmac.compare_digest(digest if hashed else raw, key.secret.encode()):
                found = key
        return found

    # ---------- concurrency (used from the event loop) ----------

    def acquire(self, key: ApiKey) -> bool:
        """Take one of the key's slots; False when all `max_concurrent` are in use."""
        running = self._running.get(key.name, 0)
        if key.max_concurrent is not None and running >= key.max_concurrent:
            return False
        self._running[key.name] = running + 1
        return True

    def release(self, key: ApiKey) -> None:
        left = self._running.get(key.name, 0) - 1
        if left > 0:
            self._running[key.name] = left
        else:
            self._running.pop(key.name, None)

    def running(self, name: str) -> int:
        """Generation requests the key `name` has running now."""
        return self._running.get(name, 0)
