// The page's start: tabs, theme, the connection status and its banner, and the three views.

import { apiKey, setApiKey } from "./api.js";
import { ChatView } from "./chat.js";
import { Conversations } from "./conversations.js";
import { describeServer, MetricsPoller, showModel } from "./panel.js";
import { Playground } from "./playground.js";
import { SamplingSettings } from "./settings.js";

const $ = (id) => document.getElementById(id);
const THEME_ITEM = "minicoder.theme";
const THEMES = ["auto", "light", "dark"];
let modelId = null;

// --- theme: follow the system, or the person's choice -----------------------------------------------
function applyTheme(choice) {
  const dark = choice === "dark" || (choice === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("hljs-light").disabled = dark;
  $("hljs-dark").disabled = !dark;
  const label = { auto: "follow the system", light: "light", dark: "dark" }[choice];
  $("theme-toggle").setAttribute("aria-label", `Theme: ${label} (click to change)`);
  $("theme-toggle").title = `Theme: ${label}`;
}
let theme = localStorage.getItem(THEME_ITEM) || "auto";
applyTheme(theme);
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => applyTheme(theme));
$("theme-toggle").addEventListener("click", () => {
  theme = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
  localStorage.setItem(THEME_ITEM, theme);
  applyTheme(theme);
});

// --- tabs (arrow keys move between them, as the ARIA tabs pattern has it) ----------------------------
const tabs = [...document.querySelectorAll('[role="tab"]')];
function selectTab(tab) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  location.hash = tab.id.slice(4);
  document.querySelector("main").dataset.view = tab.id.slice(4);
}
for (const tab of tabs) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (!step) return;
    const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
    selectTab(next);
    next.focus();
  });
}
selectTab($(`tab-${location.hash.slice(1)}`) || tabs[0]);

// --- views ----------------------------------------------------------------------------------------------
const settings = new SamplingSettings($("sampling"), $("sampling-source"), $("sampling-reset"));
const chat = new ChatView(new Conversations(), settings, () => modelId);
const playground = new Playground(settings, () => modelId);
$("api-origin").textContent = location.origin;
$("api-key").value = apiKey();
$("api-key").addEventListener("change", () => { setApiKey($("api-key").value.trim()); connect(); });

// --- connection -------------------------------------------------------------------------------------------
function showBanner(message) {
  $("banner").textContent = message || "";
  $("banner").hidden = !message;
}

function setStatus(ok, error) {
  const status = $("server-status");
  status.classList.toggle("down", !ok);
  status.textContent = ok ? `● ${modelId || "connected"}` : "● server unreachable";
  if (!ok) showBanner(`${error.message} Retrying every few seconds.`);
  else if ($("banner").dataset.kind !== "model") showBanner("");
  if (ok && !modelId) connect();
}

async function connect() {
  try {
    const described = await describeServer();
    modelId = described.id;
    $("banner").dataset.kind = "";
    showBanner("");
    showModel(described);
    const defaults = described.info?.sampling_defaults;
    settings.setDefaults(defaults || {}, defaults
      ? `Model defaults: ${described.info.sampling_defaults_source}.`
      : "Model defaults: the OpenAI API's (this server does not describe its model).");
    $("server-status").textContent = `● ${modelId}`;
    playground.detectRepositoryContext();
  } catch (error) {
    $("banner").dataset.kind = "model";
    showBanner(error.message);
  }
}

const poller = new MetricsPoller(setStatus);
connect().then(() => poller.start());
window.minicoder = { chat, playground, settings };  // for the browser console (and the tests)
