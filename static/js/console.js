// The host's console: rooms, products and lineup, pins, flash sales, a live
// dashboard, moderation and earnings.
import { ApiError, currentUser, del, get, patch, post, put } from "./api.js";
import { TimeChart } from "./chart.js";
import { $, duration, el, money, replace, show } from "./dom.js";
import { RoomSocket } from "./live.js";
import { applySaleEvent, saleStatus } from "./sale.js";

const state = {
  me: null,
  rooms: [],
  room: null,
  products: [],
  lineup: new Set(),
  sale: null,
  socket: null,
  stats: null,
  viewers: { online: 0, peak: 0 },
  chatTimes: [], // when danmaku arrived, for the per-minute rate
  selection: 0, // counts room selections: answers for an earlier one are dropped
};
const chart = new TimeChart($("#chart"));

// Shows an error; with a form, the field the server named (its `data-field`) is marked and named.
function fail(target, form = null) {
  return (err) => {
    const api = err instanceof ApiError;
    const input = form && api && err.field ? $(form).querySelector(`[data-field="${CSS.escape(err.field)}"]`) : null;
    const message = api ? err.message.replace(/ - at `\$[^`]*`$/, "") : "Something went wrong; try again.";
    const label = input?.closest("label")?.firstChild?.textContent?.trim();
    $(target).textContent = label ? `${label}: ${message}` : message;
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.addEventListener("input", () => input.removeAttribute("aria-invalid"), { once: true });
      input.focus();
    }
  };
}

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
  await Promise.all([loadRooms(), loadProducts(), loadEarnings()]);
  const wanted = location.hash.slice(1);
  const pick = state.rooms.find((r) => r.id === wanted) ?? state.rooms.find((r) => r.status !== "ended") ?? state.rooms[0];
  if (pick) await selectRoom(pick.id);
}

$("#login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#auth-error").textContent = "";
  try {
    await post("/api/auth/login", { username: $("#login-user").value, password: $("#login-pass").value });
    await start();
  } catch (err) {
    fail("#auth-error")(err);
  }
});

$("#register-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#auth-error").textContent = "";
  try {
    await post("/api/auth/register", { username: $("#reg-user").value, password: $("#reg-pass").value, role: "host" });
    await start();
  } catch (err) {
    fail("#auth-error")(err);
  }
});

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
  state.stats = null;
  state.chatTimes = [];
  chart.reset();
  replace($("#modlog"));
  show($("#no-room"), false);
  show($("#room-view"), true);
  renderRoomList();
  renderRoom();
  const [lineup, sales] = await Promise.all([get(`/api/rooms/${id}/lineup`), get(`/api/rooms/${id}/sales`)]);
  if (!current()) return;
  state.lineup = new Set(lineup.map((p) => p.id));
  state.sale = sales[0] ?? null;
  renderProducts();
  renderSale();
  loadModeration();
  state.socket = new RoomSocket(id, { onEvent, onState: onSocketState });
  state.socket.connect();
  pollStats();
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
      state.viewers = ev.viewers;
      state.room = { ...state.room, ...ev.room, pinned_product: ev.pinned_product ?? null };
      if (ev.sale) state.sale = applySaleEvent(state.sale, { type: "sale", sale: ev.sale }, state.socket.now());
      for (const msg of ev.history) logChat(msg, false);
      roomChanged();
      renderProducts();
      renderKpis();
      renderSale();
      return undefined;
    }
    case "room_ended": state.room = { ...state.room, status: "ended" }; return roomChanged();
    case "lineup":
      if (lineupSaving) return undefined; // ours, from a save the host has since ticked past
      state.lineup = new Set(ev.products.map((p) => p.id));
      return renderProducts();
    case "viewers": state.viewers = ev; return renderKpis();
    case "likes": if (state.stats) state.stats.likes = ev.total; return renderKpis();
    case "chat": logChat(ev, true); return renderKpis();
    case "chat_rejected": return logRejected(ev);
    case "chat_deleted": return markDeleted(ev.id);
    case "pin":
    case "unpin":
      state.room = { ...state.room, pinned_product: ev.product ?? null };
      return renderProducts();
    case "room": state.room = { ...state.room, ...ev.room }; return roomChanged();
    case "sale":
    case "sale_update":
    case "sold_out":
    case "sale_ended":
      state.sale = applySaleEvent(state.sale, ev, state.socket.now());
      return renderSale();
    default: return undefined;
  }
}

// ---- dashboard -----------------------------------------------------------------------------
function kpi(label, value) {
  return el("div", { class: "kpi" }, el("b", {}, value), el("span", {}, label));
}

function renderKpis() {
  const s = state.stats;
  const now = Date.now();
  state.chatTimes = state.chatTimes.filter((t) => now - t < 60000);
  replace($("#kpis"),
    kpi("viewers online", state.viewers.online), kpi("peak viewers", Math.max(state.viewers.peak, s?.peak_viewers ?? 0)),
    kpi("likes", s?.likes ?? 0), kpi("danmaku / min", state.chatTimes.length),
    kpi("orders", s?.orders ?? 0), kpi("paid orders", s?.paid_orders ?? 0),
    kpi("GMV", money(s?.gmv_cents ?? 0)), kpi("conversion", `${((s?.conversion ?? 0) * 100).toFixed(1)}%`),
    kpi("your commission", money(s?.commission_cents ?? 0)));
}

let pollTimer = null;
async function pollStats() {
  clearTimeout(pollTimer);
  const room = state.room;
  const selection = state.selection;
  if (!room || !state.me) return;
  try {
    const stats = await get(`/api/rooms/${room.id}/stats`);
    if (selection !== state.selection) return; // another room was chosen: its own loop polls
    state.stats = stats;
    chart.add({ t: Date.now(), viewers: state.viewers.online, sold: state.sale ? state.sale.sold ?? 0 : 0 });
    renderKpis();
  } catch (err) {
    if (selection !== state.selection || err.status === 401) return; // signed out: no more polling
    /* a missed sample is fine */
  }
  pollTimer = setTimeout(pollStats, 2000);
}

// ---- products and lineup ---------------------------------------------------------------------
async function loadProducts() {
  state.products = await get("/api/products");
  renderProducts();
}

function renderProducts() {
  const pinned = state.room?.pinned_product?.id;
  replace($("#products"), state.products.map((p) => el("tr", { dataset: { id: p.id } },
    el("td", {}, p.name),
    el("td", { class: "num" }, money(p.price_cents)),
    el("td", { class: "num" }, `${(p.commission_rate_bp / 100).toFixed(2)}%`),
    el("td", {}, el("input", { type: "checkbox", "aria-label": `${p.name} in lineup`, checked: state.lineup.has(p.id), onchange: (e) => toggleLineup(p.id, e.target.checked) })),
    el("td", {}, el("div", { class: "row" },
      el("button", { class: "small", type: "button", onclick: () => (pinned === p.id ? unpin() : pin(p.id)) }, pinned === p.id ? "Unpin" : "Pin"),
      el("button", { class: "small ghost", type: "button", onclick: () => editProduct(p) }, "Edit"))))));
  // Rebuilt on every pin, lineup or product change: keep the host's choice (its price stays set).
  const picked = $("#sf-product").value;
  replace($("#sf-product"), state.products.map((p) => el("option", { value: p.id }, p.name)));
  if (state.products.some((p) => p.id === picked)) $("#sf-product").value = picked;
  const chosen = state.products.find((p) => p.id === $("#sf-product").value);
  if (chosen && !$("#sf-price").value) $("#sf-price").value = String(Math.round(chosen.price_cents * 0.8));
}

async function pin(productId) {
  try {
    state.room = await post(`/api/rooms/${state.room.id}/pin`, { product_id: productId });
    renderProducts();
  } catch (err) {
    fail("#prod-error")(err);
  }
}

async function unpin() {
  try {
    state.room = await del(`/api/rooms/${state.room.id}/pin`);
    renderProducts();
  } catch (err) {
    fail("#prod-error")(err);
  }
}

// A tick changes the lineup shown at once; saves go one after another, each with the whole
// lineup as it was at its tick (two quick ticks were each sent from the lineup before the other,
// and the second undid the first).
let lineupSaves = Promise.resolve();
let lineupSaving = 0; // saves not answered yet: the room's `lineup` echoes of earlier ones are ignored

function toggleLineup(productId, on) {
  state.lineup[on ? "add" : "delete"](productId);
  const roomId = state.room.id;
  const ids = state.products.map((p) => p.id).filter((id) => state.lineup.has(id));
  lineupSaving += 1;
  lineupSaves = lineupSaves.then(() => put(`/api/rooms/${roomId}/lineup`, { product_ids: ids })).catch(async (err) => {
    fail("#prod-error")(err);
    const saved = await get(`/api/rooms/${roomId}/lineup`).catch(() => null);
    if (saved && state.room?.id === roomId) {
      state.lineup = new Set(saved.map((p) => p.id));
      renderProducts();
    }
  }).finally(() => {
    lineupSaving -= 1;
  });
}

function editProduct(p) {
  const row = $(`#products tr[data-id="${CSS.escape(p.id)}"]`);
  const price = el("input", { type: "number", min: 1, value: p.price_cents, "aria-label": "price in cents" });
  const rate = el("input", { type: "number", min: 0, max: 10000, value: p.commission_rate_bp, "aria-label": "commission in basis points" });
  replace(row, el("td", {}, p.name), el("td", {}, price), el("td", {}, rate), el("td", {}),
    el("td", {}, el("button", { class: "small primary", type: "button", onclick: async () => {
      try {
        const updated = await patch(`/api/products/${p.id}`, { price_cents: Number(price.value), commission_rate_bp: Number(rate.value) });
        state.products = state.products.map((x) => (x.id === p.id ? updated : x));
        $("#prod-error").textContent = "";
        renderProducts();
      } catch (err) {
        fail("#prod-error")(err);
      }
    } }, "Save")));
  price.focus();
}

$("#product-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#prod-error").textContent = "";
  const body = { name: $("#pf-name").value, price_cents: Number($("#pf-price").value), commission_rate_bp: Number($("#pf-rate").value), description: $("#pf-desc").value };
  if ($("#pf-image").value.trim()) body.image_url = $("#pf-image").value.trim();
  try {
    await post("/api/products", body);
    e.target.reset();
    await loadProducts();
  } catch (err) {
    fail("#prod-error", "#product-form")(err);
  }
});

