// The console's flash sale: the room's current sale as it sells (by the server's clock), the form
// that launches one, and ending it early.
import { post } from "./api.js";
import { $, duration, money, show } from "./dom.js";
import { fail } from "./errors.js";
import { saleStatus } from "./sale.js";

// `state`: the console's (the room chosen, its sale and its socket).
export function salePanel({ state }) {
  function render() {
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

  setInterval(render, 500);

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
      render();
    } catch (err) {
      fail("#sale-error", "#sale-form")(err);
    }
  });

  $("#sl-end").addEventListener("click", async () => {
    try {
      state.sale = await post(`/api/sales/${state.sale.id}/end`);
      render();
    } catch (err) {
      fail("#sale-error", "#sale-form")(err);
    }
  });

  return { render };
}
