"""Voice latency per stage: the engines alone vs through the mesh (docs/benchmarks.md#voice).

What it measures
    A `macmesh node` process (voice on: PocketSphinx + eSpeak NG; the chat model is the
    real SmolLM2 default, or `--sim` a simulated one) and a `macmesh coordinator` in
    front of it, each with its own temporary MACMESH_HOME. Every round runs the voice
    loop of issue 20, stage by stage, through the coordinator's OpenAI endpoints:

    * TTS first audio: POST /v1/audio/speech (wav) for the question -> first body byte;
    * STT: POST /v1/audio/transcriptions of that WAV -> the JSON answer;
    * TTFT: POST /v1/chat/completions (stream) with the transcript -> first content delta;
    * TTS first audio of the answer (the reply, spoken back).

    The anchors are the engines alone, same machine, same inputs: `espeak-ng --stdout`
    run as a process (time to its first stdout byte, and to the end), and a PocketSphinx
    decoder held warm in this process on the same WAV (resampling included, as the node
    does). Ratios are mesh / engine. Medians over `--rounds` (after one warm-up round).

How to run
    .venv/bin/python bench/voice.py [--rounds 10] [--sim] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from macmesh.bench.procs import (
    DEFAULT_MODEL_ID,
    ManagedProcess,
    ProcessError,
    machine_info,
    prepare_default_model,
)
from mesh.audio import ESPEAK_VOICES
from node.backends.audio_codec import decode
from node.backends.speech_engines import PocketSphinx

QUESTION = "what is the capital of France"
NODE_READY = "macmesh node listening on "
COORD_READY = "macmesh coordinator listening on "
SIM_MODEL = "chat-sim"


def espeak_alone(text: str) -> tuple[float, float, bytes]:
    """Seconds to espeak-ng's first stdout byte and to its end, and the WAV."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["espeak-ng", "--stdout", "-v", ESPEAK_VOICES["alloy"], "-s", "175", text],
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    proc.wait()
    return t_first, time.perf_counter() - t0, first + rest


