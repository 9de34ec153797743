"""OpenAI's audio endpoints: POST /v1/audio/transcriptions and POST /v1/audio/speech.

Parsing and the error envelope live here; `coordinator.audio.AudioService` resolves the
model (the same aliases as chat), picks the node and calls it. Bad input (not audio, an
empty or over-long file, an unsupported format, text past the limit) is a 400 in the
OpenAI envelope naming the problem; a model no node serves is a 404 that says what to
install when the name tells which engine it needs (docs/voice.md).
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from coordinator.api.common import json_object, openai_error, str_field
from coordinator.api.keys import caller, key_name
from coordinator.audio import AudioRoute, AudioService
from mesh import errors
from mesh.audio import (
    CONTENT_TYPES,
    FFMPEG_INPUT_FORMATS,
    KIND_STT,
    KIND_TTS,
    MAX_AUDIO_BYTES,
    MAX_SPEECH_CHARS,
    MAX_SPEED,
    MIN_SPEED,
    NATIVE_INPUT_FORMATS,
    OUTPUT_FORMATS,
    TRANSCRIPTION_RESPONSE_FORMATS,
    AudioChunk,
    SpeakRequest,
    TranscribeRequest,
    Transcription,
    sniff_format,
)

router = APIRouter()

# Without `response_format`, speech is WAV (OpenAI's default, mp3, needs ffmpeg on the node).
DEFAULT_SPEECH_FORMAT = "wav"
LANGUAGE_NAMES = {"en": "english"}


def _audio(request: Request) -> AudioService:
    return cast(AudioService, request.app.state.audio)


def _headers(route: AudioRoute) -> dict[str, str]:
    """The node that answered, and those that failed before it (as chat answers say)."""
    tried = route.tried or route.nodes[:1]
    headers = {
        "x-macmesh-node": tried[-1].node_id,
        "x-macmesh-model": route.resolution.model,
        "x-macmesh-route-reason": "least-loaded",
    }
    if len(tried) > 1:
        headers["x-macmesh-retried-from"] = ",".join(v.node_id for v in tried[:-1])
    return headers


# ---------- transcriptions ----------


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    """Multipart: `file`, `model`, optional `language`, `response_format`, `prompt`,
    `temperature` (the last two are accepted and ignored)."""
    audio = _audio(request)
    name: str | None = None
    try:
        try:
            form = await request.form(max_files=1, max_fields=32)
        except HTTPException as exc:
            raise errors.InvalidRequest(
                f"expected a multipart/form-data body: {exc.detail}"
            ) from None
        name = str_field(form, "model", required=True)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise errors.InvalidRequest(
                "field required: the audio file, as a multipart file part", field="file"
            )
        data = await upload.read()
        response_format = str_field(form, "response_format") or "json"
        if response_format not in TRANSCRIPTION_RESPONSE_FORMATS:
            raise errors.InvalidRequest(
                f"unsupported response_format {response_format!r}; use one of "
                + ", ".join(TRANSCRIPTION_RESPONSE_FORMATS),
                field="response_format",
            )
        language = str_field(form, "language")
        fmt = _check_upload(data, upload.filename or "")
        route = audio.route(name, KIND_STT, caller(request))
    except errors.MeshError as err:
        audio.rejected(name, err, key_name(request))
        return openai_error(err, param="model" if isinstance(err, errors.ModelNotFound) else None)
    try:
        result = await audio.transcribe(
            route, TranscribeRequest(route.resolution.model, data, fmt, language), key_name(request)
        )
    except errors.MeshError as err:
        return openai_error(err)
    return _transcription_response(result, response_format, _headers(route))


def _check_upload(data: bytes, filename: str) -> str:
    """The upload's container; InvalidRequest for an empty, oversized or non-audio file."""
    if not data:
        raise errors.InvalidRequest("the audio file is empty", field="file")
    if len(data) > MAX_AUDIO_BYTES:
        raise errors.InvalidRequest(
            f"the audio file is {len(data)} bytes; the limit is {MAX_AUDIO_BYTES} bytes "
            f"({MAX_AUDIO_BYTES // 2**20} MB)",
            field="file",
        )
    fmt = sniff_format(data, filename)
    if fmt not in NATIVE_INPUT_FORMATS + FFMPEG_INPUT_FORMATS:
        raise errors.InvalidRequest(
            f"the file {filename or '(unnamed)'!r} is not audio in a supported format "
            f"(WAV; {', '.join(FFMPEG_INPUT_FORMATS)} with ffmpeg on the node)",
            field="file",
        )
    return fmt


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _transcription_response(
    result: Transcription, response_format: str, headers: dict[str, str]
) -> Response:
    if response_format == "text":
        return PlainTextResponse(result.text + "\n", headers=headers)
    if response_format in ("srt", "vtt"):
        sep = "," if response_format == "srt" else "."
        blocks = [
            (f"{i}\n" if response_format == "srt" else "")
            + f"{_timestamp(s.start, sep)} --> {_timestamp(s.end, sep)}\n{s.text}\n"
            for i, s in enumerate(result.segments, 1)
        ]
        subtitles = ("WEBVTT\n\n" if response_format == "vtt" else "") + "\n".join(blocks)
        return PlainTextResponse(subtitles, headers=headers)
    if response_format == "json":
        return JSONResponse({"text": result.text}, headers=headers)
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": LANGUAGE_NAMES.get(result.language, result.language),
        "duration": round(result.duration, 3),
        "text": result.text,
        "segments": [
            {
                "id": i,
                "seek": 0,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": 0.0,
                "no_speech_prob": 0.0,
            }
            for i, s in enumerate(result.segments)
        ],
    }
    return JSONResponse(body, headers=headers)


