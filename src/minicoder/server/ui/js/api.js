// Talking to the server: JSON requests, server-sent-event streams, and every failure turned into words.
// The page is served by the server it talks to (or by `minicoder ui`, which forwards to one), so all
// paths are relative to the page's origin.

const API_KEY_ITEM = "minicoder.apiKey";

export function apiKey() { return localStorage.getItem(API_KEY_ITEM) || ""; }
export function setApiKey(key) {
  if (key) localStorage.setItem(API_KEY_ITEM, key); else localStorage.removeItem(API_KEY_ITEM);
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** An error a person can read: `message` is the sentence shown, `status` the HTTP status (0: no answer). */
export class ApiError extends Error {
  constructor(message, { status = 0, code = null, param = null } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON: say the status */ }
  const err = body && (body.error || body.detail);
  const detail = typeof err === "string" ? err : err && err.message ? err.message : response.statusText;
  const code = err && typeof err === "object" ? err.code : null;
  const param = err && typeof err === "object" ? err.param : null;
  const s = response.status;
  let message;
  if (s === 401) message = `The server needs an API key (401): ${detail}. Enter it under Model & server.`;
  else if (s === 429) message = `The server is busy (429): ${detail}. Try again in a moment.`;
  else if (code === "context_length_exceeded")
    message = `Too long for the model's context: ${detail}. Shorten the text, lower max tokens, or start a new conversation.`;
  else if (s >= 500) message = `The server failed (${s}): ${detail}`;
  else message = `The server refused the request (${s}${param ? `, field ${param}` : ""}): ${detail}`;
  return new ApiError(message, { status: s, code, param });
}

function unreachable(error) {
  if (error.name === "AbortError") return error;
  return new ApiError(`Cannot reach the server at ${location.origin}: is \`minicoder serve\` still running? (${error.message})`);
}

/** GET or POST JSON; throws ApiError. */
export async function requestJSON(path, { method = "GET", body, signal, accept = "application/json" } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method, signal, cache: "no-store",
      headers: headers({ Accept: accept, ...(body ? { "Content-Type": "application/json" } : {}) }),
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (e) { throw unreachable(e); }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

export async function requestText(path, { signal } = {}) {
  let response;
  try { response = await fetch(path, { signal, cache: "no-store", headers: headers() }); }
  catch (e) { throw unreachable(e); }
  if (!response.ok) throw await errorFrom(response);
  return response.text();
}

/**
 * POST a streaming request and call onEvent(json) for each `data:` event until `data: [DONE]`.
 * Aborting `signal` closes the connection, which makes the server cancel the generation.
 * Resolves to "done" or "aborted"; throws ApiError for HTTP errors, errors inside the stream, or a
 * stream cut off before [DONE].
 */
export async function streamEvents(path, body, onEvent, signal) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST", signal, cache: "no-store",
      headers: headers({ Accept: "text/event-stream", "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, stream: true }),
    });
  } catch (e) {
    if (e.name === "AbortError") return "aborted";
    throw unreachable(e);
  }
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return "done";
        const json = JSON.parse(data);
        if (json.error) throw new ApiError(`The server failed while generating: ${json.error.message || json.error}`,
          { status: 500, code: json.error.code });
        onEvent(json);
      }
    }
  } catch (e) {
    if (e.name === "AbortError" || signal?.aborted) return "aborted";
    if (e instanceof ApiError) throw e;
    throw new ApiError(`The connection to the server broke off mid-reply (${e.message}).`);
  } finally {
    reader.releaseLock?.();
  }
  if (signal?.aborted) return "aborted";
  throw new ApiError("The server closed the connection before the reply finished.");
}

/**
 * Stream the first choice of a completion or chat request: onText(piece) for each piece of text
 * (`textOf(choice)` finds it: `choice.text` or `choice.delta.content`). Resolves to
 * {result: "done" | "aborted", usage (the server's counts, when it sent them), finish (finish_reason),
 * firstAt (performance.now() of the first text, or null)}.
 */
export async function streamChoice(path, body, textOf, onText, signal) {
  let usage = null, finish = null, firstAt = null;
  const result = await streamEvents(path, { ...body, stream_options: { include_usage: true } }, (event) => {
    if (event.usage) usage = event.usage;
    const choice = event.choices?.[0];
    if (!choice) return;
    if (choice.finish_reason) finish = choice.finish_reason;
    const text = textOf(choice);
    if (text) {
      firstAt ??= performance.now();
      onText(text);
    }
  }, signal);
  return { result, usage, finish, firstAt };
}

/** Prometheus text -> {metric name: first value} (label sets of one model: the first sample is the one). */
export function parsePrometheus(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const [, name, labels = "", value] = m;
    const key = name.endsWith("_total") && labels.includes("finish_reason=")
      ? `${name}{${labels.match(/finish_reason="([^"]*)"/)[1]}}` : name;
    if (!(key in out)) out[key] = Number(value);
  }
  return out;
}
