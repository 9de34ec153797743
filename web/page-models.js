// The Models page: the mesh-wide model x node table and its actions.

import { api, bytes, el, main, num } from "./ui.js";

// ---- Models page: the mesh-wide table with Load / Unload per node.
export default function modelsPage() {
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
