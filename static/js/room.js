// The viewer's live room: stream, danmaku, likes, the pinned product and its flash sale.
import { ApiError, api, currentUser, get, post } from "./api.js";
import { Danmaku } from "./danmaku.js";
import { $, duration, el, money, replace, safeUrl, show, uuid } from "./dom.js";
import { RoomSocket } from "./live.js";
import { applySaleEvent, saleStatus } from "./sale.js";

const roomId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
const params = new URLSearchParams(location.search);
const referrer = params.get("ref");

const state = {
  me: null,
  room: null,
  pin: null,
  sale: null, // the sale as the server last described it; `v` orders updates
  likes: 0,
  pendingTaps: 0,
  order: null, // our reservation in the current sale
  buyKey: null, // {saleId, key, quantity}: the purchase in flight, sent again as it was on retry, never for a second buy
  buying: false,
  chatIds: new Set(),
  welcomed: false, // a first welcome came (the lineup was read at start)
  unsentChat: null, // the message last sent, until the room echoes it (or refuses it: back in the box)
  sessionDropped: false, // a 4401 came, and the page went on as anonymous
  buyWait: false, // after a 429, until its Retry-After has passed
};

const danmaku = new Danmaku($("#danmaku"));
const socket = new RoomSocket(roomId, { onEvent, onState });

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
    case "chat": return addChat(ev, true);
    case "chat_deleted": return removeChat(ev.id);
    case "likes": state.likes = Math.max(state.likes, ev.total); return renderLikes();
    case "viewers": return renderViewers(ev);
    case "pin": state.pin = ev.product; return renderCard();
    case "unpin": state.pin = null; return renderCard();
    case "lineup": return renderShelf(ev.products);
    case "room": state.room = ev.room; return renderRoom();
    case "room_ended": state.room = { ...state.room, status: "ended" }; return renderRoom();
    case "sale": return applySale(ev.sale);
    case "sale_update":
    case "sold_out":
    case "sale_ended": state.sale = applySaleEvent(state.sale, ev, socket.now()); return renderCard();
    case "error": return showChatError(ev);
    default: return undefined;
  }
}

