// The viewer's live room: the stream, and the room's events handed to its panels: chat.js,
// likes.js, buy.js and the sign-in forms (signin.js). `state` is what the panels share.
import { currentUser, get } from "./api.js";
import { buyPanel } from "./buy.js";
import { chatPanel } from "./chat.js";
import { $, el, money, replace, safeUrl, show } from "./dom.js";
import { likesPanel } from "./likes.js";
import { RoomSocket } from "./live.js";
import { wireSignIn } from "./signin.js";

const roomId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const referrer = new URLSearchParams(location.search).get("ref");

const state = {
  me: null,
  room: null,
  pin: null,
  welcomed: false, // a first welcome came (the lineup was read at start)
  sessionDropped: false, // a 4401 came, and the page went on as anonymous
};

const socket = new RoomSocket(roomId, { onEvent, onState });
const chat = chatPanel({ state, socket, signIn: openSignin });
const likes = likesPanel({ state, socket, signIn: openSignin });
const buy = buyPanel({ state, socket, referrer, signIn: openSignin, sessionEnded });
wireSignIn({
  error: "#signin-error",
  explain: (err) => (err.status === 401 ? "Wrong username or password." : err.message),
  onSignedIn: signedIn,
});

// ---- connection ------------------------------------------------------------------
function onState(s, ev) {
  const text = { connecting: "Connecting…", open: "", reconnecting: "Reconnecting…", ended: "", closed: "Disconnected" }[s];
  $("#conn-state").textContent = text ?? "";
  if (s === "closed" && ev?.code === 4404) setOverlay("This room does not exist.");
  if (s === "closed" && ev?.code === 4401) {
    // Logged out (here or elsewhere) or expired: the session cookie is dead. The server drops it
    // with its next 401, and the page goes on watching anonymously (once: never a loop).
    sessionEnded();
    $("#chat-error").textContent = "Your session ended. Sign in to chat or buy.";
    if (!state.sessionDropped) {
      state.sessionDropped = true;
      currentUser().catch(() => null).then(() => socket.connect());
    }
  }
}

function onEvent(ev) {
  switch (ev.type) {
    case "welcome": return onWelcome(ev);
    case "chat": return chat.add(ev, true);
    case "chat_deleted": return chat.remove(ev.id);
    case "likes": return likes.update(ev.total);
    case "viewers": return renderViewers(ev);
    case "pin": state.pin = ev.product; return renderPin();
    case "unpin": state.pin = null; return renderPin();
    case "lineup": return renderShelf(ev.products);
    case "room": state.room = ev.room; return renderRoom();
    case "room_ended": state.room = { ...state.room, status: "ended" }; return renderRoom();
    case "sale":
    case "sale_update":
    case "sold_out":
    case "sale_ended": return buy.saleEvent(ev);
    case "error": return chat.showError(ev);
    default: return undefined;
  }
}

function onWelcome(ev) {
  // A welcome replaces everything we know: it follows every (re)connect.
  state.room = ev.room;
  state.pin = ev.pinned_product;
  buy.welcome(ev.sale);
  chat.welcome(ev.history);
  renderRoom();
  renderViewers(ev.viewers);
  likes.welcome(ev.likes);
  renderShelfPin();
  // A welcome carries no lineup: after a reconnect, read it again (a change may have been missed),
  // at a random moment within 5 s, as every viewer of the room reconnects at once after a resync.
  if (state.welcomed) setTimeout(loadLineup, Math.random() * 5000);
  state.welcomed = true;
}

function loadLineup() {
  get(`/api/rooms/${encodeURIComponent(roomId)}/lineup`).then(renderShelf).catch(() => {});
}

// ---- room and stream ---------------------------------------------------------------
function setOverlay(text) {
  $("#overlay").textContent = text || "";
  show($("#overlay"), Boolean(text));
}

function renderRoom() {
  const room = state.room;
  if (!room) return;
  document.title = `${room.title} · livesale`;
  $("#title").textContent = room.title;
  const badge = $("#status-badge");
  badge.textContent = { live: "Live", scheduled: "Soon", ended: "Ended" }[room.status];
  badge.className = `badge ${room.status}`;
  const video = $("#video");
  const src = safeUrl(room.stream_url);
  if (room.status === "live" && src) {
    if (video.getAttribute("src") !== src) video.src = src;
    setOverlay("");
    video.play().catch(() => {});
  } else {
    video.removeAttribute("src");
    video.load();
    setOverlay(room.status === "ended" ? "This live has ended. Thanks for watching!"
      : room.status === "live" ? "The host is live" : `Waiting for ${room.host.name} to go live…`);
  }
}

function renderViewers(v) {
  $("#viewers").textContent = `${v.online} watching`;
}

// ---- the pin and the lineup: on the card, and marked on the shelf ------------------
function renderPin() {
  buy.render();
  renderShelfPin();
}

function renderShelf(products) {
  show($("#shelf"), products.length > 0);
  replace($("#shelf-list"), products.map((p) => el("li", { dataset: { id: p.id } },
    el("img", { src: safeUrl(p.image_url) ?? "/static/img/product.svg", alt: "", loading: "lazy" }),
    el("strong", {}, p.name), el("span", { class: "muted" }, money(p.price_cents)))));
  renderShelfPin();
}

function renderShelfPin() {
  for (const li of $("#shelf-list").children) li.classList.toggle("pinned", li.dataset.id === state.pin?.id);
}

// ---- share -------------------------------------------------------------------------------
function toast(text) {
  const t = el("div", { class: "toast", role: "status" }, text);
  document.body.append(t);
  setTimeout(() => t.remove(), 2500);
}

$("#share").addEventListener("click", async () => {
  const url = new URL(`/rooms/${encodeURIComponent(roomId)}`, location.origin);
  if (state.me) url.searchParams.set("ref", state.me.user_id);
  try {
    await navigator.clipboard.writeText(url.href);
    toast("Link copied: friends who buy through it earn you a share.");
  } catch {
    window.prompt("Copy this link", url.href);
  }
});

// ---- signing in, without leaving the room ---------------------------------------------
function openSignin() {
  show($("#signin"), true);
  $("#guest-name").focus();
}

function renderMe() {
  $("#whoami").textContent = state.me ? `Hi, ${state.me.name}` : "";
  show($("#signin-open"), !state.me);
  if (state.me) show($("#signin"), false);
}

// The session is gone (logged out elsewhere, expired): ask to sign in again.
function sessionEnded() {
  state.me = null;
  renderMe();
  openSignin();
}

function signedIn(user) {
  state.me = user;
  state.sessionDropped = false;
  $("#chat-error").textContent = "";
  renderMe();
  socket.connect(); // reconnect so the socket carries the new session
}

$("#signin-open").addEventListener("click", openSignin);

// ---- start -------------------------------------------------------------------------------
async function start() {
  state.me = await currentUser().catch(() => null);
  renderMe();
  loadLineup();
  socket.connect();
}

start();
