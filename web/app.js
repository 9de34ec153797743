// The macmesh web UI: routes between pages, talks to the admin API (/api/*), renders with
// DOM APIs only. Every name and model output goes in as text (textContent), never as HTML.

import { renderMarkdown, splitThinking } from "./markdown.js";

// Re-exported for tests that render in the page.
export { renderMarkdown };

const KEY = "macmesh.apiKey";
const main = document.getElementById("main");
const conn = document.getElementById("conn");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key-input");

// ---- DOM helpers: strings always become text nodes.
function el(tag, attrs = {}, ...children) {
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

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const num = (n, d = 1) => (n === null || n === undefined ? "–" : Number(n).toFixed(d));

// ---- API access: the key travels in x-api-key; a 401 asks for one.
class ApiError extends Error {}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, "x-api-key": key } : extra;
}

function askForKey() {
  keyForm.hidden = false;
  keyInput.focus();
}

keyForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, keyInput.value.trim());
  keyInput.value = "";
  keyForm.hidden = true;
  route();
});

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: fall back to the status line */ }
  return `${resp.status} ${resp.statusText}`;
}

async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: headers(body ? { "content-type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  if (resp.status === 401) askForKey();
  if (!resp.ok) throw new ApiError(await errorMessage(resp));
  return resp.json();
}

// ---- Server-sent events over fetch (EventSource cannot send the key header).
// Calls onEvent with each event's `data` text; it ends when the body does or onEvent
// returns true.
async function readEvents(resp, onEvent) {
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
function subscribe(path, onData) {
  let stopped = false;
  let controller = null;
  let delay = 1000;
  let timer = null;

  async function connect() {
    controller = new AbortController();
    try {
      const resp = await fetch(path, { headers: headers(), signal: controller.signal });
      if (resp.status === 401) { askForKey(); setConn("API key needed", true); return; }
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

function setConn(text, lost) {
  conn.textContent = text;
  conn.classList.toggle("lost", lost);
}

// ---- Mesh page: one card per node, redrawn on every event.
function nodeCard(n) {
  // A node that stopped reported "draining" last; gone is what matters now.
  const status = !n.online && n.status === "draining" ? "offline" : n.status;
  const mem = n.memory;
  const used = mem ? mem.used_bytes : null;
  const pct = mem && mem.total_bytes ? Math.min(100, (100 * used) / mem.total_bytes) : 0;
  const models = n.models || [];
  const loaded = models.filter((m) => m.loaded).map((m) => m.id);
  const onDisk = models.filter((m) => !m.loaded).map((m) => m.id);
  const load = n.load || [];
  const sum = (k) => load.reduce((a, x) => a + (x[k] || 0), 0);
  const cacheBlocks = (n.cache || []).reduce((a, c) => a + c.blocks, 0);
  const bar = el("div", { class: "bar", title: `${num(pct, 0)}% used` }, el("span"));
  bar.firstChild.style.width = `${pct}%`;
  return el("article", { class: `card ${n.online ? "online" : "offline"}`, "data-node": n.id },
    el("h3", {}, n.id, " ", el("span", { class: `badge ${status}` }, status)),
    el("div", { class: "muted" }, n.address, n.version ? ` · v${n.version}` : ""),
    n.error ? el("div", { class: "error" }, n.error) : null,
    mem ? [el("div", { class: "muted" }, `memory ${bytes(used)} / ${bytes(mem.total_bytes)}`), bar] : null,
    el("dl", {},
      el("dt", {}, "loaded"), el("dd", { class: "models-loaded" }, loaded.join(", ") || "–"),
      el("dt", {}, "on disk"), el("dd", { class: "models-disk" }, onDisk.join(", ") || "–"),
      el("dt", {}, "running / waiting"), el("dd", {}, `${n.running ?? "–"} / ${n.waiting ?? "–"}`),
      el("dt", {}, "prefill tok/s"), el("dd", {}, num(sum("prefill_tokens_per_second"))),
      el("dt", {}, "decode tok/s"), el("dd", {}, num(sum("decode_tokens_per_second"))),
      el("dt", {}, "cache blocks"), el("dd", {}, `${cacheBlocks} (indexed ${n.indexed_blocks})`),
      el("dt", {}, "last seen"),
      el("dd", {}, n.last_seen_seconds === null ? "never" : `${num(n.last_seen_seconds)} s ago`)));
}

function meshPage() {
  const cards = el("div", { class: "cards", id: "nodes" }, el("p", { class: "muted" }, "loading…"));
  main.replaceChildren(el("h2", {}, "Mesh"), cards);
  const draw = (body) => {
    const nodes = body.nodes || [];
    cards.replaceChildren(...(nodes.length ? nodes.map(nodeCard)
      : [el("p", { class: "muted" }, "no nodes yet")]));
  };
  api("/api/nodes").then(draw).catch((err) => setConn(err.message, true));
  return subscribe("/api/events", draw);
}

// ---- Models page: the mesh-wide table with Load / Unload per node.
function modelsPage() {
  const errors = el("div", { class: "error", role: "alert", id: "model-error" });
  const body = el("tbody");
  const table = el("table", { id: "models" },
    el("thead", {}, el("tr", {}, ...["model", "node", "state", "backend", "size", "est. memory",
      "idle", "ttl", "pin", ""].map((h) => el("th", {}, h)))), body);
  main.replaceChildren(el("h2", {}, "Models"), errors, table);

  async function act(verb, model, node, button) {
    button.disabled = true;
    errors.textContent = "";
    try {
      await api(`/api/models/${verb}`, { method: "POST", body: { model, node } });
    } catch (err) {
      errors.textContent = `${verb} ${model} on ${node}: ${err.message}`;
    }
    await refresh();
  }

  async function refresh() {
    let data;
    try {
      data = await api("/api/models");
    } catch (err) {
      errors.textContent = err.message;
      return;
    }
    const rows = [];
    for (const m of data.models) {
      for (const n of m.nodes) {
        const verb = n.loaded ? "unload" : "load";
        const button = el("button", { type: "button", "data-action": verb },
          n.loaded ? "Unload" : "Load");
        button.addEventListener("click", () => act(verb, m.id, n.id, button));
        rows.push(el("tr", { "data-model": m.id, "data-node": n.id },
          el("td", {}, m.id), el("td", {}, n.id),
          el("td", { class: n.loaded ? "state loaded" : "state" }, n.loaded ? "loaded" : "on disk"),
          el("td", {}, m.backend), el("td", {}, bytes(m.size_bytes)),
          el("td", {}, bytes(m.estimated_bytes)),
          el("td", {}, n.idle_seconds === null ? "–" : `${num(n.idle_seconds, 0)} s`),
          el("td", {}, m.ttl === null || m.ttl === undefined ? "–" : `${m.ttl} s`),
          el("td", {}, m.pin ? "yes" : "–"),
          el("td", {}, button)));
      }
    }
    body.replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: 10, class: "muted" }, "no models in the mesh"))]));
  }
  refresh();
  const timer = setInterval(refresh, 5000);
  return () => clearInterval(timer);
}

