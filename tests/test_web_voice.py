"""The Voice page in headless Chromium with a fake microphone: a WAV made by eSpeak NG is the
microphone's input (Chromium loops it), PocketSphinx on a live node transcribes it, a
simulated chat model answers and eSpeak NG speaks the answer. One push-to-talk turn and
one hands-free turn, each complete: transcript, streamed answer, <audio> elements from
blob: URLs, per-turn timings; no console errors."""

from __future__ import annotations

import shutil
import subprocess
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from tests.browser import CHROMIUM, NO_CHROMIUM, console_errors, stop_coordinator
from tests.conftest import (
    RunningCoordinator,
    RunningNode,
    start_coordinator,
    start_sim_node,
)

SAID = "what is the capital of France"
# Words PocketSphinx should find in SAID (two of them at least: through the browser's audio
# processing it once heard "what is the capital of brad's").
WORDS = {"what", "capital", "france"}
VOICE = "en-us+klatt"
CHAT = "chat-sim:5000:200"  # 200 tok/s
SLOW = "slow-sim:5000:20"  # 20 tok/s: still generating when it is interrupted
LEAD_S, TAIL_S = 0.5, 9.0  # silence around the speech: the loop's gap ends each utterance
TURN_MS = 60_000


def make_mic_file(path: Path) -> Path:
    """eSpeak NG says SAID; padded with silence so voice activity detection sees it end
    (Chromium plays the file in a loop)."""
    raw = path.with_suffix(".raw.wav")
    # en-us+klatt: the eSpeak NG voice PocketSphinx hears best (the API's `alloy`).
    subprocess.run(["espeak-ng", "-v", VOICE, "-w", str(raw), SAID], check=True, timeout=30)
    with wave.open(str(raw)) as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        frames = w.readframes(w.getnframes())
    lead, tail = (b"\0" * (int(rate * s) * width * channels) for s in (LEAD_S, TAIL_S))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(lead + frames + tail)
    return path


def has_audio_api(coordinator: RunningCoordinator) -> bool:
    """Whether the coordinator has the endpoints: an empty request gets the API's error
    envelope (400), not the router's 404 for an unknown path."""
    for path in ("/v1/audio/transcriptions", "/v1/audio/speech"):
        r = httpx.post(coordinator.base_url + path, json={})
        if r.status_code == 404 and "error" not in r.json():
            return False
    return True


def served_kinds(coordinator: RunningCoordinator) -> set[str]:
    models = httpx.get(coordinator.base_url + "/api/models").json()["models"]
    return {m.get("kind") or "chat" for m in models}


def start_chat_node(home: Path, *, audio: bool) -> RunningNode:
    """A node with a simulated chat model, and with its speech engines (PocketSphinx,
    eSpeak NG: whichever are installed) when `audio`."""
    return start_sim_node(home, CHAT, SLOW, audio=audio)


@pytest.fixture(scope="module")
def voice_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    if shutil.which("espeak-ng") is None:
        pytest.skip("no espeak-ng binary (run `make espeak-ng`): it makes the fake mic's WAV")
    root = tmp_path_factory.mktemp("voice")
    node = start_chat_node(root / "node", audio=True)
    coord = start_coordinator(CoordinatorConfig(home=root / "c", peers=(node.target,)))
    try:
        if not has_audio_api(coord):
            pytest.skip("the coordinator has no /v1/audio/transcriptions and /v1/audio/speech")
        missing = [k for k in ("stt", "tts") if k not in served_kinds(coord)]
        if missing:
            pytest.skip(f"the node serves no {' or '.join(missing)} model (docs/voice.md)")
        yield coord
    finally:
        stop_coordinator(coord)
        node.stop(0)