function onWelcome(ev) {
  // A welcome replaces everything we know: it follows every (re)connect.
  state.room = ev.room;
  state.pin = ev.pinned_product;
  state.likes = ev.likes;
  // Our order in the same sale is kept (loadOrder reads it again, live): SQL, which lists orders,
  // may lag, or be away, which is when reconnects happen.
  const kept = ev.sale && state.order?.sale_id === ev.sale.id ? state.order : null;
  state.sale = null;
  if (ev.sale) applySale(ev.sale);
  state.order = kept;
  replace($("#chat-list"));
  state.chatIds.clear();
  for (const msg of ev.history) addChat(msg, false);
  renderRoom();
  renderViewers(ev.viewers);
  renderLikes();
  renderCard();
  loadOrder(); // once per (re)connect, never per sale event: a thousand viewers would stampede
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

// ---- chat and danmaku ----------------------------------------------------------------
function addChat(msg, fly) {
  if (state.chatIds.has(msg.id)) return; // events right after a welcome may repeat its history
  state.chatIds.add(msg.id);
  if (state.chatIds.size > 1000) state.chatIds.delete(state.chatIds.values().next().value); // oldest
  const mine = state.me && msg.user.id === state.me.user_id;
  if (mine && msg.text === state.unsentChat) state.unsentChat = null;
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

function removeChat(id) {
  for (const li of $("#chat-list").children) if (li.dataset.id === id) li.remove();
  danmaku.remove(id);
}

const CHAT_ERRORS = {
  rate_limited: "You're sending messages too fast. Wait a moment.",
  muted: "The host has muted you in this room.",
  banned_word: "Your message contains a word this room doesn't allow.",
  login_required: "Sign in to chat and like.",
  invalid_text: "Messages are 1 to 200 characters.",
};

function showChatError(ev) {
  if (ev.code === "login_required") openSignin();
  $("#chat-error").textContent = CHAT_ERRORS[ev.code] ?? ev.message;
  // A refused message goes back into the box (it was emptied on sending), unless a new one is being typed.
  if (ev.code in CHAT_ERRORS && state.unsentChat && !$("#chat-input").value) $("#chat-input").value = state.unsentChat;
  state.unsentChat = null;
}

$("#chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!state.me) return openSignin();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text) return undefined;
  $("#chat-error").textContent = "";
  if (socket.send({ type: "chat", text })) {
    input.value = "";
    state.unsentChat = text; // until it comes back as a chat event, or is refused
  } else $("#chat-error").textContent = "Not connected; trying again…";
  return undefined;
});

// ---- likes ---------------------------------------------------------------------------
function renderLikes() {
  $("#like-count").textContent = String(state.likes + state.pendingTaps);
}

$("#like").addEventListener("click", () => {
  if (!state.me) return openSignin();
  state.pendingTaps += 1;
  renderLikes();
  floatHeart();
  return undefined;
});

// Taps are batched: one frame every 300 ms at most, whatever the tapping speed.
setInterval(() => {
  if (!state.pendingTaps) return;
  const count = Math.min(50, state.pendingTaps);
  if (socket.send({ type: "like", count })) {
    state.pendingTaps -= count;
    state.likes += count; // the server's next total confirms it
  }
}, 300);

function floatHeart() {
  const heart = el("span", { class: "heart" }, ["♥", "❤", "💖", "💗"][Math.floor(Math.random() * 4)]);
  $("#stage").append(heart);
  const drift = (Math.random() - 0.5) * 80;
  heart.animate(
    [{ transform: "translate(0, 0) scale(.8)", opacity: 1 }, { transform: `translate(${drift}px, -180px) scale(1.3)`, opacity: 0 }],
    { duration: 1400, easing: "ease-out" },
  ).onfinish = () => heart.remove();
}

// ---- the product card and the sale ---------------------------------------------------
function applySale(sale) {
  if (!state.sale || state.sale.id !== sale.id) state.order = null;
  state.sale = applySaleEvent(state.sale, { type: "sale", sale }, socket.now());
  renderCard();
}

function holdsReservation(now) {
  return Boolean(state.order && state.order.status === "reserved" && now < Date.parse(state.order.pay_by));
}

// The sale the card shows: an ended one gives way to the host's next pin, unless the viewer
// still has a reservation in it to pay.
function shownSale() {
  const sale = state.sale;
  const now = socket.now();
  if (!sale || !state.pin || saleStatus(sale, now) !== "ended" || holdsReservation(now)) return sale;
  return null;
}

function renderCard() {
  const sale = shownSale();
  const product = sale ? { ...sale.product, price_cents: sale.product.list_price_cents } : state.pin;
  show($("#card"), Boolean(product));
  renderShelfPin();
  if (!product) return;
  $("#p-img").src = safeUrl(product.image_url) ?? "/static/img/product.svg";
  $("#p-img").alt = product.name;
  $("#p-name").textContent = product.name;
  $("#p-desc").textContent = product.description || "";
  show($("#sale"), Boolean(sale));
  if (!sale) {
    $("#p-price").textContent = money(product.price_cents);
    show($("#p-list"), false);
    return;
  }
  $("#p-price").textContent = money(sale.price_cents);
  $("#p-list").textContent = money(sale.product.list_price_cents);
  show($("#p-list"), sale.product.list_price_cents > sale.price_cents);
  $("#limit").textContent = `limit ${sale.per_user_limit} per buyer`;
  const qty = $("#qty");
  if (qty.options.length !== sale.per_user_limit) {
    replace(qty, Array.from({ length: sale.per_user_limit }, (_, i) => el("option", { value: i + 1 }, i + 1)));
  }
  tick();
}

function tick() {
  const sale = state.sale;
  if (!sale) return;
  if (shownSale() !== sale) { // it ended, and the card shows the host's pin instead
    if (!$("#sale").hidden) renderCard();
    renderOrder(socket.now()); // the viewer's order in it (paid, cancelled, expired) stays in view
    return;
  }
  const now = socket.now(); // the server's clock, not the device's
  const status = saleStatus(sale, now);
  const label = { scheduled: "Flash sale starts in", active: "Flash sale · ends in", soldout: "Sold out", ended: "Sale ended" }[status];
  const stateEl = $("#sale-state");
  stateEl.textContent = label;
  stateEl.className = `sale-state ${status}`;
  $("#countdown").textContent = status === "scheduled" ? duration(sale.starts_at_ms - now)
    : status === "active" ? duration(sale.ends_at_ms - now) : "";
  const left = Math.max(0, sale.remaining);
  $("#left").textContent = status === "ended" && left === 0 ? "All gone" : `${left} left of ${sale.stock}`;
  $("#stockfill").style.transform = `scaleX(${sale.stock ? left / sale.stock : 0})`;
  const bar = $("#stockbar");
  bar.setAttribute("aria-valuemax", String(sale.stock));
  bar.setAttribute("aria-valuenow", String(left));
  // A reservation past its pay-by time has expired (the sweeper puts its units back on sale).
  const reserved = holdsReservation(now);
  $("#buy").disabled = status !== "active" || state.buying || reserved;
  $("#buy").textContent = state.buyWait ? "Wait a moment…" : state.buying ? "Buying…" : status === "soldout" ? "Sold out" : status === "ended" ? "Ended" : "Buy now";
  show($("#qty"), status === "active" && !reserved);
  // An attempt that may have gone through is tried again as it was: same key, same quantity.
  $("#qty").disabled = state.buying || state.buyKey?.saleId === sale.id;
  renderOrder(now);
}

setInterval(tick, 250);

function renderOrder(now) {
  const order = state.order;
  show($("#reservation"), Boolean(order));
  if (!order) return;
  const payBy = Date.parse(order.pay_by);
  const text = `${order.quantity} × ${money(order.price_cents)} = ${money(order.total_cents)}`;
  if (holdsReservation(now)) {
    $("#res-text").textContent = `Reserved for you: ${text}`;
    $("#res-countdown").textContent = `Pay within ${duration(payBy - now)}`;
    show($("#pay"), true);
    show($("#cancel"), true);
  } else {
    const done = order.status === "paid";
    $("#res-text").textContent = done ? `Paid: ${text}. Thank you!` : `Your reservation ${order.status === "cancelled" ? "was cancelled" : "expired"}.`;
    $("#res-countdown").textContent = "";
    show($("#pay"), false);
    show($("#cancel"), false);
  }
}

const BUY_ERRORS = {
  sold_out: "Sold out, sorry!",
  not_enough: "Not that many left: try fewer.",
  limit_exceeded: "You've reached this sale's limit per buyer.",
  not_started: "The sale hasn't started yet.",
  ended: "The sale has ended.",
  rate_limited: "Too fast: try again in a moment.",
  busy: "So many buyers right now! Try again.",
  expired: "Your reservation expired.",
  cancelled: "This reservation was cancelled.",
  paid: "This order is already paid.",
};

const RETRIES = 5;

async function withRetries(fn, stillWanted = () => true) {
  // Network failures and 503s (the server shedding a spike, or its Redis out of reach) are retried:
  // a purchase with the same Idempotency-Key (the server returns the order it already made instead
  // of taking more stock), a payment as it is (a paid order answers 200 and is charged once). Each
  // wait is 1 to 1.5 times the server's Retry-After, so that a crowd told "retry in 1 s" does not
  // come back at once.
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await fn();
    } catch (err) {
      const answered = err instanceof ApiError && err.status !== 503;
      if (answered || attempt >= RETRIES) throw err;
      const base = err.retryAfter ? Math.min(err.retryAfter, 5) * 1000 : 400 * 2 ** attempt;
      await new Promise((r) => setTimeout(r, base * (1 + Math.random() / 2)));
      if (!stillWanted()) throw err;
    }
  }
}

