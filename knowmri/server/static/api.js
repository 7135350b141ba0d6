/* The JSON API under /api: the session's token, and one fetch wrapper that raises ApiError on a 4xx/5xx. */

export const TOKEN = (() => {
  const fromUrl = new URLSearchParams(location.search).get("token");
  if (fromUrl) sessionStorage.setItem("knowmri-token", fromUrl);
  return fromUrl || sessionStorage.getItem("knowmri-token") || "";
})();

/** A URL with the token appended (for links and EventSource, which cannot send headers). */
export function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** Call the API: `body` (an object) is sent as JSON; the reply's JSON is returned. */
export async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (TOKEN) headers.Authorization = "Bearer " + TOKEN;
  let body = options.body;
  if (body !== undefined && typeof body !== "string") {
    body = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {method: options.method || "GET", headers, body, signal: options.signal});
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) throw new ApiError(response.status, (data && data.error) || response.statusText);
  return data;
}
