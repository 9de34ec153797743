"""The resolution chain, table-driven (pure: no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.errors import InvalidRequest
from routing.aliases import (
    RoutingConfig,
    claude_tier,
    model_id,
    parse_aliases,
    parse_claude_routing,
    resolve,
)

ALIASES = parse_aliases(
    {
        "fast": "qwen3-4b",
        "coder": "/Users/lab/models/Qwen3-Coder-30B-A3B-Instruct-MLX-6bit",
        "big": {"model": "~/models/Llama-70B-Q4_K_M.gguf"},
        "draft": {"model": "qwen3-14b", "backend": "mlx", "draft_model": "qwen3-0.6b"},
        "claude-haiku-*": "qwen3-4b",
        "gpt-*": "qwen3-14b",
    }
)
CLAUDE = parse_claude_routing(
    {
        "enabled": True,
        "tiers": {
            "haiku": {"model": "smollm2", "draft_model": None},
            "sonnet": {"model": "qwen3-coder", "backend": "mlx", "draft_model": "qwen3-0.6b"},
            "opus": {"model": "big.gguf", "backend": "gguf"},
        },
        "patterns": {"^claude-3-5-": "haiku"},
        "default_model": "claude-default-model",
    }
)
CONFIG = RoutingConfig(aliases=ALIASES, claude=CLAUDE, default_model="smollm2")
SERVED = {"smollm2", "qwen3-4b", "qwen3-14b", "exact-model"}

CASES: list[tuple[str, str, str, str, str | None]] = [
    # name, model, backend, rule, draft
    ("fast", "qwen3-4b", "mlx", "alias", None),
    ("coder", "Qwen3-Coder-30B-A3B-Instruct-MLX-6bit", "mlx", "alias", None),
    ("big", "Llama-70B-Q4_K_M.gguf", "gguf", "alias", None),
    ("draft", "qwen3-14b", "mlx", "alias", "qwen3-0.6b"),
    ("exact-model", "exact-model", "mlx", "exact", None),
    ("gpt-4o", "qwen3-14b", "mlx", "wildcard:gpt-*", None),
    # A wildcard alias beats tier routing (seed order).
    ("claude-haiku-4-5-20251001", "qwen3-4b", "mlx", "wildcard:claude-haiku-*", None),
    ("claude-sonnet-4-6", "qwen3-coder", "mlx", "tier:sonnet", "qwen3-0.6b"),
    ("claude-opus-4-8", "big.gguf", "gguf", "tier:opus", None),
    ("claude-3-5-sonnet-20241022", "smollm2", "mlx", "tier:haiku", None),
    ("opus", "big.gguf", "gguf", "tier:opus", None),
    ("claude-instant-1", "qwen3-coder", "mlx", "tier:sonnet", "qwen3-0.6b"),
    ("anything-else", "smollm2", "mlx", "default", None),
]


@pytest.mark.parametrize(("name", "model", "backend", "rule", "draft"), CASES)
def test_resolution_chain(
    name: str, model: str, backend: str, rule: str, draft: str | None
) -> None:
    res = resolve(name, CONFIG, SERVED)
    assert res is not None
    assert (res.model, res.backend, res.rule, res.draft_model) == (model, backend, rule, draft)
    assert res.requested == name


def test_disabled_tiers_fall_back_to_claude_default_then_default() -> None:
    claude = parse_claude_routing({"enabled": False, "default_model": "fallback"})
    res = resolve("claude-sonnet-4-6", RoutingConfig(claude=claude), ())
    assert res is not None and (res.model, res.rule) == ("fallback", "claude-default")
    res = resolve("claude-sonnet-4-6", RoutingConfig(default_model="d"), ())
    assert res is not None and (res.model, res.rule) == ("d", "default")


def test_nothing_matches_without_default() -> None:
    assert resolve("unknown", RoutingConfig(), {"smollm2"}) is None


def test_seed_null_tiers_are_unset() -> None:
    claude = parse_claude_routing(
        {"tiers": {"haiku": {"model": None, "draft_model": None}}, "default_model": None}
    )
    assert claude.tiers == {} and claude.default_model is None


@pytest.mark.parametrize(
    ("name", "tier"),
    [
        ("claude-haiku-4-5-20251001", "haiku"),
        ("claude-opus-4-8", "opus"),
        ("claude-sonnet-4-6", "sonnet"),
        ("CLAUDE-OPUS-4", "opus"),
        ("sonnet", "sonnet"),
        ("claude-2", "sonnet"),
        ("llama3", None),
    ],
)
def test_claude_tier(name: str, tier: str | None) -> None:
    assert claude_tier(name, CLAUDE) == tier


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("qwen3-4b", "qwen3-4b"),
        ("mlx-community/Qwen3-4B-4bit", "mlx-community/Qwen3-4B-4bit"),
        ("/abs/path/Model-4bit/", "Model-4bit"),
        ("./rel/Model", "Model"),
        ("~/models/x.gguf", "x.gguf"),
    ],
)
def test_model_id_from_target(target: str, expected: str) -> None:
    assert model_id(target) == expected


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], ""),
        ({"a": ""}, "aliases[a]"),
        ({"a": 3}, "aliases[a]"),
        ({"a": {"backend": "mlx"}}, "aliases[a]"),
        ({"a": {"model": "m", "backend": "onnx"}}, "aliases[a].backend"),
    ],
)
def test_bad_aliases(data: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_aliases(data)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"enabled": "yes"}, "enabled"),
        ({"tiers": {"mega": {"model": "x"}}}, "tiers.mega"),
        ({"tiers": []}, "tiers"),
        ({"patterns": {"(": "haiku"}}, "patterns[(]"),
        ({"patterns": {"x": "mega"}}, "patterns[x]"),
        ({"default_model": 5}, "default_model"),
    ],
)
def test_bad_claude_routing(data: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_claude_routing(data)
    assert info.value.field == field


def test_tier_max_tokens_cap() -> None:
    claude = parse_claude_routing({"tiers": {"haiku": {"model": "m", "max_tokens": 512}}})
    res = resolve("claude-haiku-4-5", RoutingConfig(claude=claude), ())
    assert res is not None and res.max_tokens == 512
    with pytest.raises(InvalidRequest) as info:
        parse_claude_routing({"tiers": {"haiku": {"model": "m", "max_tokens": 0}}})
    assert info.value.field == "tiers.haiku.max_tokens"


def test_gguf_backend_finds_the_served_file_name() -> None:
    config = RoutingConfig(
        aliases=parse_aliases(
            {
                "qwen": {
                    "model": "Qwen2.5-7B-Q4_K_M",
                    "backend": "gguf",
                    "draft_model": "Qwen-0.5B",
                },
                "path": "/models/Qwen2.5-7B-Q4_K_M.gguf",
                "mlx": {"model": "Qwen2.5-7B-Q4_K_M", "backend": "mlx"},
            }
        )
    )
    served = {"Qwen2.5-7B-Q4_K_M.gguf", "Qwen-0.5B.gguf"}
    res = resolve("qwen", config, served)
    assert res is not None
    assert (res.model, res.backend, res.draft_model) == (
        "Qwen2.5-7B-Q4_K_M.gguf",
        "gguf",
        "Qwen-0.5B.gguf",
    )
    by_path = resolve("path", config, served)
    assert by_path is not None and (by_path.model, by_path.backend) == (
        "Qwen2.5-7B-Q4_K_M.gguf",
        "gguf",
    )
    mlx = resolve("mlx", config, served)  # an explicit MLX backend keeps the name as is
    assert mlx is not None and mlx.model == "Qwen2.5-7B-Q4_K_M"
