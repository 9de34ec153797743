"""Resolve -> choose a node -> render -> generate. The API modules call only this."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from typing import TypeVar

from prometheus_client import CollectorRegistry

from coordinator import hygiene
from coordinator.groups import GroupManager
from coordinator.keys import ApiKey
from coordinator.metrics import (
    CLIENT_CLOSED,
    OK,
    SERVER_ERROR,
    CoordinatorMetrics,
    event_status,
    status_of,
)
from coordinator.nodes import NodeRegistry, NodeView
from coordinator.placement import Placer
from coordinator.prepared import Prepared, config_key, node_request, normalized
from coordinator.rendering import PromptRenderer, another_node
from coordinator.request_log import RequestLog, RequestRecord, finished
from coordinator.settings import SettingsStore
from coordinator.watchdog import next_event
from mesh import errors
from mesh.errors import (
    MeshError,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    PromptTooLong,
    Unavailable,
)
from mesh.sampling import check_sampling, merge_sampling
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    ModelInfo,
    SamplingParams,
    Started,
    TextPrompt,
    ToolCallEvent,
)
from routing.aliases import Resolution, resolve
from routing.policy import (
    DEFAULT_POLICY,
    Candidate,
    Decision,
    Policy,
    Reason,
    RoundRobin,
    choose,
)
from routing.prefix import DEFAULT_BLOCK_SIZE, block_hashes

log = logging.getLogger(__name__)

T = TypeVar("T")

# A routing decision counts as cached there for this long, until the node reports.
PROVISIONAL_SECONDS = 5.0

# Node-side failures worth another node, if no token reached the caller yet.
_RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
# Finish reasons the APIs report as a server error.
_FAILED = frozenset({FinishReason.ERROR, FinishReason.CANCELLED})


class ChatService:
    """The coordinator's request path, shared by every API surface."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: SettingsStore,
        *,
        policy: Policy | str = DEFAULT_POLICY,
        metrics: CoordinatorMetrics | None = None,
        requests: RequestLog | None = None,
    ) -> None:
        """`metrics` None: record into a registry of its own (nobody scrapes it)."""
        self.registry = registry
        self.settings = settings
        self.policy = Policy(policy)
        self.metrics = (
            CoordinatorMetrics(CollectorRegistry(), registry) if metrics is None else metrics
        )
        # Recent requests for /api/requests and the web UI (bounded).
        self.requests = RequestLog() if requests is None else requests
        self._round_robin = RoundRobin()
        self.placer = Placer(registry, settings)
        self.groups = GroupManager(registry, self.placer.rooms)
        self.renderer = PromptRenderer(registry)

    # ---------- resolution and placement ----------

    def resolve(self, name: str) -> Resolution:
        """The local model for `name`; ModelNotFound lists what exists."""
        served = set(self.registry.served_models()) | set(self.registry.known_models)
        served.update(g.name for g in self.groups.groups())  # a down group: its reason
        res = resolve(name, self.settings.routing(), served)
        if res is None:
            if not self.registry.online():
                # Not "unknown model": nothing is up to know it. Retryable.
                raise Unavailable("no node is reachable; check that nodes are running")
            raise ModelNotFound(name, self.available_names())
        return res

    def resolve_for(self, name: str, key: ApiKey | None) -> Resolution:
        """`resolve`, for a caller whose key may be limited to some models: allowed when
        the requested name or the model it resolves to matches one of its patterns. A
        limited key learns nothing of models it may not use (ModelNotFound lists only
        the names it may use; an unknown name it may not use is a PermissionDenied)."""
        if key is None or key.models is None:
            return self.resolve(name)
        try:
            res = self.resolve(name)
        except ModelNotFound as err:
            if not key.allows(name):
                raise self._forbidden(name, key) from None
            raise ModelNotFound(name, [n for n in err.available if key.allows(n)]) from None
        if not key.allows(name, res.model):
            raise self._forbidden(name, key)
        return res

    @staticmethod
    def _forbidden(name: str, key: ApiKey) -> PermissionDenied:
        return PermissionDenied(
            f"API key {key.name!r} may not use model {name!r} "
            f"(its models: {', '.join(key.models or ())})"
        )

    def available_names(self, key: ApiKey | None = None) -> list[str]:
        """Served models and plain aliases; for a key limited to some models, those it may use."""
        names = set(self.registry.served_models())
        names.update(a for a in self.settings.routing().aliases if not any(c in a for c in "*?["))
        if key is not None and key.models is not None:
            names = {n for n in names if self._allowed(n, key)}
        return sorted(names)

    def _allowed(self, name: str, key: ApiKey) -> bool:
        if key.allows(name):
            return True
        try:
            return key.allows(name, self.resolve(name).model)
        except MeshError:
            return False

    def candidates(self, res: Resolution) -> list[NodeView]:
        """Online nodes that serve the model; the right error when there are none."""
        candidates = self.registry.served_models().get(res.model, [])
        if candidates:
            return candidates
        if not self.registry.online():
            raise Unavailable("no node is reachable; check that nodes are running")
        down = self.groups.down_reason(res.model)
        if down is not None:
            raise Unavailable(
                f"group {res.model!r} is {down}; form it again with `macmesh groups create`"
            )
        if res.model in self.registry.known_models:
            raise Unavailable(
                f"no node serving {res.model!r} is up right now (it was served before); retry later"
            )
        if res.path:
            raise ModelNotFound(
                f"{res.model} ({config_key(res)} names {res.path}, which exists on no online node)",
                self.available_names(),
            )
        raise ModelNotFound(
            f"{res.model} (resolved from {res.requested!r})"
            if res.model != res.requested
            else res.model,
            self.available_names(),
        )

    def place(
        self,
        res: Resolution,
        ids: Sequence[int],
        views: list[NodeView],
        *,
        commit: bool = True,
        max_tokens: int | None = None,
    ) -> tuple[NodeView, Decision]:
        """The node for a prompt of token `ids`, by this coordinator's policy.

        `commit` records the choice as a provisional cache entry there, so a
        burst with the same prefix follows it before the node reports.
        `max_tokens` (the request's cap, if any) bounds the answer length the
        policy's decode estimate assumes.
        """
        now = time.monotonic()
        index = self.registry.prefix
        cached: dict[str, int] = {}
        hashes_by_size: dict[int, list[int]] = {}
        for size in index.block_sizes() or (DEFAULT_BLOCK_SIZE,):
            hashes = block_hashes(res.model, ids, size)
            hashes_by_size[size] = hashes
            for target, blocks in index.cached_blocks(hashes, now, size).items():
                cached[target] = max(cached.get(target, 0), blocks * size)
        by_target = {v.target: v for v in views}
        occupancy = index.occupancy(now)
        # Prompts that begin alike go to the same node even before any node reports them.
        first = min(hashes_by_size.items())[1][:1] if hashes_by_size else []
        affinity = first[0] if first else hash(tuple(ids)) & 0xFFFFFFFFFFFF
        decision = choose(
            [
                replace(
                    self._candidate(v, res.model, cached.get(v.target, 0)),
                    cache_blocks=occupancy.get(v.target, 0),
                )
                for v in views
            ],
            len(ids),
            self.policy,
            round_robin=self._round_robin,
            affinity=affinity or 1,
            completion_tokens=max_tokens,
        )
        view = by_target[decision.node_id]
        if commit and self.policy is Policy.CACHE_AWARE:
            # Until the node reports: at least until the request has had time to prefill.
            expires = now + max(PROVISIONAL_SECONDS, 2 * decision.ttft_s + 2.0)
            for size, hashes in hashes_by_size.items():
                index.add_provisional(view.target, hashes, expires, size)
        return view, decision

    @staticmethod
    def _candidate(view: NodeView, model: str, cached_tokens: int) -> Candidate:
        info = view.model(model)
        load = next((x for x in view.state.load if x.model == model), None) if view.state else None
        return Candidate(
            node_id=view.target,
            loaded=info is not None and info.loaded,
            prefill_tps=load.prefill_tokens_per_second if load else 0.0,
            decode_tps=load.decode_tokens_per_second if load else 0.0,
            aggregate_decode_tps=load.aggregate_decode_tokens_per_second if load else 0.0,
            # Ours until its report shows them (a burst is placed within milliseconds).
            queued_prefill_tokens=max(
                load.queued_prefill_tokens if load else 0, view.inflight_prefill
            ),
            # Our own open streams count until the node's next state shows them.
            running=max(load.running if load else 0, view.inflight),
            waiting=load.waiting if load else 0,
            cached_tokens=cached_tokens,
        )

    def model_info(self, model: str) -> ModelInfo | None:
        for view in self.registry.served_models().get(model, []):
            info = view.model(model)
            if info is not None:
                return info
        return None

    # ---------- requests ----------

    async def prepare(
        self,
        name: str,
        prompt: ChatPrompt | TextPrompt,
        *,
        commit: bool = True,
        max_tokens: int | None = None,
        key: ApiKey | None = None,
    ) -> Prepared:
        """Resolve, tokenize with the model's own template, place; raises before generating.

        Any node with the model renders (one with it loaded first): the ids are
        the same everywhere, and the placement needs them. `max_tokens` is the
        request's own cap, if any (the placement's answer-length estimate; the
        tier's and the global caps apply too). `key`: the caller's API key, whose
        `models` the name or its resolved model must match (else PermissionDenied).
        """
        received = time.perf_counter()
        res = self.resolve_for(name, key)
        views = self.candidates(res)
        cold = not any((info := v.model(res.model)) is not None and info.loaded for v in views)
        placed = ""
        if cold:  # load it where it fits first (the node's report may lag: only there)
            loaded = await self.placer.ensure_loaded(res, views)
            views, placed = [loaded.node], loaded.why  # `why` names the node
        renderer = views[0] if cold else another_node(self.registry, res.model, set())
        assert renderer is not None
        inference = self.settings.inference()
        if isinstance(prompt, ChatPrompt):
            if inference.prompt_hygiene:
                prompt, _ = hygiene.clean(prompt)
            if prompt.enable_thinking is None and inference.enable_thinking is not None:
                prompt = replace(prompt, enable_thinking=inference.enable_thinking)
            chat_prompt = prompt
            rendered, renderer = await self.renderer.on_a_node(
                renderer,
                res.model,
                lambda v: self.renderer.render(v, res.model, chat_prompt),
                "rendering the prompt",
            )
            ids, context = rendered.token_ids, rendered.context_length
            tools = prompt.tools
            chat: ChatPrompt | None = prompt
        else:
            text = prompt.text
            tokens, renderer = await self.renderer.on_a_node(
                renderer,
                res.model,
                lambda v: v.client.tokenize(res.model, text, True),
                "tokenizing",
            )
            ids = tuple(tokens)
            info = renderer.model(res.model)
            context = info.context_length if info else 0
            tools = ()
            chat = None
        if context and len(ids) >= context:
            raise PromptTooLong(len(ids), context)
        # The answer's cap, as `sampling` will set it (the context's room aside).
        asked = max_tokens if max_tokens is not None else inference.sampling.max_tokens
        caps = (asked, res.max_tokens, inference.max_output_tokens)
        cap = min((c for c in caps if c), default=None)
        node, decision = self.place(res, ids, views, commit=commit, max_tokens=cap)
        if cold and decision.node_id == renderer.target:
            decision = replace(decision, reason=Reason.NOT_LOADED.value)
        if commit:  # a real request, not a count
            self.metrics.route(decision.reason)
        return Prepared(
            res, node, decision.reason, ids, context, tools, chat, decision, received, placed
        )

    def rejected(
        self, api: str, name: str | None, err: MeshError, *, key: str | None = None
    ) -> None:
        """Count a request refused before generating (bad body, unknown model, no node);
        `key`: the name of the caller's API key."""
        res = None
        if name is not None:
            with contextlib.suppress(MeshError):
                res = self.resolve(name)
        status = status_of(err)
        self.metrics.request(api, res, status, key)
        log.info("%s request for %r refused: %s: %s", api or "api", name, err.code, err.message)
        self.requests.add(
            RequestRecord(
                id=f"req_{uuid.uuid4().hex[:16]}",
                time=time.time(),
                api=api,
                key=key,
                requested=name,
                model=res.model if res else None,
                rule=res.rule if res else None,
                status=int(status),
                outcome=f"refused: {err.message}",
            )
        )

    async def count_tokens(
        self, name: str, prompt: ChatPrompt, *, key: ApiKey | None = None
    ) -> int:
        """Exactly the prompt tokens the node will prefill for this chat."""
        return (await self.prepare(name, prompt, commit=False, key=key)).prompt_tokens

    def sampling(self, prepared: Prepared, params: SamplingParams) -> SamplingParams:
        """Request values over `inference_settings.json`; max_tokens clamped, never rejected.

        Caps: the room left in the context, the resolved tier/alias `max_tokens`,
        and the global `max_output_tokens`.
        """
        return self._sampling(prepared, params)[0]

    def _sampling(self, prepared: Prepared, params: SamplingParams) -> tuple[SamplingParams, bool]:
        """The sampling to send, and whether a server-side policy cap set max_tokens."""
        inference = self.settings.inference()
        merged = merge_sampling(params, inference.sampling)
        check_sampling(merged, prefix="")
        room = prepared.context_length - prepared.prompt_tokens if prepared.context_length else None
        policy = [c for c in (prepared.resolution.max_tokens, inference.max_output_tokens) if c]
        cap = min([c for c in (room, *policy) if c is not None], default=None)
        if cap is None or (merged.max_tokens is not None and merged.max_tokens <= cap):
            return merged, False
        by_policy = bool(policy) and min(policy) == cap and (room is None or cap < room)
        return replace(merged, max_tokens=cap), by_policy

    async def generate(
        self,
        prepared: Prepared,
        params: SamplingParams,
        request_id: str = "",
        *,
        api: str = "",
        key: str | None = None,
    ) -> AsyncGenerator[GenerateEvent, None]:
        """The node's event stream; closing it cancels the generation on the node.

        A node that fails before the first token (gone, shutting down, queue full)
        is retried on another node with the model; the caller sees one `Started`.
        After the first token a failure is final: it raises (the API turns it
        into its error event). `api` labels the request in the metrics, `key` (the
        name of the caller's API key) there and in the request log.
        """
        t0 = time.perf_counter()
        received = prepared.received or t0
        request_id = request_id or f"req_{uuid.uuid4().hex[:16]}"
        sampling = params
        node: NodeView | None = prepared.node
        tried: set[str] = set()
        started = produced = tool_calls = False
        outcome = "cancelled"
        short = "cancelled by the client"  # the request log's outcome
        finish: Finish | None = None
        first_at: float | None = None
        last: NodeView = prepared.node  # the node tried last: the one that served, or failed last
        # Until the stream ends otherwise, the caller went away (closed it early).
        status = CLIENT_CLOSED
        try:
            sampling, policy_capped = self._sampling(prepared, params)
            while node is not None:
                last = node
                tried.add(node.target)
                prepared.tried.append(node)
                failure: MeshError | None = None
                node.inflight += 1
                # The placement's estimate of what it prefills there (all of it on a retry).
                decided = prepared.decision
                cached = (
                    decided.cached_tokens if decided is not None and node is prepared.node else 0
                )
                prefill = max(prepared.prompt_tokens - cached, 0)
                node.inflight_prefill += prefill
                ttft, e2e = self.metrics.latency(node.node_id, prepared.model)
                request = node_request(prepared, node, sampling, request_id)
                stream = node.client.generate(request)
                node_started = False  # this node's first event came (Started or an error)
                try:
                    while True:
                        got = await next_event(
                            stream,
                            node,
                            self.registry.stale_after,
                            started=node_started,
                            produced=produced,
                        )
                        if got is None:
                            break
                        node_started = True
                        event = normalized(got, tool_calls)
                        if isinstance(event, ToolCallEvent):
                            tool_calls = True
                        if isinstance(event, Started):
                            if started:
                                continue  # a retry: the caller already has one
                            started = True
                        elif isinstance(event, ErrorEvent):
                            if not produced and event.code in _RETRYABLE:
                                failure = errors.from_code(event.code, event.message)
                                break
                            outcome = f"error {event.code}: {event.message}"
                            short = f"error: {event.message}"
                            status = event_status(event.code)
                        elif isinstance(event, Finish):
                            e2e.observe(time.perf_counter() - received)
                            if policy_capped and event.reason is FinishReason.LENGTH:
                                # Our cap, not the client's max_tokens, ended the answer: to
                                # the client the turn is over. Reporting "max_tokens" makes
                                # Claude Code retry for a continuation that will be cut again.
                                event = replace(event, reason=FinishReason.STOP)
                            finish = event
                            if not short.startswith("error"):
                                short = event.reason.value
                            outcome = (
                                f"{event.reason.value}, {event.usage.completion_tokens} tokens "
                                f"out, prefill {event.usage.prompt_seconds:.2f}s"
                            )
                            if status == CLIENT_CLOSED:  # no error event came first
                                status = SERVER_ERROR if event.reason in _FAILED else OK
                        elif not produced:
                            produced = True
                            first_at = time.perf_counter()
                            node.inflight_prefill -= prefill
                            prefill = 0
                            ttft.observe(time.perf_counter() - received)
                        yield event
                except (Unavailable, Overloaded) as err:
                    if produced:
                        outcome = short = f"node failed mid-stream: {err.message}"
                        raise Unavailable(
                            f"node {node.node_id} failed during generation: {err.message}"
                        ) from None
                    failure = err
                finally:
                    node.inflight -= 1
                    node.inflight_prefill -= prefill
                    await stream.aclose()
                if failure is None:
                    if status == CLIENT_CLOSED:  # the node's stream ended without a finish
                        status = SERVER_ERROR
                    return
                failed = node
                node = another_node(self.registry, prepared.model, tried)
                log.warning(
                    "%s: node %s failed before the first token (%s); %s",
                    request_id,
                    failed.node_id,
                    failure.message,
                    f"retrying on {node.node_id}" if node else "no other node has the model",
                )
                if node is None:
                    outcome = short = f"failed: {failure.message}"
                    raise failure
        except MeshError as err:
            status = status_of(err)
            if not short.startswith(("failed", "node failed")):
                short = f"error: {err.message}"
            raise
        finally:
            res = prepared.resolution
            self.metrics.request(api, res, status, key)
            self.requests.add(
                finished(
                    prepared, api, request_id, last, int(status), short, finish, first_at, t0, key
                )
            )
            log.info(
                "%s %r -> %s (%s) on %s [%s]: %d prompt tokens, max %s; %s in %.2fs%s",
                request_id,
                res.requested,
                res.model,
                res.rule,
                ",".join(sorted(tried)),
                prepared.route_reason,
                prepared.prompt_tokens,
                sampling.max_tokens,
                outcome,
                time.perf_counter() - t0,
                f"; placed: {prepared.placement}" if prepared.placement else "",
            )
