"""The speech engines behind `node.backends.speech`: blocking, one class per engine.

- PocketSphinx (speech to text, English, CPU, everywhere: the PyPI wheel ships the model);
- eSpeak NG (text to speech, CPU, everywhere: the `espeak-ng` binary, streamed from its stdout);
- mlx-whisper (speech to text) and mlx-audio (Kokoro and other TTS models) on Apple-Silicon
  Macs, when the `macmesh[mac-audio]` extra is installed and the model is in the HF cache.

Each is found with `shutil.which` / `importlib.util.find_spec`; a missing one is reported
(`missing()`), never an import error. All calls block: the backend runs them in threads.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mesh.audio import (
    ESPEAK_MODEL,
    ESPEAK_VOICES,
    INSTALL_ESPEAK,
    INSTALL_MLX_AUDIO,
    INSTALL_MLX_WHISPER,
    INSTALL_POCKETSPHINX,
    KIND_STT,
    KIND_TTS,
    POCKETSPHINX_MODEL,
    Transcription,
    TranscriptSegment,
)
from mesh.errors import BackendError, InvalidRequest
from node.backends.audio_codec import Samples, resample

log = logging.getLogger(__name__)

# PocketSphinx frames are 10 ms.
_TARGET_PEAK = 0.6
_FRAMES_PER_SECOND = 100
# eSpeak NG's rate at speed 1.0 (words per minute) and the range it accepts.
ESPEAK_WPM = 175
ESPEAK_WPM_RANGE = (80, 500)


class SttEngine(Protocol):
    model_id: str
    engine: str
    kind: str
    languages: tuple[str, ...]  # empty = any

    def transcribe(self, samples: Samples, rate: int, language: str) -> Transcription: ...


class TtsEngine(Protocol):
    model_id: str
    engine: str
    kind: str
    sample_rate: int

    def voices(self) -> tuple[str, ...]: ...

    def speak(self, text: str, voice: str, speed: float) -> Iterator[Samples]:
        """Samples as the engine produces them; closing the iterator stops the engine."""
        ...


@dataclass(frozen=True, slots=True)
class Missing:
    """An engine this node cannot run, and what to install."""

    engine: str
    hint: str


# ---------- PocketSphinx ----------


class PocketSphinx:
    """English speech to text with PocketSphinx's bundled US-English model (16 kHz)."""

    engine = "pocketsphinx"
    kind = KIND_STT
    languages: tuple[str, ...] = ("en",)
    rate = 16_000

    def __init__(self, model_id: str = POCKETSPHINX_MODEL) -> None:
        self.model_id = model_id
        self._lock = threading.Lock()  # one decoder, one utterance at a time
        self._decoder: Any = None

    def _get_decoder(self) -> Any:
        if self._decoder is None:
            from pocketsphinx import Decoder

            self._decoder = Decoder(samprate=self.rate, loglevel="FATAL")
        return self._decoder

    def transcribe(self, samples: Samples, rate: int, language: str) -> Transcription:
        t0 = time.perf_counter()
        x = resample(samples, rate, self.rate)
        # Level normalisation (peak at 0.6): PocketSphinx's acoustic model is sensitive to
        # input level, and quiet recordings or hot synthetic speech both decode worse.
        peak = float(np.max(np.abs(x))) if len(x) else 0.0
        if peak > 0:
            x = x * (_TARGET_PEAK / peak)
        pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
        with self._lock:
            d = self._get_decoder()
            d.start_utt()
            d.process_raw(pcm, full_utt=True)
            d.end_utt()
            hyp = d.hyp()
            text = hyp.hypstr if hyp is not None else ""
            segments = tuple(
                TranscriptSegment(
                    s.start_frame / _FRAMES_PER_SECOND, s.end_frame / _FRAMES_PER_SECOND, s.word
                )
                for s in d.seg()
                if s.word not in ("<s>", "</s>", "<sil>") and not s.word.startswith("[")
            )
        return Transcription(
            text=text,
            segments=_sentences(segments, text),
            duration=len(samples) / rate,
            seconds=time.perf_counter() - t0,
            language="en",
        )


