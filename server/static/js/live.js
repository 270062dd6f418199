// The room's WebSocket: reconnects with backoff, keeps a server clock offset,
// and hands every event of every batch to one callback.

const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 10000];
// Ended, abuse, too big, session over (sign in again first), no room: retrying cannot help.
const FINAL_CODES = new Set([1000, 1008, 1009, 4401, 4404]);

export class RoomSocket {
  constructor(roomId, { onEvent, onState }) {
    this.roomId = roomId;
    this.onEvent = onEvent;
    this.onState = onState;
    this.offset = 0; // server clock minus ours, ms
    this.attempt = 0;
    this.ws = null;
    this.stopped = false;
    this.pingTimer = null;
    this.pingSentAt = 0;
  }

  now() {
    return Date.now() + this.offset;
  }

  connect() {
    this.stopped = false;
    clearTimeout(this.retryTimer);
    if (this.ws) this.ws.close(1000);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/rooms/${encodeURIComponent(this.roomId)}`);
    this.ws = ws;
    this.onState("connecting");
    ws.onopen = () => {
      // The backoff starts over only at a welcome: a server that is down for the room (Redis or the
      // database away) accepts, says `unavailable` and closes with 1013, and must see it grow.
      this.onState("open");
      this.ping();
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this.ping(), 15000);
    };
    ws.onmessage = (msg) => {
      let events;
      try {
        events = JSON.parse(msg.data);
      } catch {
        return;
      }
      for (const ev of Array.isArray(events) ? events : [events]) {
        if (ev.type === "welcome") {
          this.offset = ev.server_time - Date.now();
          this.attempt = 0;
        }
        if (ev.type === "pong" && this.pingSentAt) {
          const now = Date.now();
          this.offset = ev.ts - (this.pingSentAt + now) / 2; // assume a symmetric round trip
          this.pingSentAt = 0;
        }
        this.onEvent(ev);
      }
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return; // replaced by a newer socket
      clearInterval(this.pingTimer);
      if (this.stopped || FINAL_CODES.has(ev.code)) {
        this.onState(ev.code === 1000 ? "ended" : "closed", ev);
        return;
      }
      const base = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
      this.attempt += 1;
      this.onState("reconnecting", ev);
      this.retryTimer = setTimeout(() => this.connect(), base * (0.5 + Math.random()));
    };
  }

  ping() {
    this.pingSentAt = Date.now();
    this.send({ type: "ping" });
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    if (this.ws) this.ws.close(1000);
  }
}
