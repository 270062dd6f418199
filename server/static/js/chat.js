// The room's chat: the list, the danmaku flying over the video, the box to send from, and the
// room's refusals in words (a refused message goes back into the box).
import { Danmaku } from "./danmaku.js";
import { $, el, replace } from "./dom.js";

const CHAT_ERRORS = {
  rate_limited: "You're sending messages too fast. Wait a moment.",
  muted: "The host has muted you in this room.",
  banned_word: "Your message contains a word this room doesn't allow.",
  login_required: "Sign in to chat and like.",
  invalid_text: "Messages are 1 to 200 characters.",
};

// `state`: the room page's (who is signed in, the room); `signIn()` opens the sign-in panel.
export function chatPanel({ state, socket, signIn }) {
  const danmaku = new Danmaku($("#danmaku"));
  const shown = new Set(); // ids of the messages listed
  let unsent = null; // the message last sent, until the room echoes it (or refuses it: back in the box)

  function add(msg, fly) {
    if (shown.has(msg.id)) return; // events right after a welcome may repeat its history
    shown.add(msg.id);
    if (shown.size > 1000) shown.delete(shown.values().next().value); // oldest
    const mine = state.me && msg.user.id === state.me.user_id;
    if (mine && msg.text === unsent) unsent = null;
    // By id, not by name: anyone may take the host's display name, nobody the badge.
    const byHost = msg.user.id === state.room?.host?.id;
    const list = $("#chat-list");
    // Follow new messages only when the viewer is at the bottom, not while scrolled up reading.
    const following = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(el("li", { class: mine ? "me" : null, dataset: { id: msg.id } },
      el("span", { class: "who" }, msg.user.name), byHost && el("span", { class: "badge-host" }, "Host"),
      el("span", {}, msg.text)));
    while (list.children.length > 200) list.firstElementChild.remove();
    if (following || mine) list.scrollTop = list.scrollHeight;
    if (fly) danmaku.add(msg.text, mine, msg.id);
  }

  function remove(id) {
    for (const li of $("#chat-list").children) if (li.dataset.id === id) li.remove();
    danmaku.remove(id);
  }

  function showError(ev) {
    if (ev.code === "login_required") signIn();
    $("#chat-error").textContent = CHAT_ERRORS[ev.code] ?? ev.message;
    // A refused message goes back into the box (it was emptied on sending), unless a new one is being typed.
    if (ev.code in CHAT_ERRORS && unsent && !$("#chat-input").value) $("#chat-input").value = unsent;
    unsent = null;
  }

  // A welcome's history replaces the list: it follows every (re)connect.
  function welcome(history) {
    replace($("#chat-list"));
    shown.clear();
    for (const msg of history) add(msg, false);
  }

  $("#chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!state.me) return signIn();
    const input = $("#chat-input");
    const text = input.value.trim();
    if (!text) return undefined;
    $("#chat-error").textContent = "";
    if (socket.send({ type: "chat", text })) {
      input.value = "";
      unsent = text; // until it comes back as a chat event, or is refused
    } else $("#chat-error").textContent = "Not connected; trying again…";
    return undefined;
  });

  return { add, remove, showError, welcome };
}
