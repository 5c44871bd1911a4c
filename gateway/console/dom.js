// DOM building, number formatting, the message banners and the confirmation dialog.
// Everything from the server goes into the page through textContent or attributes, never
// through innerHTML, and nothing sets a style attribute (the CSP forbids inline styles).

const SVG_NS = 'http://www.w3.org/2000/svg';

/** Adapter and queue names, as the registry accepts them (a `pattern` attribute; `-` escaped for the v flag). */
export const NAME_PATTERN = '[a-z0-9][a-z0-9._\\-]{0,63}';

/** Properties set as DOM properties; every other key becomes an attribute. */
const PROPS = new Set(['value', 'checked', 'disabled', 'hidden', 'selected', 'multiple', 'required', 'indeterminate']);

/**
 * Creates an element. `props` keys: `class`, `text` (textContent), `testid` (data-testid),
 * `on` ({event: handler}), the properties in PROPS, and anything else as an attribute
 * (null, undefined and false are skipped). Children are nodes, strings or arrays of them.
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = String(value);
    else if (key === 'testid') el.dataset.testid = value;
    else if (key === 'on') for (const [event, fn] of Object.entries(value)) el.addEventListener(event, fn);
    else if (PROPS.has(key)) el[key] = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

/** Creates an SVG element with the given attributes (geometry, fill, stroke, class). */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

/** Appends nodes, strings (as text) and nested arrays; skips null, undefined and false. */
export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** Replaces an element's children the way `append` adds them (null and arrays allowed). */
export function fill(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

/** A labelled form field: `<div class="field"><label for=id>text</label>control help</div>`. */
export function field(labelText, control, help) {
  const helpEl = help ? h('small', { class: 'help', id: `${control.id}-help`, text: help }) : null;
  if (helpEl) control.setAttribute('aria-describedby', helpEl.id);
  return h('div', { class: 'field' }, h('label', { for: control.id, text: labelText }), control, helpEl);
}

/** A table with a header row; `rows` are arrays of cells (nodes or text). Wrapped so it scrolls sideways on narrow screens. */
export function table(headers, rows, props = {}) {
  const head = h(
    'thead',
    {},
    h(
      'tr',
      {},
      headers.map((t) => h('th', { scope: 'col', text: t })),
    ),
  );
  const body = h(
    'tbody',
    {},
    rows.map((cells) =>
      h(
        'tr',
        {},
        cells.map((c) => h('td', {}, c)),
      ),
    ),
  );
  return h('div', { class: 'table-wrap' }, h('table', props, head, body));
}

/** A compact view of any JSON value: objects as definition lists, arrays of objects as tables. */
export function jsonView(value, depth = 0) {
  if (value === null || value === undefined) return h('span', { class: 'muted', text: '–' });
  if (typeof value === 'number') return document.createTextNode(fmtNum(value));
  if (typeof value !== 'object') return document.createTextNode(String(value));
  if (depth > 3) return h('code', { text: JSON.stringify(value) });
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v && typeof v === 'object' && !Array.isArray(v))) {
      const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
      return table(
        keys,
        value.map((row) => keys.map((k) => jsonView(row[k], depth + 1))),
        { class: 'compact' },
      );
    }
    return document.createTextNode(
      value.map((v) => (typeof v === 'object' ? JSON.stringify(v) : String(v))).join(', '),
    );
  }
  const entries = Object.entries(value);
  if (!entries.length) return h('span', { class: 'muted', text: '–' });
  return h(
    'dl',
    { class: 'kv' },
    entries.map(([k, v]) => [h('dt', { text: k }), h('dd', {}, jsonView(v, depth + 1))]),
  );
}

// ---- numbers and times ----

/** A float with precision that suits its size; `–` for null or non-finite values. */
export function fmtNum(v) {
  if (v === null || v === undefined || !Number.isFinite(Number(v))) return '–';
  v = Number(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e9)) return v.toExponential(2).replace(/\.?0+e/, 'e');
  const digits = a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
  return v.toLocaleString(undefined, { maximumFractionDigits: digits });
}

/** An integer with thousands separators. */
export function fmtInt(v) {
  return v === null || v === undefined || !Number.isFinite(Number(v)) ? '–' : Math.round(Number(v)).toLocaleString();
}

/** Bytes as B, KiB, MiB or GiB. */
export function fmtBytes(n) {
  if (!Number.isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? fmtNum(n) : n} ${units[i]}`;
}

/** A share 0..1 as a percentage. */
export function fmtPct(v) {
  return v === null || v === undefined || !Number.isFinite(v) ? '–' : `${fmtNum(v * 100)} %`;
}

/** Unix seconds as a local date and time. */
export function fmtTime(secs) {
  return secs ? new Date(secs * 1000).toLocaleString() : '–';
}

/** Milliseconds as "840 ms" or "2.4 s". */
export function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '–';
  return ms < 1000 ? `${Math.round(ms)} ms` : `${fmtNum(ms / 1000)} s`;
}

// ---- messages ----

/**
 * Shows an error (an ApiError, Error or string) in the page's alert banner (#error). Aborted
 * requests (the user left the page) and errors already handled (a 401 that signed out) are
 * not shown.
 */
export function showError(err) {
  if (err && (err.name === 'AbortError' || err.handled)) return;
  const box = document.getElementById('error');
  box.querySelector('.text').textContent =
    typeof err === 'string' ? err : err && err.message ? err.message : String(err);
  box.hidden = false;
}

/** Shows a success or progress message in the status banner (#notice). */
export function showNotice(text) {
  const box = document.getElementById('notice');
  box.querySelector('.text').textContent = text;
  box.hidden = false;
}

/** Hides both banners. */
export function clearMessages() {
  for (const id of ['error', 'notice']) {
    const box = document.getElementById(id);
    box.hidden = true;
    box.querySelector('.text').textContent = '';
  }
}

/** A "Loading…" line for a container that is waiting on the server. */
export function loading(text = 'Loading…') {
  return h('p', { class: 'loading', role: 'status', text });
}

/**
 * Asks for confirmation in the page's <dialog id="confirm">; resolves true for the
 * confirm button, false for cancel or Escape. Focus starts on cancel, the safe choice.
 */
export function confirmAction(text, yesLabel = 'Confirm') {
  const dialog = document.getElementById('confirm');
  const yes = document.getElementById('confirm-yes');
  const no = document.getElementById('confirm-no');
  document.getElementById('confirm-text').textContent = text;
  yes.textContent = yesLabel;
  dialog.returnValue = '';
  return new Promise((resolve) => {
    const onYes = () => dialog.close('yes');
    const onNo = () => dialog.close('no');
    dialog.addEventListener(
      'close',
      () => {
        yes.removeEventListener('click', onYes);
        no.removeEventListener('click', onNo);
        resolve(dialog.returnValue === 'yes');
      },
      { once: true },
    );
    yes.addEventListener('click', onYes);
    no.addEventListener('click', onNo);
    dialog.showModal();
    no.focus();
  });
}

/** Disables a button while `work` runs, so a double click cannot send an action twice. */
export async function busy(button, work) {
  button.disabled = true;
  try {
    return await work();
  } finally {
    button.disabled = false;
  }
}
