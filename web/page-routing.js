// The Routing page: aliases, Claude tiers and inference settings, each a form that the admin
// API validates (`PUT ...?dry_run=true`), shown as a line diff of the file before it is
// saved; errors show at the field the API names (`param`). A resolve box previews where a
// name goes. Every name and value goes into the page as text (el / input values), never HTML.

import { ApiError, api, el, main } from "./ui.js";

const TIERS = ["haiku", "sonnet", "opus"];
const BACKENDS = ["", "mlx", "gguf"];
const SAMPLING = [
  ["temperature", "0 to 100"], ["top_p", "(0, 1]"], ["top_k", "integer >= 0 (0 = off)"],
  ["min_p", "[0, 1)"], ["max_tokens", "default output tokens"],
  ["repetition_penalty", "(0, 10]"], ["max_output_tokens", "hard cap on every request"],
];
const NUMBER = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;
const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

// A text input's value: a number when it reads as one, else the text as typed (the API then
// names the field); undefined when empty.
function value(input) {
  const v = input.value.trim();
  if (v === "") return undefined;
  return NUMBER.test(v) ? Number(v) : v;
}

// Set obj[key] = v; an empty v removes the key, unless the file had it as null.
function put(obj, orig, key, v) {
  if (v !== undefined && v !== "") obj[key] = v;
  else if (isObject(orig) && orig[key] === null) obj[key] = null;
  else delete obj[key];
}

// A checkbox: true when checked; unchecked writes false only if the file had the key.
function flag(obj, orig, key, checked, dflt = false) {
  if (checked !== dflt || (isObject(orig) && key in orig)) obj[key] = checked;
  else delete obj[key];
}

const text = (attrs = {}, v = "") => {
  const input = el("input", { type: "text", autocomplete: "off", spellcheck: "false", ...attrs });
  input.value = v === null || v === undefined ? "" : String(v);
  return input;
};
const select = (options, v, attrs = {}) => {
  const s = el("select", attrs, ...options.map(([val, label]) => el("option", { value: val }, label)));
  s.value = v;
  return s;
};
const check = (checked, attrs = {}) => {
  const c = el("input", { type: "checkbox", ...attrs });
  c.checked = Boolean(checked);
  return c;
};
const backendSelect = (v, attrs) => select(BACKENDS.map((b) => [b, b || "auto"]), v || "", attrs);

