"""Voice (issue 20): speech engines on a node, /v1/audio/* on the coordinator, the CLI.

A real node (a simulated chat model + the built-in PocketSphinx and eSpeak NG engines)
behind a real coordinator, driven with the official openai SDK. Tests that need eSpeak NG
skip, saying so, where the `espeak-ng` binary is missing (`make espeak-ng` installs it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import math
import shutil
import struct
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from coordinator.config import CoordinatorConfig
from macmesh.cli import main as cli_main
from mesh.audio import (
    INSTALL_ESPEAK,
    MAX_AUDIO_SECONDS,
    MAX_SPEECH_CHARS,
    SpeakRequest,
    TranscribeRequest,
    sniff_format,
)
from mesh.client import NodeClient
from mesh.errors import InvalidRequest
from mesh.types import ChatPrompt, GenerateRequest, Message
from node.backends.audio_codec import decode, resample, wav_header
from node.backends.speech import StreamResampler
from node.backends.speech_engines import discover
from tests.conftest import (
    RunningCoordinator,
    RunningNode,
    start_coordinator,
    start_sim_node,
)

QUESTION = "what is the capital of France"

HAS_ESPEAK = shutil.which("espeak-ng") is not None
HAS_POCKETSPHINX = importlib.util.find_spec("pocketsphinx") is not None
HAS_FFMPEG = shutil.which("ffmpeg") is not None
needs_espeak = pytest.mark.skipif(
    not HAS_ESPEAK, reason="espeak-ng is not installed (make espeak-ng / brew install espeak-ng)"
)
needs_pocketsphinx = pytest.mark.skipif(
    not HAS_POCKETSPHINX, reason="pocketsphinx is not installed (make install)"
)


@pytest.fixture(scope="module")
def voice_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    home = tmp_path_factory.mktemp("voice-node")
    node = start_sim_node(home, "chat-sim:5000:200", node_id="voice-node", audio=True)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def voice_coord(
    voice_node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCoordinator]:
    home = tmp_path_factory.mktemp("voice-coord")
    running = start_coordinator(CoordinatorConfig(home=home, peers=(voice_node.target,)))
    yield running
    running.stop()


@pytest.fixture
def client(voice_coord: RunningCoordinator) -> openai.OpenAI:
    return openai.OpenAI(base_url=voice_coord.base_url + "/v1", api_key="unused", max_retries=0)


def wav_info(data: bytes) -> tuple[int, float]:
    """Sample rate and duration of a (possibly streamed, size-less) 16-bit mono WAV."""
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        frames = w.readframes(len(data))
        return w.getframerate(), len(frames) / 2 / w.getframerate()


def tone_wav(seconds: float, rate: int = 8000, width: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(seconds * rate) * width)
    return buf.getvalue()


def error_of(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["type"], body
    return str(body["error"]["message"])


# ---------- the round trip (issue 20's "done when") ----------


@needs_espeak
@needs_pocketsphinx
def test_voice_round_trip(client: openai.OpenAI) -> None:
    """eSpeak NG speaks the question, PocketSphinx transcribes it, the chat answers, and
    the answer is spoken back: all through the coordinator, with the official SDK."""
    t0 = time.perf_counter()
    speech = client.audio.speech.create(
        model="espeak-ng", voice="alloy", input=QUESTION, response_format="wav"
    )
    wav = speech.read()
    rate, seconds = wav_info(wav)
    assert rate == 22050 and 1.0 < seconds < 6.0, seconds
    tts_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    text = client.audio.transcriptions.create(
        model="pocketsphinx-en", file=("question.wav", wav, "audio/wav")
    ).text
    stt_s = time.perf_counter() - t0
    words = set(text.lower().split())
    # What PocketSphinx really hears from eSpeak NG's `alloy` (en-us+klatt) at 175 wpm:
    # "what is the capital of france" (other eSpeak voices lose "France", e.g. "friends").
    assert {"capital", "france"} <= words, text

    t0 = time.perf_counter()
    answer = client.chat.completions.create(
        model="chat-sim", messages=[{"role": "user", "content": text}], max_tokens=8
    )
    reply = answer.choices[0].message.content or ""
    assert reply.strip()
    chat_s = time.perf_counter() - t0

    spoken = client.audio.speech.create(
        model="espeak-ng", voice="nova", input=reply, response_format="wav"
    ).read()
    rate, seconds = wav_info(spoken)
    assert 0.5 < seconds < 10.0
    print(f"tts {tts_s:.3f}s stt {stt_s:.3f}s chat {chat_s:.3f}s")


@needs_espeak
@needs_pocketsphinx
def test_transcription_formats(client: openai.OpenAI, voice_coord: RunningCoordinator) -> None:
    wav = client.audio.speech.create(model="espeak-ng", voice="alloy", input=QUESTION).read()
    assert wav[:4] == b"RIFF"  # without response_format: WAV
    verbose = client.audio.transcriptions.create(
        model="pocketsphinx-en",
        file=("q.wav", wav),
        response_format="verbose_json",
        language="en",
    )
    assert verbose.language == "english" and 1.0 < verbose.duration < 6.0
    assert verbose.segments and "capital" in verbose.segments[0].text
    plain = client.audio.transcriptions.create(
        model="pocketsphinx-en", file=("q.wav", wav), response_format="text"
    )
    assert "capital" in str(plain)
    srt = httpx.post(
        voice_coord.base_url + "/v1/audio/transcriptions",
        data={"model": "pocketsphinx-en", "response_format": "srt"},
        files={"file": ("q.wav", wav)},
    )
    assert srt.status_code == 200 and srt.text.startswith("1\n00:00:00,")
    assert srt.headers["x-macmesh-node"] == "voice-node"


@needs_espeak
def test_speech_streams_as_produced(voice_coord: RunningCoordinator) -> None:
    """A long input arrives in many chunks, the first long before the last."""
    text = " ".join(["The lighthouse keeper counted the waves under a pale moon."] * 40)
    times: list[float] = []
    size = 0
    t0 = time.perf_counter()
    body = {"model": "espeak-ng", "input": text, "voice": "echo", "response_format": "pcm"}
    with httpx.stream("POST", voice_coord.base_url + "/v1/audio/speech", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"] == "audio/pcm"
        assert resp.headers["x-sample-rate"] == "24000"
        for chunk in resp.iter_raw():
            times.append(time.perf_counter() - t0)
            size += len(chunk)
    seconds = size / 2 / 24000
    assert len(times) >= 5 and seconds > 60  # ~2,400 characters: over a minute of speech
    assert times[0] < times[-1]


@needs_espeak
def test_speech_speed_and_voices(client: openai.OpenAI) -> None:
    normal = wav_info(
        client.audio.speech.create(model="espeak-ng", voice="alloy", input=QUESTION).read()
    )[1]
    fast = wav_info(
        client.audio.speech.create(
            model="espeak-ng", voice="en-gb", input=QUESTION, speed=2.0
        ).read()
    )[1]
    assert fast < normal * 0.75


# ---------- bad input: 400 / 404 in the OpenAI envelope, naming the problem ----------


def post_file(coord: RunningCoordinator, data: bytes, name: str, **fields: str) -> httpx.Response:
    form = {"model": "pocketsphinx-en", **fields}
    return httpx.post(
        coord.base_url + "/v1/audio/transcriptions", data=form, files={"file": (name, data)}
    )


def test_transcription_bad_input(voice_coord: RunningCoordinator) -> None:
    r = post_file(voice_coord, b"just some notes, not audio", "notes.txt")
    assert r.status_code == 400 and "not audio" in error_of(r)
    r = post_file(voice_coord, b"RIFF garbage that is no wave", "broken.wav")
    assert r.status_code == 400 and "not a readable WAV" in error_of(r)
    r = post_file(voice_coord, b"", "empty.wav")
    assert r.status_code == 400 and "empty" in error_of(r)
    assert r.json()["error"]["param"] == "file"
    long = tone_wav(MAX_AUDIO_SECONDS + 5)
    r = post_file(voice_coord, long, "long.wav")
    assert r.status_code == 400 and f"limit is {MAX_AUDIO_SECONDS:g} s" in error_of(r)
    r = post_file(voice_coord, tone_wav(1.0), "ok.wav", response_format="docx")
    assert r.status_code == 400 and "response_format" in error_of(r)
    r = post_file(voice_coord, tone_wav(1.0), "ok.wav", language="fr")
    assert r.status_code == 400 and "transcribes en only" in error_of(r)
    r = httpx.post(voice_coord.base_url + "/v1/audio/transcriptions", data={"model": "x"})
    assert r.status_code == 400 and "file" in error_of(r)


@pytest.mark.skipif(HAS_FFMPEG, reason="ffmpeg is installed: mp3 is a supported format here")
def test_unsupported_audio_format_names_ffmpeg(voice_coord: RunningCoordinator) -> None:
    mp3 = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 100
    r = post_file(voice_coord, mp3, "speech.mp3")
    assert r.status_code == 400
    msg = error_of(r)
    assert "supported formats: wav" in msg and "ffmpeg" in msg
    body = {"model": "espeak-ng", "input": "hi", "response_format": "mp3"}
    if HAS_ESPEAK:
        r = httpx.post(voice_coord.base_url + "/v1/audio/speech", json=body)
        assert r.status_code == 400 and "ffmpeg" in error_of(r) and "wav, pcm" in error_of(r)


def test_speech_bad_input(voice_coord: RunningCoordinator) -> None:
    url = voice_coord.base_url + "/v1/audio/speech"
    r = httpx.post(url, json={"model": "espeak-ng", "input": "x" * (MAX_SPEECH_CHARS + 1)})
    assert r.status_code == 400 and f"the limit is {MAX_SPEECH_CHARS}" in error_of(r)
    assert r.json()["error"]["param"] == "input"
    r = httpx.post(url, json={"model": "espeak-ng", "input": "  "})
    assert r.status_code == 400 and "empty" in error_of(r)
    r = httpx.post(url, json={"model": "espeak-ng", "input": "hi", "response_format": "midi"})
    assert r.status_code == 400 and "response_format" in error_of(r)
    r = httpx.post(url, json={"model": "espeak-ng", "input": "hi", "speed": 9})
    assert r.status_code == 400 and "between 0.25 and 4.0" in error_of(r)
    r = httpx.post(url, json={"input": "hi"})
    assert r.status_code == 400 and "model" in error_of(r)
    if HAS_ESPEAK:
        r = httpx.post(url, json={"model": "espeak-ng", "input": "hi", "voice": "klingon-x"})
        assert r.status_code == 400 and "unknown voice" in error_of(r)


def test_unknown_model_and_missing_engine(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.audio.speech.create(model="no-such-voice", voice="alloy", input="hi")
    assert "no-such-voice" in str(nf.value) and "not found" in str(nf.value)
    # An MLX engine this Linux node does not have: the 404 says what to install.
    with pytest.raises(openai.NotFoundError) as nf:
        client.audio.transcriptions.create(
            model="whisper-large-v3-turbo", file=("q.wav", tone_wav(1.0))
        )
    assert "mlx-whisper" in str(nf.value) and "macmesh[mac-audio]" in str(nf.value)
    with pytest.raises(openai.NotFoundError) as nf:
        client.audio.speech.create(model="Kokoro-82M-bf16", voice="alloy", input="hi")
    assert "mlx-audio" in str(nf.value)


def test_wrong_kind_of_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.speech.create(model="chat-sim", voice="alloy", input="hi")
    assert "chat model" in str(bad.value) and "text-to-speech" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.transcriptions.create(model="chat-sim", file=("q.wav", tone_wav(1.0)))
    assert "speech-to-text" in str(bad.value)
    if HAS_ESPEAK:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="espeak-ng", messages=[{"role": "user", "content": "hi"}]
            )
        assert "/v1/audio/speech" in str(bad.value)


# ---------- catalog, node state, metrics, request log ----------


def test_models_advertised_with_kind(
    voice_coord: RunningCoordinator, client: openai.OpenAI
) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"chat-sim", "pocketsphinx-en"} <= ids
    assert ("espeak-ng" in ids) is HAS_ESPEAK
    models = httpx.get(voice_coord.base_url + "/api/models").json()["models"]
    kinds = {m["id"]: m["kind"] for m in models}
    assert kinds["chat-sim"] == "chat" and kinds["pocketsphinx-en"] == "stt"
    if HAS_ESPEAK:
        assert kinds["espeak-ng"] == "tts"


@needs_espeak
def test_metrics_and_request_log(voice_coord: RunningCoordinator, client: openai.OpenAI) -> None:
    client.audio.speech.create(model="espeak-ng", voice="alloy", input="hello there").read()
    records = httpx.get(voice_coord.base_url + "/api/requests?model=espeak-ng").json()["requests"]
    ok = [r for r in records if r["ok"]]
    assert ok and ok[-1]["api"] == "openai" and ok[-1]["node"] == "voice-node"
    assert ok[-1]["outcome"].startswith("spoke") and ok[-1]["ttft_seconds"] is not None
    refused = httpx.post(
        voice_coord.base_url + "/v1/audio/speech", json={"model": "espeak-ng", "input": ""}
    )
    assert refused.status_code == 400
    records = httpx.get(voice_coord.base_url + "/api/requests?model=espeak-ng").json()["requests"]
    assert any(r["outcome"].startswith("refused") for r in records)
    metrics = httpx.get(voice_coord.base_url + "/metrics").text
    assert 'macmesh_requests_total{alias="none",api="openai",model="espeak-ng"' in metrics or (
        'model="espeak-ng"' in metrics and "macmesh_requests_total" in metrics
    )
    assert 'macmesh_time_to_first_token_seconds_count{model="espeak-ng"' in metrics


# ---------- the node's gRPC surface ----------


@needs_espeak
@needs_pocketsphinx
async def test_node_rpcs(voice_node: RunningNode) -> None:
    async with NodeClient(voice_node.target) as node:
        kinds = {m.id: m.kind for m in await node.list_models()}
        assert kinds == {"chat-sim": "chat", "pocketsphinx-en": "stt", "espeak-ng": "tts"}
        chunks = [c async for c in node.speak(SpeakRequest("espeak-ng", QUESTION, "alloy"))]
        assert chunks[0].content_type == "audio/wav" and chunks[0].sample_rate == 22050
        wav = b"".join(c.data for c in chunks)
        out = await node.transcribe(TranscribeRequest("pocketsphinx-en", wav, "wav"))
        assert "capital" in out.text and 1.0 < out.duration < 6.0 and out.seconds > 0
        with pytest.raises(InvalidRequest, match="text-to-speech model"):
            async for _ in node.generate(
                GenerateRequest("espeak-ng", ChatPrompt((Message("user", "hi"),)))
            ):
                pass
        with pytest.raises(InvalidRequest, match="chat model"):
            await node.transcribe(TranscribeRequest("chat-sim", wav, "wav"))
        with pytest.raises(InvalidRequest, match="empty"):
            await node.transcribe(TranscribeRequest("pocketsphinx-en", b"", "wav"))


def test_missing_espeak_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    _stt, tts, missing = discover(None)
    assert not tts
    hints = {m.engine: m.hint for m in missing}
    assert hints["espeak-ng"] == INSTALL_ESPEAK and "apt-get install espeak-ng" in INSTALL_ESPEAK
    # Mac-only engines are reported off a Mac (or without the extra), never imported.
    assert "macmesh[mac-audio]" in hints.get("mlx-whisper", "macmesh[mac-audio]")


# ---------- codecs ----------


def test_decode_and_sniff() -> None:
    assert sniff_format(tone_wav(0.1)) == "wav"
    assert sniff_format(b"ID3\x03rest") == "mp3" and sniff_format(b"OggS....") == "ogg"
    assert sniff_format(b"hello", "clip.flac") == "flac"
    stereo = io.BytesIO()
    with wave.open(stereo, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(struct.pack("<hh", 16384, -16384) * 4410)
    x, rate = decode(stereo.getvalue(), "wav")
    assert rate == 44100 and len(x) == 4410 and abs(float(x.max())) < 1e-6  # L+R cancel
    streamed = wav_header(16000) + b"\x00\x10" * 1600  # sizes unknown, as streamed
    x, rate = decode(streamed, "wav")
    assert rate == 16000 and len(x) == 1600
    with pytest.raises(InvalidRequest, match="empty"):
        decode(b"", "wav")


def test_resampling() -> None:
    t = np.arange(22050) / 22050
    x = np.sin(2 * math.pi * 440 * t).astype(np.float32)
    y = resample(x, 22050, 16000)
    assert len(y) == 16000 and 0.9 < float(np.max(np.abs(y))) <= 1.01
    r = StreamResampler(22050, 24000)
    parts = [r.feed(x[i : i + 1000]) for i in range(0, len(x), 1000)]
    joined = np.concatenate(parts)
    assert abs(len(joined) - 24000) <= 2
    whole = np.interp(np.arange(len(joined)) * 22050 / 24000, np.arange(len(x)), x)
    assert float(np.max(np.abs(joined - whole))) < 1e-4  # no seams between chunks


# ---------- the CLI ----------


@needs_espeak
@needs_pocketsphinx
def test_cli_say_and_transcribe(
    voice_coord: RunningCoordinator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.wav"
    url = voice_coord.base_url
    assert cli_main(["say", QUESTION, "-o", str(out), "--coordinator", url]) == 0
    assert 1.0 < wav_info(out.read_bytes())[1] < 6.0
    capsys.readouterr()
    assert cli_main(["transcribe", str(out), "--coordinator", url]) == 0
    assert "capital" in capsys.readouterr().out
    assert cli_main(["transcribe", str(out), "--model", "nope", "--coordinator", url]) == 1
    err = capsys.readouterr().err
    assert "404" in err and "nope" in err


def test_cli_transcribe_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["transcribe", str(tmp_path / "none.wav")]) == 1
    assert "none.wav" in capsys.readouterr().err


async def test_long_speech_cancel_stops_engine(voice_node: RunningNode) -> None:
    """Closing a speech stream early kills the engine; the node has nothing left running."""
    if not HAS_ESPEAK:
        pytest.skip("espeak-ng is not installed (make espeak-ng / brew install espeak-ng)")
    async with NodeClient(voice_node.target) as node:
        stream = node.speak(SpeakRequest("espeak-ng", "word " * 800, "alloy", format="pcm"))
        async for _ in stream:
            break
        await stream.aclose()
        core = voice_node.server.core
        assert core is not None
        for _ in range(100):
            if core.snapshot().running == 0:
                break
            await asyncio.sleep(0.05)
        assert core.snapshot().running == 0


# ---------- the benchmark ----------


@needs_espeak
@needs_pocketsphinx
def test_voice_bench_runs(tmp_path: Path) -> None:
    """bench/voice.py end to end, one round against a simulated chat model."""
    script = Path(__file__).resolve().parent.parent / "bench" / "voice.py"
    out = tmp_path / "voice.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--sim", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert "capital" in result["transcript"]
    assert result["median_seconds"]["mesh_stt"] > 0 and result["ratios"]["stt"] > 0
