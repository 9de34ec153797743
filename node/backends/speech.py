"""Voice models behind the Backend protocol: speech to text ("stt") and text to speech ("tts").

The engines (`node.backends.speech_engines`) are built in, like simulated models: always
"loaded", advertised in the catalog and the node state with their `kind`, so coordinators
route `/v1/audio/*` requests only to nodes that have them. Chat calls (`generate`,
`render`, `tokenize`) on a voice model are refused with the endpoint to use instead.

Engines block; every call runs in a worker thread. Speech streams: the engine's samples
travel through a queue to the event loop as it produces them, encoded on the way (a
streamed WAV header first, then PCM), and closing the stream stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path

import numpy as np

from mesh.audio import (
    CONTENT_TYPES,
    FFMPEG_OUTPUT_FORMATS,
    KIND_STT,
    KIND_TTS,
    MAX_SPEECH_CHARS,
    MAX_SPEED,
    MIN_SPEED,
    NATIVE_OUTPUT_FORMATS,
    PCM_SAMPLE_RATE,
    AudioChunk,
    SpeakRequest,
    TranscribeRequest,
    Transcription,
    endpoint_for,
    kind_label,
)
from mesh.errors import BackendError, InvalidRequest, MeshError, ModelNotFound, Unavailable
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    GenerateEvent,
    GenerateRequest,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
)
from node.backends.audio_codec import (
    Samples,
    decode,
    encode_ffmpeg,
    ffmpeg,
    to_pcm16,
    wav_header,
)
from node.backends.base import BackendContext
from node.backends.common import CountsRunning
from node.backends.speech_engines import Missing, SttEngine, TtsEngine, discover

log = logging.getLogger(__name__)

_DONE = object()


class StreamResampler:
    """Linear resampling of a stream, chunk by chunk, without seams between chunks."""

    def __init__(self, rate: int, target: int) -> None:
        self.step = rate / target
        self.pos = 0.0
        self.tail = np.zeros(0, np.float32)

    def feed(self, x: Samples) -> Samples:
        buf = np.concatenate([self.tail, x]) if len(self.tail) else x
        if len(buf) < 2:
            self.tail = buf
            return np.zeros(0, np.float32)
        idx = np.arange(self.pos, len(buf) - 1, self.step)
        out: Samples = np.interp(idx, np.arange(len(buf)), buf).astype(np.float32)
        nxt = (idx[-1] + self.step) if len(idx) else self.pos
        drop = int(nxt)
        self.tail = buf[drop:]
        self.pos = nxt - drop
        return out


class SpeechBackend(CountsRunning):
    """Backend protocol over the node's speech engines (all built in, always loaded)."""

    name = "speech"

    def __init__(
        self,
        stt: list[SttEngine],
        tts: list[TtsEngine],
        missing: Sequence[Missing] = (),
    ) -> None:
        self.stt = {e.model_id: e for e in stt}
        self.tts = {e.model_id: e for e in tts}
        self.missing = list(missing)
        self._running: dict[str, int] = dict.fromkeys([*self.stt, *self.tts], 0)
        self._closing = False

    # ---------- catalog ----------

    def info(self, model_id: str) -> ModelInfo:
        engine: SttEngine | TtsEngine = self.stt.get(model_id) or self.tts[model_id]
        return ModelInfo(
            id=model_id,
            backend=self.name,
            source="built-in",
            path=getattr(engine, "path", "") or getattr(engine, "binary", ""),
            loaded=True,
            quantization=engine.engine,
            kind=engine.kind,
        )

    def claims(self, model_id: str) -> bool:
        return model_id in self.stt or model_id in self.tts

    def model_dirs(self) -> tuple[Path, ...]:
        return ()

    def loaded(self) -> dict[str, ModelInfo]:
        return {m: self.info(m) for m in [*self.stt, *self.tts]}

    def available(self) -> dict[str, ModelInfo]:
        return {}

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        if not self.claims(model_id):
            raise ModelNotFound(model_id, self._running)
        return self.info(model_id), 0.0

    async def unload(self, model_id: str) -> bool:
        return False  # built in

    # ---------- chat calls: refused ----------

    def _not_chat(self, model_id: str) -> InvalidRequest:
        kind = KIND_STT if model_id in self.stt else KIND_TTS
        return InvalidRequest(
            f"model {model_id!r} is a {kind_label(kind)} model, not a chat model: "
            f"use {endpoint_for(kind)}",
            field="model",
        )

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        raise self._not_chat(model_id)

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        raise self._not_chat(model_id)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        raise self._not_chat(request.model)
        yield  # an async generator, like every backend's

    # ---------- voice ----------

    def _stt(self, model_id: str) -> SttEngine:
        engine = self.stt.get(model_id)
        if engine is None:
            if model_id in self.tts:
                raise InvalidRequest(
                    f"model {model_id!r} is a text-to-speech model: use it with "
                    "POST /v1/audio/speech; transcription needs a speech-to-text model "
                    f"({', '.join(self.stt) or 'none on this node'})",
                    field="model",
                )
            raise ModelNotFound(model_id, self.stt)
        return engine

    def _tts(self, model_id: str) -> TtsEngine:
        engine = self.tts.get(model_id)
        if engine is None:
            if model_id in self.stt:
                raise InvalidRequest(
                    f"model {model_id!r} is a speech-to-text model: use it with "
                    "POST /v1/audio/transcriptions; speech needs a text-to-speech model "
                    f"({', '.join(self.tts) or 'none on this node'})",
                    field="model",
                )
            raise ModelNotFound(model_id, self.tts)
        return engine

    async def transcribe(self, request: TranscribeRequest) -> Transcription:
        """Decode the upload and run the model on it, in a worker thread."""
        if self._closing:
            raise Unavailable("the node is shutting down")
        engine = self._stt(request.model)
        language = request.language.lower().split("-")[0]
        if language and engine.languages and language not in engine.languages:
            raise InvalidRequest(
                f"{engine.model_id} transcribes {', '.join(engine.languages)} only, "
                f"not {request.language!r}",
                field="language",
            )

        def run() -> Transcription:
            samples, rate = decode(request.audio, request.format)
            return engine.transcribe(samples, rate, language)

        self._running[engine.model_id] += 1
        try:
            return await asyncio.to_thread(run)
        except MeshError:
            raise
        except (RuntimeError, ValueError, OSError) as exc:
            raise BackendError(f"{engine.engine} failed: {exc}") from exc
        finally:
            self._running[engine.model_id] -= 1

    def check_speak(self, request: SpeakRequest) -> TtsEngine:
        """InvalidRequest (naming the field) for what the engine cannot do."""
        engine = self._tts(request.model)
        text = request.input
        if not text.strip():
            raise InvalidRequest("the text to speak is empty", field="input")
        if len(text) > MAX_SPEECH_CHARS:
            raise InvalidRequest(
                f"the text is {len(text)} characters; the limit is {MAX_SPEECH_CHARS}",
                field="input",
            )
        if not MIN_SPEED <= request.speed <= MAX_SPEED:
            raise InvalidRequest(
                f"must be between {MIN_SPEED} and {MAX_SPEED}, got {request.speed:g}",
                field="speed",
            )
        fmt = request.format
        formats = NATIVE_OUTPUT_FORMATS + (FFMPEG_OUTPUT_FORMATS if ffmpeg() else ())
        if fmt not in formats:
            need = " (mp3, flac, opus and aac need ffmpeg on the node)" if not ffmpeg() else ""
            raise InvalidRequest(
                f"unsupported format {fmt!r}; this node writes {', '.join(formats)}{need}",
                field="response_format",
            )
        voice_of = getattr(engine, "voice", None)
        if voice_of is not None:
            voice_of(request.voice)  # raises for an unknown voice
        return engine

    async def speak(self, request: SpeakRequest) -> AsyncGenerator[AudioChunk, None]:
        """The encoded audio, chunk by chunk as the engine produces it."""
        if self._closing:
            raise Unavailable("the node is shutting down")
        engine = self.check_speak(request)
        fmt = request.format
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            it: Iterator[Samples] = engine.speak(request.input, request.voice, request.speed)
            try:
                for samples in it:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, samples)
            except BaseException as exc:  # noqa: BLE001 - travels to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # stops the engine (kills espeak-ng) if we broke off
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        self._running[engine.model_id] += 1
        worker = loop.run_in_executor(None, produce)
        first = True
        collected: list[bytes] = []
        resampler: StreamResampler | None = None
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, MeshError):
                    raise item
                if isinstance(item, BaseException):
                    raise BackendError(f"{engine.engine} failed: {item}") from item
                assert isinstance(item, np.ndarray)
                rate = engine.sample_rate
                if fmt == "pcm":
                    if resampler is None:
                        resampler = StreamResampler(rate, PCM_SAMPLE_RATE)
                    data = to_pcm16(resampler.feed(item))
                    rate = PCM_SAMPLE_RATE
                else:
                    data = to_pcm16(item)
                if fmt not in NATIVE_OUTPUT_FORMATS:
                    collected.append(data)  # encoded as a whole at the end
                    continue
                if first:
                    head = wav_header(rate) if fmt == "wav" else b""
                    yield AudioChunk(head + data, rate, CONTENT_TYPES[fmt])
                    first = False
                elif data:
                    yield AudioChunk(data)
            if fmt not in NATIVE_OUTPUT_FORMATS:
                rate = engine.sample_rate
                encoded = await asyncio.to_thread(encode_ffmpeg, b"".join(collected), rate, fmt)
                yield AudioChunk(encoded, rate, CONTENT_TYPES[fmt])
            elif first:
                raise BackendError(f"{engine.engine} produced no audio")
        finally:
            stop.set()
            self._running[engine.model_id] -= 1
            with contextlib.suppress(Exception):
                await worker

    # ---------- state ----------

    def load_stats(self) -> list[ModelLoad]:
        return [ModelLoad(model=m, running=n, waiting=0) for m, n in self._running.items() if n]

    def cache_state(self) -> list[CachedPrefix]:
        return []


def create(ctx: BackendContext) -> SpeechBackend | None:
    """The node's speech engines, unless the config turns voice off (`audio=False`)."""
    c = ctx.config
    if not c.audio:
        return None
    hf_cache: Path | None = None
    if c.scan_hf_cache:
        if c.hf_cache_dir is not None:
            hf_cache = c.hf_cache_dir
        else:
            from huggingface_hub import constants

            hf_cache = Path(constants.HF_HUB_CACHE)
    stt, tts, missing = discover(hf_cache)
    for engine in tts:
        engine.voices()  # listed once, here, not on the event loop at the first request
    for m in missing:
        log.info("voice: %s is not available on this node (%s)", m.engine, m.hint)
    log.info(
        "voice models: %s",
        ", ".join([e.model_id for e in stt] + [e.model_id for e in tts]) or "none",
    )
    return SpeechBackend(stt, tts, missing)
