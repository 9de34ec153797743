"""Async client for one node's gRPC service.

gRPC errors are mapped to `mesh.errors` here, once. `generate` cancels the
call on the node as soon as its consumer stops iterating.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc

from mesh import errors, wire
from mesh.audio import AudioChunk, SpeakRequest, TranscribeRequest, Transcription
from mesh.auth import MeshSecret, client_interceptors
from mesh.types import (
    ChatPrompt,
    GenerateEvent,
    GenerateRequest,
    GroupRank,
    ModelInfo,
    NodeState,
    RenderedPrompt,
    Transfer,
)
from proto import node_pb2 as pb
from proto import node_pb2_grpc as pb_grpc

# Prompts of 100k+ tokens travel as token ids; allow big messages both ways.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A peer that stops answering pings for 5 s (hung with its TCP open, or its link gone)
    # has its connection closed, failing the calls on it, within 15 s even when idle.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
)
# Deadlines of calls that may legitimately take long, unless the client sets its own:
# loading a large model from a slow disk; unloading waits for requests in flight.
LOAD_TIMEOUT = 900.0
UNLOAD_TIMEOUT = 300.0
# What a node's server accepts: the clients' 10 s keepalive pings, also while a
# stream is quiet. gRPC's server defaults (pings at most every 5 minutes, two
# strikes) answer a prefill that sends nothing for a minute with GOAWAY
# "too_many_pings", which killed long prompts' streams mid-prefill.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


def _mapped(exc: grpc.aio.AioRpcError) -> errors.MeshError:
    return wire.error_from_status(exc.code(), exc.details() or "")


class NodeClient:
    """A connection to one node (`host:port`). Use as an async context manager."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        secret: bytes | MeshSecret | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`secret`: the mesh secret (every call authenticated, the node's proof checked);
        `credentials`: TLS channel credentials (mesh.auth.channel_credentials)."""
        self.target = target
        self.timeout = timeout
        interceptors = client_interceptors(secret) if secret else None
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(
                target, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                target, options=CHANNEL_OPTIONS, interceptors=interceptors
            )
        self._stub = pb_grpc.NodeStub(self._channel)

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the channel connects; Unavailable after `timeout` s."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise errors.Unavailable(
                f"node {self.target} did not answer within {timeout:g}s"
            ) from None

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """Stream events; errors before the first event raise `MeshError`."""
        call = self._stub.Generate(wire.request_to_pb(request), timeout=self.timeout)
        try:
            async for msg in call:
                yield wire.event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        finally:
            call.cancel()

    async def transcribe(self, request: TranscribeRequest) -> Transcription:
        """Speech to text on the node (an "stt" model)."""
        try:
            resp = await self._stub.Transcribe(
                wire.transcribe_request_to_pb(request), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return wire.transcription_from_pb(resp)

    async def speak(self, request: SpeakRequest) -> AsyncGenerator[AudioChunk, None]:
        """Text to speech, chunk by chunk as the node's engine produces them; errors before
        the first chunk raise `MeshError`; stopping cancels the call."""
        call = self._stub.Speak(wire.speak_request_to_pb(request), timeout=self.timeout)
        try:
            async for msg in call:
                yield wire.audio_chunk_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        finally:
            call.cancel()

    async def render(
        self, model: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        try:
            resp = await self._stub.RenderPrompt(
                pb.RenderPromptRequest(
                    model=model, chat=wire.chat_to_pb(chat), include_text=include_text
                ),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return wire.rendered_from_pb(resp)

    async def tokenize(self, model: str, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            resp = await self._stub.Tokenize(
                pb.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens),
                timeout=self.timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return list(resp.token_ids)

    async def list_models(self) -> list[ModelInfo]:
        try:
            resp = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return [wire.model_from_pb(m) for m in resp.models]

    async def load_model(self, model: str) -> tuple[ModelInfo, float]:
        try:
            resp = await self._stub.LoadModel(
                pb.LoadModelRequest(model=model), timeout=self.timeout or LOAD_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return wire.model_from_pb(resp.model), resp.load_seconds

    async def unload_model(self, model: str, *, if_idle: bool = False) -> bool:
        """Unload `model`; `if_idle`: only if nothing for it runs (else ModelLoadError)."""
        try:
            resp = await self._stub.UnloadModel(
                pb.UnloadModelRequest(model=model, if_idle=if_idle),
                timeout=self.timeout or UNLOAD_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return resp.was_loaded

    async def pull_model(self, repo: str, file: str = "", revision: str = "") -> Transfer:
        """Start a Hugging Face Hub download on the node; progress is in its state."""
        try:
            resp = await self._stub.PullModel(
                pb.PullModelRequest(repo=repo, file=file, revision=revision), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return wire.transfer_from_pb(resp)

    async def copy_model(
        self, model: str, source_address: str, source_node_id: str, max_bytes_per_second: int = 0
    ) -> Transfer:
        """Start a copy of `model` from the node at `source_address` onto this node."""
        request = pb.CopyModelRequest(
            model=model,
            source_address=source_address,
            source_node_id=source_node_id,
            max_bytes_per_second=max_bytes_per_second,
        )
        try:
            resp = await self._stub.CopyModel(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return wire.transfer_from_pb(resp)

    async def delete_model(self, model: str, *, force: bool = False) -> pb.DeleteModelResponse:
        """Delete a model's files on the node (refused while loaded unless `force`)."""
        try:
            return await self._stub.DeleteModel(
                pb.DeleteModelRequest(model=model, force=force), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None

    # ---------- node groups (node.backends.group) ----------

    async def check_group_rank(
        self, request: pb.GroupRankRequest, timeout: float = 60.0
    ) -> pb.CheckGroupRankResponse:
        """Whether the node can be `request.rank` of the group; reserves its ring port."""
        try:
            return await self._stub.CheckGroupRank(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None

    async def start_group_rank(self, request: pb.GroupRankRequest, timeout: float) -> GroupRank:
        """Start the node's rank; rank 0 answers once the group formed."""
        try:
            return wire.group_rank_from_pb(
                await self._stub.StartGroupRank(request, timeout=timeout)
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None

    async def stop_group_rank(self, name: str, timeout: float = 60.0) -> bool:
        """Stop the node's rank of `name` (rank 0: the whole group); False if it had none."""
        try:
            resp = await self._stub.StopGroupRank(
                pb.StopGroupRankRequest(name=name), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        return resp.stopped

    async def model_manifest(self, model: str) -> pb.ModelManifestResponse:
        """The files of `model` on the node, with sizes and SHA-256 (the copy's source side)."""
        try:
            return await self._stub.ModelManifest(pb.ModelManifestRequest(model=model))
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None

    async def read_model_file(
        self, model: str, path: str, offset: int = 0
    ) -> AsyncGenerator[pb.FileChunk, None]:
        """One file of `model` from `offset`, chunk by chunk; stopping cancels the call."""
        call = self._stub.ReadModelFile(
            pb.ReadModelFileRequest(model=model, path=path, offset=offset)
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        finally:
            call.cancel()

    async def watch_state(
        self, interval_ms: int = 0, model_paths: Sequence[str] = ()
    ) -> AsyncGenerator[NodeState, None]:
        """Stream the node's state until the caller stops or the node goes away.

        `model_paths`: models the caller's config names by path; the node serves
        those it has while the stream is open.
        """
        request = pb.WatchStateRequest(interval_ms=interval_ms, model_paths=list(model_paths))
        call = self._stub.WatchState(request)
        try:
            async for msg in call:
                yield wire.state_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise _mapped(exc) from None
        finally:
            call.cancel()
