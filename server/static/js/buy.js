// The room's product card: the pinned product or its flash sale, and the viewer's order in it:
// buying (retried with the attempt's Idempotency-Key), paying and cancelling.
import { ApiError, api, get, post, withRetries } from "./api.js";
import { $, duration, el, money, replace, safeUrl, show, uuid } from "./dom.js";
import { applySaleEvent, saleStatus } from "./sale.js";

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

// `state`: the room page's (who is signed in, the pin); `referrer`: who shared the link, credited
// for a purchase; `signIn()` opens the sign-in panel, `sessionEnded()` after a 401.
export function buyPanel({ state, socket, referrer, signIn, sessionEnded }) {
  const card = {
    sale: null, // the sale as the server last described it; `v` orders updates
    order: null, // our reservation in the current sale
    buyKey: null, // {saleId, key, quantity}: the purchase in flight, sent again as it was on retry, never for a second buy
    buying: false,
    buyWait: false, // after a 429, until its Retry-After has passed
  };

  function saleEvent(ev) {
    if (ev.type === "sale" && card.sale?.id !== ev.sale.id) card.order = null;
    card.sale = applySaleEvent(card.sale, ev, socket.now());
    render();
  }

  function welcome(sale) {
    // Our order in the same sale is kept (loadOrder reads it again, live): SQL, which lists orders,
    // may lag, or be away, which is when reconnects happen.
    const kept = sale && card.order?.sale_id === sale.id ? card.order : null;
    card.sale = null;
    if (sale) saleEvent({ type: "sale", sale });
    card.order = kept;
    render();
    loadOrder(); // once per (re)connect, never per sale event: a thousand viewers would stampede
  }

  function holdsReservation(now) {
    return Boolean(card.order && card.order.status === "reserved" && now < Date.parse(card.order.pay_by));
  }

  // The sale the card shows: an ended one gives way to the host's next pin, unless the viewer
  // still has a reservation in it to pay.
  function shownSale() {
    const sale = card.sale;
    const now = socket.now();
    if (!sale || !state.pin || saleStatus(sale, now) !== "ended" || holdsReservation(now)) return sale;
    return null;
  }

  function render() {
    const sale = shownSale();
    const product = sale ? { ...sale.product, price_cents: sale.product.list_price_cents } : state.pin;
    show($("#card"), Boolean(product));
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
    const sale = card.sale;
    if (!sale) return;
    if (shownSale() !== sale) { // it ended, and the card shows the host's pin instead
      if (!$("#sale").hidden) render();
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
    $("#buy").disabled = status !== "active" || card.buying || reserved;
    $("#buy").textContent = card.buyWait ? "Wait a moment…" : card.buying ? "Buying…" : status === "soldout" ? "Sold out" : status === "ended" ? "Ended" : "Buy now";
    show($("#qty"), status === "active" && !reserved);
    // An attempt that may have gone through is tried again as it was: same key, same quantity.
    $("#qty").disabled = card.buying || card.buyKey?.saleId === sale.id;
    renderOrder(now);
  }

  function renderOrder(now) {
    const order = card.order;
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

  async function buy() {
    if (!state.me) return signIn();
    if (card.buying || !card.sale) return undefined; // a second click never buys twice
    card.buying = true;
    // Read once: a retry goes to the sale that was clicked, with its key, or not at all.
    const saleId = card.sale.id;
    if (card.buyKey?.saleId !== saleId) card.buyKey = { saleId, key: uuid(), quantity: Number($("#qty").value || 1) };
    const { key, quantity } = card.buyKey;
    $("#buy-error").textContent = "";
    tick();
    const body = { quantity };
    if (referrer && referrer !== state.me.user_id) body.ref = referrer;
    try {
      const res = await withRetries(() => api("POST", `/api/sales/${saleId}/purchase`, body, { "Idempotency-Key": key }),
        () => card.sale?.id === saleId);
      card.buyKey = null;
      if (card.sale?.id === saleId) { // the page shows the current sale's order only
        card.order = res.data;
        card.sale = { ...card.sale, remaining: Math.min(card.sale.remaining, res.data.remaining) };
      }
    } catch (err) {
      $("#buy-error").textContent = BUY_ERRORS[err.code] ?? err.message ?? "Something went wrong; try again.";
      if (err.status === 401) sessionEnded();
      // Answered: a new attempt gets a new key. After a 503 or a network failure the attempt may
      // have gone through: the next click on this sale sends the same key and gets that order back.
      if (err instanceof ApiError && err.status < 500) card.buyKey = null;
      if (err.status === 429) { // Buy stays off meanwhile, and says so
        card.buyWait = true;
        tick();
        await new Promise((r) => setTimeout(r, Math.min(err.retryAfter ?? 1, 30) * 1000));
        card.buyWait = false;
      }
    } finally {
      card.buying = false;
      tick();
    }
    return undefined;
  }

  // Pay or cancel the order shown, retried as it is (paying or cancelling again gives the same answer).
  async function orderAction(button, action) {
    const order = card.order;
    if (!order) return;
    button.disabled = true;
    $("#buy-error").textContent = "";
    const still = () => card.order?.order_id === order.order_id; // not replaced by a new sale's meanwhile
    try {
      const done = await withRetries(() => post(`/api/orders/${order.order_id}/${action}`));
      if (still()) card.order = done;
    } catch (err) {
      $("#buy-error").textContent = BUY_ERRORS[err.code] ?? err.message ?? "Something went wrong; try again.";
      // Refused because the order moved on (expired, cancelled or paid): show it as it is now.
      if (["expired", "cancelled", "paid"].includes(err.code)) {
        const now = await get(`/api/orders/${order.order_id}`).catch(() => ({ ...order, status: err.code }));
        if (still()) card.order = now;
      }
    } finally {
      button.disabled = false;
      tick();
    }
  }

  async function loadOrder() {
    // After a reload, bring back a reservation we made in this sale; after a reconnect, read the
    // order we have again (it may have been paid, cancelled or expired meanwhile).
    if (!state.me || !card.sale) return;
    const saleId = card.sale.id;
    try {
      if (card.order) {
        const asked = card.order;
        const fresh = await get(`/api/orders/${asked.order_id}`);
        if (card.sale?.id === saleId && card.order === asked) { // not paid or cancelled meanwhile
          card.order = fresh;
          tick();
        }
        return;
      }
      const orders = await get("/api/orders");
      const mine = orders.find((o) => o.sale_id === saleId && o.status === "reserved");
      if (mine && card.sale?.id === saleId && !card.order) {
        card.order = await get(`/api/orders/${mine.order_id}`);
        tick();
      }
    } catch {
      /* not important enough to bother the viewer */
    }
  }

  $("#buy").addEventListener("click", buy);
  $("#pay").addEventListener("click", () => orderAction($("#pay"), "pay"));
  $("#cancel").addEventListener("click", () => orderAction($("#cancel"), "cancel")); // to buy another quantity, or none
  setInterval(tick, 250);

  return { render, saleEvent, welcome };
}
