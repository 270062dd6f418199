// The console's products: the host's catalogue with its prices and commissions, the room's lineup
// and pin, and the sale form's product choice (the same products).
import { del, get, patch, post, put } from "./api.js";
import { $, el, money, replace } from "./dom.js";
import { fail } from "./errors.js";

// `state`: the console's (the room chosen, with its pinned product).
export function productsPanel({ state }) {
  let products = [];
  let lineup = new Set(); // ids of the room's lineup
  // A tick changes the lineup shown at once; saves go one after another, each with the whole
  // lineup as it was at its tick (two quick ticks were each sent from the lineup before the other,
  // and the second undid the first).
  let lineupSaves = Promise.resolve();
  let lineupSaving = 0; // saves not answered yet: the room's `lineup` echoes of earlier ones are ignored

  async function load() {
    products = await get("/api/products");
    render();
  }

  function render() {
    const pinned = state.room?.pinned_product?.id;
    replace($("#products"), products.map((p) => el("tr", { dataset: { id: p.id } },
      el("td", {}, p.name),
      el("td", { class: "num" }, money(p.price_cents)),
      el("td", { class: "num" }, `${(p.commission_rate_bp / 100).toFixed(2)}%`),
      el("td", {}, el("input", { type: "checkbox", "aria-label": `${p.name} in lineup`, checked: lineup.has(p.id), onchange: (e) => toggleLineup(p.id, e.target.checked) })),
      el("td", {}, el("div", { class: "row" },
        el("button", { class: "small", type: "button", onclick: () => (pinned === p.id ? unpin() : pin(p.id)) }, pinned === p.id ? "Unpin" : "Pin"),
        el("button", { class: "small ghost", type: "button", onclick: () => editProduct(p) }, "Edit"))))));
    // Rebuilt on every pin, lineup or product change: keep the host's choice (its price stays set).
    const picked = $("#sf-product").value;
    replace($("#sf-product"), products.map((p) => el("option", { value: p.id }, p.name)));
    if (products.some((p) => p.id === picked)) $("#sf-product").value = picked;
    const chosen = products.find((p) => p.id === $("#sf-product").value);
    if (chosen && !$("#sf-price").value) $("#sf-price").value = String(Math.round(chosen.price_cents * 0.8));
  }

  // The room's lineup as read, or as the room says it changed.
  function showLineup(list) {
    lineup = new Set(list.map((p) => p.id));
    render();
  }

  function lineupChanged(list) {
    if (!lineupSaving) showLineup(list); // else ours, from a save the host has since ticked past
  }

  async function pin(productId) {
    try {
      state.room = await post(`/api/rooms/${state.room.id}/pin`, { product_id: productId });
      render();
    } catch (err) {
      fail("#prod-error")(err);
    }
  }

  async function unpin() {
    try {
      state.room = await del(`/api/rooms/${state.room.id}/pin`);
      render();
    } catch (err) {
      fail("#prod-error")(err);
    }
  }

  function toggleLineup(productId, on) {
    lineup[on ? "add" : "delete"](productId);
    const roomId = state.room.id;
    const ids = products.map((p) => p.id).filter((id) => lineup.has(id));
    lineupSaving += 1;
    lineupSaves = lineupSaves.then(() => put(`/api/rooms/${roomId}/lineup`, { product_ids: ids })).catch(async (err) => {
      fail("#prod-error")(err);
      const saved = await get(`/api/rooms/${roomId}/lineup`).catch(() => null);
      if (saved && state.room?.id === roomId) showLineup(saved);
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
          products = products.map((x) => (x.id === p.id ? updated : x));
          $("#prod-error").textContent = "";
          render();
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
      await load();
    } catch (err) {
      fail("#prod-error", "#product-form")(err);
    }
  });

  $("#sf-product").addEventListener("change", () => {
    const chosen = products.find((p) => p.id === $("#sf-product").value);
    if (chosen) $("#sf-price").value = String(Math.round(chosen.price_cents * 0.8));
  });

  return { load, render, showLineup, lineupChanged };
}
