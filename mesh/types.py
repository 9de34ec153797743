"""Plain data shared by nodes, coordinators and routing.

Frozen dataclasses, no I/O and no protobuf: `mesh.wire` is the one place that
converts between these and the gRPC messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# ---------- prompts ----------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: `arguments` is a JSON-encoded object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn. `role` is system | user | assistant | tool."""

    role: str
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""
    is_error: bool = False


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is a JSON Schema object."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A chat to render with the model's own template."""

    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    enable_thinking: bool | None = None
    add_generation_prompt: bool = True
    # The model must call one of `tools` (enforced where the engine can).
    tool_required: bool = False


@dataclass(frozen=True, slots=True)
class TextPrompt:
    """Raw completion text: tokenized as is, no template."""

    text: str


@dataclass(frozen=True, slots=True)
class TokenPrompt:
    """An already rendered and tokenized prompt."""

    ids: tuple[int, ...]


Prompt = ChatPrompt | TextPrompt | TokenPrompt


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling settings; None means "the node's default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation on one node."""

    model: str
    prompt: Prompt
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""
    # Tools for parsing calls out of `TextPrompt`/`TokenPrompt` output;
    # a `ChatPrompt` carries its own.
    tools: tuple[Tool, ...] = ()
    # Speculative decoding: a draft model id on the same node ("" = none).
    draft_model: str = ""

    @property
    def all_tools(self) -> tuple[Tool, ...]:
        """The tools this request offers, wherever they were given."""
        if isinstance(self.prompt, ChatPrompt) and self.prompt.tools:
            return self.prompt.tools
        return self.tools


# ---------- generation events ----------


class FinishReason(enum.Enum):
    """Why a generation ended."""

    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    TOOL_CALLS = "tool_calls"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    queue_seconds: float = 0.0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Started:
    """First event of every stream: the request was accepted."""

    request_id: str
    model: str
    prompt_tokens: int
    queue_position: int = 0


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    call: ToolCall


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """A failure after the stream began; `code` is a gRPC status name."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Last event of every stream."""

    reason: FinishReason
    usage: Usage
    stop_sequence: str = ""


GenerateEvent = Started | TextDelta | ReasoningDelta | ToolCallEvent | ErrorEvent | Finish


# ---------- models and node state ----------


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model a node can serve."""

    id: str
    backend: str
    source: str
    path: str
    loaded: bool = False
    size_bytes: int = 0
    context_length: int = 0
    quantization: str = ""
    supports_tools: bool = False
    supports_thinking: bool = False
    memory_bytes: int = 0
    # Weights plus one full-context sequence's KV cache (node.models.memory).
    estimated_bytes: int = 0
    kv_bytes_per_token: int = 0
    # Loaded: measured / estimated - 1 (0 = unknown).
    estimate_error: float = 0.0
    # Loaded: seconds since a request for it last ran here (0 while one runs).
    idle_seconds: float = 0.0
    # chat | stt | tts (mesh.audio)
    kind: str = "chat"


@dataclass(frozen=True, slots=True)
class Transfer:
    """A download (`pull`) or copy (`copy`) of model files into a node."""

    id: str
    kind: str
    model: str
    # "hf:REPO[@REVISION][/FILE]" or "node:NODE_ID"
    source: str
    # running | done | failed
    state: str = "running"
    bytes_done: int = 0
    # 0 = not known yet.
    bytes_total: int = 0
    error: str = ""
    started: float = 0.0
    finished: float = 0.0
    path: str = ""


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A chat rendered with the model's template and tokenized."""

    token_ids: tuple[int, ...]
    context_length: int
    text: str = ""

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class Memory:
    total_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    framework_bytes: int = 0
    # What macmesh may use on this machine (`--memory-budget`; 0 = no budget).
    budget_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """Work queued on one model of a node, and its measured speed."""

    model: str
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    prefill_tokens_per_second: float = 0.0
    decode_tokens_per_second: float = 0.0
    # Speculative decoding since load: proposed by the draft / accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    # All running streams together, over the last couple of seconds (the aggregate
    # at the current batch size; one stream's rate is decode_tokens_per_second).
    # 0 = not measured.
    aggregate_decode_tokens_per_second: float = 0.0


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """Block hashes (routing.prefix) of one model's prompt-cache contents on a node."""

    model: str
    block_size: int
    block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupRank:
    """One rank of a node group (node.groups) as its node reports it."""

    name: str  # the model id rank 0's node serves the group as
    model: str  # the catalog model the group shards
    rank: int
    size: int
    members: tuple[str, ...] = ()  # node ids in rank order
    strategy: str = "tensor"
    backend: str = "ring"
    state: str = "forming"  # forming | up | down
    detail: str = ""  # why it is down
    memory_bytes: int = 0  # this rank's share: weights shard + KV share
    host: str = ""  # this rank's ring address
    started_at: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeState:
    """A node's snapshot, pushed to coordinators over WatchState."""

    node_id: str
    version: str
    sequence: int
    timestamp: float
    models: tuple[ModelInfo, ...] = ()
    memory: Memory = Memory()
    load: tuple[ModelLoad, ...] = ()
    running: int = 0
    waiting: int = 0
    draining: bool = False
    cache: tuple[CachedPrefix, ...] = ()
    # Prometheus /metrics port (plain HTTP, same host as gRPC); 0 = none.
    metrics_port: int = 0
    # Downloads and copies into the node: running and recently finished.
    transfers: tuple[Transfer, ...] = ()
    # Node groups this node is a member of (one rank each), up or down.
    groups: tuple[GroupRank, ...] = ()
