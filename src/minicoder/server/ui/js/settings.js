// The sampling controls: start from the model's defaults (the server's description of its model),
// remember what the person changes, and turn the form into request fields.

const SETTINGS_ITEM = "minicoder.sampling";
const FALLBACK = { temperature: 1.0, top_p: 1.0, top_k: 0, repetition_penalty: 1.0 };
const INTEGER = new Set(["top_k", "max_tokens", "seed"]);

export class SamplingSettings {
  constructor(form, sourceNote, resetButton) {
    this.form = form;
    this.sourceNote = sourceNote;
    this.defaults = { ...FALLBACK };
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_ITEM) || "{}"); } catch { /* start from defaults */ }
    this.fill({ ...this.defaults, ...saved });
    form.addEventListener("input", () => this.save());
    form.addEventListener("submit", (e) => e.preventDefault());
    resetButton.addEventListener("click", () => { this.fill(this.defaults); this.save(); });
  }

  /** The served model's defaults; fields the person has not changed follow them. */
  setDefaults(defaults, source) {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS_ITEM) || "{}"); } catch { /* none */ }
    this.defaults = { ...FALLBACK, ...defaults };
    this.fill({ ...this.defaults, ...saved });
    this.sourceNote.textContent = source;
  }

  fill(values) {
    for (const input of this.form.querySelectorAll("input")) {
      input.value = values[input.name] ?? "";
    }
  }

  save() {
    const changed = {};
    for (const input of this.form.querySelectorAll("input")) {
      if (input.value !== "" && Number(input.value) !== this.defaults[input.name]) changed[input.name] = input.value;
    }
    localStorage.setItem(SETTINGS_ITEM, JSON.stringify(changed));
  }

  /** Request fields; an empty box is left out (the server's default: max tokens = what fits, seed = random). */
  fields() {
    const out = {};
    for (const input of this.form.querySelectorAll("input")) {
      if (input.value === "") continue;
      const value = Number(input.value);
      if (!Number.isFinite(value)) continue;
      out[input.name] = INTEGER.has(input.name) ? Math.trunc(value) : value;
    }
    return out;
  }
}
