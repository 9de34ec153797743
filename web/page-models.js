// The Models page: the mesh-wide model x node table and its actions (load, unload, copy,
// delete), pulls from the Hugging Face Hub, Hub search, and every transfer's progress.
// Live from /api/events (no polling): the table is fetched again when an event shows a
// change in the nodes' models or transfers; the transfers list is drawn from the events.

import { api, bytes, el, main, num, setConn, subscribe } from "./ui.js";

const COLUMNS = ["model", "node", "state", "backend", "size", "est. memory", "idle", "ttl",
  "pin", ""];
const DEBOUNCE_MS = 250;

// What changes the table: nodes coming and going, their models, transfers starting/ending.
function signature(nodes) {
  return JSON.stringify(nodes.map((n) => [n.id, n.online,
    (n.models || []).map((m) => [m.id, m.loaded]),
    (n.transfers || []).map((t) => [t.id, t.state])]));
}

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;

export default function modelsPage() {
  let nodes = [];            // the latest /api/events payload's nodes
  let data = { models: [] }; // the latest GET /api/models
  let lastSig = null;
  let timer = null;
  let pullId = null;         // the transfer the pull panel started, followed in its status
  const rows = new Map();    // "model\0node" -> { mode: "copy"|"delete"|null, error, target }
  const rates = new Map();   // transfer id -> { at, done, rate } (bytes/s, smoothed)

  // ---- the table
  const errors = el("div", { class: "error", role: "alert", id: "model-error" });
  const body = el("tbody");
  const table = el("table", { id: "models" },
    el("thead", {}, el("tr", {}, ...COLUMNS.map((h) => el("th", {}, h)))), body);

  // ---- transfers
  const transfers = el("div", { id: "transfers", class: "transfers" },
    el("p", { class: "muted" }, "no transfers"));

  // ---- pull panel
  const pullRepo = el("input", { id: "pull-repo", placeholder: "org/name", required: true,
    autocomplete: "off", spellcheck: "false", size: 32 });
  const fileList = el("datalist", { id: "pull-file-list" });
  const pullFile = el("input", { id: "pull-file", placeholder: "file (GGUF repos)",
    list: "pull-file-list", autocomplete: "off", spellcheck: "false" });
  const pullRev = el("input", { id: "pull-revision", placeholder: "revision (main)",
    autocomplete: "off", spellcheck: "false", size: 12 });
  const pullNode = el("select", { id: "pull-node", "aria-label": "pull onto node" });
  const pullButton = el("button", { type: "submit", id: "pull-start" }, "Pull");
  const pullError = el("div", { class: "error", role: "alert", id: "pull-error" });
  const pullStatus = el("div", { class: "muted", id: "pull-status", "aria-live": "polite" });
  const fileHint = el("div", { class: "muted", id: "pull-files" });
  const pullForm = el("form", { class: "panel-row", id: "pull-form" },
    pullRepo, pullFile, fileList, pullRev, el("label", {}, "onto ", pullNode), pullButton);

  // ---- search
  const searchQ = el("input", { id: "search-q", type: "search", placeholder: "search the Hub",
    autocomplete: "off", spellcheck: "false" });
  const searchKind = el("select", { id: "search-kind", "aria-label": "kind" },
    el("option", { value: "" }, "MLX + GGUF"), el("option", { value: "mlx" }, "MLX"),
    el("option", { value: "gguf" }, "GGUF"));
  const searchButton = el("button", { type: "submit", id: "search-go" }, "Search");
  const searchError = el("div", { class: "error", role: "alert", id: "search-error" });
  const results = el("div", { id: "search-results" });
  const searchForm = el("form", { class: "panel-row", id: "search-form" },
    searchQ, searchKind, searchButton);

  main.replaceChildren(
    el("h2", {}, "Models"), errors, table,
    el("h3", {}, "Transfers"), transfers,
    el("section", { class: "panel", id: "pull-panel" },
      el("h3", {}, "Pull from Hugging Face"), pullForm, fileHint, pullError, pullStatus,
      searchForm, searchError, results));

  // ---- helpers
  const online = () => nodes.filter((n) => n.online);
  const rowState = (key) => {
    if (!rows.has(key)) rows.set(key, { mode: null, error: "", target: "" });
    return rows.get(key);
  };

  async function refresh() {
    try {
      data = await api("/api/models");
      errors.textContent = "";
    } catch (err) {
      errors.textContent = `models: ${err.message}`;
      return;
    }
    drawTable();
  }

  function scheduleRefresh() {
    clearTimeout(timer);
    timer = setTimeout(refresh, DEBOUNCE_MS);
  }

  // Load / unload: the API answers once done.
  async function loadOrUnload(verb, model, node, st) {
    st.error = "";
    st.busy = verb === "load" ? "loading…" : "unloading…";
    drawTable();
    try {
      await api(`/api/models/${verb}`, { method: "POST", body: { model, node } });
    } catch (err) {
      st.error = `${verb}: ${err.message}`;
    }
    st.busy = "";
    await refresh();
  }

  // Copy: 202 once started; its progress shows under Transfers.
  async function copy(model, node, st) {
    st.error = "";
    st.busy = "starting copy…";
    drawTable();
    try {
      await api("/api/models/copy", { method: "POST", body: { model, from: node, to: st.target } });
      st.mode = null;
    } catch (err) {
      st.error = `copy to ${st.target}: ${err.message}`;
    }
    st.busy = "";
    drawTable();
  }

  async function remove(model, node, st) {
    st.error = "";
    st.busy = "deleting…";
    drawTable();
    const path = `/api/models/${encodeURIComponent(model).replace(/%2F/g, "/")}`;
    try {
      await api(`${path}?node=${encodeURIComponent(node)}`, { method: "DELETE" });
      st.mode = null;
    } catch (err) {
      st.error = `delete: ${err.message}`;
    }
    st.busy = "";
    await refresh();
  }

  function button(label, action, onclick, disabled = false, title = undefined) {
    return el("button", { type: "button", "data-action": action, disabled, title, onclick },
      label);
  }

  // The actions cell: buttons, or the copy / delete step that is open, and this row's error.
  function actions(m, n) {
    const st = rowState(`${m.id}\0${n.id}`);
    const has = new Set(m.nodes.map((x) => x.id));
    const targets = online().filter((x) => !has.has(x.id)).map((x) => x.id);
    const cell = el("td", { class: "actions" });
    if (st.busy) {
      cell.append(el("span", { class: "muted busy" }, st.busy));
    } else if (st.mode === "copy") {
      if (!targets.includes(st.target)) st.target = targets[0] || "";
      const pick = el("select", { "data-role": "copy-target", "aria-label": "copy to node",
        onchange: (ev) => { st.target = ev.target.value; } },
      ...targets.map((id) => el("option", { value: id, selected: id === st.target }, id)));
      cell.append(el("span", { class: "row-form" }, "copy to ", pick,
        button("Copy", "copy-confirm", () => copy(m.id, n.id, st), !targets.length),
        button("Cancel", "cancel", () => { st.mode = null; drawTable(); })));
    } else if (st.mode === "delete") {
      cell.append(el("span", { class: "row-form confirm" },
        `Delete ${m.id} from ${n.id}? `,
        button("Delete files", "delete-confirm", () => remove(m.id, n.id, st)),
        button("Cancel", "cancel", () => { st.mode = null; drawTable(); })));
    } else {
      const verb = n.loaded ? "unload" : "load";
      cell.append(el("span", { class: "row-buttons" },
        button(n.loaded ? "Unload" : "Load", verb, () => loadOrUnload(verb, m.id, n.id, st)),
        button("Copy to…", "copy", () => { st.mode = "copy"; st.error = ""; drawTable(); },
          !targets.length, targets.length ? undefined : "every online node has it"),
        button("Delete", "delete", () => { st.mode = "delete"; st.error = ""; drawTable(); })));
    }
    if (st.error) cell.append(el("div", { class: "error row-error", role: "alert" }, st.error));
    return cell;
  }

  function drawTable() {
    const out = [];
    for (const m of data.models) {
      for (const n of m.nodes) {
        out.push(el("tr", { "data-model": m.id, "data-node": n.id },
          el("td", {}, m.id), el("td", {}, n.id),
          el("td", { class: n.loaded ? "state loaded" : "state" }, n.loaded ? "loaded" : "on disk"),
          el("td", {}, m.backend), el("td", {}, bytes(m.size_bytes)),
          el("td", {}, bytes(m.estimated_bytes)),
          el("td", {}, n.idle_seconds === null || n.idle_seconds === undefined ? "–"
            : `${num(n.idle_seconds, 0)} s`),
          el("td", {}, m.ttl === null || m.ttl === undefined ? "–" : `${m.ttl} s`),
          el("td", {}, m.pin ? "yes" : "–"),
          actions(m, n)));
      }
    }
    body.replaceChildren(...(out.length ? out
      : [el("tr", {}, el("td", { colspan: COLUMNS.length, class: "muted" },
        "no models in the mesh"))]));
  }

  // ---- transfers, from the event payload
  function rate(t) {
    const now = performance.now();
    const prev = rates.get(t.id);
    if (t.state !== "running") return prev ? prev.rate : null;
    if (!prev) {
      rates.set(t.id, { at: now, done: t.bytes_done, rate: null });
      return null;
    }
    if (t.bytes_done > prev.done && now > prev.at) {
      const instant = ((t.bytes_done - prev.done) * 1000) / (now - prev.at);
      // Smoothed: nodes report in chunks, so single samples jump.
      prev.rate = prev.rate === null ? instant : 0.7 * prev.rate + 0.3 * instant;
      prev.at = now;
      prev.done = t.bytes_done;
    }
    return prev.rate;
  }

  function transferRow(t) {
    const total = t.bytes_total;
    const pct = total ? Math.min(100, (100 * t.bytes_done) / total) : 0;
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0,
      "aria-valuemax": 100, "aria-valuenow": total ? Math.round(pct) : undefined }, el("span"));
    bar.firstChild.style.width = `${t.state === "done" ? 100 : pct}%`;
    const speed = rate(t);
    const amount = total ? `${mb(t.bytes_done)} / ${mb(total)} (${num(pct, 1)}%)`
      : t.state === "running" ? `preparing… ${mb(t.bytes_done)}` : mb(t.bytes_done);
    const source = t.kind === "copy" ? `from ${String(t.source).replace(/^node:/, "")}`
      : `from ${String(t.source).replace(/^hf:/, "hf ")}`;
    return el("div", { class: `transfer ${t.state}`, "data-transfer": t.id, "data-state": t.state },
      el("div", { class: "transfer-head" },
        el("span", { class: `tstate ${t.state}` }, t.state), " ",
        el("strong", {}, t.kind), " ", el("span", { class: "tmodel" }, t.model || "(resolving)"),
        " → ", el("span", {}, t.node || "?"), " ", el("span", { class: "muted" }, source)),
      bar,
      el("div", { class: "muted" }, amount,
        t.state === "running" && speed !== null ? ` · ${num(speed / 1e6, 1)} MB/s` : "",
        t.state === "done" && t.served ? " · served" : ""),
      t.error ? el("div", { class: "error transfer-error" }, t.error) : null);
  }

  function drawTransfers() {
    const all = nodes.flatMap((n) => (n.transfers || []).map((t) => ({ node: n.id, ...t })));
    all.sort((a, b) => (a.state !== "running") - (b.state !== "running") || b.started - a.started);
    transfers.replaceChildren(...(all.length ? all.map(transferRow)
      : [el("p", { class: "muted" }, "no transfers")]));
    const mine = all.find((t) => t.id === pullId);
    if (mine) {
      pullStatus.textContent = mine.state === "running" ? `pulling ${mine.model || ""} onto ${mine.node}…`
        : mine.state === "done" ? `pulled ${mine.model} onto ${mine.node}`
          : `pull failed: ${mine.error || "unknown error"}`;
      pullStatus.className = mine.state === "failed" ? "error" : "muted";
    }
  }

  function drawNodePicker() {
    const ids = online().map((n) => n.id);
    const keep = pullNode.value;
    const now = [...pullNode.options].map((o) => o.value);
    if (JSON.stringify(now) === JSON.stringify(ids)) return;
    pullNode.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
    if (ids.includes(keep)) pullNode.value = keep;
    pullButton.disabled = !ids.length;
  }

  function onEvent(payload) {
    nodes = payload.nodes || [];
    drawTransfers();
    drawNodePicker();
    const sig = signature(nodes);
    if (sig !== lastSig) {
      lastSig = sig;
      scheduleRefresh();
    }
  }

  // ---- pull and search
  async function pull(repo, file, revision) {
    pullError.textContent = "";
    pullStatus.textContent = "";
    const req = { repo, node: pullNode.value || undefined };
    if (file) req.file = file;
    if (revision) req.revision = revision;
    pullButton.disabled = true;
    try {
      const started = await api("/api/models/pull", { method: "POST", body: req });
      pullId = started.transfer.id;
      pullStatus.className = "muted";
      pullStatus.textContent = `pull of ${repo} started on ${started.node}`;
      drawTransfers();
    } catch (err) {
      pullError.textContent = `pull ${repo}: ${err.message}`;
    }
    pullButton.disabled = !online().length;
  }

  // A repo typed in: offer its GGUF files for the file field (GET /api/hub/repos/{repo}).
  let lookup = 0;
  pullRepo.addEventListener("change", async () => {
    const repo = pullRepo.value.trim();
    const seq = ++lookup;
    fileHint.textContent = "";
    if (!/^[\w.-]+\/[\w.-]+$/.test(repo)) return;
    try {
      const info = await api(`/api/hub/repos/${repo}`);
      if (seq !== lookup) return;
      const ggufs = (info.files || []).filter((f) => f.quantization !== undefined);
      fileList.replaceChildren(...ggufs.map((f) => el("option", { value: f.name })));
      if (ggufs.length > 1) {
        fileHint.textContent = `${ggufs.length} GGUF files: ${ggufs.map((f) =>
          `${f.name} (${bytes(f.size_bytes)})`).join(", ")}`;
      }
    } catch (err) {
      if (seq === lookup) fileHint.textContent = `${repo}: ${err.message}`;
    }
  });

  pullForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    pull(pullRepo.value.trim(), pullFile.value.trim(), pullRev.value.trim());
  });

  function resultRow(r) {
    const files = r.gguf_files || [];
    const go = () => {
      pullRepo.value = r.repo;
      pullFile.value = files.length === 1 ? files[0] : "";
      fileList.replaceChildren(...files.map((f) => el("option", { value: f })));
      if (files.length > 1) {
        pullStatus.className = "muted";
        pullStatus.textContent = `${r.repo} has ${files.length} GGUF files: choose one, then Pull`;
        pullFile.focus();
        return;
      }
      pull(r.repo, pullFile.value, pullRev.value.trim());
    };
    return el("tr", { "data-repo": r.repo },
      el("td", { class: "repo" }, r.repo), el("td", {}, r.kind),
      el("td", {}, r.quantization || "–"), el("td", {}, String(r.downloads ?? "–")),
      el("td", {}, String(r.likes ?? "–")), el("td", {}, bytes(r.size_bytes)),
      el("td", {}, r.parameters ? `${num(r.parameters / 1e9, 2)} B` : "–"),
      el("td", {}, button("Pull", "pull", go)));
  }

  searchForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    searchError.textContent = "";
    searchButton.disabled = true;
    const q = new URLSearchParams({ q: searchQ.value.trim(), limit: "20" });
    if (searchKind.value) q.set("kind", searchKind.value);
    try {
      const found = await api(`/api/models/search?${q}`);
      const list = found.results || [];
      results.replaceChildren(list.length
        ? el("table", { id: "search-table" },
          el("thead", {}, el("tr", {}, ...["repo", "kind", "quantization", "downloads", "likes",
            "size", "params", ""].map((h) => el("th", {}, h)))),
          el("tbody", {}, ...list.map(resultRow)))
        : el("p", { class: "muted" }, "nothing found"));
    } catch (err) {
      searchError.textContent = `search: ${err.message}`;
    }
    searchButton.disabled = false;
  });

  // ---- start: the table now, then whatever the event stream says
  refresh();
  api("/api/nodes").then(onEvent).catch((err) => setConn(err.message, true));
  const stop = subscribe("/api/events", onEvent);
  return () => { stop(); clearTimeout(timer); };
}
