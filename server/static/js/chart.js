// A small hand-drawn SVG line chart: two series over time, each on its own scale
// (viewers on the left, units sold on the right). No library needed for this.

const NS = "http://www.w3.org/2000/svg";
const W = 600;
const H = 200;
const PAD = { left: 36, right: 36, top: 10, bottom: 22 };

function node(tag, attrs, text) {
  const n = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
  if (text !== undefined) n.textContent = text;
  return n;
}

export class TimeChart {
  constructor(svg, maxPoints = 300) {
    this.svg = svg;
    this.maxPoints = maxPoints;
    this.points = []; // {t, viewers, sold}
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  }

  add(point) {
    this.points.push(point);
    if (this.points.length > this.maxPoints) this.points.shift();
    this.draw();
  }

  reset() {
    this.points = [];
    this.draw();
  }

  draw() {
    const { svg, points } = this;
    svg.replaceChildren();
    const x0 = PAD.left;
    const x1 = W - PAD.right;
    const y0 = H - PAD.bottom;
    const y1 = PAD.top;
    svg.append(node("line", { class: "axis", x1: x0, y1: y0, x2: x1, y2: y0 }));
    if (points.length < 2) {
      svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "Collecting data…"));
      return;
    }
    const tMin = points[0].t;
    const tSpan = Math.max(1, points[points.length - 1].t - tMin);
    const maxV = Math.max(1, ...points.map((p) => p.viewers));
    const maxS = Math.max(1, ...points.map((p) => p.sold));
    const x = (t) => x0 + ((t - tMin) / tSpan) * (x1 - x0);
    const line = (key, max) => points.map((p) => `${x(p.t).toFixed(1)},${(y0 - (p[key] / max) * (y0 - y1)).toFixed(1)}`).join(" ");
    svg.append(node("polyline", { class: "viewers", points: line("viewers", maxV) }));
    svg.append(node("polyline", { class: "sold", points: line("sold", maxS) }));
    svg.append(node("text", { x: 4, y: y1 + 10 }, String(maxV)));
    svg.append(node("text", { x: 4, y: y0 }, "0"));
    svg.append(node("text", { x: W - 4, y: y1 + 10, "text-anchor": "end" }, String(maxS)));
    const minutes = Math.round(tSpan / 60000);
    svg.append(node("text", { x: x1, y: H - 4, "text-anchor": "end" }, minutes ? `last ${minutes} min` : "last minute"));
  }
}