@pytest.fixture(scope="module")
def mic_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Chromium whose microphone says SAID (no microphone without espeak-ng). The module's
    only browser: a second Playwright instance beside it would not start."""
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    from playwright.sync_api import sync_playwright

    args = ["--headless=new", "--no-sandbox"]
    if shutil.which("espeak-ng") is not None:
        wav = make_mic_file(tmp_path_factory.mktemp("mic") / "mic.wav")
        args += [
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
        ]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield b
        b.close()


@pytest.fixture
def plain_page(mic_browser: Any) -> Iterator[Any]:
    context = mic_browser.new_context(bypass_csp=True)  # see tests/browser.py
    yield context.new_page()
    context.close()


def voice_turns(browser: Any, base: str) -> None:
    """Drives one push-to-talk turn and one hands-free turn on /ui/voice and checks them."""
    # bypass_csp: Playwright's polling predicates are evaluated strings (see tests/browser.py).
    context = browser.new_context(bypass_csp=True, permissions=["microphone"])
    page = context.new_page()
    errors = console_errors(page)
    try:
        page.goto(base + "/ui/voice")
        page.wait_for_function(
            "document.querySelector('#voice-stt').value && "
            "document.querySelector('#voice-tts').value && "
            "document.querySelector('#voice-model').value === 'chat-sim'",
            timeout=15_000,
        )
        assert page.locator("#voice-error").inner_text() == ""
        page.fill("#voice-max-tokens", "8")  # a short answer: spoken before the mic loops

        # Push to talk: click to start, wait for the utterance to pass, click to send.
        page.click("#voice-ptt")
        vad = "document.querySelector('#voice-state').dataset.vad"
        page.wait_for_function(f"{vad} === 'speech'", timeout=20_000)
        page.wait_for_function(f"{vad} === 'silence'", timeout=20_000)
        page.click("#voice-ptt")
        check_turn(page, 0)

        # Hands-free: the next loop of the file starts a turn by itself.
        page.check("#voice-handsfree")
        check_turn(page, 1)

        # Barge-in: a long, slow answer, and the loop after it speaks over it: playback
        # stops and the generation is cancelled.
        page.select_option("#voice-model", "slow-sim")
        page.fill("#voice-max-tokens", "400")
        page.locator("article.voice-turn").nth(3).wait_for(timeout=TURN_MS)
        interrupted = page.locator("article.voice-turn").nth(2)
        assert "interrupted" in (interrupted.get_attribute("class") or "").split()
        assert "interrupted by speech" in interrupted.locator(".voice-stats").inner_text()
        assert page.evaluate(
            "[...document.querySelectorAll('article.voice-turn')[2].querySelectorAll('audio')]"
            ".every(a => a.paused)"
        )
        page.uncheck("#voice-handsfree")
        page.click("#voice-stop")
        outcomes = [r["outcome"] for r in requests(base, "slow-sim")]
        assert "cancelled by the client" in outcomes, outcomes
        assert page.evaluate("window.__xss") is None
        assert errors == [], errors
    finally:
        context.close()


def requests(base: str, model: str) -> list[dict[str, Any]]:
    """The coordinator's request log for `model` (after a moment for the last to end)."""
    deadline = time.monotonic() + 10
    while True:
        body = httpx.get(base + "/api/requests", params={"model": model}).json()
        records: list[dict[str, Any]] = body["requests"]
        if any(r["outcome"] for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def check_turn(page: Any, i: int) -> None:
    turn = page.locator("article.voice-turn").nth(i)
    turn.wait_for(timeout=TURN_MS)
    page.wait_for_function(
        f"(() => {{ const t = document.querySelectorAll('article.voice-turn')[{i}];"
        " return t && !t.classList.contains('busy'); })()",
        timeout=TURN_MS,
    )
    error = turn.locator(".error").inner_text()
    classes = turn.get_attribute("class") or ""
    assert "done" in classes.split(), f"turn {i}: {classes}: {error}"
    transcript = turn.locator(".voice-transcript").inner_text().lower()
    assert len(set(transcript.replace(",", " ").split()) & WORDS) >= 2, transcript
    assert turn.locator(".voice-answer").inner_text().strip(), "no answer text"
    srcs = turn.locator("audio").evaluate_all("els => els.map(a => a.src)")
    assert srcs and all(s.startswith("blob:") for s in srcs), srcs
    assert turn.locator("audio").evaluate_all("els => els.every(a => a.ended)"), "not played"
    stats = turn.locator(".voice-stats").inner_text()
    for bit in ("STT", "TTFT", "first audio"):
        assert bit in stats, stats


def test_voice_turns(voice_mesh: RunningCoordinator, mic_browser: Any) -> None:
    voice_turns(mic_browser, voice_mesh.base_url)


@pytest.fixture(scope="module")
def chat_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    """A coordinator over a node with a chat model and no voice models."""
    root = tmp_path_factory.mktemp("voice-none")
    node = start_chat_node(root / "node", audio=False)
    coord = start_coordinator(CoordinatorConfig(home=root / "c", peers=(node.target,)))
    yield coord
    stop_coordinator(coord)
    node.stop(0)


def test_voice_page_helpers(chat_only: RunningCoordinator, plain_page: Any) -> None:
    """The page's WAV encoder, sentence splitter and speech text, in the browser; and the
    Voice link in the navigation."""
    page = plain_page
    errors = console_errors(page)
    page.goto(chat_only.base_url + "/ui/mesh")
    page.click("nav a[data-page=voice]")
    page.locator("#voice-ptt").wait_for()
    out = page.evaluate(
        """async () => {
            const m = await import('/ui/static/page-voice.js');
            const wav = m.encodeWav(m.resample(new Float32Array(4800).fill(0.5), 48000, 16000),
              16000);
            const v = new DataView(await wav.arrayBuffer());
            const split = (t, f) => m.takeSentences(t, f);
            return {
              type: wav.type, size: wav.size, rate: v.getUint32(24, true),
              channels: v.getUint16(22, true), bits: v.getUint16(34, true),
              first: v.getInt16(44, true),
              a: split("Paris is the capital. It is big! And ol", false),
              b: split("Paris is the capital. It is big! And old", true),
              c: split("no stop yet", false),
              d: split("x".repeat(150) + ", " + "y".repeat(100), false),
              spoken: m.speakable("**Paris** is `the` [capital](http://x).\\n```py\\ncode\\n```"),
            };
        }"""
    )
    assert out["type"] == "audio/wav" and out["size"] == 44 + 1600 * 2
    assert (out["rate"], out["channels"], out["bits"]) == (16000, 1, 16)
    assert out["first"] == round(0.5 * 0x7FFF) or out["first"] == int(0.5 * 0x7FFF)
    assert out["a"] == [["Paris is the capital.", "It is big!"], "And ol"]
    assert out["b"] == [["Paris is the capital.", "It is big!", "And old"], ""]
    assert out["c"] == [[], "no stop yet"]
    assert out["d"][0] == ["x" * 150 + ","] and out["d"][1] == "y" * 100
    assert out["spoken"] == "Paris is the capital."
    assert errors == [], errors


def test_voice_page_names_missing_models(chat_only: RunningCoordinator, plain_page: Any) -> None:
    """Without voice models in the mesh the page says so; the chat model is offered; without a
    secure context it says how to get the microphone."""
    assert not {"stt", "tts"} & served_kinds(chat_only)
    page = plain_page
    errors = console_errors(page)
    page.goto(chat_only.base_url + "/ui/voice")
    page.wait_for_function("document.querySelector('#voice-error').textContent !== ''")
    assert "model in the mesh" in page.locator("#voice-error").inner_text()
    assert page.locator("#voice-model").input_value() == "chat-sim"
    # Plain HTTP from another machine: no microphone, and the page says what to do.
    page.evaluate("Object.defineProperty(window, 'isSecureContext', { value: false })")
    page.click("#voice-ptt")
    page.wait_for_function("document.querySelector('#voice-error').textContent.includes('secure')")
    assert "ssh -L" in page.locator("#voice-error").inner_text()
    assert errors == [], errors


def test_chat_page_lists_chat_models_only(voice_mesh: RunningCoordinator, plain_page: Any) -> None:
    """Voice models (kind stt / tts) belong on the Voice page, not in the chat picker."""
    if not {"stt", "tts"} & served_kinds(voice_mesh):
        pytest.skip("no voice models served (pocketsphinx / espeak-ng missing)")
    plain_page.goto(voice_mesh.base_url + "/ui/chat")
    plain_page.locator("#chat-model option").first.wait_for(state="attached")
    values = plain_page.locator("#chat-model option").evaluate_all("os => os.map(o => o.value)")
    assert values and "pocketsphinx-en" not in values and "espeak-ng" not in values
