// The completion playground: a prefix and a suffix, fill-in-the-middle through /v1/completions with
// `suffix` (plain completion when the suffix is empty), the middle streamed and shown highlighted in
// place between them, and optional repository-context files sent as `input_extra` [{filename, text}]
// (llama.cpp's field, where the server accepts it). Ctrl+Enter runs, Esc stops; Tab is left to move
// focus (no keyboard trap).

import { requestJSON, streamChoice } from "./api.js";
import { highlight } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const FILES_ITEM = "minicoder.repoFiles";

export class Playground {
  constructor(settings, model) {
    this.settings = settings;
    this.model = model;
    this.controller = null;
    this.middle = "";
    this.repoSupported = false;
    try { this.files = JSON.parse(localStorage.getItem(FILES_ITEM) || "[]"); } catch { this.files = []; }
    $("fim-run").addEventListener("click", () => this.run());
    $("fim-stop").addEventListener("click", () => this.controller?.abort());
    $("fim-accept").addEventListener("click", () => this.accept());
    $("fim-language").addEventListener("change", () => this.paint());
    for (const id of ["fim-prefix", "fim-suffix"]) {
      $(id).addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); this.run(); }
        if (e.key === "Escape") { if (this.controller) this.controller.abort(); else e.target.blur(); }
      });
    }
    $("repo-add").addEventListener("click", () => {
      const path = $("repo-path").value.trim();
      if (!path) { $("repo-path").focus(); return; }
      this.addFile(path, $("repo-text").value);
      $("repo-path").value = $("repo-text").value = "";
    });
    $("repo-pick").addEventListener("change", async (e) => {
      for (const file of e.target.files) this.addFile(file.webkitRelativePath || file.name, await file.text());
      e.target.value = "";
    });
    this.renderFiles();
    this.paint();
  }

  /** Does the server accept `input_extra`? Its OpenAPI schema says (servers without one: no). */
  async detectRepositoryContext() {
    let supported = false;
    try {
      const schema = await requestJSON("openapi.json");
      supported = Boolean(schema?.components?.schemas?.CompletionRequest?.properties?.input_extra);
    } catch { /* no schema: not supported */ }
    this.repoSupported = supported;
    $("repo-support").textContent = supported
      ? "With a suffix (fill-in-the-middle), these files go before the code in the model's repository layout (input_extra)."
      : "This server does not accept repository context (no input_extra field on /v1/completions): files are kept here but not sent.";
    this.renderFiles();
  }

  addFile(filename, text) {
    this.files = this.files.filter((f) => f.filename !== filename);
    this.files.push({ filename, text });
    this.saveFiles();
  }

  saveFiles() {
    localStorage.setItem(FILES_ITEM, JSON.stringify(this.files));
    this.renderFiles();
  }

  renderFiles() {
    const items = this.files.map((f) => {
      const li = document.createElement("li");
      const name = Object.assign(document.createElement("code"), { textContent: f.filename });
      const size = Object.assign(document.createElement("span"), { className: "hint",
                                                                   textContent: ` ${f.text.length} characters ` });
      const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "Remove" });
      remove.setAttribute("aria-label", `Remove ${f.filename}`);
      remove.addEventListener("click", () => { this.files = this.files.filter((g) => g !== f); this.saveFiles(); });
      li.append(name, size, remove);
      return li;
    });
    $("repo-files").replaceChildren(...items);
    $("repo-count").textContent = this.files.length ? `(${this.files.length}${this.repoSupported ? "" : ", not sent"})` : "";
  }

  async run() {
    if (this.controller) return;
    const prefix = $("fim-prefix").value, suffix = $("fim-suffix").value;
    const { max_tokens: _, ...sampling } = this.settings.fields();
    const maxTokens = Number($("fim-max-tokens").value);
    const request = { ...(this.model() ? { model: this.model() } : {}), prompt: prefix, ...sampling };
    if (Number.isFinite(maxTokens) && maxTokens > 0) request.max_tokens = Math.trunc(maxTokens);
    if (suffix) request.suffix = suffix;
    if (suffix && this.repoSupported && this.files.length) request.input_extra = this.files;  // context for FIM
    this.middle = "";
    this.lastRequest = { prefix, suffix };
    $("fim-error").hidden = true;
    $("fim-stats").textContent = "generating…";
    this.setBusy(true);
    const controller = this.controller = new AbortController();
    const start = performance.now();
    let frame = 0;
    try {
      const { result, usage, finish, firstAt } = await streamChoice("v1/completions", request, (choice) => choice.text,
        (text) => {
          this.middle += text;
          frame ||= requestAnimationFrame(() => { frame = 0; this.paint(); });
        }, controller.signal);
      const parts = [suffix ? "fill-in-the-middle" : "plain completion"];
      if (usage) parts.push(`${usage.prompt_tokens} prompt tokens`, `${usage.completion_tokens} tokens`);
      if (firstAt !== null) parts.push(`first token ${((firstAt - start) / 1000).toFixed(2)} s`);
      parts.push(`${((performance.now() - start) / 1000).toFixed(2)} s`, result === "aborted" ? "stopped" : finish === "length" ? "stopped at max tokens" : finish || "");
      $("fim-stats").textContent = parts.filter(Boolean).join(" · ");
    } catch (error) {
      $("fim-stats").textContent = "";
      $("fim-error").textContent = error.message;
      $("fim-error").hidden = false;
    } finally {
      if (frame) cancelAnimationFrame(frame);
      this.controller = null;
      this.setBusy(false);
      this.paint();
    }
  }

  setBusy(busy) {
    $("fim-run").hidden = busy;
    $("fim-stop").hidden = !busy;
    $("fim-accept").disabled = busy || !this.middle;
  }

  /** The prefix, the middle (marked) and the suffix, each highlighted, in one code view. */
  paint() {
    const { prefix, suffix } = this.lastRequest || { prefix: $("fim-prefix").value, suffix: $("fim-suffix").value };
    const language = $("fim-language").value;
    const code = $("fim-result");
    code.innerHTML = `<span class="fim-prefix">${highlight(prefix, language)}</span>`
      + `<mark class="fim-middle" aria-label="generated middle">${highlight(this.middle, language)}</mark>`
      + `<span class="fim-suffix">${highlight(suffix, language)}</span>`;
  }

  /** Put the middle into the prefix, as accepting an editor suggestion does. */
  accept() {
    $("fim-prefix").value += this.middle;
    this.middle = "";
    this.lastRequest = null;
    $("fim-accept").disabled = true;
    this.paint();
  }
}