$("#buy").addEventListener("click", async () => {
  if (!state.me) return openSignin();
  if (state.buying || !state.sale) return undefined; // a second click never buys twice
  state.buying = true;
  // Read once: a retry goes to the sale that was clicked, with its key, or not at all.
  const saleId = state.sale.id;
  if (state.buyKey?.saleId !== saleId) state.buyKey = { saleId, key: uuid(), quantity: Number($("#qty").value || 1) };
  const { key, quantity } = state.buyKey;
  $("#buy-error").textContent = "";
  tick();
  const body = { quantity };
  if (referrer && referrer !== state.me.user_id) body.ref = referrer;
  try {
    const res = await withRetries(() => api("POST", `/api/sales/${saleId}/purchase`, body, { "Idempotency-Key": key }),
      () => state.sale?.id === saleId);
    state.buyKey = null;
    if (state.sale?.id === saleId) { // the page shows the current sale's order only
      state.order = res.data;
      state.sale = { ...state.sale, remaining: Math.min(state.sale.remaining, res.data.remaining) };
    }
  } catch (err) {
    $("#buy-error").textContent = BUY_ERRORS[err.code] ?? err.message ?? "Something went wrong; try again.";
    if (err.status === 401) sessionEnded();
    // Answered: a new attempt gets a new key. After a 503 or a network failure the attempt may
    // have gone through: the next click on this sale sends the same key and gets that order back.
    if (err instanceof ApiError && err.status < 500) state.buyKey = null;
    if (err.status === 429) { // Buy stays off meanwhile, and says so
      state.buyWait = true;
      tick();
      await new Promise((r) => setTimeout(r, Math.min(err.retryAfter ?? 1, 30) * 1000));
      state.buyWait = false;
    }
  } finally {
    state.buying = false;
    tick();
  }
  return undefined;
});

