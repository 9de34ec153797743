"""The gRPC servicer: decodes requests, calls NodeCore, maps errors to status codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from mesh import wire
from mesh.errors import MeshError
from node.service import NodeCore
from proto import node_pb2 as pb
from proto import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_WATCH_INTERVAL_MS = 1000
MIN_WATCH_INTERVAL_MS = 50


async def _abort(context: grpc.aio.ServicerContext[object, object], err: MeshError) -> None:
    log.info("rejected: %s %s", err.code, err.message)
    await context.abort(wire.status_code(err), err.message)


class NodeServicer(pb_grpc.NodeServicer):
    """macmesh.v1.Node over a NodeCore."""

    def __init__(self, core: NodeCore) -> None:
        self.core = core

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.GenerateEvent]:
        try:
            req = wire.request_from_pb(request)
            stream = self.core.generate(req)
            # Rejections before the first event travel as a status, not an event.
            first = await anext(stream)
        except MeshError as err:
            await _abort(context, err)
            return
        try:
            yield wire.event_to_pb(first)
            async for event in stream:
                yield wire.event_to_pb(event)
        finally:
            await stream.aclose()

    async def RenderPrompt(
        self, request: pb.RenderPromptRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RenderPromptResponse:
        try:
            rendered = await self.core.render(
                request.model, wire.chat_from_pb(request.chat), request.include_text
            )
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return wire.rendered_to_pb(rendered)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.TokenizeResponse:
        try:
            ids = await self.core.tokenize(request.model, request.text, request.add_special_tokens)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return pb.TokenizeResponse(token_ids=ids, token_count=len(ids))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListModelsResponse:
        await self.core.catalog.refresh()  # in a worker thread, at most once a second
        return pb.ListModelsResponse(models=[wire.model_to_pb(m) for m in self.core.list_models()])

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.LoadModelResponse:
        try:
            info, seconds = await self.core.load(request.model)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return pb.LoadModelResponse(model=wire.model_to_pb(info), load_seconds=seconds)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.UnloadModelResponse:
        try:
            was = await self.core.unload(request.model, if_idle=request.if_idle)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return pb.UnloadModelResponse(was_loaded=was)

    async def WatchState(
        self, request: pb.WatchStateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.NodeState]:
        interval_ms = request.interval_ms or DEFAULT_WATCH_INTERVAL_MS
        interval = max(interval_ms, MIN_WATCH_INTERVAL_MS) / 1000
        # The coordinator's config paths count while its stream is open.
        token = self.core.push_model_paths(list(request.model_paths))
        try:
            while True:
                changed = self.core.change_event()
                yield wire.state_to_pb(self.core.snapshot())
                # On timeout: a heartbeat, the (possibly unchanged) state anyway.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), interval)
        finally:
            self.core.withdraw_model_paths(token)

    # ---------- voice (node.backends.speech) ----------

    async def Transcribe(
        self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.TranscribeResponse:
        try:
            result = await self.core.transcribe(wire.transcribe_request_from_pb(request))
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return wire.transcription_to_pb(result)

    async def Speak(
        self, request: pb.SpeakRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.AudioChunk]:
        stream = self.core.speak(wire.speak_request_from_pb(request))
        try:
            # Rejections before the first chunk travel as a status.
            first = await anext(stream, None)
        except MeshError as err:
            await stream.aclose()
            await _abort(context, err)
            return
        try:
            if first is not None:
                yield wire.audio_chunk_to_pb(first)
                async for chunk in stream:
                    yield wire.audio_chunk_to_pb(chunk)
        except MeshError as err:
            # Mid-stream: the status ends the call (the client raises it).
            await _abort(context, err)
        finally:
            await stream.aclose()

    # ---------- model files (node.models.pull / node.models.copy) ----------

    async def PullModel(
        self, request: pb.PullModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.Transfer:
        try:
            transfer = await self.core.pull(request.repo, request.file, request.revision)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return wire.transfer_to_pb(transfer)

    async def CopyModel(
        self, request: pb.CopyModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.Transfer:
        try:
            transfer = await self.core.copy(
                request.model,
                request.source_address,
                request.source_node_id,
                request.max_bytes_per_second,
            )
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return wire.transfer_to_pb(transfer)

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.DeleteModelResponse:
        try:
            return await self.core.delete(request.model, force=request.force)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None

    # ---------- node groups (node.backends.group) ----------

    async def CheckGroupRank(
        self, request: pb.GroupRankRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CheckGroupRankResponse:
        try:
            check = await asyncio.to_thread(  # reads the model's config, imports mlx-lm
                self.core.groups.check,
                request.name,
                request.model,
                request.rank,
                len(request.hosts),
                request.host_hint,
                strategy=request.strategy or "tensor",
                backend=request.backend or "ring",
            )
            self.core.check_group_room(request.name, check.memory_bytes)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return pb.CheckGroupRankResponse(
            host=check.host,
            control=check.control,
            memory_bytes=check.memory_bytes,
            architecture=check.architecture,
            context_length=check.context_length,
        )

    async def StartGroupRank(
        self, request: pb.GroupRankRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GroupRank:
        try:
            rank = await self.core.groups.start(
                request.name,
                request.model,
                request.rank,
                tuple(request.hosts),
                tuple(request.members),
                strategy=request.strategy or "tensor",
                backend=request.backend or "ring",
                control=request.control,
                token=request.token,
            )
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return wire.group_rank_to_pb(rank)

    async def StopGroupRank(
        self, request: pb.StopGroupRankRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.StopGroupRankResponse:
        return pb.StopGroupRankResponse(stopped=await self.core.groups.stop(request.name))

    async def ModelManifest(
        self, request: pb.ModelManifestRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelManifestResponse:
        try:
            return await self.core.manifest(request.model)
        except MeshError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None

    async def ReadModelFile(
        self, request: pb.ReadModelFileRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.FileChunk]:
        try:
            stream = self.core.read_file(request.model, request.path, request.offset)
            first = await anext(stream, None)
        except MeshError as err:
            await _abort(context, err)
            return
        try:
            if first is not None:
                yield first
                async for chunk in stream:
                    yield chunk
        finally:
            await stream.aclose()
