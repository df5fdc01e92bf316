// The chat view: conversations in the sidebar, the messages of the current one, the composer.
// Replies stream from /v1/chat/completions; Stop (or Esc) aborts the request, which makes the server
// cancel the generation and free its slot.

import { streamChoice } from "./api.js";
import { apiMessages } from "./conversations.js";
import { copyText, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);

export class ChatView {
  /** `conversations`: a Conversations store; `settings`: SamplingSettings; `model()`: the served model's id. */
  constructor(conversations, settings, model) {
    this.store = conversations;
    this.settings = settings;
    this.model = model;
    this.controller = null;  // the AbortController of the reply being streamed
    this.list = $("messages");
    this.prompt = $("prompt");
    this.system = $("system-prompt");

    $("composer").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    this.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.send(); }
    });
    document.addEventListener("keydown", (e) => { if (e.key === "Escape" && this.controller) this.stop(); });
    $("stop").addEventListener("click", () => this.stop());
    $("new-conversation").addEventListener("click", () => {
      if (this.controller) this.stop();
      this.store.create();
      this.render();
      this.prompt.focus();
    });
    this.system.addEventListener("input", () => { this.store.current.system = this.system.value; this.store.touch(); });
    this.render();
  }

  get busy() { return this.controller !== null; }

  // --- actions ------------------------------------------------------------------------------------
  send() {
    const text = this.prompt.value;
    if (this.busy || !text.trim()) return;
    this.prompt.value = "";
    const conversation = this.store.current;
    conversation.messages.push({ role: "user", content: text });
    this.reply(conversation.messages.length);
  }

  stop() { this.controller?.abort(); }

  /** Replace message `index` (and all after it) by a new reply to the messages before it. */
  async reply(index) {
    const conversation = this.store.current;
    conversation.messages.splice(index);
    const message = { role: "assistant", content: "" };
    conversation.messages.push(message);
    this.store.touch();
    this.render();
    const request = { ...(this.model() ? { model: this.model() } : {}), messages: apiMessages(conversation, index),
                      ...this.settings.fields() };
    const controller = this.controller = new AbortController();
    this.setBusy(true);
    const element = this.list.lastElementChild;
    const start = performance.now();
    let chunks = 0, frame = 0, streamed = { usage: null, finish: null, firstAt: null };
    try {
      streamed = await streamChoice("v1/chat/completions", request, (choice) => choice.delta?.content, (text) => {
        chunks += 1;
        message.content += text;
        frame ||= requestAnimationFrame(() => { frame = 0; this.paintBody(element, message); });  // one render a frame
      }, controller.signal);
      if (streamed.result === "aborted") message.stopped = true;
    } catch (error) {
      if (!message.content) conversation.messages.pop();
      conversation.messages.push({ role: "error", content: error.message, error: true });
    } finally {
      if (frame) cancelAnimationFrame(frame);
      const end = performance.now(), { usage, firstAt } = streamed;
      message.stats = {
        prompt_tokens: usage?.prompt_tokens ?? null,
        cached_tokens: usage?.prompt_tokens_details?.cached_tokens ?? null,
        completion_tokens: usage?.completion_tokens ?? chunks,  // stopped: the server sent no counts
        exact: usage !== null,
        seconds: (end - start) / 1000,
        first_token_seconds: firstAt === null ? null : (firstAt - start) / 1000,
        decode_seconds: firstAt === null ? null : (end - firstAt) / 1000,
        finish_reason: message.stopped ? "stopped" : streamed.finish,
      };
      this.controller = null;
      this.setBusy(false);
      this.store.touch();
      this.render();
    }
  }

  // --- rendering ----------------------------------------------------------------------------------
  setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    this.list.setAttribute("aria-busy", String(busy));
  }

  render() {
    const conversation = this.store.current;
    this.system.value = conversation.system;
    if (conversation.system) this.system.closest("details").open = true;
    this.list.replaceChildren(...conversation.messages.map((m, i) => this.messageElement(m, i)));
    this.list.lastElementChild?.scrollIntoView({ block: "end" });
    this.renderSidebar();
  }

  renderSidebar() {
    const items = this.store.list.map((c) => {
      const li = document.createElement("li");
      const open = Object.assign(document.createElement("button"), { type: "button", className: "conversation",
                                                                       textContent: c.title });
      if (c.id === this.store.currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => {
        if (this.busy) this.stop();
        this.store.select(c.id);
        this.render();
      });
      const remove = Object.assign(document.createElement("button"), { type: "button", className: "icon-button",
                                                                         textContent: "×" });
      remove.setAttribute("aria-label", `Delete conversation: ${c.title}`);
      remove.addEventListener("click", () => {
        if (this.busy && c.id === this.store.currentId) this.stop();
        this.store.remove(c.id);
        this.render();
      });
      li.append(open, remove);
      return li;
    });
    $("conversation-list").replaceChildren(...items);
  }

  messageElement(message, index) {
    const li = document.createElement("li");
    li.className = `message ${message.role}`;
    li.dataset.index = index;
    const role = { user: "You", assistant: "Model", error: "Error" }[message.role];
    li.innerHTML = `<div class="role"></div><div class="body"></div><div class="meta"></div><div class="actions"></div>`;
    li.querySelector(".role").textContent = role;
    li.setAttribute("aria-label", `${role} message`);
    this.paintBody(li, message);
    const meta = li.querySelector(".meta");
    meta.textContent = statsLine(message);
    if (message.role === "error") li.setAttribute("role", "alert");
    const actions = li.querySelector(".actions");
    const action = (label, handler, aria) => {
      const b = Object.assign(document.createElement("button"), { type: "button", textContent: label });
      b.setAttribute("aria-label", aria);
      b.addEventListener("click", handler);
      actions.append(b);
      return b;
    };
    if (message.role === "user") {
      action("Edit", () => this.edit(li, index), "Edit and resend this message");
    } else if (message.role === "assistant" && message.stats) {
      const copy = action("Copy", () => copyText(message.content, copy), "Copy this reply");
      action("Regenerate", () => { if (!this.busy) this.reply(index); }, "Generate this reply again");
    }
    return li;
  }

  paintBody(li, message) {
    const body = li.querySelector(".body");
    if (message.role === "assistant") {
      if (message.content) renderMarkdown(body, message.content);
      else if (!message.stats) body.innerHTML = `<span class="typing" aria-label="The model is thinking">…</span>`;
      else body.innerHTML = `<em class="hint">(empty reply)</em>`;
    } else {
      body.textContent = message.content;
    }
  }

  edit(li, index) {
    if (this.busy) return;
    const message = this.store.current.messages[index];
    const body = li.querySelector(".body");
    const area = Object.assign(document.createElement("textarea"), { value: message.content, rows: 3 });
    area.setAttribute("aria-label", "Edited message");
    const save = Object.assign(document.createElement("button"), { type: "button", textContent: "Send",
                                                                   className: "primary" });
    const cancel = Object.assign(document.createElement("button"), { type: "button", textContent: "Cancel" });
    const resend = () => {
      if (!area.value.trim()) return;
      message.content = area.value;
      this.reply(index + 1);
    };
    save.addEventListener("click", resend);
    cancel.addEventListener("click", () => this.render());
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); resend(); }
      if (e.key === "Escape") { e.stopPropagation(); this.render(); }
    });
    body.replaceChildren(area, save, cancel);
    li.querySelector(".actions").replaceChildren();
    area.focus();
  }
}

/** "12 prompt tokens · 40 tokens · 85.2 tokens/s · first token 0.05 s · stop" under a reply. */
export function statsLine(message) {
  const s = message.stats;
  if (!s || message.role !== "assistant") return "";
  const parts = [];
  if (s.prompt_tokens !== null) parts.push(`${s.prompt_tokens} prompt tokens${s.cached_tokens ? ` (${s.cached_tokens} cached)` : ""}`);
  parts.push(`${s.exact ? "" : "≈"}${s.completion_tokens} tokens`);
  if (s.decode_seconds > 0 && s.completion_tokens > 1) {
    parts.push(`${((s.completion_tokens - 1) / s.decode_seconds).toFixed(1)} tokens/s`);
  }
  if (s.first_token_seconds !== null) parts.push(`first token ${s.first_token_seconds.toFixed(2)} s`);
  if (s.finish_reason) parts.push(s.finish_reason === "length" ? "stopped at max tokens" : s.finish_reason);
  return parts.join(" · ");
}
