"""Deterministic request workloads for `macmesh bench routing`.

A workload is an ordered list of `BenchRequest`s. Requests of one *session*
(a conversation, an agent run) run one after another, each after the previous
one finished (plus its `pause_s`); requests of different sessions interleave.
Text is pseudo-random words from a fixed seed, so every run sends the same
bytes except the per-policy salt, which starts every prompt: a policy never
finds the previous policy's prefixes in the caches.

Sizes are in tokens and turned into characters with `chars_per_token`
(1.0 for the simulated engines, whose tokenizer is one token per byte).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

# Prefill and decode tokens/s of `--sim` nodes (llama.cpp-like for a small model).
DEFAULT_SIM_RATES = (400.0, 150.0)

WORKLOADS: tuple[str, ...] = ("shared-prefix", "multi-turn", "agent")
# How the requests of one round (turn t of every session) are ordered.
ORDERS: tuple[str, ...] = ("shuffled", "cyclic")

_VOCAB = (
    "lamp", "keeper", "harbor", "signal", "tide", "fog", "beacon", "ledger", "storm", "rope",
    "anchor", "coast", "north", "light", "watch", "vessel", "chart", "wind", "reef", "glass",
    "oil", "wick", "tower", "stair", "bell", "night", "dawn", "gull", "pier", "current",
)  # fmt: skip

# The assistant turn appended to every history (not the model's output): deterministic turns.
_REPLY = "Understood. I checked the logbook and the answer is noted above. "


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One chat completion of a workload."""

    session: int  # requests of one session run in order, one at a time
    turn: int
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    pause_s: float = 0.0  # wait this long after the session's previous request finished


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Sizes of the three workloads (tokens; see `chars_per_token`)."""

    groups: int = 16  # shared-prefix: system prompts
    prompts_per_group: int = 8
    prefix_tokens: int = 1024
    question_tokens: int = 48
    conversations: int = 16  # multi-turn
    turns: int = 6
    system_tokens: int = 640  # multi-turn: per-conversation system prompt
    message_tokens: int = 160  # user message (multi-turn) / tool result (agent)
    reply_tokens: int = 64  # the fixed assistant reply appended to histories
    sessions: int = 4  # agent
    agent_turns: int = 8
    agent_prefix_tokens: int = 3072  # tools + system prompt shared by every agent session
    pause_s: float = 0.5  # agent: between turns (the user / tools "thinking")
    max_tokens: int = 16
    chars_per_token: float = 1.0
    seed: int = 1234
    # "shuffled": every round in a new random order; "cyclic": the same order every round
    # (G clients taking turns: least-recently-used caches see their worst case).
    order: str = "shuffled"


def _words(rng: random.Random, tokens: int, cpt: float) -> str:
    """About `tokens` tokens of words (exactly `tokens * cpt` characters)."""
    n = max(1, round(tokens * cpt))
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(_VOCAB)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def _tools_prefix(rng: random.Random, tokens: int, cpt: float) -> str:
    """A Claude-Code-shaped system prompt: instructions, then JSON tool definitions."""
    n = max(1, round(tokens * cpt))
    parts = ["You are a coding agent. Use the tools below; answer tersely.\n# Tools\n"]
    size = len(parts[0])
    i = 0
    while size < n:
        tool = {
            "name": f"tool_{i}",
            "description": _words(rng, 40, cpt),
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
        }
        line = json.dumps(tool) + "\n"
        parts.append(line)
        size += len(line)
        i += 1
    return "".join(parts)[:n]


def _interleave(
    per_session: list[list[BenchRequest]], rng: random.Random, order: str = "shuffled"
) -> list[BenchRequest]:
    """Round by round (turn t of every session), sessions shuffled within a round.

    The shuffle keeps the order from lining up with round-robin's node cycle
    (with G groups and N nodes, G a multiple of N, a fixed order would hand
    round-robin perfect affinity by accident). `order="cyclic"` keeps one
    shuffled order for every round instead: with G not a multiple of N,
    round-robin then shows each node all G sessions in turn, the
    least-recently-used pattern that defeats a cache smaller than G.
    """
    if order not in ORDERS:
        raise ValueError(f"order: one of {', '.join(ORDERS)}, not {order!r}")
    out: list[BenchRequest] = []
    fixed = list(range(len(per_session)))
    if order == "cyclic":
        rng.shuffle(fixed)
    for t in range(max((len(s) for s in per_session), default=0)):
        if order == "cyclic":
            row = [per_session[i][t] for i in fixed if t < len(per_session[i])]
        else:
            row = [s[t] for s in per_session if t < len(s)]
            rng.shuffle(row)
        out.extend(row)
    return out


def shared_prefix(spec: WorkloadSpec, salt: str) -> list[BenchRequest]:
    """G groups x P prompts: a long system prompt per group + a short question.

    Every request is its own session (no ordering between them), interleaved
    across groups.
    """
    rng = random.Random(spec.seed)
    cpt = spec.chars_per_token
    systems = [
        f"{salt} Group {g}. " + _words(rng, spec.prefix_tokens, cpt) for g in range(spec.groups)
    ]
    per_group: list[list[BenchRequest]] = []
    sid = 0
    for g in range(spec.groups):
        reqs = []
        for p in range(spec.prompts_per_group):
            question = f"Question {p}: " + _words(rng, spec.question_tokens, cpt)
            msgs = (
                {"role": "system", "content": systems[g]},
                {"role": "user", "content": question},
            )
            reqs.append(BenchRequest(sid, 0, msgs, spec.max_tokens))
            sid += 1
        per_group.append(reqs)
    return _interleave(per_group, random.Random(spec.seed + 1), spec.order)


def _conversation(
    sid: int,
    system: str,
    turns: int,
    rng: random.Random,
    spec: WorkloadSpec,
    pause_s: float,
    label: str,
) -> list[BenchRequest]:
    """Turn t = system + t previous (user, fixed reply) pairs + a new user message."""
    cpt = spec.chars_per_token
    reply = (_REPLY * (1 + int(spec.reply_tokens * cpt) // len(_REPLY)))[
        : max(1, round(spec.reply_tokens * cpt))
    ]
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    out = []
    for t in range(turns):
        user = f"{label} {t}: " + _words(rng, spec.message_tokens, cpt)
        history.append({"role": "user", "content": user})
        out.append(BenchRequest(sid, t, tuple(history), spec.max_tokens, pause_s if t else 0.0))
        history.append({"role": "assistant", "content": reply})
    return out


def multi_turn(spec: WorkloadSpec, salt: str) -> list[BenchRequest]:
    """K conversations of T turns (history + a new user message), interleaved."""
    rng = random.Random(spec.seed + 2)
    convs = []
    for k in range(spec.conversations):
        system = f"{salt} Conversation {k}. " + _words(
            rng, spec.system_tokens, spec.chars_per_token
        )
        convs.append(_conversation(k, system, spec.turns, rng, spec, 0.0, "Message"))
    return _interleave(convs, random.Random(spec.seed + 3), spec.order)


def agent(spec: WorkloadSpec, salt: str) -> list[BenchRequest]:
    """S agent sessions sharing one long tools+system prefix, growing turns, pauses."""
    rng = random.Random(spec.seed + 4)
    prefix = f"{salt} " + _tools_prefix(rng, spec.agent_prefix_tokens, spec.chars_per_token)
    sessions = [
        _conversation(s, prefix, spec.agent_turns, rng, spec, spec.pause_s, f"Session {s} result")
        for s in range(spec.sessions)
    ]
    return _interleave(sessions, random.Random(spec.seed + 5), spec.order)


def build(name: str, spec: WorkloadSpec, salt: str) -> list[BenchRequest]:
    """The requests of workload `name` (one of WORKLOADS) with `salt` starting every prompt."""
    if name == "shared-prefix":
        return shared_prefix(spec, salt)
    if name == "multi-turn":
        return multi_turn(spec, salt)
    if name == "agent":
        return agent(spec, salt)
    raise ValueError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})")