def _sentences(words: tuple[TranscriptSegment, ...], text: str) -> tuple[TranscriptSegment, ...]:
    """Word segments joined into one segment per pause longer than 0.6 s."""
    out: list[TranscriptSegment] = []
    for w in words:
        word = w.text.split("(")[0]  # alternate pronunciations: "the(2)"
        if out and w.start - out[-1].end <= 0.6:
            last = out[-1]
            out[-1] = TranscriptSegment(last.start, w.end, f"{last.text} {word}")
        else:
            out.append(TranscriptSegment(w.start, w.end, word))
    if not out and text:
        out.append(TranscriptSegment(0.0, 0.0, text))
    return tuple(out)


# ---------- eSpeak NG ----------


class EspeakNG:
    """Text to speech with the `espeak-ng` binary: WAV read from its stdout as it speaks."""

    engine = "espeak-ng"
    kind = KIND_TTS
    sample_rate = 22_050

    def __init__(self, binary: str, model_id: str = ESPEAK_MODEL) -> None:
        self.binary = binary
        self.model_id = model_id
        self._voices: tuple[str, ...] | None = None

    def voices(self) -> tuple[str, ...]:
        if self._voices is None:
            try:
                out = subprocess.run(
                    [self.binary, "--voices"], capture_output=True, text=True, timeout=10
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            names = [line.split()[1] for line in out.splitlines()[1:] if len(line.split()) > 1]
            self._voices = tuple(names)
        return self._voices

    def voice(self, name: str) -> str:
        """An eSpeak voice for `name`: an OpenAI voice, an eSpeak voice (`en-us`,
        `en-us+f3`), else InvalidRequest naming the choices."""
        if not name:
            return ESPEAK_VOICES["alloy"]
        if name in ESPEAK_VOICES:
            return ESPEAK_VOICES[name]
        base = name.split("+", 1)[0]
        known = self.voices()
        if not known or base in known:
            return name
        raise InvalidRequest(
            f"unknown voice {name!r} for {self.model_id}: use an OpenAI voice "
            f"({', '.join(ESPEAK_VOICES)}) or an eSpeak NG voice (e.g. en, en-us, en-gb, "
            "en-us+f3; `espeak-ng --voices` lists them)",
            field="voice",
        )

    def speak(self, text: str, voice: str, speed: float) -> Iterator[Samples]:
        wpm = int(min(max(ESPEAK_WPM * speed, ESPEAK_WPM_RANGE[0]), ESPEAK_WPM_RANGE[1]))
        proc = subprocess.Popen(
            [self.binary, "--stdout", "-v", self.voice(voice), "-s", str(wpm), "--stdin"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # unbuffered: the header read must not swallow samples
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(text.encode())
            proc.stdin.close()
            header = _read_exact(proc.stdout, 44)
            if len(header) < 44 or header[:4] != b"RIFF":
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BackendError(f"espeak-ng produced no audio: {err.strip() or 'no output'}")
            rate = int.from_bytes(header[24:28], "little")
            if rate != self.sample_rate:
                self.sample_rate = rate
            carry = b""
            fd = proc.stdout.fileno()
            while True:
                block = os.read(fd, 16384)  # whatever espeak-ng has written so far
                if not block:
                    break
                block = carry + block
                usable = len(block) - len(block) % 2
                carry = block[usable:]
                if usable:
                    yield (np.frombuffer(block[:usable], "<i2") / 32768).astype(np.float32)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()


def _read_exact(f: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = f.read(n - len(buf))
        if not got:
            break
        buf += got
    return buf


# ---------- MLX (Apple Silicon) ----------


class MlxWhisper:
    """mlx-whisper over a model dir or HF repo (`mlx-community/whisper-*`)."""

    engine = "mlx-whisper"
    kind = KIND_STT
    languages: tuple[str, ...] = ()

    def __init__(self, model_id: str, path: str) -> None:
        self.model_id = model_id
        self.path = path
        self._lock = threading.Lock()

    def transcribe(self, samples: Samples, rate: int, language: str) -> Transcription:
        import mlx_whisper

        t0 = time.perf_counter()
        x = resample(samples, rate, 16_000)
        with self._lock:  # one model, one GPU stream
            out: dict[str, Any] = mlx_whisper.transcribe(
                x, path_or_hf_repo=self.path, language=language or None
            )
        segments = tuple(
            TranscriptSegment(float(s["start"]), float(s["end"]), str(s["text"]).strip())
            for s in out.get("segments", ())
        )
        return Transcription(
            text=str(out.get("text", "")).strip(),
            segments=segments,
            duration=len(samples) / rate,
            seconds=time.perf_counter() - t0,
            language=str(out.get("language", language)),
        )


class MlxAudioTts:
    """mlx-audio text to speech (Kokoro and the like) over a model dir or HF repo."""

    engine = "mlx-audio"
    kind = KIND_TTS
    sample_rate = 24_000

    def __init__(self, model_id: str, path: str) -> None:
        self.model_id = model_id
        self.path = path
        self._model: Any = None
        self._lock = threading.Lock()

    def voices(self) -> tuple[str, ...]:
        return ()

    def speak(self, text: str, voice: str, speed: float) -> Iterator[Samples]:
        from mlx_audio.tts.utils import load_model

        with self._lock:
            if self._model is None:
                self._model = load_model(self.path)
            model = self._model
        kokoro_voice = voice if voice and voice not in _OPENAI_NAMES else "af_heart"
        for result in model.generate(text=text, voice=kokoro_voice, speed=speed):
            self.sample_rate = int(getattr(result, "sample_rate", self.sample_rate))
            yield np.asarray(result.audio, dtype=np.float32).reshape(-1)


_OPENAI_NAMES = frozenset(ESPEAK_VOICES)


# ---------- discovery ----------


def _on_apple_silicon() -> bool:
    return sys.platform == "darwin"


def _hf_repos(cache: Path | None) -> list[tuple[str, Path]]:
    """(repo id, snapshot dir) of every model repo in the HF cache (folder listings only)."""
    if cache is None or not cache.is_dir():
        return []
    out = []
    for d in sorted(cache.glob("models--*")):
        repo = d.name[len("models--") :].replace("--", "/")
        ref = d / "refs" / "main"
        snap: Path | None = None
        if ref.is_file():
            snap = d / "snapshots" / ref.read_text().strip()
        else:
            snaps = sorted((d / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
            snap = snaps[-1] if snaps else None
        if snap is not None and snap.is_dir():
            out.append((repo, snap))
    return out


def discover(
    hf_cache: Path | None, *, espeak_binary: str | None = None
) -> tuple[list[SttEngine], list[TtsEngine], list[Missing]]:
    """The engines this node can run, and those it cannot (with what to install)."""
    stt: list[SttEngine] = []
    tts: list[TtsEngine] = []
    missing: list[Missing] = []
    if importlib.util.find_spec("pocketsphinx") is not None:
        stt.append(PocketSphinx())
    else:
        missing.append(Missing("pocketsphinx", INSTALL_POCKETSPHINX))
    binary = espeak_binary or shutil.which("espeak-ng")
    if binary:
        tts.append(EspeakNG(binary))
    else:
        missing.append(Missing("espeak-ng", INSTALL_ESPEAK))
    has_whisper = _on_apple_silicon() and importlib.util.find_spec("mlx_whisper") is not None
    has_mlx_audio = _on_apple_silicon() and importlib.util.find_spec("mlx_audio") is not None
    if not has_whisper:
        missing.append(Missing("mlx-whisper", INSTALL_MLX_WHISPER))
    if not has_mlx_audio:
        missing.append(Missing("mlx-audio", INSTALL_MLX_AUDIO))
    if has_whisper or has_mlx_audio:
        for repo, snap in _hf_repos(hf_cache):
            name = repo.rsplit("/", 1)[-1]
            low = name.lower()
            # Served by repo id, as MLX models from the HF cache are: the speech backend
            # claims the id first, so the catalog's own entry for the repo (an MLX dir it
            # may take for a chat model) is replaced by this one, with its kind.
            if has_whisper and low.startswith("whisper"):
                stt.append(MlxWhisper(repo, str(snap)))
            elif has_mlx_audio and "kokoro" in low:
                tts.append(MlxAudioTts(repo, str(snap)))
    return stt, tts, missing
