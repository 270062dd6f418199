import { get } from "./api.js";
import { $, el, replace } from "./dom.js";

const rooms = await get("/api/rooms?limit=50").catch(() => []);
const open = rooms.filter((r) => r.status !== "ended");
replace($("#rooms"), open.length ? open.map((r) => el("li", {},
  el("a", { href: `/rooms/${encodeURIComponent(r.id)}` },
    el("span", { class: `badge ${r.status}` }, r.status === "live" ? "Live" : "Soon"),
    el("strong", { class: "grow" }, r.title), el("span", { class: "muted" }, r.host.name))))
  : el("li", { class: "muted" }, "No rooms yet. Hosts start one from the console."));
