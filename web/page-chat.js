// The Chat page: a streamed playground over the coordinator's own OpenAI API.

import { renderMarkdown, splitThinking } from "./markdown.js";
import {
  ApiError, api, askForKey, chatModelGroups, el, errorMessage, headers, main, modelsAndRouting,
  num, readEvents,
} from "./ui.js";

// ---- Chat page: a playground over the coordinator's own OpenAI API (streamed).
export default function chatPage() {
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
    let routing;
    try {
      ({ models, routing } = await modelsAndRouting());
    } catch (err) {
      pickError.textContent = err.message;
      return;
    }
    const groups = chatModelGroups(models, routing);
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
