// The Voice page: speak, see the transcript, hear the answer. One turn is
//   microphone (getUserMedia + an AudioWorklet, web/voice-worklet.js) -> 16 kHz mono 16-bit WAV
//   -> POST /v1/audio/transcriptions -> streamed POST /v1/chat/completions -> the answer cut
//   into sentences -> POST /v1/audio/speech per sentence -> <audio> elements played in order.
// Push-to-talk (hold, or click to start and click to stop) or hands-free (level-based voice
// activity detection); speaking (or pressing) during an answer interrupts it.

import { renderMarkdown, splitThinking } from "./markdown.js";
import {
  ApiError, askForKey, chatModelGroups, el, errorMessage, headers, main, modelsAndRouting, num,
  readEvents,
} from "./ui.js";

const SETTINGS = "macmesh.voice";
const TARGET_RATE = 16000; // what the WAV sent for transcription holds
// Voice activity detection (levels are RMS of ~40 ms blocks, full scale 1.0).
const VAD = {
  minLevel: 0.01, // never call quieter than this speech
  overNoise: 3, // ... nor anything under this many times the noise floor
  bargeInLevel: 0.03, // while an answer plays, louder still (the answer itself may leak in)
  startMs: 120, // this long above the threshold, within twice as long, starts speech
  bargeInMs: 250, // ... and this long while an answer plays
  endMs: 800, // this long below it ends speech
  minSpeechMs: 250, // shorter utterances are ignored (a cough, a click)
  preRollMs: 400, // audio kept from before the start was detected
};
// The OpenAI API's voice names (a node maps them onto its engine's voices, docs/voice.md).
const OPENAI_VOICES = ["alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
  "shimmer", "verse"];
const HOLD_MS = 400; // a push-to-talk press held longer than this stops on release
const SPEECH_HINT =
  "Speech models run on nodes with the audio engines installed (docs/voice.md); " +
  "check the Models page for one.";

// ---- Audio helpers (no library): resampling, WAV encoding, text for speech.
function concat(blocks) {
  const n = blocks.reduce((a, b) => a + b.length, 0);
  const out = new Float32Array(n);
  let at = 0;
  for (const b of blocks) { out.set(b, at); at += b.length; }
  return out;
}

// Box-filtered decimation: each output sample averages the input samples it covers (a crude
// low-pass that is plenty for speech recognition).
export function resample(samples, from, to) {
  if (from === to) return samples;
  const ratio = from / to;
  const out = new Float32Array(Math.floor(samples.length / ratio));
  for (let i = 0; i < out.length; i++) {
    const a = Math.floor(i * ratio);
    const b = Math.max(a + 1, Math.min(samples.length, Math.floor((i + 1) * ratio)));
    let s = 0;
    for (let j = a; j < b; j++) s += samples[j];
    out[i] = s / (b - a);
  }
  return out;
}

export function encodeWav(samples, rate) {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const str = (at, s) => { for (let i = 0; i < s.length; i++) v.setUint8(at + i, s.charCodeAt(i)); };
  str(0, "RIFF");
  v.setUint32(4, 36 + samples.length * 2, true);
  str(8, "WAVE");
  str(12, "fmt ");
  v.setUint32(16, 16, true); // fmt chunk size
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true); // bytes a second
  v.setUint16(32, 2, true); // block align
  v.setUint16(34, 16, true); // bits a sample
  str(36, "data");
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