// Pay or cancel the order shown, retried as it is (paying or cancelling again gives the same answer).
async function orderAction(button, action) {
  const order = state.order;
  if (!order) return;
  button.disabled = true;
  $("#buy-error").textContent = "";
  const still = () => state.order?.order_id === order.order_id; // not replaced by a new sale's meanwhile
  try {
    const done = await withRetries(() => post(`/api/orders/${order.order_id}/${action}`));
    if (still()) state.order = done;
  } catch (err) {
    $("#buy-error").textContent = BUY_ERRORS[err.code] ?? err.message ?? "Something went wrong; try again.";
    // Refused because the order moved on (expired, cancelled or paid): show it as it is now.
    if (["expired", "cancelled", "paid"].includes(err.code)) {
      const now = await get(`/api/orders/${order.order_id}`).catch(() => ({ ...order, status: err.code }));
      if (still()) state.order = now;
    }
  } finally {
    button.disabled = false;
    tick();
  }
}

$("#pay").addEventListener("click", () => orderAction($("#pay"), "pay"));
$("#cancel").addEventListener("click", () => orderAction($("#cancel"), "cancel")); // to buy another quantity, or none

async function loadOrder() {
  // After a reload, bring back a reservation we made in this sale; after a reconnect, read the
  // order we have again (it may have been paid, cancelled or expired meanwhile).
  if (!state.me || !state.sale) return;
  const saleId = state.sale.id;
  try {
    if (state.order) {
      const asked = state.order;
      const fresh = await get(`/api/orders/${asked.order_id}`);
      if (state.sale?.id === saleId && state.order === asked) { // not paid or cancelled meanwhile
        state.order = fresh;
        tick();
      }
      return;
    }
    const orders = await get("/api/orders");
    const mine = orders.find((o) => o.sale_id === saleId && o.status === "reserved");
    if (mine && state.sale?.id === saleId && !state.order) {
      state.order = await get(`/api/orders/${mine.order_id}`);
      tick();
    }
  } catch {
    /* not important enough to bother the viewer */
  }
}

// ---- lineup ----------------------------------------------------------------------------
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

async function signedIn(user) {
  state.me = user;
  state.sessionDropped = false;
  $("#chat-error").textContent = "";
  renderMe();
  socket.connect(); // reconnect so the socket carries the new session
}

$("#signin-open").addEventListener("click", openSignin);

$("#guest-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#signin-error").textContent = "";
  try {
    await signedIn(await post("/api/auth/guest", { name: $("#guest-name").value }));
  } catch (err) {
    $("#signin-error").textContent = err.message;
  }
});

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#signin-error").textContent = "";
  try {
    await signedIn(await post("/api/auth/login", { username: $("#login-user").value, password: $("#login-pass").value }));
  } catch (err) {
    $("#signin-error").textContent = err.status === 401 ? "Wrong username or password." : err.message;
  }
});

// ---- start -------------------------------------------------------------------------------
async function start() {
  state.me = await currentUser().catch(() => null);
  renderMe();
  loadLineup();
  socket.connect();
}

start();
