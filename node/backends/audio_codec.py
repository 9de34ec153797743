"""Audio in and out for the speech engines: decode uploads to mono float samples, resample,
write streaming WAV headers, and hand other containers to ffmpeg when the node has it.

WAV (PCM 8/16/24/32-bit, IEEE float) is read with the standard library; every other
container needs `ffmpeg` on PATH, and without it the error names the formats that work.
Everything here is blocking: callers run it in a worker thread.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import wave

import numpy as np
import numpy.typing as npt

from mesh.audio import (
    FFMPEG_INPUT_FORMATS,
    INSTALL_FFMPEG,
    MAX_AUDIO_BYTES,
    MAX_AUDIO_SECONDS,
    NATIVE_INPUT_FORMATS,
)
from mesh.errors import InvalidRequest

Samples = npt.NDArray[np.float32]

# Streaming WAV: the sizes are not known when the header goes out (what espeak-ng and
# OpenAI's streamed WAV do too); readers take the data to the end of the file.
_UNKNOWN_SIZE = 0xFFFFFFFF


def ffmpeg() -> str | None:
    return shutil.which("ffmpeg")


def supported_input_formats() -> tuple[str, ...]:
    return NATIVE_INPUT_FORMATS + (FFMPEG_INPUT_FORMATS if ffmpeg() else ())


def decode(data: bytes, fmt: str) -> tuple[Samples, int]:
    """Mono float32 samples in [-1, 1] and their sample rate; InvalidRequest naming the
    problem for empty, oversized, undecodable or over-long audio or a format not supported."""
    if not data:
        raise InvalidRequest("the audio file is empty", field="file")
    if len(data) > MAX_AUDIO_BYTES:
        raise InvalidRequest(
            f"the audio file is {len(data)} bytes; the limit is {MAX_AUDIO_BYTES} bytes "
            f"({MAX_AUDIO_BYTES // 2**20} MB)",
            field="file",
        )
    fmt = fmt.lower()
    if fmt == "wav":
        samples, rate = _decode_wav(data)
    elif fmt in FFMPEG_INPUT_FORMATS and ffmpeg():
        samples, rate = _decode_ffmpeg(data)
    else:
        supported = ", ".join(supported_input_formats())
        what = f"{fmt!r} audio" if fmt else "this file: it is not audio in a known format"
        need = (
            f" ({fmt} needs ffmpeg: {INSTALL_FFMPEG})"
            if fmt in FFMPEG_INPUT_FORMATS and not ffmpeg()
            else ""
        )
        raise InvalidRequest(
            f"cannot decode {what}; supported formats: {supported}{need}", field="file"
        )
    duration = len(samples) / rate if rate else 0.0
    if len(samples) == 0:
        raise InvalidRequest("the audio file holds no samples", field="file")
    if duration > MAX_AUDIO_SECONDS:
        raise InvalidRequest(
            f"the audio is {duration:.1f} s long; the limit is {MAX_AUDIO_SECONDS:g} s",
            field="file",
        )
    return samples, rate


def _decode_wav(data: bytes) -> tuple[Samples, int]:
    try:
        with wave.open(io.BytesIO(data)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            # Streamed WAVs declare an unknown length: read to the end of the data.
            raw = w.readframes(min(w.getnframes(), len(data)))
    except (wave.Error, EOFError, struct.error) as exc:
        if (
            b"WAVE" in data[:12]
            and b"fmt " in data[:64]
            and struct.unpack_from("<H", data, 20)[0] == 3
        ):
            return _decode_float_wav(data)
        raise InvalidRequest(f"not a readable WAV file: {exc}", field="file") from None
    if rate <= 0 or channels <= 0:
        raise InvalidRequest("not a readable WAV file: no sample rate", field="file")
    usable = len(raw) - len(raw) % (width * channels)
    raw = raw[:usable]
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v & 0x800000, v - 0x1000000, v)
        x = v.astype(np.float32) / 8388608
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    else:
        raise InvalidRequest(f"unsupported WAV sample width: {width} bytes", field="file")
    return _mono(x.astype(np.float32), channels), rate


def _decode_float_wav(data: bytes) -> tuple[Samples, int]:
    """IEEE-float WAV (format 3), which the `wave` module refuses."""
    channels, rate = struct.unpack_from("<HI", data, 22)
    bits = struct.unpack_from("<H", data, 34)[0]
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"data":
            raw = data[pos + 8 : pos + 8 + size]
            dtype = "<f4" if bits == 32 else "<f8"
            item = 4 if bits == 32 else 8
            raw = raw[: len(raw) - len(raw) % (item * max(channels, 1))]
            x = np.frombuffer(raw, dtype).astype(np.float32)
            return _mono(x, max(channels, 1)), rate
        pos += 8 + size + (size & 1)
    raise InvalidRequest("not a readable WAV file: no data chunk", field="file")


def _mono(x: Samples, channels: int) -> Samples:
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1).astype(np.float32)
    return x


def _decode_ffmpeg(data: bytes) -> tuple[Samples, int]:
    exe = ffmpeg()
    assert exe is not None
    rate = 16_000
    proc = subprocess.run(
        [
            *(exe, "-nostdin", "-loglevel", "error", "-i", "pipe:0"),
            *("-f", "s16le", "-ac", "1", "-ar", str(rate), "pipe:1"),
        ],
        input=data,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise InvalidRequest(f"ffmpeg cannot decode the file: {msg[0]}", field="file")
    return (np.frombuffer(proc.stdout, "<i2") / 32768).astype(np.float32), rate


def resample(x: Samples, rate: int, target: int) -> Samples:
    """`x` at `target` Hz: band-limited (FFT) when downsampling, then linear interpolation."""
    if rate == target or len(x) == 0:
        return x.astype(np.float32)
    y = x.astype(np.float64)
    if target < rate:
        spectrum = np.fft.rfft(y)
        freqs = np.fft.rfftfreq(len(y), 1 / rate)
        spectrum[freqs > target / 2 * 0.95] = 0
        y = np.fft.irfft(spectrum, len(y))
    n = max(round(len(y) * target / rate), 1)
    out = np.interp(np.linspace(0, len(y) - 1, n), np.arange(len(y)), y)
    return out.astype(np.float32)


def to_pcm16(x: Samples) -> bytes:
    return (np.clip(x, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_header(rate: int, *, channels: int = 1, width: int = 2, frames: int | None = None) -> bytes:
    """A 44-byte PCM WAV header; `frames` None: sizes unknown (a streamed WAV)."""
    if frames is None:
        data_size = riff_size = _UNKNOWN_SIZE
    else:
        data_size = frames * channels * width
        riff_size = 36 + data_size
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack(
            "<IHHIIHH", 16, 1, channels, rate, rate * channels * width, channels * width, width * 8
        )
        + b"data"
        + struct.pack("<I", data_size)
    )


def encode_ffmpeg(pcm16: bytes, rate: int, fmt: str) -> bytes:
    """16-bit mono PCM encoded as `fmt` (mp3, flac, opus, aac) by ffmpeg."""
    exe = ffmpeg()
    if exe is None:
        raise InvalidRequest(f"{fmt} output needs ffmpeg on the node: {INSTALL_FFMPEG}")
    container = {"opus": "ogg", "aac": "adts"}.get(fmt, fmt)
    codec = {"opus": ["-c:a", "libopus"], "aac": ["-c:a", "aac"]}.get(fmt, [])
    proc = subprocess.run(
        [
            *(exe, "-nostdin", "-loglevel", "error", "-f", "s16le", "-ar", str(rate), "-ac", "1"),
            *("-i", "pipe:0", *codec, "-f", container, "pipe:1"),
        ],
        input=pcm16,
        capture_output=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise InvalidRequest(f"ffmpeg cannot encode {fmt}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout
