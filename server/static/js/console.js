// The host's console: signing in, the host's rooms and the one chosen (going live, its stream,
// ending it), and the room's events handed to its panels: dashboard.js, sale-panel.js,
// products.js, moderation.js and earnings.js.
import { currentUser, get, patch, post } from "./api.js";
import { dashboardPanel } from "./dashboard.js";
import { $, el, replace, show } from "./dom.js";
import { earningsPanel } from "./earnings.js";
import { errorText, fail } from "./errors.js";
import { RoomSocket } from "./live.js";
import { moderationPanel } from "./moderation.js";
import { productsPanel } from "./products.js";
import { salePanel } from "./sale-panel.js";
import { applySaleEvent } from "./sale.js";
import { wireSignIn } from "./signin.js";

const state = {
  me: null,
  rooms: [],
  room: null,
  sale: null,
  socket: null,
  selection: 0, // counts room selections: answers for an earlier one are dropped
};
const dashboard = dashboardPanel({ state });
const flashSale = salePanel({ state });
const products = productsPanel({ state });
const moderation = moderationPanel({ state });
const earnings = earningsPanel({ state });
wireSignIn({ error: "#auth-error", role: "host", explain: errorText, onSignedIn: start });

// ---- sign in -----------------------------------------------------------------------------
async function start() {
  state.me = await currentUser().catch(() => null);
  if (!state.me || state.me.role !== "host") {
    show($("#auth"), true);
    show($("#app"), false);
    if (state.me) $("#auth-error").textContent = "This account is a viewer; log in with a host account.";
    return;
  }
  show($("#auth"), false);
  show($("#app"), true);
  show($("#logout"), true);
  $("#whoami").textContent = state.me.name;
  await Promise.all([loadRooms(), products.load(), earnings.load()]);
  const wanted = location.hash.slice(1);
  const pick = state.rooms.find((r) => r.id === wanted) ?? state.rooms.find((r) => r.status !== "ended") ?? state.rooms[0];
  if (pick) await selectRoom(pick.id);
}

$("#logout").addEventListener("click", async () => {
  await post("/api/auth/logout").catch(() => {});
  location.reload();
});

// ---- rooms ---------------------------------------------------------------------------------
async function loadRooms() {
  state.rooms = await get(`/api/rooms?host_id=${encodeURIComponent(state.me.user_id)}&limit=100`);
  renderRoomList();
}

function renderRoomList() {
  replace($("#room-list"), state.rooms.map((r) => el("li", {},
    el("button", { class: "room-link", type: "button", "aria-current": String(r.id === state.room?.id), onclick: () => selectRoom(r.id) },
      el("span", {}, r.title), el("span", { class: `badge ${r.status}` }, r.status)))));
}

$("#room-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#room-error").textContent = "";
  try {
    const room = await post("/api/rooms", { title: $("#room-title").value });
    $("#room-title").value = "";
    await loadRooms();
    await selectRoom(room.id);
  } catch (err) {
    fail("#room-error")(err);
  }
});

async function selectRoom(id) {
  // Clicks on two rooms in a row: only the last one's answers count, and only it gets a socket.
  const selection = ++state.selection;
  const current = () => selection === state.selection;
  state.socket?.close();
  state.socket = null;
  const room = state.rooms.find((r) => r.id === id) ?? (await get(`/api/rooms/${id}`));
  if (!current()) return;
  state.room = room;
  history.replaceState(null, "", `#${id}`);
  state.sale = null;
  dashboard.reset();
  moderation.reset();
  show($("#no-room"), false);
  show($("#room-view"), true);
  renderRoomList();
  renderRoom();
  const [lineup, sales] = await Promise.all([get(`/api/rooms/${id}/lineup`), get(`/api/rooms/${id}/sales`)]);
  if (!current()) return;
  state.sale = sales[0] ?? null;
  products.showLineup(lineup);
  flashSale.render();
  moderation.load();
  state.socket = new RoomSocket(id, { onEvent, onState: onSocketState });
  state.socket.connect();
  dashboard.poll();
}

function onSocketState(s, ev) {
  if (s !== "closed" || ev?.code !== 4401) return;
  // Logged out elsewhere, or expired: back to the sign-in form (or on, if signed in again meanwhile).
  start().then(() => {
    if (!state.me) $("#auth-error").textContent = "Your session ended; log in again.";
  });
}

// The room's view and its line in the room list (status badge).
function roomChanged() {
  state.rooms = state.rooms.map((r) => (r.id === state.room.id ? { ...r, ...state.room } : r));
  renderRoomList();
  renderRoom();
}

function renderRoom() {
  const room = state.room;
  $("#rv-title").textContent = room.title;
  $("#rv-status").textContent = room.status;
  $("#rv-status").className = `badge ${room.status}`;
  $("#rv-link").href = `/rooms/${encodeURIComponent(room.id)}`;
  $("#go-live").disabled = room.status !== "scheduled";
  $("#end-room").disabled = room.status === "ended";
  if (document.activeElement !== $("#stream-url")) $("#stream-url").value = room.stream_url ?? "";
}

async function roomAction(path, body) {
  $("#rv-error").textContent = "";
  try {
    const room = body === undefined ? await post(path) : await patch(path, body);
    state.room = room;
    state.rooms = state.rooms.map((r) => (r.id === room.id ? room : r));
    renderRoom();
    renderRoomList();
  } catch (err) {
    fail("#rv-error")(err);
  }
}

$("#go-live").addEventListener("click", () => roomAction(`/api/rooms/${state.room.id}/start`));
$("#end-room").addEventListener("click", () => {
  if (window.confirm("End this room for everyone?")) roomAction(`/api/rooms/${state.room.id}/end`);
});
$("#stream-form").addEventListener("submit", (e) => {
  e.preventDefault();
  roomAction(`/api/rooms/${state.room.id}`, { stream_url: $("#stream-url").value.trim() || null });
});

// ---- live events ---------------------------------------------------------------------------
function onEvent(ev) {
  switch (ev.type) {
    case "welcome": {
      // After a reconnect, what changed meanwhile: the room, its pin, its sale, new chat.
      state.room = { ...state.room, ...ev.room, pinned_product: ev.pinned_product ?? null };
      if (ev.sale) state.sale = applySaleEvent(state.sale, { type: "sale", sale: ev.sale }, state.socket.now());
      for (const msg of ev.history) moderation.logChat(msg);
      roomChanged();
      products.render();
      dashboard.setViewers(ev.viewers);
      flashSale.render();
      return undefined;
    }
    case "room_ended": state.room = { ...state.room, status: "ended" }; return roomChanged();
    case "lineup": return products.lineupChanged(ev.products);
    case "viewers": return dashboard.setViewers(ev);
    case "likes": return dashboard.setLikes(ev.total);
    case "chat":
      if (moderation.logChat(ev)) dashboard.countChat();
      return dashboard.render();
    case "chat_rejected": return moderation.logRejected(ev);
    case "chat_deleted": return moderation.markDeleted(ev.id);
    case "pin":
    case "unpin":
      state.room = { ...state.room, pinned_product: ev.product ?? null };
      return products.render();
    case "room": state.room = { ...state.room, ...ev.room }; return roomChanged();
    case "sale":
    case "sale_update":
    case "sold_out":
    case "sale_ended":
      state.sale = applySaleEvent(state.sale, ev, state.socket.now());
      return flashSale.render();
    default: return undefined;
  }
}

start();
