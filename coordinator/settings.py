"""The coordinator's editable config files in `MACMESH_HOME` (seed-compatible).

- `model_aliases.json`    alias -> model (see routing.aliases)
- `claude_routing.json`   Claude tiers -> models
- `model_settings.json`   idle TTLs and pins per model (routing.placement)
- `inference_settings.json`  default sampling: temperature, top_p, top_k, min_p,
  max_tokens, repetition_penalty, and enable_thinking (true/false/null); plus
  max_output_tokens, a hard cap on every request's output, and prompt_hygiene
  (default true: drop client metadata such as Claude Code's billing header)

Files are re-read when they change on disk (checked at most once a second), so
hand edits apply without a restart; a file that fails validation is reported
in the log and the last good version stays in force. The admin API validates
before it writes, and writes atomically (temp file + rename); `validate` runs the
same checks and writes nothing (the admin API's `?dry_run=true`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.errors import InvalidRequest, MeshError
from mesh.paths import ALIASES_FILE, ROUTING_FILE
from mesh.sampling import check_sampling
from mesh.types import SamplingParams
from routing.aliases import (
    ClaudeRouting,
    RoutingConfig,
    Target,
    lifetime_entries,
    named_paths,
    parse_aliases,
    parse_claude_routing,
)
from routing.placement import Lifetime, ModelSettings, lifetime, parse_model_settings

log = logging.getLogger(__name__)

INFERENCE_FILE = "inference_settings.json"
MODEL_SETTINGS_FILE = "model_settings.json"
_CHECK_SECONDS = 1.0

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "repetition_penalty")


@dataclass(frozen=True, slots=True)
class InferenceSettings:
    """Global defaults a request may override."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    enable_thinking: bool | None = None
    # Hard cap on output tokens, whatever a request asks for (clamped, not rejected).
    max_output_tokens: int | None = None
    # Drop client metadata that carries no instruction (coordinator.hygiene); false
    # sends every prompt verbatim.
    prompt_hygiene: bool = True


def parse_inference_settings(data: Any) -> InferenceSettings:
    """Validate `inference_settings.json`."""
    if not isinstance(data, dict):
        raise InvalidRequest("inference_settings.json must be a JSON object")
    values: dict[str, Any] = {}
    for key in _SAMPLING_KEYS:
        value = data.get(key)
        if value is None:
            continue
        integral = key in ("top_k", "max_tokens")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest("must be a number", field=key)
        if integral and not float(value).is_integer():
            raise InvalidRequest("must be an integer", field=key)
        values[key] = int(value) if integral else float(value)
    sampling = SamplingParams(**values)
    check_sampling(sampling, prefix="")
    thinking = data.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise InvalidRequest("must be true, false or null", field="enable_thinking")
    cap = data.get("max_output_tokens")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise InvalidRequest("must be a positive integer", field="max_output_tokens")
    hygiene = data.get("prompt_hygiene", True)
    if not isinstance(hygiene, bool):
        raise InvalidRequest("must be true or false", field="prompt_hygiene")
    return InferenceSettings(
        sampling=sampling, enable_thinking=thinking, max_output_tokens=cap, prompt_hygiene=hygiene
    )


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _ConfigFile:
    """One JSON file: raw data + parsed value, reloaded when its mtime changes."""

    def __init__(self, path: Path, parse: Callable[[Any], Any], empty: Any) -> None:
        self.path = path
        self.parse = parse
        self.raw: Any = empty
        self.value: Any = parse(empty)
        self.error: str | None = None
        self._stamp: tuple[int, int] | None = None

    def refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._stamp is not None:
                log.info("%s removed: back to defaults", self.path.name)
            self._stamp = None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            raw = json.loads(self.path.read_text())
            value = self.parse(raw)
        except (OSError, ValueError) as exc:
            self.error = f"{self.path.name}: invalid JSON ({exc})"
        except MeshError as exc:
            self.error = f"{self.path.name}: {exc.message}"
        else:
            self.raw, self.value, self.error = raw, value, None
            log.info("loaded %s", self.path)
            return
        log.error("%s; keeping the previous settings", self.error)


class SettingsStore:
    """Owns the four files; thread-safe, cheap to call per request."""

    def __init__(self, home: Path, *, default_model: str | None = None) -> None:
        self.home = home
        self.default_model = default_model
        self._files = {
            "aliases": _ConfigFile(home / ALIASES_FILE, parse_aliases, {}),
            "routing": _ConfigFile(home / ROUTING_FILE, parse_claude_routing, {}),
            "inference": _ConfigFile(home / INFERENCE_FILE, parse_inference_settings, {}),
            "models": _ConfigFile(home / MODEL_SETTINGS_FILE, parse_model_settings, {}),
        }
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < _CHECK_SECONDS:
                return
            self._checked = now
            for f in self._files.values():
                f.refresh()

    def routing(self) -> RoutingConfig:
        """The resolution config as it is on disk now."""
        self._refresh()
        aliases: dict[str, Target] = self._files["aliases"].value
        claude: ClaudeRouting = self._files["routing"].value
        return RoutingConfig(aliases=aliases, claude=claude, default_model=self.default_model)

    def model_paths(self) -> tuple[str, ...]:
        """Models and drafts the config files name by path (nodes serve those they have)."""
        return named_paths(self.routing())

    def lifetime(self, model: str) -> Lifetime:
        """How long `model` stays loaded when idle (model_settings.json, alias and tier entries)."""
        self._refresh()
        settings: ModelSettings = self._files["models"].value
        return lifetime(model, settings, lifetime_entries(self.routing()))

    def inference(self) -> InferenceSettings:
        self._refresh()
        value: InferenceSettings = self._files["inference"].value
        return value

    def raw(self, name: str) -> Any:
        """The file's JSON as last loaded (what the admin API shows)."""
        self._refresh()
        return self._files[name].raw

    def errors(self) -> dict[str, str]:
        """Files on disk that failed validation (their previous version is in force)."""
        return {n: f.error for n, f in self._files.items() if f.error}

    def validate(self, name: str, data: Any) -> Any:
        """Check `data` exactly as `replace` would and return what it would write; writes
        nothing (the admin API's `?dry_run=true`). InvalidRequest names the field."""
        self._files[name].parse(data)
        return data

    def replace(self, name: str, data: Any) -> Any:
        """Validate, write atomically, apply at once; InvalidRequest leaves all as it was."""
        f = self._files[name]
        value = f.parse(data)
        with self._lock:
            atomic_write_json(f.path, data)
            st = f.path.stat()
            f.raw, f.value, f.error = data, value, None
            f._stamp = (st.st_mtime_ns, st.st_size)
        return data
