"""One rank of a node group: an MLX model sharded over `mx.distributed` (ring).

Run as a child process of a node agent (`python -m node.groups`), one per
member, each started by its own agent with the shared host list (no SSH):

    MLX_RANK=<r> MLX_HOSTFILE=<hosts.json> python -m node.groups --model DIR

Every rank loads its part of the model, split by MACMESH_GROUP_STRATEGY: tensor
parallel (`model.shard(group)`: every layer's heads and MLP columns) or pipeline
(`model.model.pipeline(group)`: consecutive layers; activations pass from rank to
rank and every rank gets the last one), and then runs the same forward passes in
lockstep. Rank 0 is driven by its node agent through JSON lines (stdin: commands,
stdout: events) and passes each command on to the other ranks over their control
connections, where idle ranks wait in a blocking read (waiting in a ring
collective spins a core: ~100% CPU per idle rank, measured). Only rank 0
samples: every decode step it broadcasts the token and a stop flag with an
`all_sum` (its values, zeros elsewhere), so every rank feeds the same token, and
a cancel or a stop sequence seen on rank 0 ends the generation on every rank at
the same step. Each rank keeps the last request's KV cache, and the next prompt
reuses the prefix they share: the same decision on every rank, as they all see
the same tokens.

Rank 0 protocol (one JSON object a line):
  in:  {"op": "generate", "tokens": [...], "max_tokens": N, "temperature": T, "seed": S,
        "top_p": P, "min_p": M, "top_k": K, "repetition_penalty": R}
       {"op": "cancel"}       (ends the running generation)
       {"op": "shutdown"}     (all ranks exit)
  out: {"ready": true, "rank": 0, "size": N, "memory_bytes": B}
       {"token": id, "text": "..."} per generated token (the first also has
        "cached": the prompt tokens served from the last request's KV cache)
       {"done": "stop"|"length"|"cancelled", "tokens": n, "seconds": s}
       {"error": "..."} then exit (a lost peer: the group is down)

A member that dies breaks the ring: the survivors' next collective fails with
"[ring] connection to a peer was lost", they report it and exit non-zero.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Prompt tokens per prefill forward pass (bounds the activations' memory).
_PREFILL_STEP = 512

# Liveness: every rank > 0 holds a TCP connection to rank 0's control port
# (MACMESH_GROUP_CONTROL, ip:port). The ring backend notices a dead peer only
# sometimes (a survivor can wait on it forever); a closed control connection is
# seen at once, also after SIGKILL. Whichever end sees it exits, so one death
# takes every rank of the group down within moments.
_CONTROL_TIMEOUT = float(os.environ.get("MACMESH_GROUP_CONTROL_TIMEOUT", "60"))
_stopping = threading.Event()


def _die(reason: str) -> None:
    """The group is down: say why (rank 0 to its agent) and exit now."""
    if _stopping.is_set():
        return
    # The agent may be gone (the reason we are dying): its pipes then raise
    # BrokenPipeError, which must not keep us from exiting.
    with contextlib.suppress(OSError, ValueError):
        if os.environ.get("MLX_RANK") == "0":
            _emit({"error": reason})
        print(f"rank {os.environ.get('MLX_RANK')}: {reason}", file=sys.stderr, flush=True)
    os._exit(3)


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


def _watch(sock: socket.socket, who: str) -> None:
    """Block until the peer's end closes; then the group is down."""
    try:
        while sock.recv(64):
            pass
    except OSError:
        pass
    _die(f"{who} left the group")


def _watch_agent(rank: int) -> None:
    """Rank > 0: its node agent holds our stdin; EOF means the agent died (or let us go)."""
    while sys.stdin.buffer.read(4096):
        pass
    _die(f"the node agent of rank {rank} left")


def _token() -> bytes:
    return os.environ.get("MACMESH_GROUP_TOKEN", "").encode()


def _control_listen() -> socket.socket:
    """Rank 0: bind the control port before the ring forms."""
    ip, _, port = os.environ["MACMESH_GROUP_CONTROL"].rpartition(":")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((ip, int(port)))
    server.listen(16)
    return server


# Rank 0: its connection to every other rank, which carries each command to them.
_members: dict[int, socket.socket] = {}


def _control_accept(server: socket.socket, size: int) -> None:
    """Rank 0: one connection from each other rank, each with the group's token."""
    server.settimeout(_CONTROL_TIMEOUT)
    members = _members
    while len(members) < size - 1:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            _die(f"members {sorted(set(range(1, size)) - set(members))} never connected")
        conn.settimeout(10)
        try:
            hello = conn.recv(256).decode(errors="replace").split()
        except OSError:
            conn.close()
            continue
        if (
            len(hello) != 2
            or not hello[0].isdigit()
            or not hmac.compare_digest(hello[1].encode(), _token())
        ):
            conn.close()  # not a member of this group
            continue
        conn.settimeout(None)
        _keepalive(conn)
        members[int(hello[0])] = conn
        threading.Thread(target=_watch, args=(conn, f"rank {hello[0]}"), daemon=True).start()
    server.close()