$("#sf-product").addEventListener("change", () => {
  const chosen = state.products.find((p) => p.id === $("#sf-product").value);
  if (chosen) $("#sf-price").value = String(Math.round(chosen.price_cents * 0.8));
});

// ---- flash sale --------------------------------------------------------------------------------
function renderSale() {
  const sale = state.sale;
  show($("#sale-live"), Boolean(sale));
  if (!sale) return;
  const now = state.socket ? state.socket.now() : Date.now();
  const status = saleStatus(sale, now);
  $("#sl-name").textContent = `${sale.product.name} at ${money(sale.price_cents)}`;
  $("#sl-status").textContent = status;
  $("#sl-status").className = `badge ${status === "active" ? "live" : status === "ended" ? "ended" : ""}`;
  $("#sl-countdown").textContent = status === "scheduled" ? `starts in ${duration(sale.starts_at_ms - now)}`
    : status === "active" || status === "soldout" ? `ends in ${duration(sale.ends_at_ms - now)}` : "";
  $("#sl-fill").style.transform = `scaleX(${sale.stock ? sale.remaining / sale.stock : 0})`;
  $("#sl-figures").textContent = `${sale.sold ?? 0} sold of ${sale.stock} · ${sale.remaining} left`;
  $("#sl-end").disabled = status === "ended";
}

