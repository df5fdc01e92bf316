// Model output as Markdown: marked parses it, DOMPurify sanitizes it (model text is untrusted), and
// highlight.js colours the code blocks, each of which gets a copy button.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.js";
import hljs from "../vendor/highlight.min.js";

const marked = new Marked({ gfm: true, breaks: true });
// Model text is untrusted: no scripts (DOMPurify's default), and nothing that loads from elsewhere or
// looks like the page's own controls (images would also make an offline page reach out to the network).
const SANITIZE = { FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "video", "audio"],
                   FORBID_ATTR: ["style"] };

export { hljs };

/** Highlighted HTML of `code` in `language` (auto-detected when unknown). */
export function highlight(code, language) {
  if (language && hljs.getLanguage(language)) return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  return hljs.highlightAuto(code).value;
}

/** Render Markdown `text` into `element`: sanitized, code highlighted, copy buttons added. */
export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), SANITIZE);
  for (const code of element.querySelectorAll("pre > code")) {
    const language = [...code.classList].find((c) => c.startsWith("language-"))?.slice(9);
    code.innerHTML = highlight(code.textContent, language);
    code.classList.add("hljs");
    const pre = code.parentElement;
    pre.classList.add("code-block");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", `Copy ${language || ""} code`.replace("  ", " "));
    button.addEventListener("click", () => copyText(code.textContent.replace(/\n$/, ""), button));
    pre.append(button);
  }
}

/** Copy to the clipboard, saying so on the button (the Clipboard API needs a secure context: fall back). */
export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1200);
  }
}
