"""Screenshots of every web UI page in light and dark mode, for docs/ui.md (`make screenshots`).

Runs a small demo lab the way users deploy it: three plain `macmesh node` processes with
simulated models (one stopped, to show an offline node), a `macmesh coordinator` with
seed-style config files, a few requests through the official OpenAI SDK, then Debian's
Chromium (Playwright) on each page. Everything is loopback and temporary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
MACMESH = str(Path(sys.executable).parent / "macmesh")
PAGES = ("mesh", "models", "chat", "voice", "routing", "requests")
VOICE_SAID = "what is the capital of France"
THEMES: tuple[Literal["light", "dark"], ...] = ("light", "dark")
NODES = {
    "studio": ["qwen3-30b-sim:3000:60,mem=18,load=0.3", "qwen3-4b-sim:6000:120"],
    "mbp-lab-2": ["qwen3-4b-sim:5000:100", "gemma-270m-sim:9000:300"],
    "mini-3": ["qwen3-4b-sim:4000:90"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.2)
    raise SystemExit(f"screenshots: {what} not within {timeout:.0f}s")


@contextlib.contextmanager
def demo_lab(root: Path) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """Nodes and a coordinator as processes; yields the coordinator URL and the nodes."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports = {name: _port() for name in NODES}
    try:
        for name, models in NODES.items():
            home = root / name
            home.mkdir()
            (home / "node_id").write_text(name + "\n")
            sims = [a for m in models for a in ("--sim-model", m)]
            args = [MACMESH, "node", "--grpc-port", str(ports[name]), "--metrics-port", "-1"]
            args += ["--no-default-model", "--no-hf-cache", "--memory-budget", "24", *sims]
            log = (root / f"{name}.log").open("wb")
            env = {**os.environ, "MACMESH_HOME": str(home)}
            procs[name] = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        coord = root / "coordinator"
        coord.mkdir()
        (coord / "model_aliases.json").write_text(
            json.dumps(
                {"fast": "gemma-270m-sim", "coder": "qwen3-30b-sim", "qwen*": "qwen3-4b-sim"}
            )
        )
        (coord / "claude_routing.json").write_text(
            json.dumps(
                {
                    "enabled": True,
                    "tiers": {
                        "opus": {"model": "qwen3-30b-sim", "max_tokens": 8192},
                        "sonnet": {"model": "qwen3-4b-sim"},
                        "haiku": {"model": "gemma-270m-sim", "max_tokens": 1024},
                    },
                }
            )
        )
        (coord / "inference_settings.json").write_text(
            json.dumps({"temperature": 0.7, "top_p": 0.95, "max_output_tokens": 16384})
        )
        http = _port()
        peers = [a for p in ports.values() for a in ("--peer", f"127.0.0.1:{p}")]
        args = [MACMESH, "coordinator", "--port", str(http), "--no-bonjour", *peers]
        log = (root / "coordinator.log").open("wb")
        env = {**os.environ, "MACMESH_HOME": str(coord)}
        procs["coordinator"] = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        base = f"http://127.0.0.1:{http}"
        _wait(lambda: httpx.get(f"{base}/health").json()["nodes_online"] == 3, 120, "3 nodes")
        yield base, procs
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def traffic(base: str) -> None:
    """Requests for the Requests page, a loaded model, and one refused name."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="demo", max_retries=0)
    for model, text in (
        ("claude-sonnet-4-5", "Summarise the design doc."),
        ("fast", "One word for fast?"),
        ("coder", "Write a binary search in Python."),
        ("qwen3", "Hello!"),
        ("claude-haiku-4-5", "Tag this commit message."),
    ):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=24
        )
    with contextlib.suppress(openai.APIError):
        client.chat.completions.create(
            model="llama-70b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )


def voice_turn(page: Any) -> None:
    """One push-to-talk turn on the Voice page; the fake microphone says VOICE_SAID. (Only
    selectors: the page's CSP forbids Playwright's evaluated predicates.)"""
    for picker in ("#voice-stt", "#voice-tts"):
        page.wait_for_selector(f"{picker} option:not([value=''])", state="attached")
    page.wait_for_selector("#voice-model option[value=qwen3-4b-sim]", state="attached")
    page.select_option("#voice-model", "qwen3-4b-sim")
    page.fill("#voice-max-tokens", "16")
    page.click("#voice-ptt")
    page.wait_for_selector("#voice-state[data-vad=speech]", timeout=30_000)
    page.wait_for_selector("#voice-state[data-vad=silence]", timeout=30_000)
    page.click("#voice-ptt")
    page.wait_for_selector("article.voice-turn:not(.busy)", timeout=60_000)


def fake_mic(out: Path) -> list[str]:
    """Chromium flags for a microphone that says VOICE_SAID (eSpeak NG), then 9 s of silence
    (Chromium loops the file)."""
    raw = out / "said.wav"
    cmd = ["espeak-ng", "-v", "en-us+klatt", "-w", str(raw), VOICE_SAID]  # PocketSphinx's best
    subprocess.run(cmd, check=True, timeout=30)
    with wave.open(str(raw)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    padded = out / "mic.wav"
    with wave.open(str(padded), "wb") as w:
        w.setparams(params)
        second = b"\0" * (params.framerate * params.sampwidth * params.nchannels)
        w.writeframes(second[: len(second) // 2] + frames + second * 9)
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={padded}",
    ]


def shoot(base: str, out: Path, chromium: str, tmp: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    shots: list[Path] = []
    # The Voice page needs a microphone: a fake one that speaks (eSpeak NG).
    mic = fake_mic(tmp) if shutil.which("espeak-ng") else []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--headless=new", *mic])
        for theme in THEMES:
            ctx = browser.new_context(
                viewport={"width": 1280, "height": 820},
                color_scheme=theme,
                device_scale_factor=1,
                permissions=["microphone"] if mic else [],
            )
            page = ctx.new_page()
            for name in PAGES:
                page.goto(f"{base}/ui/{name}")
                if name == "chat":
                    page.wait_for_selector("#chat-model option", state="attached")
                    page.select_option("#chat-model", index=1)
                    page.fill("#chat-max-tokens", "60")
                    page.fill("#chat-input", "Explain the mesh in one paragraph.")
                    page.click("#chat-send")
                    page.wait_for_selector(".msg.assistant .meta", timeout=30_000)
                    page.wait_for_selector("#chat-send:not([disabled])")
                elif name == "voice":
                    if mic:
                        voice_turn(page)
                    else:
                        print("screenshots: no espeak-ng, so no voice turn (make espeak-ng)")
                        page.wait_for_timeout(1200)
                elif name == "requests":
                    page.wait_for_selector("#requests tbody tr[data-seq]")
                elif name == "routing":
                    page.wait_for_load_state("networkidle")
                    page.fill("#resolve-name", "claude-opus-4-1")
                    page.keyboard.press("Enter")
                    page.wait_for_selector("#resolve-result dl")
                else:
                    page.wait_for_timeout(1200)  # the first event
                path = out / f"ui-{name}-{theme}.png"
                page.screenshot(path=str(path), full_page=False)
                shots.append(path)
            ctx.close()
        browser.close()
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="macmesh-shots-") as tmp,
        demo_lab(Path(tmp)) as (
            base,
            procs,
        ),
    ):
        traffic(base)
        httpx.post(
            f"{base}/api/models/load", json={"model": "qwen3-30b-sim", "node": "studio"}, timeout=60
        )
        procs["mini-3"].send_signal(signal.SIGTERM)  # an offline node, as a lab sees one
        procs["mini-3"].wait(15)
        time.sleep(3)
        for path in shoot(base, args.out, args.chromium, Path(tmp)):
            print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
