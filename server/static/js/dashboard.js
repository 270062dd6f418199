// The console's live dashboard: the room's figures (viewers, likes, danmaku rate, orders, GMV,
// commission), its stats read every 2 s, and the chart of viewers and units sold.
import { get } from "./api.js";
import { TimeChart } from "./chart.js";
import { $, el, money, replace } from "./dom.js";

export function kpi(label, value) {
  return el("div", { class: "kpi" }, el("b", {}, value), el("span", {}, label));
}

// `state`: the console's (who is signed in, the room chosen and its sale, `selection`).
export function dashboardPanel({ state }) {
  const chart = new TimeChart($("#chart"));
  let stats = null;
  let viewers = { online: 0, peak: 0 };
  let chatTimes = []; // when danmaku arrived, for the per-minute rate
  let pollTimer = null;

  function render() {
    const now = Date.now();
    chatTimes = chatTimes.filter((t) => now - t < 60000);
    replace($("#kpis"),
      kpi("viewers online", viewers.online), kpi("peak viewers", Math.max(viewers.peak, stats?.peak_viewers ?? 0)),
      kpi("likes", stats?.likes ?? 0), kpi("danmaku / min", chatTimes.length),
      kpi("orders", stats?.orders ?? 0), kpi("paid orders", stats?.paid_orders ?? 0),
      kpi("GMV", money(stats?.gmv_cents ?? 0)), kpi("conversion", `${((stats?.conversion ?? 0) * 100).toFixed(1)}%`),
      kpi("your commission", money(stats?.commission_cents ?? 0)));
  }

  async function poll() {
    clearTimeout(pollTimer);
    const room = state.room;
    const selection = state.selection;
    if (!room || !state.me) return;
    try {
      const read = await get(`/api/rooms/${room.id}/stats`);
      if (selection !== state.selection) return; // another room was chosen: its own loop polls
      stats = read;
      chart.add({ t: Date.now(), viewers: viewers.online, sold: state.sale ? state.sale.sold ?? 0 : 0 });
      render();
    } catch (err) {
      if (selection !== state.selection || err.status === 401) return; // signed out: no more polling
      /* a missed sample is fine */
    }
    pollTimer = setTimeout(poll, 2000);
  }

  return {
    render, poll,
    reset() { // another room: its figures start over
      stats = null;
      chatTimes = [];
      chart.reset();
    },
    setViewers(v) {
      viewers = v;
      render();
    },
    setLikes(total) {
      if (stats) stats.likes = total;
      render();
    },
    countChat() {
      chatTimes.push(Date.now());
    },
  };
}