setInterval(renderSale, 500);

$("#sale-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#sale-error").textContent = "";
  const num = (id) => Number($(id).value);
  try {
    state.sale = await post(`/api/rooms/${state.room.id}/sales`, {
      product_id: $("#sf-product").value, price_cents: num("#sf-price"), stock: num("#sf-stock"),
      per_user_limit: num("#sf-limit"), starts_in_s: num("#sf-start"), duration_s: num("#sf-duration"),
      payment_timeout_s: num("#sf-timeout"),
    });
    renderSale();
  } catch (err) {
    fail("#sale-error", "#sale-form")(err);
  }
});

$("#sl-end").addEventListener("click", async () => {
  try {
    state.sale = await post(`/api/sales/${state.sale.id}/end`);
    renderSale();
  } catch (err) {
    fail("#sale-error", "#sale-form")(err);
  }
});

// ---- moderation --------------------------------------------------------------------------------
function modItem(user, text, cls, actions) {
  const list = $("#modlog");
  const item = el("li", { class: cls }, el("strong", {}, user.name), el("span", { class: "text" }, text), actions);
  list.append(item);
  while (list.children.length > 300) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
  return item;
}

function muteButton(user) {
  return el("button", { class: "small ghost", type: "button", onclick: () => mute(user) }, "Mute 10 min");
}

