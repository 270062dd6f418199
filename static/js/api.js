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