def speech_via_mesh(http: httpx.Client, base: str, text: str, voice: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    body = {"model": "espeak-ng", "input": text, "voice": voice, "response_format": "wav"}
    first: float | None = None
    data = b""
    with http.stream("POST", f"{base}/v1/audio/speech", json=body) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_raw():
            if first is None:
                first = time.perf_counter() - t0
            data += chunk
    assert first is not None
    return first, data


def ttft_via_mesh(http: httpx.Client, base: str, model: str, text: str) -> tuple[float, str]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "max_tokens": 32,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    first: float | None = None
    reply = ""
    with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            content = delta[0]["delta"].get("content") if delta else None
            if content:
                reply += content
                if first is None:
                    first = time.perf_counter() - t0
    assert first is not None, "no content"
    return first, reply


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return float(len(w.readframes(len(data))) / w.getsampwidth() / w.getframerate())


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    node_args = ["node", "--grpc-port", "0", "--no-hf-cache", "--no-bonjour"]
    node_args += ["--metrics-port", "-1", "--shutdown-grace", "2"]
    if args.sim:
        model = SIM_MODEL
        node_args += ["--no-default-model", "--sim-model", f"{SIM_MODEL}:5000:200"]
    else:
        model = DEFAULT_MODEL_ID
        models_dir = work / "models"
        prepare_default_model(models_dir)
        node_args += ["--models-dir", str(models_dir), "--preload", model]
    node = ManagedProcess(
        "node", node_args, home=work / "node-home", log_path=work / "node.log", ready=NODE_READY
    )
    coord: ManagedProcess | None = None
    try:
        node.start()
        target = node.wait_ready()
        coord = ManagedProcess(
            "coordinator",
            ["coordinator", "--port", "0", "--no-bonjour", "--peer", target],
            home=work / "coord-home",
            log_path=work / "coord.log",
            ready=COORD_READY,
        )
        coord.start()
        base = coord.wait_ready(60.0)
        with httpx.Client(timeout=120, trust_env=False) as http:
            deadline = time.monotonic() + 60
            while http.get(f"{base}/health").json().get("nodes_online", 0) < 1:
                if time.monotonic() > deadline:
                    raise ProcessError("the coordinator saw no node in 60 s")
                time.sleep(0.05)
            return rounds(args, http, base, model)
    finally:
        if coord is not None:
            coord.stop()
        node.stop()


def rounds(args: argparse.Namespace, http: httpx.Client, base: str, model: str) -> dict[str, Any]:
    sphinx = PocketSphinx()
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "engine_tts_first",
            "engine_tts_total",
            "engine_stt",
            "mesh_tts_first",
            "mesh_stt",
            "mesh_ttft",
            "mesh_answer_first_audio",
            "loop_to_first_answer_audio",
        )
    }
    transcript = reply = ""
    for i in range(args.rounds + 1):
        e_first, e_total, e_wav = espeak_alone(QUESTION)
        samples, rate = decode(e_wav, "wav")
        t0 = time.perf_counter()
        sphinx.transcribe(samples, rate, "en")
        e_stt = time.perf_counter() - t0

        loop0 = time.perf_counter()
        m_first, wav = speech_via_mesh(http, base, QUESTION, "alloy")
        t0 = time.perf_counter()
        resp = http.post(
            f"{base}/v1/audio/transcriptions",
            data={"model": "pocketsphinx-en"},
            files={"file": ("q.wav", wav, "audio/wav")},
        )
        resp.raise_for_status()
        m_stt = time.perf_counter() - t0
        transcript = resp.json()["text"]
        m_ttft, reply = ttft_via_mesh(http, base, model, transcript)
        t_answer = time.perf_counter()
        a_first, _ = speech_via_mesh(http, base, reply, "nova")
        loop = t_answer - loop0 + a_first
        if i == 0:
            continue  # warm-up
        for key, value in (
            ("engine_tts_first", e_first),
            ("engine_tts_total", e_total),
            ("engine_stt", e_stt),
            ("mesh_tts_first", m_first),
            ("mesh_stt", m_stt),
            ("mesh_ttft", m_ttft),
            ("mesh_answer_first_audio", a_first),
            ("loop_to_first_answer_audio", loop),
        ):
            rows[key].append(value)
    med = {k: median(v) for k, v in rows.items()}
    return {
        "model": model,
        "rounds": args.rounds,
        "question_audio_seconds": wav_seconds(espeak_alone(QUESTION)[2]),
        "transcript": transcript,
        "reply": reply,
        "median_seconds": med,
        "ratios": {
            "tts_first_audio": med["mesh_tts_first"] / med["engine_tts_first"],
            "stt": med["mesh_stt"] / med["engine_stt"],
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--sim", action="store_true", help="a simulated chat model, not SmolLM2")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("voice bench: espeak-ng is not installed (make espeak-ng)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="macmesh-voice-") as tmp:
        result = run(args, Path(tmp))
    result["machine"] = machine_info({"pocketsphinx": "pocketsphinx"})
    med, ratios = result["median_seconds"], result["ratios"]
    print(f"voice loop, {result['rounds']} rounds, chat model {result['model']}")
    print(
        f"  question: {result['question_audio_seconds']:.2f} s of audio -> {result['transcript']!r}"
    )
    print(f"  reply: {result['reply']!r}")
    print(f"  {'stage':<34}{'engine alone':>14}{'via mesh':>12}{'ratio':>8}")
    print(
        f"  {'TTS first audio (question)':<34}{med['engine_tts_first'] * 1000:>11.1f} ms"
        f"{med['mesh_tts_first'] * 1000:>9.1f} ms{ratios['tts_first_audio']:>8.2f}"
    )
    print(
        f"  {'STT (PocketSphinx)':<34}{med['engine_stt'] * 1000:>11.1f} ms"
        f"{med['mesh_stt'] * 1000:>9.1f} ms{ratios['stt']:>8.2f}"
    )
    print(f"  {'TTFT (chat)':<34}{'':>14}{med['mesh_ttft'] * 1000:>9.1f} ms")
    for label, key in (
        ("TTS first audio (answer)", "mesh_answer_first_audio"),
        ("whole loop to answer audio", "loop_to_first_answer_audio"),
    ):
        print(f"  {label:<34}{'':>14}{med[key] * 1000:>9.1f} ms")
    print(f"  (espeak-ng alone, whole question: {med['engine_tts_total'] * 1000:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