// ---- Chat page: a playground over the coordinator's own OpenAI API (streamed).
function chatPage() {
  const convo = []; // {role, content}: the conversation, sent with every turn
  const select = el("select", { id: "chat-model" });
  const resolved = el("span", { class: "muted", id: "chat-resolve" });
  const system = el("textarea", { id: "chat-system", rows: 2,
    placeholder: "System prompt (optional)" });
  const maxTokens = el("input", { id: "chat-max-tokens", type: "number", min: 1, value: 512,
    title: "max_tokens" });
  const input = el("textarea", { id: "chat-input", rows: 3, placeholder: "Message" });
  const send = el("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = el("button", { type: "button", id: "chat-stop", disabled: true }, "Stop");
  const clear = el("button", { type: "button", id: "chat-clear" }, "Clear");
  const log = el("div", { id: "chat-log", class: "chat-log" });
  const pickError = el("div", { class: "error", role: "alert" });
  const form = el("form", { class: "chat-form", id: "chat-form" }, input,
    el("div", { class: "chat-actions" }, send, stop, clear,
      el("label", { class: "muted" }, "max tokens ", maxTokens)));
  main.replaceChildren(el("h2", {}, "Chat"),
    el("div", { class: "chat-pick" }, el("label", { for: "chat-model" }, "Model "), select,
      resolved),
    pickError, system, log, form);
  let controller = null;
  let left = false;

  async function loadModels() {
    let models;
    let routing = {};
    try {
      models = await api("/api/models");
    } catch (err) {
      pickError.textContent = err.message;
      return;
    }
    try { routing = await api("/api/routing/config"); } catch (_) { /* tiers are optional */ }
    const groups = [];
    const served = models.models.map((m) => m.id);
    if (served.length) {
      groups.push(el("optgroup", { label: "Models" },
        served.map((id) => el("option", { value: id }, id))));
    }
    const aliases = Object.entries(models.aliases || {});
    if (aliases.length) {
      groups.push(el("optgroup", { label: "Aliases" }, aliases.map(([name, target]) => {
        const t = typeof target === "string" ? target : (target && target.model) || "";
        return el("option", { value: name }, t ? `${name} → ${t}` : name);
      })));
    }
    const tiers = Object.entries(routing.tiers || {}).map(([tier, target]) =>
      [tier, typeof target === "string" ? target : (target && target.model) || ""])
      .filter(([, t]) => t);
    if (tiers.length) {
      groups.push(el("optgroup", { label: "Claude tiers" }, tiers.map(([tier, t]) =>
        el("option", { value: `claude-${tier}` }, `claude ${tier} → ${t}`))));
    }
    const keep = select.value;
    select.replaceChildren(...groups);
    if (!groups.length) select.append(el("option", { value: "" }, "no models in the mesh"));
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
    showResolve();
  }

  async function showResolve() {
    const name = select.value;
    resolved.textContent = "";
    if (!name) return;
    try {
      const r = await api(`/api/routing/resolve/${encodeURIComponent(name)}`);
      if (select.value !== name) return;
      const nodes = (r.nodes || []).join(", ") || "no node";
      resolved.textContent = r.resolved === name ? `on ${nodes}` : `→ ${r.resolved} on ${nodes}`;
    } catch (err) {
      if (select.value === name) resolved.textContent = err.message;
    }
  }
  select.addEventListener("change", showResolve);

  function turn(role, text) {
    const body = el("div", { class: "body" });
    const box = el("div", { class: `msg ${role}` }, el("div", { class: "role muted" }, role), body);
    if (role === "user") body.textContent = text;
    log.append(box);
    box.scrollIntoView({ block: "end" });
    return box;
  }

  async function ask(ev) {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller || !select.value) return;
    input.value = "";
    turn("user", text);
    convo.push({ role: "user", content: text });
    const box = turn("assistant", "");
    box.classList.add("streaming");
    const thinkBody = el("div", { class: "thinking-body" });
    const think = el("details", { class: "thinking", hidden: true },
      el("summary", {}, "thinking"), thinkBody);
    const answer = el("div", { class: "answer" });
    const meta = el("div", { class: "meta muted" });
    const error = el("div", { class: "error", role: "alert" });
    box.querySelector(".body").append(think, answer, meta, error);

    const messages = system.value.trim()
      ? [{ role: "system", content: system.value.trim() }, ...convo] : [...convo];
    const body = { model: select.value, messages, stream: true,
      stream_options: { include_usage: true } };
    const limit = parseInt(maxTokens.value, 10);
    if (limit > 0) body.max_tokens = limit;

    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    let reasoning = "";
    let content = "";
    let usage = null;
    let chunks = 0;
    let node = "";
    let reason = "";
    let tFirst = null;
    let tLast = null;
    let finish = "";
    let drawn = false;
    const t0 = performance.now();
    const draw = () => {
      drawn = false;
      const parts = splitThinking(reasoning, content);
      think.hidden = !parts.thinking;
      thinkBody.textContent = parts.thinking;
      answer.replaceChildren(renderMarkdown(parts.answer));
    };
    const info = (stopped) => {
      const bits = [];
      if (node) bits.push(`node ${node}`);
      if (reason) bits.push(`route ${reason}`);
      if (usage) {
        const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
        bits.push(`prompt ${usage.prompt_tokens} tokens (${cached ?? 0} cached)`);
        bits.push(`completion ${usage.completion_tokens} tokens`);
      }
      if (tFirst !== null) bits.push(`TTFT ${num((tFirst - t0) / 1000, 2)} s`);
      const produced = usage ? usage.completion_tokens : chunks;
      if (tFirst !== null && tLast > tFirst && produced > 1) {
        bits.push(`${num((produced - 1) / ((tLast - tFirst) / 1000))} tok/s`);
      }
      if (finish && finish !== "stop") bits.push(`finish ${finish}`);
      if (stopped) bits.push("stopped");
      meta.textContent = bits.join(" · ");
    };
    let stopped = false;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", signal: controller.signal,
        headers: headers({ "content-type": "application/json" }), body: JSON.stringify(body),
      });
      node = resp.headers.get("x-macmesh-node") || "";
      reason = resp.headers.get("x-macmesh-route-reason") || "";
      if (resp.status === 401) askForKey();
      if (!resp.ok || !resp.body) throw new ApiError(await errorMessage(resp));
      info(false);
      await readEvents(resp, (data) => {
        if (data === "[DONE]") return true;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(obj.error.message || JSON.stringify(obj.error));
        if (obj.usage) usage = obj.usage;
        for (const choice of obj.choices || []) {
          const d = choice.delta || {};
          if (d.reasoning_content || d.content) {
            reasoning += d.reasoning_content || "";
            content += d.content || "";
            chunks++;
            tLast = performance.now();
            if (tFirst === null) tFirst = tLast;
            if (!drawn) { drawn = true; requestAnimationFrame(draw); }
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        info(false);
        return false;
      });
    } catch (err) {
      if (err.name === "AbortError") stopped = true;
      else error.textContent = err.message;
    }
    draw();
    info(stopped);
    box.classList.remove("streaming");
    box.classList.add(stopped ? "stopped" : error.textContent ? "failed" : "done");
    const said = splitThinking("", content).answer;
    if (error.textContent && !said) convo.pop(); // keep the history sendable
    else convo.push({ role: "assistant", content: said });
    controller = null;
    if (!left) { send.disabled = false; stop.disabled = true; }
  }

  form.addEventListener("submit", ask);
  input.addEventListener("keydown", (ev) => {
    if (ev.key !== "Enter" || ev.shiftKey || ev.isComposing) return;
    ev.preventDefault();
    form.requestSubmit();
  });
  stop.addEventListener("click", () => { if (controller) controller.abort(); });
  clear.addEventListener("click", () => {
    if (controller) controller.abort();
    convo.length = 0;
    log.replaceChildren();
  });
  loadModels();
  return () => { left = true; if (controller) controller.abort(); };
}

// ---- Routing between pages (history API; the server serves index.html for /ui/*).
const PAGES = {
  mesh: meshPage,
  models: modelsPage,
  chat: chatPage,
};
let leave = () => {};

function route() {
  const name = location.pathname.replace(/^\/(ui\/?)?/, "").split("/")[0] || "mesh";
  const page = PAGES[name] ? name : "mesh";
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.page === page);
  }
  leave();
  setConn("", false);
  leave = PAGES[page]();
}

document.querySelector("nav").addEventListener("click", (ev) => {
  const a = ev.target.closest("a[data-page]");
  if (!a || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
  ev.preventDefault();
  history.pushState(null, "", a.getAttribute("href"));
  route();
});
window.addEventListener("popstate", route);
route();
