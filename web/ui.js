// Shared by every page: DOM building (text only, never HTML), the API client with the key,
// and server-sent events with reconnect. Pages import from here; nothing here knows a page.

export const KEY = "macmesh.apiKey";
export const main = document.getElementById("main");
const conn = document.getElementById("conn");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key-input");

// ---- DOM helpers: strings always become text nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

// GET /api/models and the routing config, for the pages' model pickers; the config's
// Claude tiers are optional ({} when it cannot be read). Throws when the models can't.
export async function modelsAndRouting() {
  const models = await api("/api/models");
  let routing = {};
  try { routing = await api("/api/routing/config"); } catch (_) { /* tiers are optional */ }
  return { models, routing };
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
export const num = (n, d = 1) => (n === null || n === undefined ? "–" : Number(n).toFixed(d));

// ---- API access: the key travels in x-api-key; a 401 asks for one.
// `param` is the field the API's error envelope names (null when none), `status` the HTTP status.
export class ApiError extends Error {
  constructor(message, { param = null, status = null } = {}) {
    super(message);
    this.param = param;
    this.status = status;
  }
}

export function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, "x-api-key": key } : extra;
}

export function askForKey() {
  keyForm.hidden = false;
  keyInput.focus();
}


// The error envelope's message and param (`{"error": {"message", "param", ...}}`).
async function errorInfo(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) {
      return { message: body.error.message, param: body.error.param || null };
    }
  } catch (_) { /* not JSON: fall back to the status line */ }
  return { message: `${resp.status} ${resp.statusText}`, param: null };
}

export async function errorMessage(resp) {
  return (await errorInfo(resp)).message;
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers(body ? { "content-type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  if (resp.status === 401) askForKey();
  if (!resp.ok) {
    const { message, param } = await errorInfo(resp);
    throw new ApiError(message, { param, status: resp.status });
  }
  return resp.json();
}

// ---- Server-sent events over fetch (EventSource cannot send the key header).
// Calls onEvent with each event's `data` text; it ends when the body does or onEvent
// returns true.
export async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onEvent(data)) { reader.cancel().catch(() => {}); return; }
    }
  }
}

// Reconnects with backoff and says so in the header; `stop()` ends it for good.
export function subscribe(path, onData) {
  let stopped = false;
  let controller = null;
  let delay = 1000;
  let timer = null;

  async function connect() {
    controller = new AbortController();
    try {
      const resp = await fetch(path, { headers: headers(), signal: controller.signal });
      if (resp.status === 401) { askForKey(); setConn("API key needed", true); return; }
      // A key whose role is not admin (docs/security.md), or the loopback guard: say why.
      if (resp.status === 403) { askForKey(); setConn(await errorMessage(resp), true); return; }
      if (!resp.ok || !resp.body) throw new ApiError(await errorMessage(resp));
      setConn("live", false);
      delay = 1000;
      await readEvents(resp, (data) => { onData(JSON.parse(data)); });
      throw new ApiError("stream ended");
    } catch (err) {
      if (stopped) return;
      const secs = Math.round(delay / 1000);
      setConn(`connection lost (${err.message}); reconnecting in ${secs} s`, true);
      timer = setTimeout(connect, delay);
      delay = Math.min(delay * 2, 15000);
    }
  }
  connect();
  return () => { stopped = true; clearTimeout(timer); if (controller) controller.abort(); };
}

export function setConn(text, lost) {
  conn.textContent = text;
  conn.classList.toggle("lost", lost);
}


// The key form: app.js decides what happens once a key is entered.
export function onKeyEntered(callback) {
  keyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, keyInput.value.trim());
    keyInput.value = "";
    keyForm.hidden = true;
    callback();
  });
}

// The chat-model picker's groups, shared by the Chat and Voice pages: served chat models
// (voice models, kind stt / tts, are left out), aliases with their targets, and the Claude
// tiers that have a model (sent as `claude-<tier>`). `models`: GET /api/models; `routing`:
// GET /api/routing/config (or {}).
export function chatModelGroups(models, routing) {
  const groups = [];
  const served = (models.models || []).filter((m) => !m.kind || m.kind === "chat").map((m) => m.id);
  if (served.length) {
    groups.push(el("optgroup", { label: "Models" },
      served.map((id) => el("option", { value: id }, id))));
  }
  const target = (t) => (typeof t === "string" ? t : (t && t.model) || "");
  const aliases = Object.entries(models.aliases || {});
  if (aliases.length) {
    groups.push(el("optgroup", { label: "Aliases" }, aliases.map(([name, t]) =>
      el("option", { value: name }, target(t) ? `${name} → ${target(t)}` : name))));
  }
  const tiers = Object.entries(routing.tiers || {}).map(([tier, t]) => [tier, target(t)])
    .filter(([, t]) => t);
  if (tiers.length) {
    groups.push(el("optgroup", { label: "Claude tiers" }, tiers.map(([tier, t]) =>
      el("option", { value: `claude-${tier}` }, `claude ${tier} → ${t}`))));
  }
  return groups;
}
