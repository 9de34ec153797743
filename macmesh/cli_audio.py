"""`macmesh say TEXT` and `macmesh transcribe FILE`: the coordinator's OpenAI audio
endpoints from the shell, for scripts (docs/voice.md)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import httpx

from macmesh.admin_client import AdminClient, add_coordinator_flags
from mesh.audio import (
    ESPEAK_MODEL,
    OUTPUT_FORMATS,
    POCKETSPHINX_MODEL,
    TRANSCRIPTION_RESPONSE_FORMATS,
)

TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def _client(args: argparse.Namespace) -> tuple[str, httpx.Client]:
    admin = AdminClient.from_args(args)  # the same key lookup as every admin command
    headers = {"authorization": f"Bearer {admin.key}"} if admin.key else {}
    return admin.base, httpx.Client(headers=headers, timeout=TIMEOUT)


def _fail(resp: httpx.Response) -> int:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text.strip() or resp.reason_phrase
    print(f"macmesh: {resp.status_code}: {message}", file=sys.stderr)
    return 1


def cmd_say(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    out = args.output
    if out == "-" and sys.stdout.isatty():
        print("macmesh say: stdout is a terminal; write the audio with -o FILE", file=sys.stderr)
        return 2
    body: dict[str, Any] = {
        "model": args.model,
        "input": text,
        "voice": args.voice,
        "response_format": args.format,
        "speed": args.speed,
    }
    base, http = _client(args)
    try:
        with http, http.stream("POST", f"{base}/v1/audio/speech", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                return _fail(resp)
            with contextlib.ExitStack() as stack:
                sink = sys.stdout.buffer if out == "-" else stack.enter_context(open(out, "wb"))
                for chunk in resp.iter_bytes():
                    sink.write(chunk)
                    sink.flush()  # a player reading a pipe starts at once
    except httpx.HTTPError as exc:
        print(f"macmesh: cannot reach the coordinator at {base}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        data = sys.stdin.buffer.read() if args.file == "-" else path.read_bytes()
    except OSError as exc:
        print(f"macmesh transcribe: {exc}", file=sys.stderr)
        return 1
    fields = {"model": args.model, "response_format": args.format}
    if args.language:
        fields["language"] = args.language
    name = "audio.wav" if args.file == "-" else path.name
    base, http = _client(args)
    try:
        with http:
            resp = http.post(
                f"{base}/v1/audio/transcriptions", data=fields, files={"file": (name, data)}
            )
    except httpx.HTTPError as exc:
        print(f"macmesh: cannot reach the coordinator at {base}: {exc}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        return _fail(resp)
    if args.format == "json":
        print(resp.json()["text"])
    else:
        sys.stdout.write(resp.text if resp.text.endswith("\n") else resp.text + "\n")
    return 0


def add_audio_parsers(sub: Any) -> None:
    """The `say` and `transcribe` commands."""
    p = sub.add_parser("say", help="speak TEXT through the coordinator (/v1/audio/speech)")
    p.add_argument("text", help="what to say (- reads stdin)")
    p.add_argument("-o", "--output", default="-", help="audio file to write (default: stdout)")
    p.add_argument("--model", default=ESPEAK_MODEL, help=f"text-to-speech model ({ESPEAK_MODEL})")
    p.add_argument("--voice", default="alloy", help="OpenAI or engine voice (default alloy)")
    p.add_argument("--format", default="wav", choices=OUTPUT_FORMATS, help="default wav")
    p.add_argument("--speed", type=float, default=1.0, help="0.25 to 4.0 (default 1.0)")
    add_coordinator_flags(p)
    p.set_defaults(func=cmd_say)

    p = sub.add_parser(
        "transcribe", help="transcribe an audio FILE through the coordinator (speech to text)"
    )
    p.add_argument("file", help="audio file (WAV; others with ffmpeg on the node; - = stdin)")
    p.add_argument(
        "--model", default=POCKETSPHINX_MODEL, help=f"speech-to-text model ({POCKETSPHINX_MODEL})"
    )
    p.add_argument("--language", help="ISO-639-1 code, e.g. en")
    p.add_argument(
        "--format",
        default="text",
        choices=TRANSCRIPTION_RESPONSE_FORMATS,
        help="what to print: text (default), json, verbose_json, srt, vtt",
    )
    add_coordinator_flags(p)
    p.set_defaults(func=cmd_transcribe)
