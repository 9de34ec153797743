"""A request resolved, placed and tokenized (`Prepared`), and how errors name the config
entry that resolved it."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.nodes import NodeView
from mesh.types import ChatPrompt, Tool
from routing.aliases import Resolution
from routing.policy import Decision


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request resolved, placed and tokenized, ready to generate."""

    resolution: Resolution
    node: NodeView
    route_reason: str
    token_ids: tuple[int, ...]
    context_length: int
    tools: tuple[Tool, ...]
    # The chat as asked (after defaults): GGUF nodes get it instead of token ids,
    # because llama-server renders it and parses tool calls/reasoning itself.
    chat: ChatPrompt | None = None
    decision: Decision | None = None
    # time.perf_counter() when preparing began: latencies count from here.
    received: float = 0.0
    # A cold model: where placement loaded it and why (coordinator.placement).
    placement: str = ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def model(self) -> str:
        return self.resolution.model

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that say where and why a request went."""
        headers = {
            "x-macmesh-node": self.node.node_id,
            "x-macmesh-model": self.resolution.model,
            "x-macmesh-route-reason": self.route_reason,
        }
        if self.placement:
            headers["x-macmesh-placement"] = self.placement
        return headers


def config_key(res: Resolution) -> str:
    """The config file and key that decided `res`, for error messages."""
    rule = res.rule
    if rule == "alias":
        return f"model_aliases.json key {res.requested!r}"
    if rule.startswith("wildcard:"):
        return f"model_aliases.json key {rule.removeprefix('wildcard:')!r}"
    if rule.startswith("tier:"):
        return f"claude_routing.json tiers.{rule.removeprefix('tier:')}"
    if rule == "claude-default":
        return "claude_routing.json default_model"
    return f"rule {rule}"
