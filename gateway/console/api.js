// Talking to the gateway: the signed-in session (its CSRF token lives only in memory), fetch
// with the cookie and the CSRF header, OpenAI-shaped errors, and server-sent events read from
// a fetch body (EventSource could not send the CSRF header, and streams here are POSTs too).

/** The signed-in session `{sub, tenant, role, csrf, expires}`, or null when signed out. */
export const session = { current: null };

let onUnauthorized = () => {};

/** Sets what happens when a call answers 401: the app shows the sign-in form. */
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

/** An error answer: `status` plus the OpenAI error body's message, type, param and code. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail.message || `the server answered ${status}`);
    this.name = 'ApiError';
    this.status = status;
    this.type = detail.type || null;
    this.param = detail.param || null;
    this.code = detail.code || null;
  }
}

/** Reads an error body; a body that is not the OpenAI shape still gives a readable message. */
async function errorFrom(res) {
  const text = await res.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && body.error) return new ApiError(res.status, body.error);
  } catch {
    // Not JSON: fall through to the status line.
  }
  return new ApiError(res.status, {
    message: `${res.status} ${res.statusText}${text ? `: ${text.slice(0, 200)}` : ''}`,
  });
}

/**
 * Sends one request and returns the Response when it is 2xx; throws an ApiError otherwise.
 * `json` is sent as a JSON body; `body` as it is (FormData, a File). Every request carries
 * the session cookie; every non-GET one the CSRF header. A 401 outside sign-in signs out.
 */
export async function request(method, path, { json, body, headers = {}, signal } = {}) {
  const sent = { ...headers };
  if (method !== 'GET' && session.current) sent['x-csrf-token'] = session.current.csrf;
  if (json !== undefined) {
    sent['content-type'] = 'application/json';
    body = JSON.stringify(json);
  }
  const res = await fetch(path, { method, headers: sent, body, signal, credentials: 'same-origin' });
  if (res.ok) return res;
  const err = await errorFrom(res);
  if (res.status === 401 && path !== '/console/session') {
    // The sign-in form says why; callers' error displays skip a handled error.
    err.handled = true;
    onUnauthorized(err);
  }
  throw err;
}

/** GET a JSON document. */
export async function getJSON(path, signal) {
  return (await request('GET', path, { signal })).json();
}

/** Sends a JSON body (or none) and returns the JSON answer, or null for an empty one. */
export async function send(method, path, json, signal) {
  const res = await request(method, path, { json, signal });
  const text = await res.text();
  return text ? JSON.parse(text) : null;
}

/** Percent-encodes one path segment. */
export const seg = encodeURIComponent;

/**
 * Reads server-sent events from a response body, calling `onData` with each event's data
 * (multi-line data joined by "\n"). Returns true when the stream ended with `data: [DONE]`,
 * false when the server closed it without one.
 */
export async function readSSE(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, '');
      buffer = buffer.slice(nl + 1);
      if (line.startsWith('data:')) {
        data.push(line.slice(5).replace(/^ /, ''));
      } else if (line === '' && data.length) {
        const text = data.join('\n');
        data = [];
        if (text === '[DONE]') {
          await reader.cancel().catch(() => {});
          return true;
        }
        onData(text);
      }
      // Comments (":") and other fields (event, id, retry) carry nothing this console uses.
    }
    if (done) {
      const text = data.join('\n');
      if (text === '[DONE]') return true;
      if (text) onData(text);
      return false;
    }
  }
}
