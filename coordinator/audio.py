"""Voice requests: resolve the model (same aliases as chat), pick a node that has it, call it.

Speech-to-text and text-to-speech models are advertised by nodes with their `kind`
(mesh.audio); a request goes to the least-loaded online node whose model has the right
kind, and is retried on another node when one fails before answering (gone, shutting
down, queue full). Every request counts in the metrics (`macmesh_requests_total` with
api "openai"; time to first audio byte as time to first token, the whole request as e2e
latency) and leaves one line in the request log, as chat requests do.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from coordinator.keys import ApiKey
from coordinator.metrics import CLIENT_CLOSED, OK, status_of
from coordinator.nodes import NodeView
from coordinator.request_log import RequestRecord
from coordinator.service import ChatService
from coordinator.watchdog import next_event, watched
from mesh.audio import (
    KIND_CHAT,
    KIND_STT,
    KIND_TTS,
    AudioChunk,
    SpeakRequest,
    TranscribeRequest,
    Transcription,
    endpoint_for,
    install_hint,
    kind_label,
)
from mesh.errors import InvalidRequest, MeshError, ModelNotFound, Overloaded, Unavailable
from routing.aliases import Resolution

log = logging.getLogger(__name__)

API = "openai"
ROUTE_REASON = "least-loaded"
# A transcription's deadline: the longest upload (600 s of audio) at PocketSphinx's ~0.3x
# real time on a slow CPU, with room to spare.
TRANSCRIBE_SECONDS = 300.0


@dataclass
class AudioRoute:
    """Where one voice request goes: the resolved model and the nodes to try, best first."""

    resolution: Resolution
    nodes: list[NodeView]
    received: float
    # The nodes tried so far, in order; the last one is serving (or failed last).
    tried: list[NodeView] = field(default_factory=list)


class AudioService:
    """The `/v1/audio/*` request path over the chat service's registry, aliases and metrics."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    @property
    def stale_after(self) -> float:
        return self.service.registry.stale_after

    def names(self, kind: str, key: ApiKey | None = None) -> list[str]:
        """Served models of `kind`, for error messages."""
        out = []
        for model, views in self.service.registry.served_models().items():
            info = next((i for v in views if (i := v.model(model)) is not None), None)
            if info is not None and info.kind == kind and (key is None or key.allows(model)):
                out.append(model)
        return sorted(out)

    def route(self, name: str, kind: str, key: ApiKey | None) -> AudioRoute:
        """Resolve `name` to a model of `kind` and order the nodes that serve it."""
        received = time.perf_counter()
        try:
            res = self.service.resolve_for(name, key)
            views = self.service.candidates(res)
        except ModelNotFound as err:
            raise self._not_found(name, kind, key, err) from None
        have = [v for v in views if (i := v.model(res.model)) is not None and i.kind == kind]
        if not have:
            info = next((i for v in views if (i := v.model(res.model)) is not None), None)
            actual = info.kind if info is not None else KIND_CHAT
            raise InvalidRequest(
                f"model {name!r} is a {kind_label(actual)} model; {endpoint_for(kind)} needs a "
                f"{kind_label(kind)} model (available: "
                f"{', '.join(self.names(kind, key)) or 'none'})",
                field="model",
            )
        have.sort(key=lambda v: (self._load(v, res.model), v.node_id))
        return AudioRoute(res, have, received)

    def _not_found(
        self, name: str, kind: str, key: ApiKey | None, err: ModelNotFound
    ) -> ModelNotFound:
        """ModelNotFound listing this kind's models, and what to install when the name says."""
        out = ModelNotFound(name, self.names(kind, key))
        hint = install_hint(name)
        if hint:
            out.message = f"{out.message}. {hint[0].upper()}{hint[1:]}"
            out.args = (out.message,)
        return out

    @staticmethod
    def _load(view: NodeView, model: str) -> int:
        load = next((x for x in view.state.load if x.model == model), None) if view.state else None
        return max(load.running + load.waiting if load else 0, view.inflight)

    def rejected(self, name: str | None, err: MeshError, key: str | None) -> None:
        """A voice request refused before reaching a node (bad body, unknown model)."""
        self.service.rejected(API, name, err, key=key)

    def _record(
        self,
        route: AudioRoute,
        request_id: str,
        node: NodeView | None,
        status: str,
        outcome: str,
        key: str | None,
        first_at: float | None,
        stream: bool,
    ) -> None:
        res = route.resolution
        now = time.perf_counter()
        self.service.metrics.request(API, res, status, key)
        if node is not None:
            ttft, e2e = self.service.metrics.latency(node.node_id, res.model)
            if first_at is not None:
                ttft.observe(first_at - route.received)
            e2e.observe(now - route.received)
        self.service.requests.add(
            RequestRecord(
                id=request_id,
                time=time.time() - (now - route.received),
                api=API,
                key=key,
                requested=res.requested,
                model=res.model,
                rule=res.rule,
                node=node.node_id if node is not None else None,
                route_reason=ROUTE_REASON,
                ttft_seconds=(first_at - route.received) if first_at is not None else None,
                duration_seconds=now - route.received,
                status=int(status),
                outcome=outcome,
                stream=stream,
            )
        )
        log.info(
            "%s %r -> %s on %s: %s in %.2fs",
            request_id,
            res.requested,
            res.model,
            node.node_id if node else "-",
            outcome,
            now - route.received,
        )

    async def transcribe(
        self, route: AudioRoute, request: TranscribeRequest, key: str | None
    ) -> Transcription:
        request_id = request.request_id or f"tr_{uuid.uuid4().hex[:16]}"
        last: NodeView | None = None
        status, outcome = CLIENT_CLOSED, "cancelled by the client"
        try:
            for node in route.nodes:
                last = node
                route.tried.append(node)
                node.inflight += 1
                call = node.client.transcribe(
                    TranscribeRequest(
                        route.resolution.model,
                        request.audio,
                        request.format,
                        request.language,
                        request_id,
                    )
                )
                try:
                    # Bounded like every node call: a hung node is left for the next one.
                    out = await watched(
                        node,
                        self.stale_after,
                        call,
                        deadline=TRANSCRIBE_SECONDS,
                        what="transcribing",
                    )
                except (Unavailable, Overloaded) as err:
                    log.warning("%s: node %s failed: %s", request_id, node.node_id, err.message)
                    if node is route.nodes[-1]:
                        raise
                    continue
                finally:
                    node.inflight -= 1
                words = len(out.text.split())
                status = OK
                outcome = (
                    f"transcribed {out.duration:.1f}s of audio: {words} words "
                    f"in {out.seconds:.2f}s on the node"
                )
                return out
            raise Unavailable("no node could transcribe")  # route.nodes is never empty
        except MeshError as err:
            status, outcome = status_of(err), f"error: {err.message}"
            raise
        finally:
            self._record(route, request_id, last, status, outcome, key, None, False)

    async def speak(
        self, route: AudioRoute, request: SpeakRequest, key: str | None
    ) -> AsyncGenerator[AudioChunk, None]:
        """Audio chunks; errors before the first chunk raise (and may try another node)."""
        request_id = request.request_id or f"sp_{uuid.uuid4().hex[:16]}"
        last: NodeView | None = None
        status, outcome = CLIENT_CLOSED, "cancelled by the client"
        first_at: float | None = None
        sent = 0
        try:
            for node in route.nodes:
                last = node
                route.tried.append(node)
                node.inflight += 1
                stream = node.client.speak(
                    SpeakRequest(
                        route.resolution.model,
                        request.input,
                        request.voice,
                        request.speed,
                        request.format,
                        request_id,
                    )
                )
                try:
                    while True:
                        started = first_at is not None
                        chunk = await next_event(
                            stream, node, self.stale_after, started=started, produced=started
                        )
                        if chunk is None:
                            break
                        if first_at is None:
                            first_at = time.perf_counter()
                        sent += len(chunk.data)
                        yield chunk
                except (Unavailable, Overloaded) as err:
                    if first_at is not None or node is route.nodes[-1]:
                        raise
                    log.warning("%s: node %s failed: %s", request_id, node.node_id, err.message)
                    continue
                finally:
                    node.inflight -= 1
                    await stream.aclose()
                status = OK
                outcome = f"spoke {len(request.input)} characters: {sent} bytes of {request.format}"
                return
        except MeshError as err:
            status, outcome = status_of(err), f"error: {err.message}"
            raise
        finally:
            self._record(route, request_id, last, status, outcome, key, first_at, True)


__all__ = ["KIND_STT", "KIND_TTS", "AudioRoute", "AudioService"]
