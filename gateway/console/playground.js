// Playground (#/playground): one prompt, up to two models side by side, each answer streamed
// as it is generated, with its time to first token, token count, decode speed and the version
// that served it; then thumbs, a correction and feedback on either answer.

import { getJSON, request, readSSE, send } from './api.js';
import { h, field, fmtNum, fmtInt, fmtMs, showError, busy } from './dom.js';

/** A model picker; `none` adds a "none" choice. */
function picker(id, ids, none) {
  const select = h(
    'select',
    { id },
    none ? h('option', { value: '', text: 'none' }) : null,
    ids.map((m) => h('option', { value: m, text: m })),
  );
  return select;
}

/** The chat request's sampling parameters from the form; blank fields are left out. */
function params() {
  const out = {};
  const num = (id, key, parse) => {
    const raw = document.getElementById(id).value.trim();
    if (raw !== '') out[key] = parse(raw);
  };
  num('temperature', 'temperature', Number);
  num('max-tokens', 'max_tokens', (v) => parseInt(v, 10));
  num('top-p', 'top_p', Number);
  num('seed', 'seed', (v) => parseInt(v, 10));
  return out;
}

/** One answer column: the streamed text, its figures, and its feedback controls. */
function side(key) {
  const s = { key, responseId: null, thumbs: null };
  s.title = h('h2', { id: `side-${key}-title`, text: `Answer ${key.toUpperCase()}` });
  s.answer = h('div', { id: `answer-${key}`, class: 'answer-text', 'aria-live': 'polite', 'aria-busy': 'false' });
  s.stats = h('dl', { class: 'kv stats', id: `stats-${key}` });
  s.up = h('button', {
    type: 'button',
    id: `thumbs-up-${key}`,
    class: 'thumb',
    'aria-label': `Thumbs up for answer ${key.toUpperCase()}`,
    'aria-pressed': 'false',
    text: 'Thumbs up',
    disabled: true,
  });
  s.down = h('button', {
    type: 'button',
    id: `thumbs-down-${key}`,
    class: 'thumb',
    'aria-label': `Thumbs down for answer ${key.toUpperCase()}`,
    'aria-pressed': 'false',
    text: 'Thumbs down',
    disabled: true,
  });
  s.correction = h('textarea', { id: `correction-${key}`, rows: 3, disabled: true });
  s.send = h('button', { type: 'button', id: `send-feedback-${key}`, text: 'Send feedback', disabled: true });
  s.sent = h('p', {
    class: 'sent',
    testid: `feedback-sent-${key}`,
    role: 'status',
    hidden: true,
    text: 'Feedback sent',
  });
  const setThumbs = (value) => {
    s.thumbs = s.thumbs === value ? null : value;
    s.up.setAttribute('aria-pressed', String(s.thumbs === 'up'));
    s.down.setAttribute('aria-pressed', String(s.thumbs === 'down'));
  };
  s.up.addEventListener('click', () => setThumbs('up'));
  s.down.addEventListener('click', () => setThumbs('down'));
  s.send.addEventListener('click', () => sendFeedback(s));
  s.el = h(
    'section',
    { class: 'side card', id: `side-${key}`, 'aria-labelledby': s.title.id },
    s.title,
    s.answer,
    s.stats,
    h(
      'div',
      { class: 'feedback-controls' },
      h('div', { class: 'thumbs', role: 'group', 'aria-label': 'Rate this answer' }, s.up, s.down),
      field('Correction (what the answer should have been)', s.correction),
      h('div', { class: 'actions' }, s.send),
      s.sent,
    ),
  );
  return s;
}

/** Shows the figures of a side's run: `[label, testid, text]` triples. */
function showStats(s, figures) {
  s.stats.replaceChildren(
    ...figures.flatMap(([label, testid, text]) => [
      h('dt', { text: label }),
      h('dd', { testid: `${testid}-${s.key}`, text }),
    ]),
  );
}

/** Clears a side for a new run (or hides it when its model is none). */
function reset(s, model) {
  s.el.hidden = !model;
  s.responseId = null;
  s.thumbs = null;
  s.answer.textContent = '';
  s.answer.classList.remove('failed');
  s.stats.replaceChildren();
  s.up.setAttribute('aria-pressed', 'false');
  s.down.setAttribute('aria-pressed', 'false');
  s.correction.value = '';
  s.sent.hidden = true;
  for (const c of [s.up, s.down, s.correction, s.send]) c.disabled = true;
  s.title.textContent = `Answer ${s.key.toUpperCase()}${model ? `: ${model}` : ''}`;
}