# ---------- speech ----------


def _speech_request(data: dict[str, Any]) -> SpeakRequest:
    def text(key: str, default: str = "") -> str:
        value = data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise errors.InvalidRequest("must be a string", field=key)
        return value

    model = text("model")
    if not model:
        raise errors.InvalidRequest("field required", field="model")
    if "input" not in data:
        raise errors.InvalidRequest("field required", field="input")
    spoken = text("input")
    if not spoken.strip():
        raise errors.InvalidRequest("the text to speak is empty", field="input")
    if len(spoken) > MAX_SPEECH_CHARS:
        raise errors.InvalidRequest(
            f"the text is {len(spoken)} characters; the limit is {MAX_SPEECH_CHARS}",
            field="input",
        )
    fmt = text("response_format") or DEFAULT_SPEECH_FORMAT
    if fmt not in OUTPUT_FORMATS:
        raise errors.InvalidRequest(
            f"unsupported response_format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}",
            field="response_format",
        )
    stream_format = text("stream_format") or "audio"
    if stream_format != "audio":
        raise errors.InvalidRequest(
            f"unsupported stream_format {stream_format!r}: only 'audio' (the audio bytes, "
            "streamed as they are produced)",
            field="stream_format",
        )
    speed = data.get("speed", 1.0)
    if speed is None:
        speed = 1.0
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not math.isfinite(speed):
        raise errors.InvalidRequest("must be a number", field="speed")
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise errors.InvalidRequest(
            f"must be between {MIN_SPEED} and {MAX_SPEED}, got {speed:g}", field="speed"
        )
    text("instructions")  # accepted (a string), not used by these engines
    return SpeakRequest(model, spoken, text("voice"), float(speed), fmt)


@router.post("/v1/audio/speech")
async def speech(request: Request) -> Response:
    """JSON: `model`, `input`, `voice`, `response_format` (wav, pcm; mp3, flac, opus,
    aac with ffmpeg on the node), `speed`. The audio streams as the engine produces it."""
    audio = _audio(request)
    name: str | None = None
    try:
        body = await json_object(request)
        name = body.get("model") if isinstance(body.get("model"), str) else None
        req = _speech_request(body)
        route = audio.route(req.model, KIND_TTS, caller(request))
    except errors.MeshError as err:
        audio.rejected(name, err, key_name(request))
        return openai_error(err, param="model" if isinstance(err, errors.ModelNotFound) else None)
    chunks = audio.speak(route, req, key_name(request))
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return openai_error(errors.BackendError("the node produced no audio"))
    except errors.MeshError as err:
        await chunks.aclose()
        return openai_error(err)
    media = first.content_type or CONTENT_TYPES.get(req.format, "application/octet-stream")
    headers = _headers(route)
    if first.sample_rate:
        headers["x-sample-rate"] = str(first.sample_rate)
    return StreamingResponse(_relay(first, chunks), media_type=media, headers=headers)


async def _relay(
    first: AudioChunk, chunks: AsyncGenerator[AudioChunk, None]
) -> AsyncGenerator[bytes, None]:
    """The audio bytes; a failure mid-stream can only cut the stream (the status is sent)."""
    try:
        yield first.data
        async for chunk in chunks:
            yield chunk.data
    except errors.MeshError:
        return  # logged and counted by AudioService
    finally:
        await chunks.aclose()