def _tell_members(cmd: dict[str, Any]) -> None:
    """Rank 0: a command to every other rank, over its control connection."""
    line = (json.dumps(cmd) + "\n").encode()
    for rank, conn in sorted(_members.items()):
        try:
            conn.sendall(line)
        except OSError:
            _die(f"rank {rank} left the group")


def _control_connect(rank: int) -> queue.Queue[dict[str, Any]]:
    """Rank > 0: connect to rank 0's control port; its commands arrive on the queue."""
    ip, _, port = os.environ["MACMESH_GROUP_CONTROL"].rpartition(":")
    deadline = time.monotonic() + _CONTROL_TIMEOUT
    while True:
        try:
            sock = socket.create_connection((ip, int(port)), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                _die("cannot reach rank 0's control port")
            time.sleep(0.2)
    sock.settimeout(None)
    _keepalive(sock)
    sock.sendall(f"{rank} ".encode() + _token() + b"\n")
    commands: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_follow, args=(sock, commands), daemon=True).start()
    return commands


def _follow(sock: socket.socket, commands: queue.Queue[dict[str, Any]]) -> None:
    """Rank > 0: rank 0's commands, one JSON line each, until its end closes (down)."""
    try:
        with sock.makefile("rb") as lines:
            for line in lines:
                commands.put(json.loads(line))
    except (OSError, ValueError):
        pass
    _die("rank 0 left the group")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Commands:
    """Rank 0's stdin, read on a thread: a cancel must arrive mid-generation."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[dict[str, Any]] = []
        self.cancel = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            with self._cond:
                if cmd.get("op") == "cancel":
                    self.cancel = True
                else:
                    self._queue.append(cmd)
                self._cond.notify_all()
        with self._cond:  # the agent went away: shut the group down
            self._queue.append({"op": "shutdown"})
            self._cond.notify_all()

    def next(self) -> dict[str, Any]:
        with self._cond:
            while not self._queue:
                self._cond.wait()
            self.cancel = False
            return self._queue.pop(0)


def _broadcast(values: list[int] | None, size: int, group: Any) -> list[int]:
    """Rank 0's `values` (length `size`) on every rank."""
    import mlx.core as mx

    data = mx.array(values, dtype=mx.int32) if values is not None else mx.zeros(size, mx.int32)
    out = mx.distributed.all_sum(data, group=group, stream=mx.cpu)
    mx.eval(out)
    result: list[int] = out.tolist()  # type: ignore[assignment]
    return result


class _Held:
    """This rank's KV cache from the last request and the tokens in it. Every rank sees
    the same tokens, so every rank reuses the same prefix and the ranks stay in step."""

    cache: list[Any] | None = None
    tokens: list[int] = []


_held = _Held()


