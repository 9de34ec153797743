"""Model-name resolution: what a client asks for -> the local model that answers.

The chain (first match wins):

1. exact alias            `model_aliases.json` key equal to the name
2. served model           the name is a model some node serves
3. wildcard alias         `model_aliases.json` key with `*`/`?`/`[` (fnmatch), in file order
4. Claude tier            `claude_routing.json`: names starting with `claude` or containing
                          haiku/sonnet/opus pick that tier (regex `patterns` first)
5. Claude default         `claude_routing.json` `default_model`, for Claude names
6. default model          the coordinator's default model (`--default-model`)

Seed-compatible formats (MLX Studio): an alias value is a model id or a path
(`~` and `$VARS` expanded; the last path component is the model id), or an
object `{"model": ..., "backend": "mlx"|"gguf", "draft_model": ...,
"max_tokens": N, "ttl": S, "pin": B}` (N caps output tokens for requests
resolved through it; `ttl`/`pin` set its model's lifetime, routing.placement). A target
ending in `.gguf` means the gguf backend unless an entry says otherwise.
No I/O here: callers load the files and pass their parsed JSON.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.errors import InvalidRequest
from routing.placement import Lifetime, parse_lifetime

TIERS = ("haiku", "sonnet", "opus")
BACKENDS = ("mlx", "gguf")


@dataclass(frozen=True, slots=True)
class Target:
    """Where a name points: a model id, its backend, an optional draft model."""

    model: str
    backend: str | None = None
    draft_model: str | None = None
    # Cap on output tokens for requests resolved through this entry (seed tier field).
    max_tokens: int | None = None
    # The target as a path (`~`/`$VARS` expanded) when the config named it by path:
    # nodes on which that path exists serve it (see `named_paths`).
    path: str | None = None
    # `ttl`/`pin` the entry sets for its model (routing.placement), if any.
    lifetime: Lifetime | None = None


@dataclass(frozen=True, slots=True)
class ClaudeRouting:
    """`claude_routing.json`."""

    enabled: bool = True
    tiers: Mapping[str, Target] = field(default_factory=dict)
    default_model: str | None = None
    # (regex, tier) tried with re.match, case-insensitive, before keywords.
    patterns: tuple[tuple[str, str], ...] = ()
    # `default_model` as an expanded path, when it was given as one.
    default_path: str | None = None


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Everything resolution needs."""

    aliases: Mapping[str, Target] = field(default_factory=dict)
    claude: ClaudeRouting = field(default_factory=ClaudeRouting)
    default_model: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome: `model` on `backend`, and which rule decided it."""

    requested: str
    model: str
    backend: str
    draft_model: str | None
    rule: str
    tier: str | None = None
    max_tokens: int | None = None
    # The file or dir the config named, when it named one by path.
    path: str | None = None


def as_path(target: str) -> str | None:
    """`target` expanded (`~`, `$VARS`) when it names a path, else None (an id, `org/repo`)."""
    t = os.path.expandvars(os.path.expanduser(target.strip()))
    if t.startswith(("/", "./", "../")) or target.strip().startswith("~"):
        return t.rstrip("/") or t
    return None


def model_id(target: str) -> str:
    """A path becomes its last component; anything else (an id, `org/repo`) stays."""
    path = as_path(target)
    if path is not None:
        return os.path.basename(path)
    return os.path.expandvars(os.path.expanduser(target.strip()))


def named_paths(config: RoutingConfig) -> tuple[str, ...]:
    """Every model and draft the config names by path, expanded, sorted, once each.

    Coordinators send these to their nodes; a node serves those that exist on it.
    """
    targets = [*config.aliases.values(), *config.claude.tiers.values()]
    found = {t.path for t in targets if t.path}
    found.update(p for t in targets if t.draft_model and (p := as_path(t.draft_model)))
    if config.claude.default_path:
        found.add(config.claude.default_path)
    return tuple(sorted(found))


def lifetime_entries(config: RoutingConfig) -> list[tuple[str, Lifetime]]:
    """(model, lifetime) of every alias and tier entry that sets `ttl` or `pin`."""
    targets = [*config.aliases.values(), *config.claude.tiers.values()]
    out = []
    for t in targets:
        if t.lifetime is not None:
            model = t.model
            if detect_backend(model, t.backend) == "gguf" and not model.lower().endswith(".gguf"):
                out.append((f"{model}.gguf", t.lifetime))  # as `resolve` names it when served
            out.append((model, t.lifetime))
    return out


def detect_backend(model: str, explicit: str | None = None) -> str:
    """Explicit backend, else `.gguf` -> gguf, else mlx."""
    if explicit:
        return explicit
    return "gguf" if model.lower().endswith(".gguf") else "mlx"


def _target(value: Any, field_name: str) -> Target:
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRequest("must not be empty", field=field_name)
        return Target(model=model_id(value), path=as_path(value))
    if isinstance(value, Mapping):
        model = value.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest("needs a non-empty string 'model'", field=field_name)
        backend = value.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise InvalidRequest(
                f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}",
                field=f"{field_name}.backend",
            )
        draft = value.get("draft_model")
        if draft is not None and not isinstance(draft, str):
            raise InvalidRequest("must be a string or null", field=f"{field_name}.draft_model")
        cap = value.get("max_tokens")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise InvalidRequest("must be a positive integer", field=f"{field_name}.max_tokens")
        has_lifetime = "ttl" in value or "pin" in value
        return Target(
            model=model_id(model),
            backend=backend,
            draft_model=draft or None,
            max_tokens=cap,
            path=as_path(model),
            lifetime=parse_lifetime(value, field_name) if has_lifetime else None,
        )
    raise InvalidRequest("must be a model id, a path, or an object with 'model'", field=field_name)


def parse_aliases(data: Any) -> dict[str, Target]:
    """Validate `model_aliases.json` (a JSON object of name -> target)."""
    if not isinstance(data, Mapping):
        raise InvalidRequest("model_aliases.json must be a JSON object")
    out: dict[str, Target] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not name:
            raise InvalidRequest("alias names must be non-empty strings", field="aliases")
        out[name] = _target(value, f"aliases[{name}]")
    return out


def parse_claude_routing(data: Any) -> ClaudeRouting:
    """Validate `claude_routing.json`; tiers with a null model are unset."""
    if not isinstance(data, Mapping):
        raise InvalidRequest("claude_routing.json must be a JSON object")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidRequest("must be true or false", field="enabled")
    tiers_raw = data.get("tiers", {})
    if not isinstance(tiers_raw, Mapping):
        raise InvalidRequest("must be an object of tier -> {model, ...}", field="tiers")
    tiers: dict[str, Target] = {}
    for tier, value in tiers_raw.items():
        if tier not in TIERS:
            raise InvalidRequest(
                f"unknown tier (expected {', '.join(TIERS)})", field=f"tiers.{tier}"
            )
        if isinstance(value, Mapping) and value.get("model") in (None, ""):
            continue  # seed writes {"model": null} for an unset tier
        tiers[tier] = _target(value, f"tiers.{tier}")
    default = data.get("default_model")
    if default is not None and not isinstance(default, str):
        raise InvalidRequest("must be a string or null", field="default_model")
    patterns_raw = data.get("patterns", {})
    if not isinstance(patterns_raw, Mapping):
        raise InvalidRequest("must be an object of regex -> tier", field="patterns")
    patterns: list[tuple[str, str]] = []
    for regex, tier in patterns_raw.items():
        if tier not in TIERS:
            raise InvalidRequest(f"unknown tier {tier!r}", field=f"patterns[{regex}]")
        try:
            re.compile(regex)
        except re.error as exc:
            raise InvalidRequest(f"invalid regex: {exc}", field=f"patterns[{regex}]") from None
        patterns.append((regex, tier))
    return ClaudeRouting(
        enabled=enabled,
        tiers=tiers,
        default_model=model_id(default) if default else None,
        patterns=tuple(patterns),
        default_path=as_path(default) if default else None,
    )


def claude_tier(name: str, routing: ClaudeRouting) -> str | None:
    """The tier a Claude-style name belongs to, or None for non-Claude names."""
    for regex, tier in routing.patterns:
        if re.match(regex, name, re.IGNORECASE):
            return tier
    lower = name.lower()
    for tier in ("haiku", "opus", "sonnet"):
        if tier in lower:
            return tier
    # Claude names without a known tier keyword route like the seed: sonnet.
    return "sonnet" if lower.startswith("claude") else None


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _resolved(name: str, t: Target, rule: str, tier: str | None = None) -> Resolution:
    return Resolution(
        requested=name,
        model=t.model,
        backend=detect_backend(t.model, t.backend),
        draft_model=t.draft_model,
        rule=rule,
        tier=tier,
        max_tokens=t.max_tokens,
        path=t.path,
    )


def resolve(name: str, config: RoutingConfig, served: Collection[str] = ()) -> Resolution | None:
    """Resolve `name` through the chain above; None when nothing matches.

    A GGUF target named without its `.gguf` suffix (`"backend": "gguf"`, as
    MLX Studio configs often write it) becomes the served `<name>.gguf`.
    """
    res = _resolve(name, config, served)
    if res is None or res.backend != "gguf":
        return res
    model = _gguf_name(res.model, served)
    draft = _gguf_name(res.draft_model, served) if res.draft_model else res.draft_model
    return replace(res, model=model, draft_model=draft)


def _gguf_name(model: str, served: Collection[str]) -> str:
    # `<name>.gguf` even when an MLX model is also called `<name>`: the entry said gguf.
    if model.lower().endswith(".gguf"):
        return model
    return f"{model}.gguf" if f"{model}.gguf" in served else model


def _resolve(name: str, config: RoutingConfig, served: Collection[str]) -> Resolution | None:
    exact = config.aliases.get(name)
    if exact is not None and not _is_pattern(name):
        return _resolved(name, exact, "alias")
    if name in served:
        return _resolved(name, Target(name), "exact")
    for pattern, target in config.aliases.items():
        if _is_pattern(pattern) and fnmatch.fnmatchcase(name, pattern):
            return _resolved(name, target, f"wildcard:{pattern}")
    claude = config.claude
    tier = claude_tier(name, claude)
    if tier is not None:
        if claude.enabled and tier in claude.tiers:
            return _resolved(name, claude.tiers[tier], f"tier:{tier}", tier)
        if claude.default_model:
            default = Target(claude.default_model, path=claude.default_path)
            return _resolved(name, default, "claude-default", tier)
    if config.default_model:
        return _resolved(name, Target(config.default_model), "default", tier)
    return None