/** Streams one chat completion into a side, timing the first token and the decode rate. */
async function runSide(s, model, prompt, signal) {
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let served = '–';
  const figures = () => {
    const end = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const decodeSecs = first === null ? 0 : (end - first) / 1000;
    return [
      ['Served version', 'served', served],
      ['Time to first token', 'ttft', first === null ? '–' : fmtMs(first - started)],
      ['Tokens', 'tokens', `${fmtInt(tokens)}${usage ? '' : ' (chunks)'}`],
      [
        'Tokens/s (after the first)',
        'tokens-per-s',
        tokens > 1 && decodeSecs > 0 ? fmtNum((tokens - 1) / decodeSecs) : '–',
      ],
      ['Total time', 'total', fmtMs(end - started)],
    ];
  };
  s.answer.setAttribute('aria-busy', 'true');
  try {
    const res = await request('POST', '/v1/chat/completions', {
      json: {
        model,
        messages: [{ role: 'user', content: prompt }],
        stream: true,
        stream_options: { include_usage: true },
        ...params(),
      },
      signal,
    });
    served = res.headers.get('x-switchyard-served-version') || '–';
    await readSSE(res, (data) => {
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.id) s.responseId = chunk.id;
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        chunks += 1;
        s.answer.append(delta.content);
      }
      showStats(s, figures());
    });
  } catch (err) {
    if (err.name === 'AbortError') {
      s.answer.append(h('span', { class: 'muted', text: ' [stopped]' }));
    } else {
      s.answer.classList.add('failed');
      s.answer.append(
        h('span', {
          class: 'error-text',
          role: 'alert',
          text: `${s.answer.textContent ? '\n' : ''}Error: ${err.message}`,
        }),
      );
    }
  } finally {
    s.answer.setAttribute('aria-busy', 'false');
    showStats(s, figures());
    if (s.responseId) for (const c of [s.up, s.down, s.correction, s.send]) c.disabled = false;
  }
}

/** Posts the thumbs and correction for a side's answer. */
async function sendFeedback(s) {
  const body = { response_id: s.responseId };
  if (s.thumbs) body.thumbs = s.thumbs;
  if (s.correction.value.trim()) body.correction = s.correction.value;
  if (!body.thumbs && !body.correction) {
    showError('Choose thumbs up or down, or write a correction, first.');
    return;
  }
  try {
    await busy(s.send, () => send('POST', '/v1/feedback', body));
    s.sent.hidden = false;
    for (const c of [s.up, s.down, s.correction, s.send]) c.disabled = true;
  } catch (err) {
    showError(err);
  }
}

export const page = {
  title: 'Playground',
  admin: true,
  async render(root, ctx) {
    const models = await getJSON('/v1/models', ctx.signal);
    const ids = models.data.filter((m) => (m.kind || 'chat') === 'chat').map((m) => m.id);
    const prompt = h('textarea', { id: 'prompt', rows: 5, required: true });
    const modelA = picker('model-a', ids, false);
    const modelB = picker('model-b', ids, true);
    const num = (id, attrs) => h('input', { id, type: 'number', inputmode: 'decimal', ...attrs });
    const run = h('button', { type: 'submit', id: 'run', class: 'primary', text: 'Run' });
    const stop = h('button', { type: 'button', id: 'stop', text: 'Stop', disabled: true });
    const form = h(
      'form',
      { id: 'playground-form', class: 'card' },
      field('Prompt', prompt),
      h(
        'div',
        { class: 'form-grid' },
        field('Model A', modelA),
        field('Model B', modelB),
        field('Temperature', num('temperature', { min: 0, max: 2, step: 0.1, value: '0.7' })),
        field('Max tokens', num('max-tokens', { min: 1, step: 1, value: '256' })),
        field('Top p', num('top-p', { min: 0, max: 1, step: 0.05, value: '1' })),
        field(
          'Seed',
          num('seed', { min: 0, step: 1, placeholder: 'random' }),
          'The same seed and request give the same answer.',
        ),
      ),
      h('div', { class: 'actions' }, run, stop),
    );
    const a = side('a');
    const b = side('b');
    reset(a, null);
    reset(b, null);
    root.append(form, h('div', { class: 'sides' }, a.el, b.el));

    let controller = null;
    ctx.onLeave(() => controller && controller.abort());
    stop.addEventListener('click', () => controller && controller.abort());
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      if (!prompt.value.trim()) {
        showError('Write a prompt first.');
        prompt.focus();
        return;
      }
      controller = new AbortController();
      run.disabled = true;
      stop.disabled = false;
      reset(a, modelA.value);
      reset(b, modelB.value);
      const runs = [runSide(a, modelA.value, prompt.value, controller.signal)];
      if (modelB.value) runs.push(runSide(b, modelB.value, prompt.value, controller.signal));
      await Promise.all(runs);
      run.disabled = false;
      stop.disabled = true;
    });
  },
};
