// Conversations kept in the browser's local storage, so a reload (or a closed tab) loses nothing.
// A conversation: {id, title, system, messages: [{role, content, stats?, stopped?, error?}], updated}.
// Messages with `error` are shown to the person but never sent to the model.

const STORE_ITEM = "minicoder.conversations";
const CURRENT_ITEM = "minicoder.currentConversation";

function load() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE_ITEM) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];  // a corrupt entry (edited by hand): start clean rather than fail to open the page
  }
}

export class Conversations {
  constructor() {
    this.list = load();
    this.currentId = localStorage.getItem(CURRENT_ITEM);
    if (!this.current) this.create();
  }

  get current() { return this.list.find((c) => c.id === this.currentId) || null; }

  create() {
    const conversation = { id: crypto.randomUUID?.() || String(Date.now() + Math.random()), title: "New conversation",
                           system: "", messages: [], updated: Date.now() };
    this.list.unshift(conversation);
    this.select(conversation.id);
    return conversation;
  }

  select(id) {
    this.currentId = id;
    localStorage.setItem(CURRENT_ITEM, id);
    this.save();
  }

  remove(id) {
    this.list = this.list.filter((c) => c.id !== id);
    if (this.currentId === id) {
      if (this.list.length) this.select(this.list[0].id); else this.create();
    }
    this.save();
  }

  /** Save after a change to the current conversation (its title comes from its first message). */
  touch() {
    const c = this.current;
    if (c) {
      c.updated = Date.now();
      const first = c.messages.find((m) => m.role === "user");
      if (first) c.title = first.content.split("\n")[0].slice(0, 60) || "Conversation";
    }
    this.save();
  }

  save() {
    try {
      localStorage.setItem(STORE_ITEM, JSON.stringify(this.list));
    } catch (e) {
      // Quota exceeded: drop the least recently updated conversations until it fits, keeping the current one.
      const others = this.list.filter((c) => c.id !== this.currentId);
      if (others.length) {
        const oldest = others.reduce((a, b) => (a.updated <= b.updated ? a : b));
        this.list = this.list.filter((c) => c !== oldest);
        this.save();
      } else {
        throw e;
      }
    }
  }
}

/** The OpenAI `messages` of a conversation up to (not including) index `end`. */
export function apiMessages(conversation, end = conversation.messages.length) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  for (const m of conversation.messages.slice(0, end)) {
    if (!m.error && (m.role === "user" || m.role === "assistant")) messages.push({ role: m.role, content: m.content });
  }
  return messages;
}