function logChat(msg, live) {
  if ($(`#modlog li[data-id="${CSS.escape(msg.id)}"]`)) return;
  if (live) state.chatTimes.push(Date.now());
  const item = modItem(msg.user, msg.text, null, [
    el("button", { class: "small ghost", type: "button", onclick: () => deleteChat(msg.id) }, "Delete"),
    msg.user.id === state.me.user_id ? null : muteButton(msg.user)]);
  item.dataset.id = msg.id;
}

function logRejected(ev) {
  modItem(ev.user, `${ev.text} (refused: ${ev.reason === "muted" ? "muted" : "banned word"})`, "rejected", [muteButton(ev.user)]);
}

function markDeleted(id) {
  const item = $(`#modlog li[data-id="${CSS.escape(id)}"]`);
  if (item) {
    item.classList.add("deleted");
    item.querySelectorAll("button").forEach((b) => b.remove());
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
    await loadModeration();
  } catch (err) {
    fail("#mod-error")(err);
  }
}

async function loadModeration() {
  const room = state.room;
  const [banned, mutes] = await Promise.all([get(`/api/rooms/${room.id}/banned-words`), get(`/api/rooms/${room.id}/mutes`)]);
  if (state.room?.id !== room.id) return; // another room was chosen meanwhile
  if (document.activeElement !== $("#banned")) $("#banned").value = banned.words.join(", ");
  replace($("#mutes"), mutes.length ? mutes.map((m) => el("li", {},
    el("span", { class: "text" }, `${m.name ?? m.user_id} until ${new Date(m.until).toLocaleTimeString()}`),
    el("button", { class: "small ghost", type: "button", onclick: async () => {
      await del(`/api/rooms/${room.id}/mutes/${m.user_id}`).catch(fail("#mod-error"));
      loadModeration();
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

// ---- earnings ------------------------------------------------------------------------------------
async function loadEarnings() {
  const earnings = await get("/api/me/earnings");
  replace($("#earn-totals"), kpi("total earned", money(earnings.total_cents)),
    kpi("commission", money(earnings.host_commission_cents)), kpi("referrals", money(earnings.referral_share_cents)));
  replace($("#ledger"), earnings.entries.length ? earnings.entries.map((e) => el("tr", {},
    el("td", {}, new Date(e.created_at).toLocaleString()), el("td", {}, e.order_id.slice(-8)),
    el("td", {}, e.kind.replace("_", " ")), el("td", { class: "num" }, money(e.amount_cents))))
    : el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No paid orders yet.")));
}

setInterval(() => {
  if (state.me?.role === "host") loadEarnings().catch(() => {});
}, 10000);

start();
