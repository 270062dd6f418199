// A flash sale's state on the client, shared by the room and the console.

// Status by the server's clock (`now` = device time + measured offset).
export function saleStatus(sale, now) {
  if (sale.status === "ended" || sale.ended_at || now >= sale.ends_at_ms) return "ended";
  if (now < sale.starts_at_ms) return "scheduled";
  return sale.remaining > 0 ? "active" : "soldout";
}

// Apply a sale event to the sale we show; returns the new sale (or the old one if the
// event is about another sale or older than what we have: updates may arrive out of order
// from different server processes, `v` tells which is newer).
export function applySaleEvent(sale, ev, now) {
  const ended = sale && saleStatus(sale, now) === "ended";
  if (ev.type === "sale") {
    if (!sale || sale.id !== ev.sale.id) return { ...ev.sale };
    // An end is final: an older snapshot of a sale we know has ended never brings it back.
    if (ended && saleStatus(ev.sale, now) !== "ended") return sale;
    return ev.sale.v >= sale.v ? { ...ev.sale } : sale;
  }
  if (!sale || sale.id !== ev.id) return sale;
  // An end is final whatever its `v`: another process's update may carry a higher one.
  if (ev.type === "sale_ended") {
    return { ...sale, v: Math.max(sale.v, ev.v || 0), status: "ended", ended_at: new Date(now).toISOString(), end_reason: ev.reason };
  }
  if (ev.v && ev.v < sale.v) return sale;
  const next = { ...sale, v: Math.max(sale.v, ev.v || 0) };
  if (ev.type === "sale_update") Object.assign(next, { remaining: ev.remaining, sold: ev.sold });
  if (ev.type === "sold_out") next.remaining = 0;
  return next;
}
