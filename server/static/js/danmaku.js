// Bullet chat over the video: messages fly right to left in lanes. All bullets move
// at one speed, so a lane is free again as soon as the last bullet's tail has
// entered the screen (plus a gap): bullets in a lane can never overlap.

const SPEED_PX_PER_MS = 0.12;
const GAP_PX = 24;
const MAX_WAITING = 40; // beyond this, the oldest waiting bullets are dropped

export class Danmaku {
  constructor(layer) {
    this.layer = layer;
    this.lanes = [];
    this.waiting = [];
    this.timer = null;
  }

  laneCount() {
    const laneHeight = 32;
    return Math.max(1, Math.floor(this.layer.clientHeight / laneHeight));
  }

  add(text, mine = false, id = null) {
    this.waiting.push({ text, mine, id });
    if (this.waiting.length > MAX_WAITING) this.waiting.splice(0, this.waiting.length - MAX_WAITING);
    this.pump();
  }

  pump() {
    clearTimeout(this.timer);
    const count = this.laneCount();
    while (this.lanes.length < count) this.lanes.push(0);
    this.lanes.length = count;
    const now = performance.now();
    while (this.waiting.length) {
      const lane = this.lanes.findIndex((freeAt) => freeAt <= now);
      if (lane < 0) break;
      this.launch(lane, this.waiting.shift(), now);
    }
    if (this.waiting.length) {
      const next = Math.min(...this.lanes) - now;
      this.timer = setTimeout(() => this.pump(), Math.max(16, next));
    }
  }

  // A message the host deleted stops flying, and never starts if it was still waiting.
  remove(id) {
    this.waiting = this.waiting.filter((b) => b.id !== id);
    for (const bullet of this.layer.querySelectorAll(".bullet")) if (bullet.dataset.id === id) bullet.remove();
  }

  launch(lane, { text, mine, id }, now) {
    const bullet = document.createElement("div");
    bullet.className = mine ? "bullet mine" : "bullet";
    if (id) bullet.dataset.id = id;
    bullet.textContent = text;
    bullet.style.top = `${lane * 32 + 4}px`;
    this.layer.append(bullet);
    const width = bullet.offsetWidth;
    const stage = this.layer.clientWidth;
    this.lanes[lane] = now + (width + GAP_PX) / SPEED_PX_PER_MS;
    const flight = bullet.animate(
      [{ transform: `translateX(${stage}px)` }, { transform: `translateX(${-width}px)` }],
      { duration: (stage + width) / SPEED_PX_PER_MS, easing: "linear" },
    );
    flight.onfinish = () => bullet.remove();
  }
}
