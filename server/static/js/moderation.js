// The console's chat moderation: the room's chat as it comes, with the messages the room refused,
// deleting a message, muting and unmuting a viewer, and the room's banned words.
import { del, get, post, put } from "./api.js";
import { $, el, replace } from "./dom.js";
import { fail } from "./errors.js";

// `state`: the console's (who is signed in, the room chosen).
export function moderationPanel({ state }) {
  function item(user, text, cls, actions) {
    const list = $("#modlog");
    const li = el("li", { class: cls }, el("strong", {}, user.name), el("span", { class: "text" }, text), actions);
    list.append(li);
    while (list.children.length > 300) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
    return li;
  }

  function muteButton(user) {
    return el("button", { class: "small ghost", type: "button", onclick: () => mute(user) }, "Mute 10 min");
  }

  // Returns whether the message is new to the log (a welcome's history may repeat it).
  function logChat(msg) {
    if ($(`#modlog li[data-id="${CSS.escape(msg.id)}"]`)) return false;
    const li = item(msg.user, msg.text, null, [
      el("button", { class: "small ghost", type: "button", onclick: () => deleteChat(msg.id) }, "Delete"),
      msg.user.id === state.me.user_id ? null : muteButton(msg.user)]);
    li.dataset.id = msg.id;
    return true;
  }

  function logRejected(ev) {
    item(ev.user, `${ev.text} (refused: ${ev.reason === "muted" ? "muted" : "banned word"})`, "rejected", [muteButton(ev.user)]);
  }

  function markDeleted(id) {
    const li = $(`#modlog li[data-id="${CSS.escape(id)}"]`);
    if (li) {
      li.classList.add("deleted");
      li.querySelectorAll("button").forEach((b) => b.remove());
    }
  }

  async function deleteChat(id) {
    try {
      await del(`/api/rooms/${state.room.id}/chat/${id}`);
    } catch (err) {
      fail("#mod-error")(err);
    }
  }

  async function mute(user) {
    try {
      await post(`/api/rooms/${state.room.id}/mutes`, { user_id: user.id, duration_s: 600 });
      await load();
    } catch (err) {
      fail("#mod-error")(err);
    }
  }

  // The room's banned words and mutes.
  async function load() {
    const room = state.room;
    const [banned, mutes] = await Promise.all([get(`/api/rooms/${room.id}/banned-words`), get(`/api/rooms/${room.id}/mutes`)]);
    if (state.room?.id !== room.id) return; // another room was chosen meanwhile
    if (document.activeElement !== $("#banned")) $("#banned").value = banned.words.join(", ");
    replace($("#mutes"), mutes.length ? mutes.map((m) => el("li", {},
      el("span", { class: "text" }, `${m.name ?? m.user_id} until ${new Date(m.until).toLocaleTimeString()}`),
      el("button", { class: "small ghost", type: "button", onclick: async () => {
        await del(`/api/rooms/${room.id}/mutes/${m.user_id}`).catch(fail("#mod-error"));
        load();
      } }, "Unmute"))) : el("li", { class: "muted" }, "Nobody is muted."));
  }

  $("#banned-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const words = $("#banned").value.split(",").map((w) => w.trim()).filter(Boolean);
    try {
      const saved = await put(`/api/rooms/${state.room.id}/banned-words`, { words });
      $("#banned").value = saved.words.join(", ");
      $("#mod-error").textContent = "";
    } catch (err) {
      fail("#mod-error")(err);
    }
  });

  return {
    logChat, logRejected, markDeleted, load,
    reset: () => replace($("#modlog")), // another room: its log starts empty
  };
}