// ---- Line diff (LCS) of two JSON texts; a trailing comma alone is not a change.
export function lineDiff(a, b) {
  const x = a.split("\n");
  const y = b.split("\n");
  const same = (i, j) => x[i].replace(/,$/, "") === y[j].replace(/,$/, "");
  const L = Array.from({ length: x.length + 1 }, () => new Uint32Array(y.length + 1));
  for (let i = x.length - 1; i >= 0; i--) {
    for (let j = y.length - 1; j >= 0; j--) {
      L[i][j] = same(i, j) ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < x.length && j < y.length) {
    if (same(i, j)) { out.push([" ", y[j]]); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) out.push(["-", x[i++]]);
    else out.push(["+", y[j++]]);
  }
  while (i < x.length) out.push(["-", x[i++]]);
  while (j < y.length) out.push(["+", y[j++]]);
  return out;
}

// Pretty JSON; an empty object as two lines, so that adding to it diffs as added lines only.
const pretty = (v) => JSON.stringify(v, null, 2).replace(/^\{\}$/, "{\n}");

// ---- One editable file: render its form, collect a body, review (dry run + diff), save.
function editor({ id, title, hint, path, key, read, wrap = (b) => b, render, collect }) {
  const form = el("div", { class: "fields" });
  const note = el("div", { class: "error", role: "alert" });
  const done = el("span", { class: "muted", role: "status" });
  const review = el("button", { type: "button", "data-action": "review" }, "Review changes");
  const diffBox = el("div", { class: "review", hidden: true });
  const root = el("section", { class: "card routing-section", id },
    el("h3", {}, title), hint ? el("p", { class: "hint" }, hint) : null, note, form,
    el("div", { class: "actions" }, review, done), diffBox);
  let current = {};
  let pending = null;
  let fields = new Map();

  function clearErrors() {
    for (const n of root.querySelectorAll("[aria-invalid]")) {
      n.removeAttribute("aria-invalid");
      n.removeAttribute("aria-describedby");
    }
    for (const m of root.querySelectorAll(".field-error")) m.remove();
    note.textContent = "";
  }

  function showError(err) {
    const input = err.param ? fields.get(err.param) : null;
    if (!input) { note.textContent = err.message; return; }
    const msgId = `${id}-err-${root.querySelectorAll(".field-error").length}`;
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-describedby", msgId);
    input.after(el("span", { class: "field-error", id: msgId, role: "alert" }, err.message));
    input.focus();
  }

  function show(data) {
    current = read(data);
    note.textContent = data.error ? `On disk: ${data.error} (the last good version is in force)` : "";
    form.replaceChildren();
    render(current, form);
  }

  async function load() {
    try { show(await api(path)); } catch (err) { note.textContent = err.message; }
  }

  function close() { pending = null; diffBox.hidden = true; diffBox.replaceChildren(); }

  async function onReview() {
    clearErrors();
    close();
    done.textContent = "";
    let out;
    try {
      out = collect(current);
      fields = out.fields;
      if (out.error) throw out.error;
      const r = await api(`${path}?dry_run=true`, { method: "PUT", body: wrap(out.body) });
      const lines = lineDiff(pretty(current), pretty(r[key]));
      if (lines.every(([op]) => op === " ")) { done.textContent = "No changes."; return; }
      pending = out.body;
      const save = el("button", { type: "button", "data-action": "save", class: "primary" }, "Save");
      const cancel = el("button", { type: "button", "data-action": "cancel" }, "Cancel");
      save.addEventListener("click", () => onSave(save));
      cancel.addEventListener("click", close);
      diffBox.replaceChildren(
        el("p", { class: "hint" }, "Valid. Changes to the file (- now, + after saving):"),
        el("pre", { class: "diff" }, ...lines.map(([op, line]) =>
          el("span", { class: op === "+" ? "add" : op === "-" ? "del" : "same" }, `${op} ${line}\n`))),
        el("div", { class: "actions" }, save, cancel));
      diffBox.hidden = false;
    } catch (err) {
      showError(err instanceof ApiError ? err : new ApiError(err.message));
    }
  }

  async function onSave(button) {
    if (pending === null) return;
    button.disabled = true;
    clearErrors();
    try {
      const r = await api(path, { method: "PUT", body: wrap(pending) });
      close();
      show({ ...wrap(r[key]), error: null });
      done.textContent = "Saved.";
    } catch (err) {
      button.disabled = false;
      close();
      showError(err instanceof ApiError ? err : new ApiError(err.message));
    }
  }

  review.addEventListener("click", onReview);
  // An edit after a review invalidates it: review again before saving.
  form.addEventListener("input", () => { if (pending !== null) close(); done.textContent = ""; });
  form.addEventListener("change", () => { if (pending !== null) close(); });
  return { root, load };
}

// ---- Aliases: alias -> model, or {model, backend, draft_model, max_tokens, ...}.
function aliasesEditor() {
  let rows = [];
  let body;
  function row(name = "", v = "") {
    const o = isObject(v) ? v : { model: v };
    const r = {
      orig: v,
      name: text({ "data-col": "alias", "aria-label": "alias" }, name),
      model: text({ "data-col": "model", "aria-label": "model" }, o.model),
      backend: backendSelect(o.backend, { "data-col": "backend", "aria-label": "backend" }),
      draft: text({ "data-col": "draft_model", "aria-label": "draft model" }, o.draft_model),
      max: text({ "data-col": "max_tokens", "aria-label": "max_tokens", inputmode: "numeric" },
        o.max_tokens),
    };
    const remove = el("button", { type: "button", "data-action": "remove", title: "remove" }, "Remove");
    r.tr = el("tr", { class: "alias-row" }, ...[r.name, r.model, r.backend, r.draft, r.max, remove]
      .map((c) => el("td", {}, c)));
    remove.addEventListener("click", () => { r.tr.remove(); body.dispatchEvent(new Event("input", { bubbles: true })); });
    rows.push(r);
    return r.tr;
  }
  return editor({
    id: "aliases", title: "Aliases", key: "aliases", path: "/api/aliases",
    hint: "A name clients send → the model that answers. Names with * ? [ are wildcards, tried in order.",
    read: (data) => (isObject(data.aliases) ? data.aliases : {}),
    wrap: (b) => ({ aliases: b }),
    render(current, form) {
      rows = [];
      body = el("tbody", {}, ...Object.entries(current).map(([n, v]) => row(n, v)));
      const add = el("button", { type: "button", "data-action": "add-alias" }, "Add alias");
      add.addEventListener("click", () => { body.append(row()); rows.at(-1).name.focus(); });
      form.append(el("table", { class: "edit", id: "alias-table" },
        el("thead", {}, el("tr", {}, ...["alias", "model", "backend", "draft model", "max_tokens", ""]
          .map((h) => el("th", {}, h)))), body), add);
    },
    collect() {
      const out = {};
      const fields = new Map();
      let error = null;
      for (const r of rows) {
        if (!r.tr.isConnected) continue;
        const name = r.name.value.trim();
        const model = r.model.value.trim();
        if (!name && !model && r.orig === "") continue; // an untouched new row
        const k = name ? `aliases[${name}]` : "aliases";
        if (name in out) {
          fields.set(k, r.name);
          error ??= new ApiError(`${k}: alias ${name} is listed twice`, { param: k });
          continue;
        }
        fields.set(k, name ? r.model : r.name);
        fields.set(`${k}.backend`, r.backend);
        fields.set(`${k}.draft_model`, r.draft);
        fields.set(`${k}.max_tokens`, r.max);
        for (const extra of ["ttl", "pin"]) fields.set(`${k}.${extra}`, r.model);
        const obj = isObject(r.orig) ? { ...r.orig } : {};
        obj.model = model;
        put(obj, r.orig, "backend", r.backend.value);
        put(obj, r.orig, "draft_model", r.draft.value.trim());
        put(obj, r.orig, "max_tokens", value(r.max));
        out[name] = !isObject(r.orig) && Object.keys(obj).length === 1 ? model : obj;
      }
      return { body: out, fields, error };
    },
  });
}

// ---- Claude tiers: claude_routing.json (patterns and unknown keys kept as they are).
function tiersEditor() {
  let inputs;
  return editor({
    id: "tiers", title: "Claude tiers", key: "routing", path: "/api/routing/config",
    hint: "Claude model names (claude-…-haiku/sonnet/opus) go to their tier's model; other Claude names to the default model.",
    read: (data) => { const { error, ...rest } = data; return rest; },
    render(current, form) {
      const tiers = isObject(current.tiers) ? current.tiers : {};
      inputs = {
        enabled: check(current.enabled !== false, { id: "tiers-enabled" }),
        default_model: text({ id: "tiers-default", "data-field": "default_model" }, current.default_model),
        tiers: {},
      };
      const rowsOut = TIERS.map((t) => {
        const v = tiers[t];
        const o = isObject(v) ? v : { model: v };
        const i = {
          orig: v,
          model: text({ "data-col": "model", "aria-label": `${t} model` }, o.model),
          backend: backendSelect(o.backend, { "data-col": "backend", "aria-label": `${t} backend` }),
          draft_model: text({ "data-col": "draft_model", "aria-label": `${t} draft model` }, o.draft_model),
          max_tokens: text({ "data-col": "max_tokens", "aria-label": `${t} max_tokens`, inputmode: "numeric" }, o.max_tokens),
          ttl: text({ "data-col": "ttl", "aria-label": `${t} ttl`, inputmode: "numeric" }, o.ttl),
          pin: check(o.pin, { "data-col": "pin", "aria-label": `${t} pin` }),
        };
        inputs.tiers[t] = i;
        return el("tr", { "data-tier": t }, el("th", {}, t),
          ...["model", "backend", "draft_model", "max_tokens", "ttl", "pin"].map((c) => el("td", {}, i[c])));
      });
      const patterns = isObject(current.patterns) ? Object.entries(current.patterns) : [];
      form.append(
        el("label", { class: "inline" }, inputs.enabled, " route Claude names by tier"),
        el("table", { class: "edit", id: "tier-table" },
          el("thead", {}, el("tr", {}, ...["tier", "model", "backend", "draft model", "max_tokens",
            "ttl (s)", "pin"].map((h) => el("th", {}, h)))), el("tbody", {}, ...rowsOut)),
        el("label", { class: "inline" }, "default model (other Claude names) ", inputs.default_model),
        patterns.length ? el("p", { class: "hint" }, "patterns (edit the file to change): ",
          patterns.map(([re, t]) => `${re} → ${t}`).join(", ")) : "");
    },
    collect(current) {
      const out = { ...current };
      const fields = new Map([["enabled", inputs.enabled], ["default_model", inputs.default_model]]);
      flag(out, current, "enabled", inputs.enabled.checked, true);
      put(out, current, "default_model", inputs.default_model.value.trim());
      const tiers = isObject(current.tiers) ? { ...current.tiers } : {};
      for (const t of TIERS) {
        const i = inputs.tiers[t];
        const k = `tiers.${t}`;
        fields.set(k, i.model);
        for (const c of ["backend", "draft_model", "max_tokens", "ttl", "pin"]) fields.set(`${k}.${c}`, i[c]);
        const model = i.model.value.trim();
        if (!model) {
          if (!(isObject(i.orig) && i.orig.model === null)) delete tiers[t];
          continue;
        }
        const obj = isObject(i.orig) ? { ...i.orig } : {};
        obj.model = model;
        put(obj, i.orig, "backend", i.backend.value);
        put(obj, i.orig, "draft_model", i.draft_model.value.trim());
        put(obj, i.orig, "max_tokens", value(i.max_tokens));
        put(obj, i.orig, "ttl", value(i.ttl));
        flag(obj, i.orig, "pin", i.pin.checked);
        tiers[t] = typeof i.orig === "string" && Object.keys(obj).length === 1 ? model : obj;
      }
      if (Object.keys(tiers).length || "tiers" in current) out.tiers = tiers;
      fields.set("tiers", inputs.tiers.haiku.model);
      return { body: out, fields };
    },
  });
}

// ---- Inference settings: inference_settings.json (unknown keys kept as they are).
function inferenceEditor() {
  let inputs;
  return editor({
    id: "inference", title: "Inference settings", key: "inference", path: "/api/inference-settings",
    hint: "Defaults for what a request leaves unset (empty: the node's default), and a hard cap.",
    read: (data) => { const { error, ...rest } = data; return rest; },
    render(current, form) {
      inputs = {};
      const grid = el("div", { class: "form-grid" });
      for (const [k, help] of SAMPLING) {
        inputs[k] = text({ id: `inf-${k}`, "data-field": k, inputmode: "decimal", placeholder: help }, current[k]);
        grid.append(el("label", { for: `inf-${k}` }, k), inputs[k]);
      }
      const thinking = current.enable_thinking;
      inputs.enable_thinking = select([["", "model default"], ["true", "on"], ["false", "off"]],
        thinking === true ? "true" : thinking === false ? "false" : "", { id: "inf-enable_thinking" });
      inputs.prompt_hygiene = check(current.prompt_hygiene !== false, { id: "inf-prompt_hygiene" });
      grid.append(el("label", { for: "inf-enable_thinking" }, "enable_thinking"), inputs.enable_thinking,
        el("label", { for: "inf-prompt_hygiene" }, "prompt_hygiene"),
        el("span", {}, inputs.prompt_hygiene, el("span", { class: "hint" }, " drop client metadata (billing header)")));
      form.append(grid);
    },
    collect(current) {
      const out = { ...current };
      for (const [k] of SAMPLING) put(out, current, k, value(inputs[k]));
      const t = inputs.enable_thinking.value;
      put(out, current, "enable_thinking", t === "" ? undefined : t === "true");
      flag(out, current, "prompt_hygiene", inputs.prompt_hygiene.checked, true);
      return { body: out, fields: new Map(Object.entries(inputs)) };
    },
  });
}

// ---- Resolve box: where a name goes now, and where a cold load would go.
function resolveBox() {
  const input = text({ id: "resolve-name", placeholder: "alias, claude-sonnet-4-5, model id", "aria-label": "model name" });
  const out = el("div", { id: "resolve-result", "aria-live": "polite" });
  const form = el("form", { class: "resolve" }, input, el("button", { type: "submit" }, "Resolve"));
  const row = (k, v) => [el("dt", {}, k), el("dd", { "data-key": k }, v === null || v === undefined || v === "" ? "–" : String(v))];
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = input.value.trim();
    if (!name) return;
    out.replaceChildren(el("span", { class: "muted" }, "resolving…"));
    const enc = encodeURIComponent(name);
    let res;
    try {
      res = await api(`/api/routing/resolve/${enc}`);
    } catch (err) {
      out.replaceChildren(el("div", { class: "error" }, err.message));
      return;
    }
    let place;
    try {
      const p = await api(`/api/models/placement/${enc}`);
      place = p.loaded_on.length ? `loaded on ${p.loaded_on.join(", ")}`
        : p.fits ? `a load would go to ${p.node}${p.evict.length ? ` (evicting ${p.evict.join(", ")})` : ""}: ${p.why}`
          : `no room: ${p.message}`;
    } catch (err) {
      place = err.message;
    }
    out.replaceChildren(el("dl", {}, row("name", res.original), row("model", res.resolved),
      row("rule", res.rule), row("tier", res.tier), row("backend", res.backend),
      row("draft", res.draft_model), row("nodes", (res.nodes || []).join(", ") || "none serves it"),
      row("placement", place)));
  });
  return el("section", { class: "card routing-section", id: "resolve" },
    el("h3", {}, "Resolve"), el("p", { class: "hint" }, "Preview where a name goes (aliases, wildcards, Claude tiers, defaults)."),
    form, out);
}

export default function routingPage() {
  const editors = [aliasesEditor(), tiersEditor(), inferenceEditor()];
  main.replaceChildren(el("h2", {}, "Routing"), el("div", { class: "routing" },
    resolveBox(), ...editors.map((e) => e.root)));
  for (const e of editors) e.load();
  return () => {};
}
