// The console's earnings: the host's totals and ledger, read again every 10 s.
import { get } from "./api.js";
import { kpi } from "./dashboard.js";
import { $, el, money, replace } from "./dom.js";

// `state`: the console's (who is signed in).
export function earningsPanel({ state }) {
  async function load() {
    const earnings = await get("/api/me/earnings");
    replace($("#earn-totals"), kpi("total earned", money(earnings.total_cents)),
      kpi("commission", money(earnings.host_commission_cents)), kpi("referrals", money(earnings.referral_share_cents)));
    replace($("#ledger"), earnings.entries.length ? earnings.entries.map((e) => el("tr", {},
      el("td", {}, new Date(e.created_at).toLocaleString()), el("td", {}, e.order_id.slice(-8)),
      el("td", {}, e.kind.replace("_", " ")), el("td", { class: "num" }, money(e.amount_cents))))
      : el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No paid orders yet.")));
  }

  setInterval(() => {
    if (state.me?.role === "host") load().catch(() => {});
  }, 10000);

  return { load };
}
