// The model and server panel: what is served (the server's own description at GET /, or /v1/models on
// servers that have none) and live figures from its /metrics, polled every few seconds.

import { parsePrometheus, requestJSON, requestText } from "./api.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

function facts(element, rows) {
  element.replaceChildren(...rows.flatMap(([term, value]) => {
    const dt = Object.assign(document.createElement("dt"), { textContent: term });
    const dd = Object.assign(document.createElement("dd"), { textContent: value ?? "—" });
    return [dt, dd];
  }));
}

function count(n) {
  if (n === null || n === undefined) return null;
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

/** The served model: {id, info (GET / JSON or null), source}. Throws ApiError when neither answers. */
export async function describeServer() {
  try {
    const info = await requestJSON("./");
    if (info && info.object === "server" && info.model) return { id: info.model.id, info };
  } catch (e) {
    if (e.status === 401 || e.status === 0) throw e;  // needs a key / unreachable: say so, not "no description"
  }
  const models = await requestJSON("v1/models");
  const card = models.data?.[0] || {};
  return { id: card.id || null, info: null, card };
}

export function showModel(described) {
  const { info, card } = described;
  if (!info) {
    facts($("model-info"), [["Name", card?.id], ["Context length", card?.max_model_len ? `${card.max_model_len} tokens` : null],
                            ["Details", "this server does not describe its model beyond /v1/models"]]);
    return;
  }
  const m = info.model, t = m.training || {};
  facts($("model-info"), [
    ["Name", m.id],
    ["Architecture", m.architecture],
    ["Parameters", count(m.parameters)],
    ["Context length", `${m.context_length} tokens`],
    ["Data type", m.dtype],
    ["Quantization", m.quantization || "none"],
    ["Backend", m.backend],
    ["Training stage", m.training ? t.stage ?? "unknown" : "not a minicoder training run (no minicoder.json)"],
    ...(m.training ? [["Preset", t.preset], ["Steps", t.steps], ["Tokens trained", count(t.tokens_trained)],
                      ["Training sequence length", t.seq_len],
                      ["Held-out loss", t.val_loss?.toFixed(4)], ["Held-out bits per byte", t.val_bpb?.toFixed(4)]] : []),
    ["Fill-in-the-middle", m.fill_in_the_middle ? "yes" : "no (the tokenizer has no FIM tokens)"],
    ["Directory", m.path],
  ]);
}

/** Poll /metrics; `onHealth(ok, error)` hears whether the server answers. */
export class MetricsPoller {
  constructor(onHealth) {
    this.onHealth = onHealth;
    this.timer = null;
  }

  start() {
    if (!this.timer) { this.poll(); this.timer = setInterval(() => this.poll(), POLL_MS); }
  }

  async poll() {
    let text;
    try {
      text = await requestText("metrics");
    } catch (error) {
      $("metrics-error").textContent = error.message;
      $("metrics-error").hidden = false;
      this.onHealth(false, error);
      return;
    }
    $("metrics-error").hidden = true;
    this.onHealth(true, null);
    const m = parsePrometheus(text);
    const value = (name) => m[`minicoder_${name}`];
    if (value("num_requests_running") === undefined) {
      facts($("metrics"), [["Metrics", "this server's /metrics has no minicoder figures"]]);
      return;
    }
    const used = value("kv_cache_blocks_used"), total = value("kv_cache_blocks_total");
    const reasons = ["stop", "length", "abort", "rejected", "error"]
      .map((r) => `${r} ${m[`minicoder_requests_total{${r}}`] ?? 0}`).join(", ");
    facts($("metrics"), [
      ["Running requests", String(value("num_requests_running"))],
      ["Waiting requests", String(value("num_requests_waiting"))],
      ["KV-cache blocks used", `${used} of ${total} (${total ? ((100 * used) / total).toFixed(1) : 0}%)`],
      ["Prefix-cache hit rate", `${(100 * (value("prefix_cache_hit_rate") || 0)).toFixed(1)}%`],
      ["Generation", `${(value("generation_tokens_per_second") || 0).toFixed(1)} tokens/s (last 10 s)`],
      ["Tokens generated", String(value("generation_tokens_total"))],
      ["Requests", reasons],
    ]);
    $("metrics-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }
}
