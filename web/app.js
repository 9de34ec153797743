// The macmesh web UI: routes between pages, talks to the admin API (/api/*), renders with
// DOM APIs only. Every name and model output goes in as text (textContent), never as HTML.

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
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const chunk = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = chunk.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) onData(JSON.parse(data));
        }
      }
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

// ---- Routing between pages (history API; the server serves index.html for /ui/*).
const PAGES = {
  mesh: meshPage,
  models: modelsPage,
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
