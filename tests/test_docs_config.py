"""The seed-style config examples in docs/coordinator.md parse and resolve as documented."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from coordinator.settings import parse_inference_settings
from routing.aliases import (
    RoutingConfig,
    named_paths,
    parse_aliases,
    parse_claude_routing,
    resolve,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "coordinator.md"


def examples() -> list[dict[str, Any]]:
    section = DOC.read_text().split("## Config files", 1)[1].split("\n## ", 1)[0]
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]


def test_every_example_is_valid_and_resolves_as_the_doc_says() -> None:
    found = examples()
    aliases_raw = next(e for e in found if "fast" in e)
    routing_raw = next(e for e in found if "tiers" in e)
    inference = parse_inference_settings(next(e for e in found if "temperature" in e))
    assert inference.prompt_hygiene and inference.max_output_tokens == 8192
    config = RoutingConfig(
        aliases=parse_aliases(aliases_raw), claude=parse_claude_routing(routing_raw)
    )
    served = {"qwen3-4b", "qwen3-coder-30b", "qwen3-14b", "Qwen2.5-72B-Q4_K_M.gguf"}
    big = resolve("big", config, served)
    assert big is not None
    assert (big.model, big.backend) == ("Qwen2.5-72B-Q4_K_M.gguf", "gguf")
    home = os.path.expanduser("~")
    assert big.path == f"{home}/.cache/huggingface/gguf/Qwen2.5-72B-Q4_K_M.gguf"
    coder = resolve("coder", config, served)
    assert coder is not None and coder.model == "Qwen3-Coder-30B-A3B-Instruct-MLX-6bit"
    # Both paths go to the nodes; ids and tiers do not.
    assert named_paths(config) == (
        "/Users/lab/models/Qwen3-Coder-30B-A3B-Instruct-MLX-6bit",
        f"{home}/.cache/huggingface/gguf/Qwen2.5-72B-Q4_K_M.gguf",
    )
    haiku = resolve("claude-3-5-haiku-20241022", config, served)
    assert haiku is not None and (haiku.model, haiku.max_tokens) == ("qwen3-4b", 4096)
    gpt = resolve("gpt-4o", config, served)
    assert gpt is not None and (gpt.model, gpt.rule) == ("qwen3-14b", "wildcard:gpt-*")


def test_gguf_backend_prefers_the_gguf_twin() -> None:
    tiers = {"tiers": {"haiku": {"model": "smollm2", "backend": "gguf"}, "sonnet": "smollm2"}}
    config = RoutingConfig(claude=parse_claude_routing(tiers))
    served = {"smollm2", "smollm2.gguf"}
    haiku = resolve("claude-haiku-4-5", config, served)
    sonnet = resolve("claude-sonnet-4-6", config, served)
    assert haiku is not None and (haiku.model, haiku.backend) == ("smollm2.gguf", "gguf")
    assert sonnet is not None and (sonnet.model, sonnet.backend) == ("smollm2", "mlx")
