"""The GGUF backend: each model is served by its own supervised llama-server.

Chats go to llama-server's `/v1/chat/completions` (`--jinja`), so its own
chat-format parsers turn the model's output into tool calls and reasoning.
Templates that know no tools would drop them silently; for those, the tools
are described in the system message and calls are parsed from `<tool_call>`
tags, exactly as the MLX backend does (node.backends.chat_template). Text and
token prompts go to `/completion`. Stop sequences are matched here, not by
llama-server, which does not say whether a stop string or EOS ended a chat.

Counts are llama-server's own: prompts are rendered with `/apply-template`
and counted with `/tokenize`, the calls the chat endpoint makes internally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mesh.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    Unavailable,
)
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
    Started,
    TextPrompt,
)
from node.backends.base import BackendContext
from node.backends.common import check_prompt, drain, request_id, with_fallback_tools
from node.backends.llamacpp_render import RenderMemo, chat_body, tokenize_text
from node.backends.llamacpp_server import LlamaServer, ServerSpec, reap_orphans
from node.backends.llamacpp_settings import GGUFSettings, LlamaServerError
from node.backends.llamacpp_slots import PromptKey, SlotScheduler, Ticket
from node.backends.llamacpp_stream import Item, StreamFailed, produce
from node.backends.llamacpp_wire import (
    FINISH,
    StreamRun,
    sampling_body,
    usage_of,
)
from node.backends.outparse import OutputParser, ParserConfig
from node.backends.stats import Admission, ModelStats
from node.config import SamplingDefaults
from node.models.catalog import Catalog
from node.models.memory import estimate_error, estimated_bytes
from node.sampling import resolve_sampling
from routing.prefix import DEFAULT_BLOCK_SIZE

log = logging.getLogger(__name__)


class LlamaCppBackend:
    """Serves the catalog's GGUF models through llama-server; see the module docstring."""

    name = "gguf"

    def __init__(
        self,
        catalog: Catalog,
        *,
        home: Path,
        defaults: SamplingDefaults,
        max_waiting: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        on_change: Any = None,
    ) -> None:
        """`block_size`: tokens per reported prefix block (the node's cache config)."""
        self.catalog = catalog
        self.home = home
        self.defaults = defaults
        self.max_waiting = max_waiting
        self._on_change = on_change or (lambda: None)
        # Per (model, draft): its llama-server and what the node keeps for it.
        self._served: dict[tuple[str, str], _Served] = {}
        self._stats: dict[str, ModelStats] = {}
        self._renders = RenderMemo()
        self.block_size = block_size
        self._closing = False
        self._good_dirs: tuple[Path, ...] = ()
        self._dirs_logged = ""
        reaped = reap_orphans(home / "run")
        if reaped:
            log.warning("reaped %d llama-server(s) left behind by a node that died", reaped)

    # ---------- settings and servers ----------

    def settings(self) -> GGUFSettings:
        """`gguf_config.json`, re-read on every use (it is small and may change)."""
        return GGUFSettings.load(self.home)

    def claims(self, model_id: str) -> bool:
        return model_id in self.loaded()

    def model_dirs(self) -> tuple[Path, ...]:
        return self.gguf_dirs()

    def gguf_dirs(self) -> tuple[Path, ...]:
        """Extra GGUF directories for the catalog (its watcher calls this every poll).

        A broken `gguf_config.json` keeps the last good `model_dirs`; it and a
        folder that does not exist are logged once, naming the file and key.
        """
        try:
            dirs = self.settings().model_dirs
        except LlamaServerError as exc:
            self._dirs_problem(exc.message + "; keeping the previous model_dirs")
            return self._good_dirs
        missing = [str(d) for d in dirs if not d.is_dir()]
        self._dirs_problem(
            f"{self.home / 'gguf_config.json'}: `model_dirs` names folders that do not "
            f"exist: {', '.join(missing)}"
            if missing
            else ""
        )
        self._good_dirs = dirs
        return dirs

    def _dirs_problem(self, problem: str) -> None:
        if problem and problem != self._dirs_logged:
            log.error("%s", problem)
        self._dirs_logged = problem

    def _resolve_file(self, ref: str, role: str) -> tuple[str, Path]:
        """A GGUF model id (or a path, for the seed's `draft_model`) -> (id, file)."""
        entries = self.catalog.entries()
        entry = entries.get(ref)
        if entry is None:
            path = Path(ref).expanduser()
            if path.suffix.lower() == ".gguf" and path.is_file():
                return path.name, path
            raise ModelNotFound(ref, entries)
        if entry.backend != "gguf":
            raise InvalidRequest(
                f"{role} {ref!r} is an {entry.backend} model; a GGUF model needs a GGUF {role}",
                field="draft_model" if role == "draft" else "model",
            )
        return entry.id, entry.path

    def _server(self, model_id: str, draft: str = "") -> LlamaServer:
        settings = self.settings()
        if not settings.enabled:
            raise ModelLoadError(
                f"GGUF models are disabled on this node (`enabled: false` in "
                f"{self.home / 'gguf_config.json'})"
            )
        mid, path = self._resolve_file(model_id, "model")
        draft = draft or settings.draft_model or ""
        did, dpath = self._resolve_file(draft, "draft") if draft else ("", None)
        key = (mid, did)
        served = self._served.get(key)
        if served is None:
            server = LlamaServer(
                ServerSpec(mid, path, did, dpath), self.home, on_change=self._on_change
            )
            served = self._served[key] = _Served(server, settings.parallel)
            self._stats.setdefault(mid, ModelStats())
        return served.server

    async def _ready(
        self, model_id: str, draft: str = "", *, explicit: bool = False
    ) -> LlamaServer:
        if self._closing:
            raise Unavailable("the node is shutting down")
        known = self._served.get((model_id, draft))
        if known is not None and known.server.healthy:
            return known.server  # the request path: no config read, no catalog lookup
        server = self._server(model_id, draft)
        if server.healthy:
            return server
        settings = self.settings()
        if not explicit and not settings.auto_start and not server.crashed:
            raise ModelLoadError(
                f"{model_id} is not loaded and `auto_start` is false in gguf_config.json; "
                "load it first (LoadModel / `macmesh models load`)"
            )
        await server.ensure_started(settings)
        return server

    # ---------- Backend protocol: models ----------

    def available(self) -> dict[str, ModelInfo]:
        return {}  # everything it serves unloaded is in the catalog

    def loaded(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for (mid, _), served in self._served.items():
            server = served.server
            if not server.healthy or server.info is None:
                continue
            prev = out.get(mid)
            memory = server.memory_bytes() + (prev.memory_bytes if prev else 0)
            entry = self.catalog.entries().get(mid)
            kv = entry.kv_bytes_per_token if entry is not None else 0
            size = server.spec.model_path.stat().st_size if server.spec.model_path.exists() else 0
            # llama-server allocates the KV cache of its whole context (all slots) at start.
            estimated = estimated_bytes(size, kv, server.info.n_ctx)
            out[mid] = ModelInfo(
                id=mid,
                backend="gguf",
                source="llama-server",
                path=str(server.spec.model_path),
                loaded=True,
                size_bytes=size,
                context_length=server.info.n_ctx,
                quantization=prev.quantization if prev else self._quant(mid),
                supports_tools=True,  # natively, or through the described-tools fallback
                supports_thinking=server.info.supports_thinking,
                memory_bytes=memory,
                estimated_bytes=estimated,
                kv_bytes_per_token=kv,
                estimate_error=estimate_error(memory, estimated),
            )
        return out

    def _quant(self, model_id: str) -> str:
        entry = self.catalog.entries().get(model_id)
        return entry.quantization if entry else ""

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        t0 = time.perf_counter()
        server = await self._ready(model_id, explicit=True)
        info = self.loaded()[server.spec.model_id]
        return info, time.perf_counter() - t0

    async def unload(self, model_id: str) -> bool:
        keys = [k for k in self._served if k[0] == model_id]
        was = any(self._served[k].server.healthy for k in keys)
        for key in keys:
            await self._served.pop(key).server.stop()
        self._stats.pop(model_id, None)
        return was

    # ---------- rendering (node.backends.llamacpp_render) ----------

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        server = await self._ready(model_id)
        ids, text = await self._renders.render_ids(server, chat)
        assert server.info is not None
        return RenderedPrompt(
            token_ids=tuple(ids),
            context_length=server.info.n_ctx,
            text=text if include_text else "",
        )

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        return await tokenize_text(await self._ready(model_id), text, add_special_tokens)

    # ---------- generation ----------

    async def _prepare(self, request: GenerateRequest) -> _Job:
        """The server, body and slot key for a request; a chat's count starts here."""
        sampling = resolve_sampling(request.sampling, self.defaults)
        server = await self._ready(request.model, request.draft_model)
        assert server.info is not None
        n_ctx = server.info.n_ctx
        prompt = request.prompt
        count: asyncio.Task[tuple[list[int], str]] | None = None
        fallback_tools = bool(request.all_tools)
        ids: list[int] = []
        if isinstance(prompt, ChatPrompt):
            endpoint = "/v1/chat/completions"
            body, fallback_tools = chat_body(server, prompt)
            memo = self._renders.key(server, body)
            known = self._renders.known(memo)  # a coordinator's RenderPrompt, just before
            pkey = PromptKey.of_chat_body(body, known[0] if known is not None else None)
            count = asyncio.create_task(self._renders.render_ids(server, prompt, dict(body), memo))
        else:
            endpoint = "/completion"
            if isinstance(prompt, TextPrompt):
                if not prompt.text:
                    raise InvalidRequest("must not be empty", field="text")
                ids = await tokenize_text(server, prompt.text, True)
            else:
                ids = list(prompt.ids)
            body = {"prompt": ids}
            pkey = PromptKey(tuple(ids))
            check_prompt(ids, n_ctx)
        if n_ctx:
            # Chats are counted in parallel: llama-server stops at the end of the context.
            room = n_ctx - len(ids) if ids else n_ctx
            sampling = replace(sampling, max_tokens=min(sampling.max_tokens, room))
        body.update(sampling_body(sampling, chat=count is not None))
        cfg = ParserConfig(stop=sampling.stop)
        parser = OutputParser(with_fallback_tools(cfg) if fallback_tools else cfg)
        return _Job(server, n_ctx, endpoint, body, pkey, ids, count, parser, sampling.max_tokens)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """Count, take a slot (llamacpp_slots), then stream llama-server's output.

        A chat's count (`/apply-template` + `/tokenize`) runs while llama-server
        already prefills it when a slot is free at once, so it costs no time to
        first token; `Started` (which carries the count) still comes first.
        Until counted (unless a coordinator's render is remembered), a chat is
        matched to a slot by its messages.
        """
        job = await self._prepare(request)
        server, parser, ids = job.server, job.parser, job.ids
        stats = self._stats.setdefault(server.spec.model_id, ModelStats())
        run = StreamRun(timings={})
        events: asyncio.Queue[Item] = asyncio.Queue()
        producer: asyncio.Task[None] | None = None
        enqueued = started = time.perf_counter()
        sched = self._scheduler(server)
        position = sched.waiting
        try:
            admission = Admission(stats, self.max_waiting)
        except Overloaded:
            if job.count is not None:
                job.count.cancel()
            raise
        ticket: Ticket | None = None
        prefilled = failed = False

        def send(t: Ticket) -> asyncio.Task[None]:
            assert t.slot is not None
            sched.sent(t)
            body = {**job.body, "id_slot": t.slot.id}
            return asyncio.create_task(
                produce(server, job.endpoint, body, parser, run, events, stats.count_decoded)
            )

        try:
            ticket = sched.request(job.key, job.max_tokens)
            if ticket.slot is not None:  # a slot for it now: generate while counting
                producer = send(ticket)
            if job.count is not None:
                ids = (await job.count)[0]
                check_prompt(ids, job.n_ctx)
                sched.refine(ticket, ids)
            # Work to prefill: what the slot (chosen, or likely) does not hold.
            reuse = ticket.matched if ticket.slot is not None else sched.predicted(ticket.key)
            admission.queue_prefill(max(len(ids) - reuse, 0))
            yield Started(
                request_id=request_id(request),
                model=server.spec.model_id,
                prompt_tokens=len(ids),
                queue_position=0 if producer is not None else position + 1,
            )
            if producer is None:
                await sched.wait(ticket)
                started = time.perf_counter()
                producer = send(ticket)
            admission.run()
            reason = FinishReason.ERROR
            while (item := await events.get()) is not None:
                if isinstance(item, StreamFailed):
                    failed = True
                    yield ErrorEvent(item.code, item.message)
                    break
                if not prefilled:
                    prefilled = ticket.prefilled = True
                    admission.prefilled()
                ticket.produced += 1
                yield item
            else:
                for event in parser.finish():
                    yield event
                reason = _finish_reason(parser, run)
            usage = usage_of(run, len(ids), started - enqueued)
            if reason is not FinishReason.ERROR:
                sched.release(
                    ticket,
                    ids=ids,
                    cached=usage.cached_prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                )
                stats.observe_usage(usage)
            yield Finish(
                reason=reason, usage=usage, stop_sequence=parser.stop_sequence or run.stop_word
            )
        finally:
            # Closing the HTTP stream (cancelling the producer) stops llama-server's work.
            for task in (producer, job.count):
                if task is not None and not task.done():
                    task.cancel()
            if producer is not None:
                await asyncio.gather(producer, return_exceptions=True)
            if ticket is not None:
                # No-op after a clean release; a cut or failed stream leaves the slot unknown.
                sched.release(ticket, ids=ids or None, failed=failed or not prefilled)
            admission.close()
            self._on_change()

    # ---------- state ----------

    def _scheduler(self, server: LlamaServer) -> SlotScheduler:
        served = self._served[server.spec.key]
        known = served.slots
        if known is None or known[0] != server.started_at:  # new, or restarted: empty slots
            stats = self._stats.setdefault(server.spec.model_id, ModelStats())
            sched = SlotScheduler(
                server.spec.model_id,
                served.parallel,
                block_size=self.block_size,
                rates=lambda: (stats.prefill_tps, stats.decode_tps),
                on_change=self._on_change,
            )
            served.slots = (server.started_at, sched)
            return sched
        return known[1]

    def cache_state(self) -> list[CachedPrefix]:
        """Block hashes of the prompts llama-server's slots hold, per model."""
        out: dict[str, dict[int, None]] = {}
        for (mid, _), served in self._served.items():
            if served.slots is None:
                continue
            started_at, sched = served.slots
            if not served.server.healthy or served.server.started_at != started_at:
                continue
            out.setdefault(mid, {}).update(dict.fromkeys(sched.hashes()))
        return [CachedPrefix(m, self.block_size, tuple(h)) for m, h in out.items() if h]

    def load_stats(self) -> list[ModelLoad]:
        loaded = self.loaded()
        return [
            s.to_load(mid)
            for mid, s in self._stats.items()
            if mid in loaded or s.running or s.waiting
        ]

    @property
    def running(self) -> int:
        return sum(s.running for s in self._stats.values())

    @property
    def waiting(self) -> int:
        return sum(s.waiting for s in self._stats.values())

    async def close(self, grace: float) -> None:
        """Refuse new work, give in-flight streams `grace` s, then stop every server."""
        self._closing = True
        await drain(lambda: self.running + self.waiting, grace)
        servers, self._served = self.servers(), {}
        await asyncio.gather(*(s.stop() for s in servers))

    def servers(self) -> list[LlamaServer]:
        """Every llama-server this backend has made (running or not)."""
        return [s.server for s in self._served.values()]


@dataclass
class _Job:
    """One request made ready for llama-server: where it goes, what it sends, how it is keyed."""

    server: LlamaServer
    n_ctx: int
    endpoint: str
    body: dict[str, Any]
    key: PromptKey
    # Token ids when known up front (text and token prompts); a chat's come from `count`.
    ids: list[int]
    count: asyncio.Task[tuple[list[int], str]] | None
    parser: OutputParser
    max_tokens: int


def _finish_reason(parser: OutputParser, run: StreamRun) -> FinishReason:
    """Why a stream that ran to its end stopped, in the node's terms."""
    if parser.stopped or run.stop_word:
        return FinishReason.STOP_SEQUENCE
    if parser.tool_calls:
        return FinishReason.TOOL_CALLS
    return FINISH.get(run.finish or "stop", FinishReason.STOP)


@dataclass
class _Served:
    """One llama-server (a model, with or without a draft) and what the node keeps for it."""

    server: LlamaServer
    # llama-server slots it was started with (`parallel` in gguf_config.json).
    parallel: int
    # The node's record of those slots, for the server process it was made for (its start time).
    slots: tuple[float, SlotScheduler] | None = None


def create(ctx: BackendContext) -> LlamaCppBackend:
    """The node's GGUF backend (every node has one; llama-server starts on demand)."""
    c = ctx.config
    return LlamaCppBackend(
        ctx.catalog,
        home=c.home,
        defaults=c.sampling,
        max_waiting=c.max_waiting,
        block_size=c.cache.block_size,
        on_change=ctx.on_change,
    )
