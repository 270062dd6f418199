// The HTTP API, with the session cookie (same origin) and JSON errors as exceptions.

export class ApiError extends Error {
  constructor(status, code, message, field, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
    this.retryAfter = retryAfter; // seconds, from a Retry-After header
  }
}

export async function api(method, path, body, headers = {}) {
  const init = { method, credentials: "same-origin", headers: { ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const retryAfter = Number.parseFloat(res.headers.get("Retry-After"));
    throw new ApiError(res.status, data?.error ?? `http_${res.status}`, data?.message ?? res.statusText, data?.field,
      Number.isFinite(retryAfter) ? retryAfter : null);
  }
  return { status: res.status, data };
}

export const get = async (path) => (await api("GET", path)).data;
export const post = async (path, body) => (await api("POST", path, body)).data;
export const put = async (path, body) => (await api("PUT", path, body)).data;
export const patch = async (path, body) => (await api("PATCH", path, body)).data;
export const del = async (path) => (await api("DELETE", path)).data;

export async function currentUser() {
  try {
    return await get("/api/me");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return null;
    throw err;
  }
}

const RETRIES = 5;

// Calls `fn` until the server answers: network failures and 503s (the server shedding a spike, or
// its Redis out of reach) are tried again, up to RETRIES times, as long as `stillWanted()`. Only for
// requests that may go twice: a purchase with the same Idempotency-Key (the server returns the
// order it already made instead of taking more stock), a payment as it is (a paid order answers 200
// and is charged once). Each wait is 1 to 1.5 times the server's Retry-After, so that a crowd told
// "retry in 1 s" does not come back at once.
export async function withRetries(fn, stillWanted = () => true) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await fn();
    } catch (err) {
      const answered = err instanceof ApiError && err.status !== 503;
      if (answered || attempt >= RETRIES) throw err;
      const base = err.retryAfter ? Math.min(err.retryAfter, 5) * 1000 : 400 * 2 ** attempt;
      await new Promise((r) => setTimeout(r, base * (1 + Math.random() / 2)));
      if (!stillWanted()) throw err;
    }
  }
}