def _reuse(model: Any, prompt: list[int]) -> tuple[list[Any], int]:
    """The cache for `prompt`: the last one trimmed to their common prefix (at least one
    prompt token is left to run), else a fresh one; and how many tokens it serves."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    common = 0
    if _held.cache is not None and can_trim_prompt_cache(_held.cache):
        limit = min(len(_held.tokens), len(prompt) - 1)
        while common < limit and _held.tokens[common] == prompt[common]:
            common += 1
    if common == 0 or _held.cache is None:
        _held.cache, _held.tokens = make_prompt_cache(model), []
        return _held.cache, 0
    trim_prompt_cache(_held.cache, len(_held.tokens) - common)
    del _held.tokens[common:]
    return _held.cache, common


def _generate(
    model: Any,
    tokenizer: Any,
    group: Any,
    cmd: dict[str, Any],
    commands: _Commands | None,
) -> None:
    """One generation in lockstep; rank 0 (`commands`) samples and emits events.

    Every rank runs the same forward passes, but only rank 0 samples: it broadcasts
    each token with the stop flag. A ring `all_sum` need not round alike on every
    rank, so ranks sampling on their own could split on a near-tie, and their next
    collectives would then pair with the wrong ones (garbage, or a hang).
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    prompt = [int(t) for t in cmd["tokens"]]
    max_tokens = int(cmd.get("max_tokens", 256))
    sampler: Any = None
    processors: list[Any] = []
    if commands is not None:
        vocab = int(getattr(getattr(model, "args", None), "vocab_size", 0) or 1 << 30)
        top_p, top_k = float(cmd.get("top_p", 1.0)), int(cmd.get("top_k", 0))
        penalty = float(cmd.get("repetition_penalty", 1.0))
        mx.random.seed(int(cmd.get("seed", 0)) % (1 << 63))
        sampler = make_sampler(
            temp=float(cmd.get("temperature", 0.0)),
            top_p=top_p if 0 < top_p < 1 else 0.0,
            min_p=float(cmd.get("min_p", 0.0)),
            # past the vocabulary: keep every token (mlx-lm would raise)
            top_k=top_k if 0 < top_k < vocab else 0,
        )
        if penalty > 0 and penalty != 1.0:
            processors = make_logits_processors(
                repetition_penalty=penalty, repetition_context_size=20
            )
    cache, cached = _reuse(model, prompt)
    held = _held.tokens  # what the cache holds, kept exact as tokens are fed
    tokens = mx.array(prompt[cached:], dtype=mx.uint32)
    while tokens.size > 1:  # prefill all but the last prompt token, in chunks
        step = min(_PREFILL_STEP, tokens.size - 1)
        model(tokens[None, :step], cache=cache)
        mx.eval([c.state for c in cache])
        held.extend(tokens[:step].tolist())  # type: ignore[arg-type]
        tokens = tokens[step:]
    history = list(prompt)
    detok = tokenizer.detokenizer
    detok.reset()
    eos = set(tokenizer.eos_token_ids)
    t0 = time.perf_counter()
    n = 0
    reason = "length"
    while n < max_tokens:
        logits = model(tokens[None], cache=cache)[:, -1, :]
        held.extend(tokens.tolist())  # type: ignore[arg-type]
        picked: list[int] | None = None
        if commands is not None:
            for proc in processors:
                logits = proc(mx.array(history[-20:], dtype=mx.uint32), logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = [int(sampler(logprobs).item()), 1 if commands.cancel else 0]
        else:
            mx.eval(logits)  # this rank's part of the forward pass (its collectives)
        token, stop = _broadcast(picked, 2, group)
        n += 1
        if stop:
            reason = "cancelled"
            break
        if token in eos:
            reason = "stop"
            break
        history.append(token)
        if commands is not None:
            detok.add_token(token)
            event: dict[str, Any] = {"token": token, "text": detok.last_segment}
            if n == 1:
                event["cached"] = cached  # prompt tokens the held cache served
            _emit(event)
        tokens = mx.array([token], dtype=mx.uint32)
    if commands is not None:
        _emit({"done": reason, "tokens": n, "seconds": time.perf_counter() - t0, "cached": cached})


def serve(model_dir: Path) -> int:
    """Load, shard, then follow rank 0 until shutdown; the exit status."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model, load_tokenizer

    server = _control_listen() if os.environ.get("MLX_RANK") == "0" else None
    group = mx.distributed.init(backend="ring", strict=True)
    rank, size = group.rank(), group.size()
    follow: queue.Queue[dict[str, Any]] | None = None
    if server is not None:
        _control_accept(server, size)
    else:
        follow = _control_connect(rank)
        threading.Thread(target=_watch_agent, args=(rank,), daemon=True).start()
    # Lazily: only this rank's part of the weights is ever read (mlx-lm's sharded_load).
    model, config = load_model(model_dir, lazy=True, strict=False)
    tokenizer: Any = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))  # type: ignore[no-untyped-call]
    if os.environ.get("MACMESH_GROUP_STRATEGY", "tensor") == "pipeline":
        model.model.pipeline(group)  # type: ignore[operator]  # rank 0 holds the last layers
    else:
        model.shard(group)  # type: ignore[operator]
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))  # all loaded
    commands = _Commands() if rank == 0 else None
    if commands is not None:
        params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        memory = sum(int(v.nbytes) for _, v in params)
        _emit({"ready": True, "rank": rank, "size": size, "memory_bytes": memory})
    while True:
        # Idle ranks wait here, in a blocking read (a ring collective would spin a core).
        if commands is not None:
            cmd = commands.next()
            _tell_members(cmd if cmd.get("op") == "generate" else {"op": "shutdown"})
        else:
            assert follow is not None
            cmd = follow.get()
        if cmd.get("op") != "generate":
            _stopping.set()
            return 0
        _generate(model, tokenizer, group, cmd, commands)


def run(model_dir: Path) -> int:
    """`serve`, with a lost peer or failed collective reported: the exit status."""
    try:
        return serve(model_dir)
    except Exception as exc:  # noqa: BLE001 - a lost peer, a failed collective, a bug: down
        _die(f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc))
        return 3
