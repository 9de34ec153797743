"""A request resolved, placed and tokenized (`Prepared`): the request each node gets for it,
how its events read to every API, and how errors name the config entry that resolved it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from coordinator.nodes import NodeView
from mesh import errors
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    SamplingParams,
    TokenPrompt,
    Tool,
)
from routing.aliases import Resolution
from routing.policy import Decision

log = logging.getLogger(__name__)


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
    # Every node the generation was sent to, in order (the last one served it): a node
    # that fails or hangs before the first token is left for another. Appended to by
    # ChatService.generate, so headers built after it (a non-streamed answer) say so.
    tried: list[NodeView] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def model(self) -> str:
        return self.resolution.model

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that say where and why a request went."""
        node = self.tried[-1] if self.tried else self.node
        headers = {
            "x-macmesh-node": node.node_id,
            "x-macmesh-model": self.resolution.model,
            "x-macmesh-route-reason": self.route_reason,
        }
        if self.placement:
            headers["x-macmesh-placement"] = self.placement
        if len(self.tried) > 1:
            headers["x-macmesh-retried-from"] = ",".join(v.node_id for v in self.tried[:-1])
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


def normalized(event: GenerateEvent, tool_calls: bool) -> GenerateEvent:
    """One meaning per event for every API: a turn that called tools finishes with
    TOOL_CALLS, and a generation the node cancelled (shutdown), not this caller,
    is a server error."""
    if isinstance(event, Finish) and event.reason is FinishReason.STOP and tool_calls:
        return replace(event, reason=FinishReason.TOOL_CALLS)
    if isinstance(event, ErrorEvent) and event.code == errors.Cancelled.code:
        return replace(event, code=errors.BackendError.code)
    return event


def node_request(
    prepared: Prepared, node: NodeView, sampling: SamplingParams, request_id: str
) -> GenerateRequest:
    """The request as `node` should get it: its prompt form, and the draft if it has it."""
    info = node.model(prepared.model)
    prompt: ChatPrompt | TokenPrompt = TokenPrompt(prepared.token_ids)
    if prepared.chat is not None and info is not None and info.backend == "gguf":
        prompt = prepared.chat
    draft = prepared.resolution.draft_model or ""
    if draft and node.model(draft) is None:
        # A draft only speeds things up: a node without it still serves the model.
        log.info("%s: node %s has no draft model %r", request_id, node.node_id, draft)
        draft = ""
    return GenerateRequest(
        model=prepared.model,
        prompt=prompt,
        sampling=sampling,
        request_id=request_id,
        tools=prepared.tools,
        draft_model=draft,
    )
