"""Voice: the model kinds, limits, formats, voices and install hints nodes and coordinators share.

No I/O here. The engines live on nodes (`node.backends.speech`); the coordinator's
`/v1/audio/*` endpoints (`coordinator.audio`) check requests against the same limits
before anything reaches a node, and name what to install when no node has an engine.
"""

from __future__ import annotations

from dataclasses import dataclass

# ModelInfo.kind values (an empty kind from an older node means chat).
KIND_CHAT = "chat"
KIND_STT = "stt"
KIND_TTS = "tts"
KINDS = (KIND_CHAT, KIND_STT, KIND_TTS)

# Limits (OpenAI's: 25 MB uploads, 4096 characters of speech input).
MAX_AUDIO_BYTES = 25 * 2**20
MAX_AUDIO_SECONDS = 600.0
MAX_SPEECH_CHARS = 4096
MIN_SPEED, MAX_SPEED = 0.25, 4.0

# Built-in model ids.
POCKETSPHINX_MODEL = "pocketsphinx-en"
ESPEAK_MODEL = "espeak-ng"

# Upload containers: WAV is decoded with the standard library; the others need ffmpeg.
NATIVE_INPUT_FORMATS = ("wav",)
FFMPEG_INPUT_FORMATS = ("mp3", "flac", "ogg", "webm", "m4a", "mp4", "mpeg", "mpga", "opus")
# Speech output: WAV and raw PCM are written here; the others need ffmpeg on the node.
NATIVE_OUTPUT_FORMATS = ("wav", "pcm")
FFMPEG_OUTPUT_FORMATS = ("mp3", "flac", "opus", "aac")
OUTPUT_FORMATS = NATIVE_OUTPUT_FORMATS + FFMPEG_OUTPUT_FORMATS
CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "flac": "audio/flac",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}
# OpenAI's `pcm`: 16-bit little-endian mono at 24 kHz.
PCM_SAMPLE_RATE = 24_000

TRANSCRIPTION_RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")

# OpenAI voice names -> eSpeak NG voices. `alloy` (the SDKs' usual default) is the
# Klatt variant, which PocketSphinx transcribes best (tests/test_audio.py's round trip).
ESPEAK_VOICES = {
    "alloy": "en-us+klatt",
    "ash": "en-us+m1",
    "ballad": "en-gb+m3",
    "coral": "en-us+f4",
    "echo": "en-us+m4",
    "fable": "en-gb",
    "onyx": "en-us+m7",
    "nova": "en-us+f2",
    "sage": "en-us+f3",
    "shimmer": "en-us+f1",
    "verse": "en-us+m2",
}

# What to install for an engine, by the model names it serves.
INSTALL_ESPEAK = (
    "install eSpeak NG on a node: `brew install espeak-ng` (macOS), "
    "`apt-get install espeak-ng` (Debian/Ubuntu) or `make espeak-ng`"
)
INSTALL_POCKETSPHINX = (
    "install PocketSphinx on a node: `pip install pocketsphinx` (part of `make install`)"
)
INSTALL_MLX_WHISPER = (
    "Whisper models need mlx-whisper on an Apple-Silicon Mac node: "
    "`pip install 'macmesh[mac-audio]'`, then pull an mlx-community/whisper-* model"
)
INSTALL_MLX_AUDIO = (
    "Kokoro and other MLX speech models need mlx-audio on an Apple-Silicon Mac node: "
    "`pip install 'macmesh[mac-audio]'`, then pull the model (e.g. mlx-community/Kokoro-82M-bf16)"
)
INSTALL_FFMPEG = "install ffmpeg on the node (`brew install ffmpeg`, `apt-get install ffmpeg`)"


def install_hint(model: str) -> str | None:
    """What to install to serve `model`, when its name says which engine it needs."""
    name = model.lower().rsplit("/", 1)[-1]
    if name.startswith("espeak"):
        return INSTALL_ESPEAK
    if name.startswith("pocketsphinx"):
        return INSTALL_POCKETSPHINX
    if "whisper" in name:
        return INSTALL_MLX_WHISPER
    if "kokoro" in name or name.startswith(("csm-", "dia-", "orpheus", "spark-tts", "outetts")):
        return INSTALL_MLX_AUDIO
    return None


def kind_label(kind: str) -> str:
    return {KIND_STT: "speech-to-text", KIND_TTS: "text-to-speech"}.get(kind, "chat")


def endpoint_for(kind: str) -> str:
    return {
        KIND_STT: "POST /v1/audio/transcriptions",
        KIND_TTS: "POST /v1/audio/speech",
    }.get(kind, "POST /v1/chat/completions")


def sniff_format(data: bytes, filename: str = "") -> str:
    """The container of an uploaded file, by its first bytes, else its extension ("" if neither)."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[4:8] == b"ftyp":
        return "m4a"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return ext


@dataclass(frozen=True, slots=True)
class TranscribeRequest:
    model: str
    audio: bytes
    format: str = ""
    language: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class TranscriptSegment:
    start: float
    end: float
    text: str


@dataclass(frozen=True, slots=True)
class Transcription:
    text: str
    segments: tuple[TranscriptSegment, ...] = ()
    duration: float = 0.0  # seconds of audio
    seconds: float = 0.0  # seconds the engine took
    language: str = ""


@dataclass(frozen=True, slots=True)
class SpeakRequest:
    model: str
    input: str
    voice: str = ""
    speed: float = 1.0
    format: str = "wav"
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class AudioChunk:
    data: bytes
    # The first chunk: the sample rate and MIME type (0 / "" on later chunks).
    sample_rate: int = 0
    content_type: str = ""