// Cuts finished sentences off the front of `text`: [sentences, rest]. A sentence ends at
// . ! ? … (and CJK ones) followed by a space, or at a line break; with none in sight a long
// run is cut at its last comma or space so speech can start; `final` flushes the rest.
export function takeSentences(text, final = false) {
  const out = [];
  let rest = text;
  for (;;) {
    const m = /[.!?…。！？]+["'”’)\]]*\s|\n/.exec(rest);
    let cut = m ? m.index + m[0].length : -1;
    if (cut < 0 && rest.length > 200) {
      const at = Math.max(rest.lastIndexOf(", ", 200), rest.lastIndexOf("; ", 200));
      cut = at > 40 ? at + 2 : rest.lastIndexOf(" ", 200) + 1;
      if (cut <= 0) cut = 200;
    }
    if (cut < 0) break;
    const s = rest.slice(0, cut).trim();
    if (s) out.push(s);
    rest = rest.slice(cut);
  }
  if (final && rest.trim()) { out.push(rest.trim()); rest = ""; }
  return [out, rest];
}

// What a text-to-speech engine should read: Markdown marks, code and links' targets out.
export function speakable(text) {
  return text
    .replace(/```[\s\S]*?(```|$)/g, " ")
    .replace(/`([^`]*)`/g, "$1")
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1")
    .replace(/^\s{0,3}(#{1,6}|[-*+]|\d+[.)]|>)\s+/gm, "")
    .replace(/[*_~#|<>]+/g, " ")
    .replace(/\s+/g, " ")
    .trim();
}

// Which pipeline stage a model of GET /api/models serves: its kind when the API gives one,
// otherwise a guess from the backend and the id.
export function modelKind(m) {
  const k = String(m.kind || m.type || m.task || "").toLowerCase();
  if (/stt|speech-to-text|transcri|asr/.test(k)) return "stt";
  if (/tts|text-to-speech|speech|audio-out/.test(k)) return "tts";
  if (k && !/chat|text|llm|generat/.test(k)) return "other";
  const b = `${m.backend || ""} ${m.id || ""}`.toLowerCase();
  if (/sphinx|whisper|vosk|\bstt\b|\basr\b/.test(b)) return "stt";
  if (/espeak|piper|kokoro|\btts\b/.test(b)) return "tts";
  return "chat";
}

const secs = (ms) => `${num(ms / 1000, 2)} s`;

export default function voicePage() {
  const saved = (() => {
    try { return JSON.parse(localStorage.getItem(SETTINGS) || "{}"); } catch (_) { return {}; }
  })();
  const convo = []; // {role, content}: the conversation, sent with every turn
  const sttSel = el("select", { id: "voice-stt", title: "speech-to-text model" });
  const chatSel = el("select", { id: "voice-model", title: "chat model, alias or Claude tier" });
  const ttsSel = el("select", { id: "voice-tts", title: "text-to-speech model" });
  const voices = el("datalist", { id: "voice-voices" });
  const voiceIn = el("input", { id: "voice-voice", list: "voice-voices", size: 10,
    placeholder: "default", value: saved.voice || "", title: "the TTS voice" });
  const speed = el("input", { id: "voice-speed", type: "number", min: 0.25, max: 4, step: 0.05,
    value: saved.speed || 1, title: "speech speed" });
  const maxTokens = el("input", { id: "voice-max-tokens", type: "number", min: 1,
    value: saved.maxTokens || 256, title: "max_tokens" });
  const system = el("textarea", { id: "voice-system", rows: 2, placeholder: "System prompt" });
  system.value = saved.system ?? "You are a voice assistant: answer briefly, in plain sentences " +
    "without Markdown, lists or code.";
  const ptt = el("button", { type: "button", id: "voice-ptt", class: "voice-ptt",
    "aria-pressed": "false" }, "Push to talk");
  const handsFree = el("input", { type: "checkbox", id: "voice-handsfree" });
  const bargeIn = el("input", { type: "checkbox", id: "voice-barge-in",
    checked: saved.bargeIn !== false });
  const stopBtn = el("button", { type: "button", id: "voice-stop", disabled: true }, "Stop");
  const clearBtn = el("button", { type: "button", id: "voice-clear" }, "Clear");
  const level = el("meter", { id: "voice-level", min: 0, max: 1, value: 0, low: 0.2, high: 0.8,
    optimum: 0.5, title: "microphone level" });
  const stateLine = el("span", { id: "voice-state", class: "muted", "data-vad": "off",
    role: "status", "aria-live": "polite" }, "microphone off");
  const notice = el("div", { id: "voice-error", class: "error", role: "alert" });
  const log = el("div", { id: "voice-log", class: "voice-log" });
  const field = (label, input) => el("label", { class: "voice-field" },
    el("span", { class: "muted" }, label), input);
  main.replaceChildren(
    el("h2", {}, "Voice"),
    el("div", { class: "voice-pick" },
      field("Speech to text", sttSel), field("Chat model", chatSel),
      field("Text to speech", ttsSel), field("Voice", voiceIn), voices,
      field("Speed", speed), field("Max tokens", maxTokens)),
    system,
    el("div", { class: "voice-controls" }, ptt,
      el("label", { class: "voice-toggle" }, handsFree, " Hands-free"),
      el("label", { class: "voice-toggle", title: "in hands-free mode, speaking during an " +
        "answer stops it (use headphones, or the answer may interrupt itself)" },
      bargeIn, " Interrupt by speaking"),
      stopBtn, clearBtn, level, stateLine),
    notice, log);

  let left = false;
  let ttsModels = [];
  let mic = null; // {stream, ctx, node, rate}
  let micStarting = null;
  let current = null; // the turn in progress (see newTurn)
  let recording = null; // {blocks, kind: "ptt"|"vad", started}
  let pressAt = 0;
  // VAD state
  let noise = 0.005;
  let speaking = false;
  const recent = []; // [ms, loud] of the latest blocks, for the start of speech
  let quietMs = 0;
  let speechMs = 0;
  const preRoll = [];

  function save() {
    const s = { stt: sttSel.value, chat: chatSel.value, tts: ttsSel.value, voice: voiceIn.value,
      speed: speed.value, maxTokens: maxTokens.value, system: system.value,
      bargeIn: bargeIn.checked };
    try { localStorage.setItem(SETTINGS, JSON.stringify(s)); } catch (_) { /* private mode */ }
  }
  for (const input of [sttSel, chatSel, ttsSel, voiceIn, speed, maxTokens, system, bargeIn]) {
    input.addEventListener("change", save);
  }

  function setState(text, vad) {
    stateLine.textContent = text;
    if (vad) stateLine.dataset.vad = vad;
  }

  // ---- Models: speech-to-text, chat (models, aliases, Claude tiers) and text-to-speech.
  async function loadModels() {
    let models;
    let routing;
    try {
      ({ models, routing } = await modelsAndRouting());
    } catch (err) {
      notice.textContent = err.message;
      return;
    }
    const by = { stt: [], tts: [], chat: [] };
    for (const m of models.models || []) (by[modelKind(m)] || []).push(m);
    const fill = (select, options, empty, want) => {
      const keep = select.value || want;
      select.replaceChildren(...options);
      if (!select.options.length) select.append(el("option", { value: "" }, empty));
      if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
    };
    fill(sttSel, by.stt.map((m) => el("option", { value: m.id }, m.id)),
      "no speech-to-text model in the mesh", saved.stt);
    fill(ttsSel, by.tts.map((m) => el("option", { value: m.id }, m.id)),
      "no text-to-speech model in the mesh", saved.tts);
    const groups = chatModelGroups(models, routing);
    fill(chatSel, groups, "no chat model in the mesh", saved.chat);
    ttsModels = by.tts;
    fillVoices();
    const missing = [];
    if (!by.stt.length) missing.push("speech-to-text");
    if (!by.tts.length) missing.push("text-to-speech");
    notice.textContent = missing.length
      ? `No ${missing.join(" or ")} model in the mesh. ${SPEECH_HINT}` : "";
  }

  function fillVoices() {
    const m = ttsModels.find((x) => x.id === ttsSel.value) || ttsModels[0];
    const list = (m && m.voices) || OPENAI_VOICES;
    voices.replaceChildren(...list.map((v) =>
      el("option", { value: typeof v === "string" ? v : v.id || v.name || "" })));
  }

  // ---- The microphone: opened on the first press (browsers want a user gesture).
  async function ensureMic() {
    if (mic) return mic;
    if (micStarting) return micStarting;
    micStarting = (async () => {
      if (!window.isSecureContext || !navigator.mediaDevices ||
          !navigator.mediaDevices.getUserMedia) {
        throw new Error("The browser offers no microphone here: it needs a secure context " +
          "(http://localhost or 127.0.0.1, or HTTPS). From another machine, forward the port " +
          "(ssh -L 1234:127.0.0.1:1234 host, then http://localhost:1234/ui/voice) or serve " +
          "the UI over HTTPS (docs/web.md#voice-page).");
      }
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({ audio: {
          channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true,
        } });
      } catch (err) {
        throw new Error(err.name === "NotAllowedError"
          ? "Microphone access was refused: allow it for this site in the browser's settings."
          : `No microphone: ${err.message || err.name}`);
      }
      const ctx = new AudioContext();
      try {
        await ctx.audioWorklet.addModule("/ui/static/voice-worklet.js");
      } catch (err) {
        stream.getTracks().forEach((t) => t.stop());
        ctx.close();
        throw err;
      }
      const node = new AudioWorkletNode(ctx, "macmesh-capture", { numberOfOutputs: 1 });
      node.port.onmessage = (ev) => onBlock(ev.data);
      ctx.createMediaStreamSource(stream).connect(node);
      node.connect(ctx.destination); // it writes silence; connected so it keeps running
      if (ctx.state === "suspended") await ctx.resume();
      mic = { stream, ctx, node, rate: ctx.sampleRate };
      if (left) closeMic();
      else setState("listening", "silence");
      return mic;
    })();
    try {
      return await micStarting;
    } finally {
      micStarting = null;
    }
  }

  function closeMic() {
    if (!mic) return;
    mic.node.port.onmessage = null;
    mic.stream.getTracks().forEach((t) => t.stop());
    mic.ctx.close().catch(() => {});
    mic = null;
  }

  // ---- Voice activity detection over each ~40 ms block from the worklet.
  function onBlock(block) {
    if (!mic) return;
    const ms = (block.length / mic.rate) * 1000;
    let sum = 0;
    for (let i = 0; i < block.length; i++) sum += block[i] * block[i];
    const rms = Math.sqrt(sum / block.length);
    level.value = Math.min(1, Math.sqrt(rms) * 1.5);
    if (recording) recording.blocks.push(block);
    preRoll.push(block);
    let kept = preRoll.reduce((a, b) => a + b.length, 0);
    while (preRoll.length > 1 && kept - preRoll[0].length >= (VAD.preRollMs / 1000) * mic.rate) {
      kept -= preRoll.shift().length;
    }
    const busy = current !== null && !current.finished;
    // Hands-free without barge-in: nothing is heard until the answer is over.
    if (busy && handsFree.checked && !bargeIn.checked && !recording) {
      if (speaking) { speaking = false; setState("answering", "silence"); }
      return;
    }
    const threshold = Math.max(busy ? VAD.bargeInLevel : VAD.minLevel, noise * VAD.overNoise);
    const loud = rms > threshold;
    if (!speaking) {
      // The floor follows quiet levels quickly and loud ones slowly.
      noise = Math.max(0.001, noise + (rms - noise) * (rms < noise ? 0.2 : 0.02));
      // Speech starts when enough of the latest blocks were loud (the gaps between words
      // and the stops inside them are quiet blocks too).
      const need = busy ? VAD.bargeInMs : VAD.startMs;
      recent.push([ms, loud]);
      let span = recent.reduce((a, [m]) => a + m, 0);
      while (recent.length > 1 && span - recent[0][0] >= 2 * need) span -= recent.shift()[0];
      const loudMs = recent.reduce((a, [m, l]) => a + (l ? m : 0), 0);
      if (loud && loudMs >= need) {
        speaking = true;
        quietMs = 0;
        speechMs = span;
        recent.length = 0;
        onSpeechStart();
      }
    } else {
      speechMs += ms;
      quietMs = loud ? 0 : quietMs + ms;
      if (quietMs >= VAD.endMs) {
        speaking = false;
        onSpeechEnd(speechMs - quietMs);
      }
    }
  }

  function onSpeechStart() {
    if (!handsFree.checked) { setState(recording ? "recording: speech" : "speech", "speech"); return; }
    if (current && !current.finished) interrupt("interrupted by speech");
    if (!recording) recording = { blocks: [...preRoll], kind: "vad", started: performance.now() };
    setState("hearing you", "speech");
  }

  function onSpeechEnd(voicedMs) {
    if (!handsFree.checked) {
      setState(recording ? "recording: silence" : "listening", "silence");
      return;
    }
    setState("listening", "silence");
    if (!recording || recording.kind !== "vad") return;
    const rec = recording;
    recording = null;
    if (voicedMs < VAD.minSpeechMs) return;
    runTurn(rec.blocks);
  }

  // ---- Push-to-talk: hold (released after HOLD_MS stops), or click to start, click to stop.
  async function pressStart() {
    notice.textContent = "";
    if (recording && recording.kind === "ptt") { pressStop(); return; }
    pressAt = performance.now();
    try {
      await ensureMic();
    } catch (err) {
      notice.textContent = err.message;
      return;
    }
    if (current && !current.finished) interrupt("interrupted");
    recording = { blocks: [], kind: "ptt", started: performance.now() };
    ptt.classList.add("recording");
    ptt.setAttribute("aria-pressed", "true");
    ptt.textContent = "Recording… (release or click to send)";
    setState(speaking ? "recording: speech" : "recording: silence", speaking ? "speech" : "silence");
  }

  function pressStop() {
    if (!recording || recording.kind !== "ptt") return;
    const rec = recording;
    recording = null;
    ptt.classList.remove("recording");
    ptt.setAttribute("aria-pressed", "false");
    ptt.textContent = "Push to talk";
    setState("listening", speaking ? "speech" : "silence");
    if (rec.blocks.length) runTurn(rec.blocks);
  }

  ptt.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0 || ptt.disabled) return;
    pressStart();
  });
  ptt.addEventListener("pointerup", () => {
    if (recording && recording.kind === "ptt" && performance.now() - pressAt > HOLD_MS) pressStop();
  });
  ptt.addEventListener("keydown", (ev) => {
    if ((ev.key === " " || ev.key === "Enter") && !ev.repeat) { ev.preventDefault(); pressStart(); }
  });
  ptt.addEventListener("keyup", (ev) => {
    if ((ev.key === " " || ev.key === "Enter") &&
        recording && recording.kind === "ptt" && performance.now() - pressAt > HOLD_MS) pressStop();
  });

  handsFree.addEventListener("change", async () => {
    notice.textContent = "";
    if (recording && recording.kind === "ptt") pressStop();
    ptt.disabled = handsFree.checked;
    if (!handsFree.checked) {
      if (recording) recording = null;
      setState(mic ? "listening (push to talk)" : "microphone off", mic ? undefined : "off");
      return;
    }
    try {
      await ensureMic();
      setState("hands-free: speak any time", speaking ? "speech" : "silence");
    } catch (err) {
      notice.textContent = err.message;
      handsFree.checked = false;
      ptt.disabled = false;
    }
  });

  // ---- One turn: transcribe, answer (streamed), speak sentence by sentence.
  function newTurn() {
    const transcript = el("div", { class: "voice-transcript" }, "transcribing…");
    const answer = el("div", { class: "voice-answer" });
    const audios = el("div", { class: "voice-audios" });
    const stats = el("div", { class: "voice-stats muted" });
    const error = el("div", { class: "error", role: "alert" });
    const box = el("article", { class: "voice-turn busy" },
      el("div", { class: "role muted" }, "you"), transcript,
      el("div", { class: "role muted" }, "answer"), answer, audios, stats, error);
    log.append(box);
    box.scrollIntoView({ block: "end" });
    return { box, transcript, answer, audios, stats, error, controller: new AbortController(),
      finished: false, interrupted: "", playing: null, urls: [], said: "", t: {} };
  }

  function interrupt(why) {
    const turn = current;
    if (!turn || turn.finished) return;
    turn.interrupted = why;
    turn.controller.abort();
    if (turn.playing) { turn.playing.audio.pause(); turn.playing.done(); }
  }

  function showStats(turn) {
    const t = turn.t;
    const bits = [];
    if (t.speech !== undefined) bits.push(`speech ${secs(t.speech)}`);
    if (t.stt !== undefined) bits.push(`STT ${secs(t.stt)}`);
    if (t.ttft !== undefined) bits.push(`TTFT ${secs(t.ttft)}`);
    if (t.firstAudio !== undefined) bits.push(`first audio ${secs(t.firstAudio)}`);
    if (turn.node) bits.push(`node ${turn.node}`);
    if (turn.tokens) bits.push(`${turn.tokens} tokens`);
    if (turn.sentences) bits.push(`spoken ${turn.played || 0} of ${turn.sentences} sentences`);
    if (turn.interrupted) bits.push(turn.interrupted);
    turn.stats.textContent = bits.join(" · ");
  }

  async function failed(resp) {
    if (resp.status === 401) askForKey();
    const msg = await errorMessage(resp);
    const hint = (resp.status === 404 || resp.status === 503) && !/install/i.test(msg);
    return new ApiError(hint ? `${msg} ${SPEECH_HINT}` : msg, { status: resp.status });
  }

  async function transcribe(turn, wav) {
    const form = new FormData();
    form.append("file", wav, "speech.wav");
    form.append("model", sttSel.value);
    form.append("response_format", "json");
    const resp = await fetch("/v1/audio/transcriptions", {
      method: "POST", headers: headers(), body: form, signal: turn.controller.signal,
    });
    if (!resp.ok) throw await failed(resp);
    const body = await resp.json();
    return String(body.text || "").trim();
  }

  async function synthesize(turn, text) {
    const body = { model: ttsSel.value, input: text, response_format: "wav" };
    if (voiceIn.value.trim()) body.voice = voiceIn.value.trim();
    const sp = parseFloat(speed.value);
    if (sp > 0 && sp !== 1) body.speed = sp;
    const resp = await fetch("/v1/audio/speech", {
      method: "POST", signal: turn.controller.signal,
      headers: headers({ "content-type": "application/json" }), body: JSON.stringify(body),
    });
    if (!resp.ok) throw await failed(resp);
    return resp.blob();
  }

  // Plays one sentence's audio to its end (or until interrupted); the element stays.
  function play(turn, blob, started) {
    return new Promise((resolve) => {
      started();
      if (turn.interrupted || left) { resolve(); return; }
      const url = URL.createObjectURL(blob);
      turn.urls.push(url);
      const audio = el("audio", { class: "voice-audio", controls: true, preload: "auto" });
      audio.src = url;
      turn.audios.append(audio);
      const done = () => { if (turn.playing && turn.playing.audio === audio) turn.playing = null; resolve(); };
      turn.playing = { audio, done };
      audio.addEventListener("ended", done);
      audio.addEventListener("error", () => {
        turn.error.textContent = "the browser could not play the speech audio";
        done();
      });
      audio.addEventListener("playing", () => {
        if (turn.t.firstAudio === undefined) turn.t.firstAudio = performance.now() - turn.t0;
        turn.played = (turn.played || 0) + 1;
        showStats(turn);
      }, { once: true });
      audio.play().catch((err) => {
        if (err.name === "AbortError") return; // paused by an interruption
        turn.error.textContent = `playback blocked (${err.message}): press play on the audio`;
        done();
      });
    });
  }

  async function runTurn(blocks) {
    const rate = mic ? mic.rate : 48000;
    const turn = newTurn();
    current = turn;
    stopBtn.disabled = false;
    turn.t0 = performance.now(); // the end of speech: every time below counts from here
    turn.t.speech = (blocks.reduce((a, b) => a + b.length, 0) / rate) * 1000;
    showStats(turn);
    const { signal } = turn.controller;
    // Speech is fetched in order, one sentence ahead of playback: sentence k+1 once sentence
    // k is fetched and has started to play.
    let fetching = Promise.resolve();
    let prevStarted = Promise.resolve();
    let playing = Promise.resolve();
    const speak = (sentence) => {
      const text = speakable(sentence);
      if (!/[\p{L}\p{N}]/u.test(text)) return;
      turn.sentences = (turn.sentences || 0) + 1;
      let started;
      const startedP = new Promise((resolve) => { started = resolve; });
      const audio = Promise.all([fetching, prevStarted]).then(() => synthesize(turn, text));
      fetching = audio.catch(() => {});
      prevStarted = startedP;
      playing = playing.then(() => audio).then((blob) => play(turn, blob, started))
        .catch((err) => {
          if (err.name !== "AbortError" && !turn.interrupted) turn.error.textContent = err.message;
        })
        .finally(started);
    };
    try {
      if (!sttSel.value) throw new ApiError(`No speech-to-text model in the mesh. ${SPEECH_HINT}`);
      if (!chatSel.value) throw new ApiError("No chat model in the mesh.");
      const wav = encodeWav(resample(concat(blocks), rate, TARGET_RATE), TARGET_RATE);
      const text = await transcribe(turn, wav);
      turn.t.stt = performance.now() - turn.t0;
      turn.transcript.textContent = text || "(nothing recognised)";
      showStats(turn);
      if (!text) return;
      convo.push({ role: "user", content: text });
      await answer(turn, speak, signal);
      await playing;
    } catch (err) {
      if (err.name !== "AbortError") turn.error.textContent = err.message;
      if (turn.transcript.textContent === "transcribing…") turn.transcript.textContent = "–";
    } finally {
      turn.finished = true;
      turn.box.classList.remove("busy");
      turn.box.classList.add(turn.interrupted ? "interrupted"
        : turn.error.textContent ? "failed" : "done");
      showStats(turn);
      if (current === turn) { current = null; stopBtn.disabled = true; }
    }
  }

  // Streams the chat answer: shown as it comes, each finished sentence handed to `speak`.
  async function answer(turn, speak, signal) {
    const messages = system.value.trim()
      ? [{ role: "system", content: system.value.trim() }, ...convo] : [...convo];
    const body = { model: chatSel.value, messages, stream: true,
      stream_options: { include_usage: true } };
    const limit = parseInt(maxTokens.value, 10);
    if (limit > 0) body.max_tokens = limit;
    const tSent = performance.now();
    let reasoning = "";
    let content = "";
    let spokenTo = 0; // how much of the answer text went to the sentence splitter
    let pending = "";
    const feed = (final) => {
      const said = splitThinking(reasoning, content).answer;
      // Hold back a possibly unfinished "<think>" tag.
      const lt = said.lastIndexOf("<");
      const upTo = !final && lt >= 0 && lt > said.length - 8 ? lt : said.length;
      if (upTo > spokenTo) { pending += said.slice(spokenTo, upTo); spokenTo = upTo; }
      const [sentences, rest] = takeSentences(pending, final);
      pending = rest;
      sentences.forEach(speak);
      turn.said = said;
    };
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", signal,
        headers: headers({ "content-type": "application/json" }), body: JSON.stringify(body),
      });
      turn.node = resp.headers.get("x-macmesh-node") || "";
      if (resp.status === 401) askForKey();
      if (!resp.ok || !resp.body) throw new ApiError(await errorMessage(resp));
      await readEvents(resp, (data) => {
        if (data === "[DONE]") return true;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.message || JSON.stringify(obj.error));
        if (obj.usage) turn.tokens = obj.usage.completion_tokens;
        for (const choice of obj.choices || []) {
          const d = choice.delta || {};
          if (d.reasoning_content || d.content) {
            reasoning += d.reasoning_content || "";
            content += d.content || "";
            if (turn.t.ttft === undefined && d.content) {
              turn.t.ttft = performance.now() - tSent;
              showStats(turn);
            }
            feed(false);
            turn.answer.replaceChildren(renderMarkdown(turn.said));
          }
        }
        return false;
      });
      feed(true);
    } finally {
      turn.answer.replaceChildren(renderMarkdown(turn.said));
      // What was said stays in the history (cut short when interrupted).
      if (turn.said) convo.push({ role: "assistant", content: turn.said });
      else convo.pop();
    }
  }

  stopBtn.addEventListener("click", () => interrupt("stopped"));
  clearBtn.addEventListener("click", () => {
    interrupt("stopped");
    convo.length = 0;
    for (const box of log.querySelectorAll("audio")) URL.revokeObjectURL(box.src);
    log.replaceChildren();
  });
  ttsSel.addEventListener("change", fillVoices);

  loadModels();
  return () => {
    left = true;
    interrupt("left the page");
    recording = null;
    closeMic();
    for (const a of log.querySelectorAll("audio")) URL.revokeObjectURL(a.src);
  };
}
