// The Requests page: the coordinator's log of recent requests, live over
// /api/requests/events (SSE), filtered in the page. The coordinator keeps a bounded ring
// (--request-log-size); the page keeps at most KEEP rows.

import { el, main, num, subscribe } from "./ui.js";

const KEEP = 1000;
const BACKLOG = 300;

function clock(t) {
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false });
}

function secs(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function row(r) {
  const name = !r.model || r.model === r.requested ? (r.requested ?? "–")
    : `${r.requested} → ${r.model}`;
  return el("tr", { class: r.ok ? "ok" : "failed", "data-seq": r.seq, "data-id": r.id },
    el("td", { title: new Date(r.time * 1000).toISOString() }, clock(r.time)),
    el("td", {}, r.api, r.key ? el("div", { class: "muted req-key" }, r.key) : null),
    el("td", { class: "req-model" }, name, r.rule ? el("div", { class: "muted" }, r.rule) : null),
    el("td", { class: "req-node" }, r.node ?? "–"),
    el("td", { title: r.placement || "" }, r.route_reason ?? "–"),
    el("td", { class: "num" }, `${r.prompt_tokens} / ${r.cached_tokens}`),
    el("td", { class: "num" }, String(r.completion_tokens)),
    el("td", { class: "num" }, secs(r.ttft_seconds)),
    el("td", { class: "num" }, num(r.tokens_per_second)),
    el("td", { class: "num" }, secs(r.duration_seconds)),
    el("td", { class: "req-outcome" }, r.outcome || "–", r.ok ? "" : ` (${r.status})`));
}

export default function requestsPage() {
  const records = []; // oldest first, at most KEEP
  let maxSeq = 0;
  let paused = false;
  const field = (id, label, attrs = {}) => el("input", { id, type: "search", placeholder: label,
    "aria-label": label, ...attrs });
  const fModel = field("req-f-model", "model");
  const fNode = field("req-f-node", "node");
  const fText = field("req-f-text", "text anywhere");
  const fApi = el("select", { id: "req-f-api", "aria-label": "API" },
    el("option", { value: "" }, "any API"), el("option", { value: "openai" }, "OpenAI"),
    el("option", { value: "anthropic" }, "Anthropic"));
  const fOutcome = el("select", { id: "req-f-outcome", "aria-label": "outcome" },
    el("option", { value: "" }, "any outcome"), el("option", { value: "ok" }, "answered"),
    el("option", { value: "failed" }, "failed / refused / cancelled"));
  const pause = el("button", { type: "button", id: "req-pause" }, "Pause");
  const count = el("span", { class: "muted", id: "req-count" });
  const body = el("tbody");
  const table = el("table", { id: "requests", class: "requests" },
    el("thead", {}, el("tr", {}, ...["time", "API / key", "requested → model", "node", "route",
      "prompt / cached", "out", "TTFT", "tok/s", "total", "outcome"]
      .map((h) => el("th", {}, h)))), body);
  main.replaceChildren(el("h2", {}, "Requests"),
    el("div", { class: "panel-row filters" }, fModel, fNode, fApi, fOutcome, fText, pause, count),
    table);

  function matches(r) {
    const has = (v, want) => String(v ?? "").toLowerCase().includes(want);
    const m = fModel.value.trim().toLowerCase();
    if (m && !has(r.requested, m) && !has(r.model, m)) return false;
    const n = fNode.value.trim().toLowerCase();
    if (n && !has(r.node, n)) return false;
    if (fApi.value && r.api !== fApi.value) return false;
    if (fOutcome.value === "ok" && !r.ok) return false;
    if (fOutcome.value === "failed" && r.ok) return false;
    const t = fText.value.trim().toLowerCase();
    if (t && ![r.id, r.requested, r.model, r.rule, r.node, r.route_reason, r.outcome, r.key]
      .some((v) => has(v, t))) return false;
    return true;
  }

  function draw() {
    const shown = records.filter(matches).reverse(); // newest first
    body.replaceChildren(...(shown.length ? shown.map(row)
      : [el("tr", {}, el("td", { colspan: 11, class: "muted" },
        records.length ? "no request matches the filters" : "no requests yet"))]));
    count.textContent = `${shown.length} shown of ${records.length}${paused ? " · paused" : ""}`;
  }

  function add(data) {
    if (data.last_seq < maxSeq) { records.length = 0; maxSeq = 0; } // coordinator restarted
    for (const r of data.requests || []) {
      if (r.seq <= maxSeq) continue; // a reconnect's backlog repeats what we have
      records.push(r);
      maxSeq = r.seq;
    }
    if (records.length > KEEP) records.splice(0, records.length - KEEP);
    if (!paused) draw();
  }

  for (const input of [fModel, fNode, fText]) input.addEventListener("input", draw);
  for (const select of [fApi, fOutcome]) select.addEventListener("change", draw);
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    draw();
  });
  draw();
  return subscribe(`/api/requests/events?limit=${BACKLOG}`, add);
}
