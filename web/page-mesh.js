// The Mesh page: one card per node and per node group, live over /api/events (SSE; no polling).

import { api, bytes, el, main, num, setConn, subscribe } from "./ui.js";

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

// ---- Node groups (docs/groups.md): one model over several nodes, each rank's state.
function groupCard(g) {
  const state = g.state === "up" ? "online" : g.state === "forming" ? "settling" : "offline";
  return el("article", { class: `card ${g.state === "up" ? "online" : "offline"}`, "data-group": g.name },
    el("h3", {}, g.name, " ", el("span", { class: `badge ${state}` }, g.state)),
    el("div", { class: "muted" },
      `${g.model} · ${g.strategy} / ${g.backend} · ${bytes(g.memory_bytes_per_member)} per member`),
    g.detail ? el("div", { class: "error" }, g.detail) : null,
    el("dl", {}, ...g.ranks.flatMap((r) => [
      el("dt", {}, `rank ${r.rank}`),
      el("dd", { class: "group-rank" },
        `${r.node}${r.online ? "" : " (offline)"} · ${r.state} · ${r.host}`,
        r.rank === 0 ? " · serves it" : ""),
    ])));
}

export default function meshPage() {
  const cards = el("div", { class: "cards", id: "nodes" }, el("p", { class: "muted" }, "loading…"));
  const groups = el("div", { class: "cards", id: "groups" });
  const groupsHead = el("h2", { hidden: "" }, "Node groups");
  main.replaceChildren(el("h2", {}, "Mesh"), cards, groupsHead, groups);
  const draw = (body) => {
    const nodes = body.nodes || [];
    cards.replaceChildren(...(nodes.length ? nodes.map(nodeCard)
      : [el("p", { class: "muted" }, "no nodes yet")]));
    const gs = body.groups || [];
    groupsHead.hidden = !gs.length;
    groups.replaceChildren(...gs.map(groupCard));
  };
  api("/api/nodes").then(draw).catch((err) => setConn(err.message, true));
  return subscribe("/api/events", draw);
}
