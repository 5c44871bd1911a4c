// Training (#/training, #/training/<job id>): a job form built from the server's parameter
// list (only changed values are sent), the jobs list, and one job's page with its live loss
// and learning-rate chart (fed by the job's server-sent events), its evaluation, Cancel, and
// promotion of the registered candidate.

import { getJSON, send, request, readSSE, seg } from './api.js';
import {
  h,
  fill,
  NAME_PATTERN,
  field,
  table,
  jsonView,
  fmtInt,
  fmtTime,
  loading,
  showError,
  showNotice,
  confirmAction,
  busy,
} from './dom.js';
import { chartSvg, renderLineChart } from './charts.js';
import { listDatasets } from './datasets.js';
import { promoteToProd, movedMessage } from './models.js';

const FINISHED = new Set(['succeeded', 'failed', 'cancelled']);

/** The input for one parameter, by its kind; defaults filled in. */
function paramInput(p) {
  const id = `param-${p.name}`;
  const def = p.default;
  switch (p.kind) {
    case 'bool':
      return h('input', { id, type: 'checkbox', checked: Boolean(def) });
    case 'choice':
      return h(
        'select',
        { id },
        (p.choices || []).map((c) =>
          h('option', { value: String(c), text: String(c), selected: String(c) === String(def) }),
        ),
      );
    case 'int':
    case 'float':
      return h('input', {
        id,
        type: 'number',
        step: p.kind === 'int' ? 1 : 'any',
        min: p.min,
        max: p.max,
        value: def === null || def === undefined ? '' : String(def),
        placeholder: def === null || def === undefined ? 'unset' : null,
      });
    default:
      return h('input', {
        id,
        type: 'text',
        value: def === null || def === undefined ? '' : String(def),
        placeholder: def === null || def === undefined ? 'unset' : null,
      });
  }
}

/**
 * The parameters whose inputs differ from their defaults, typed by kind. Throws an Error
 * naming the parameter when a number does not parse.
 */
function changedParams(specs) {
  const out = {};
  for (const p of specs) {
    const el = document.getElementById(`param-${p.name}`);
    let value;
    if (p.kind === 'bool') value = el.checked;
    else if (el.value.trim() === '') continue;
    else if (p.kind === 'int' || p.kind === 'float') {
      value = Number(el.value);
      if (!Number.isFinite(value) || (p.kind === 'int' && !Number.isInteger(value)))
        throw new Error(`${p.name} must be ${p.kind === 'int' ? 'a whole number' : 'a number'}.`);
    } else value = el.value;
    const def = p.default;
    let same;
    if (p.kind === 'bool') same = Boolean(def) === value;
    else if (p.kind === 'int' || p.kind === 'float') same = def !== null && def !== undefined && Number(def) === value;
    else same = def !== null && def !== undefined && String(def) === value;
    if (!same) out[p.name] = value;
  }
  return out;
}

/** The "start a job" form. */
async function jobForm(ctx) {
  const [params, adapters, datasets] = await Promise.all([
    getJSON('/admin/finetune/params', ctx.signal),
    getJSON('/admin/adapters', ctx.signal).catch(() => ({ data: [] })),
    listDatasets(ctx.signal),
  ]);
  const specs = params.data || [];
  const adapter = h('input', {
    id: 'job-adapter',
    required: true,
    list: 'job-adapter-names',
    autocomplete: 'off',
    pattern: NAME_PATTERN,
  });
  const names = h(
    'datalist',
    { id: 'job-adapter-names' },
    adapters.data.map((a) => h('option', { value: a.name })),
  );
  const wanted = ctx.query.get('dataset');
  const known = datasets.map((d) => d.id);
  if (wanted && !known.includes(wanted)) known.unshift(wanted);
  const dataset = h(
    'select',
    { id: 'job-dataset' },
    h('option', { value: 'feedback', text: 'Accepted feedback' }),
    known.map((id) => h('option', { value: id, text: `Uploaded dataset ${id}`, selected: id === wanted })),
    h('option', { value: 'other', text: 'Another uploaded dataset id…' }),
  );
  const otherId = h('input', { id: 'job-dataset-id', placeholder: 'ds-…', autocomplete: 'off' });
  const otherField = field('Uploaded dataset id', otherId);
  otherField.hidden = true;
  dataset.addEventListener('change', () => {
    otherField.hidden = dataset.value !== 'other';
  });
  const margin = h('input', { id: 'job-promote-margin', type: 'number', min: 0, step: 'any', placeholder: 'never' });
  const start = h('button', { type: 'submit', id: 'job-start', class: 'primary', text: 'Start training' });
  const form = h(
    'form',
    { id: 'job-form', class: 'card', 'aria-labelledby': 'job-form-title' },
    h('h2', { id: 'job-form-title', text: 'Start a training job' }),
    h(
      'div',
      { class: 'form-grid' },
      field('Adapter name', adapter, 'The result is registered as a new version of this adapter, alias candidate.'),
      names,
      field('Dataset', dataset),
      otherField,
      field(
        'Promote margin',
        margin,
        'Promote the candidate to prod when it beats prod by this much (accuracy, or validation loss); blank: an admin promotes.',
      ),
    ),
    h(
      'details',
      { class: 'params', open: true },
      h('summary', { text: 'Hyper-parameters (only changed values are sent)' }),
      h(
        'div',
        { class: 'form-grid' },
        specs.map((p) => field(p.name, paramInput(p), p.help)),
      ),
    ),
    h('div', { class: 'actions' }, start),
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      if (!adapter.value) throw new Error('Give the adapter name.');
      const ds =
        dataset.value === 'feedback'
          ? { kind: 'feedback' }
          : { kind: 'uploaded', id: dataset.value === 'other' ? otherId.value.trim() : dataset.value };
      if (ds.kind === 'uploaded' && !ds.id) throw new Error('Give the uploaded dataset id.');
      const body = { adapter: adapter.value, dataset: ds, params: changedParams(specs) };
      if (margin.value !== '') body.promote_margin = Number(margin.value);
      const job = await busy(start, () => send('POST', '/admin/finetune/jobs', body));
      showNotice(`Job ${job.id} queued.`);
      location.hash = `#/training/${encodeURIComponent(job.id)}`;
    } catch (err) {
      showError(err);
      if (err.param === 'adapter') adapter.focus();
    }
  });
  return form;
}

/** A job's progress as a <progress> bar with its text. */
function progress(job) {
  const bar = h('progress', {
    id: `progress-${job.id}`,
    max: job.total_steps || 1,
    value: job.total_steps ? job.step : 0,
    'aria-label': `Progress of ${job.id}`,
  });
  return h(
    'span',
    { class: 'progress' },
    bar,
    ` ${fmtInt(job.step)} / ${job.total_steps ? fmtInt(job.total_steps) : '?'}`,
  );
}

/** The jobs list, redrawn every 5 s while the page is open. */
async function jobsList(box, ctx) {
  const draw = async () => {
    const jobs = (await getJSON('/admin/finetune/jobs', ctx.signal)).data || [];
    box.replaceChildren(
      box.firstChild,
      jobs.length
        ? table(
            ['Job', 'Adapter', 'State', 'Progress', 'Created', 'Version'],
            jobs.map((j) => [
              h(
                'a',
                { href: `#/training/${encodeURIComponent(j.id)}`, testid: `job-${j.id}` },
                h('code', { text: j.id }),
              ),
              j.adapter,
              h('span', { class: `badge state-${j.state}`, text: j.state }),
              progress(j),
              fmtTime(j.created),
              j.version ? `v${j.version}${j.promoted ? ' (promoted)' : ''}` : '–',
            ]),
            { id: 'jobs' },
          )
        : h('p', { class: 'empty', text: 'No training jobs yet.' }),
    );
  };
  const timer = setInterval(() => {
    draw().catch(showError);
  }, 5000);
  ctx.onLeave(() => clearInterval(timer));
  await draw();
}

/** The job's status block. */
function statusView(job) {
  const rows = [
    ['Adapter', job.adapter],
    ['State', h('span', { class: `badge state-${job.state}`, testid: 'job-state', text: job.state })],
    ['Progress', progress(job)],
    ['Created', fmtTime(job.created)],
    ['Started', fmtTime(job.started)],
    ['Finished', fmtTime(job.finished)],
    ['Version', job.version ? `v${job.version}${job.promoted ? ' (promoted to prod)' : ''}` : '–'],
  ];
  if (job.error)
    rows.push(['Error', h('span', { class: 'error-text', text: `${job.error.code}: ${job.error.message}` })]);
  return h(
    'dl',
    { class: 'kv', id: 'job-status' },
    rows.map(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)]),
  );
}

/** The evaluation table and, for a registered version, the button that promotes it. */
async function outcomeView(box, job, ctx) {
  const metrics = job.metrics && typeof job.metrics === 'object' ? job.metrics : {};
  const parts = [h('h2', { text: 'Evaluation' })];
  parts.push(
    Array.isArray(metrics.eval)
      ? h('div', { id: 'job-eval' }, jsonView(metrics.eval))
      : h('p', { class: 'muted', text: 'No evaluation recorded.' }),
  );
  if (metrics.decision) parts.push(h('p', {}, 'Promotion policy: ', h('span', { text: metrics.decision })));
  if (metrics.release_started)
    parts.push(h('p', { text: 'A staged release of the candidate was started on prod (see the models page).' }));
  if (job.version && job.state === 'succeeded') {
    const listing = await getJSON(`/admin/adapters/${seg(job.adapter)}`, ctx.signal).catch((err) => {
      if (err.status === 404) return null;
      throw err;
    });
    const current = listing && listing.aliases.prod ? listing.aliases.prod.version : null;
    const button = h('button', {
      type: 'button',
      class: 'primary',
      testid: `promote-${job.adapter}-${job.version}`,
      text: `Promote version ${job.version} to prod`,
      disabled: current === job.version,
    });
    /** Promotes; a lost compare-and-set is explained and the outcome redrawn with the fresh prod. */
    const promote = async () => {
      try {
        if (await promoteToProd(job.adapter, job.version, current, button)) button.disabled = true;
      } catch (err) {
        if (err.status !== 409) throw err;
        const fresh = await getJSON(`/admin/adapters/${seg(job.adapter)}`, ctx.signal);
        showError(movedMessage('prod', fresh.aliases.prod ? fresh.aliases.prod.version : null));
        await outcomeView(box, job, ctx);
      }
    };
    button.addEventListener('click', () => promote().catch(showError));
    parts.push(h('p', {}, `prod serves ${current === null ? 'no version yet' : `version ${current}`}. `, button));
  }
  box.replaceChildren(...parts);
}

/** One job's page: status, Cancel, the live chart, and the outcome when it is done. */
async function jobPage(root, id, ctx) {
  const statusBox = h(
    'section',
    { class: 'card', 'aria-labelledby': 'job-title' },
    h('h2', { id: 'job-title', text: `Job ${id}` }),
    loading(),
  );
  const cancel = h('button', { type: 'button', id: 'job-cancel', class: 'danger', text: 'Cancel job' });
  const chart = chartSvg('Training loss and learning rate by step', { testid: 'loss-chart', cls: 'loss-chart' });
  const last = h('div', { id: 'job-last-step' });
  const outcome = h('section', { class: 'card', id: 'job-outcome', hidden: true });
  root.append(
    h('p', {}, h('a', { href: '#/training', text: '← All jobs' })),
    statusBox,
    h(
      'section',
      { class: 'card', 'aria-labelledby': 'curve-title' },
      h('h2', { id: 'curve-title', text: 'Loss and learning rate' }),
      chart,
      last,
    ),
    outcome,
  );
  const steps = [];
  let job = null;
  let frame = 0;

  /** Redraws the chart and the latest step's figures (at most once per animation frame). */
  const redraw = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      renderLineChart(
        chart,
        [
          { label: 'loss', cls: 's1', points: steps.map((s) => [s.step, s.loss]), marker: 'point' },
          {
            label: 'validation loss',
            cls: 's3',
            points: steps.filter((s) => Number.isFinite(s.val_loss)).map((s) => [s.step, s.val_loss]),
            marker: 'val-point',
          },
          { label: 'learning rate (right axis)', cls: 's2', points: steps.map((s) => [s.step, s.lr]), axis: 'right' },
        ],
        { empty: job && job.state === 'queued' ? 'Waiting for the sidecar to start the job' : 'No steps yet' },
      );
      const s = steps[steps.length - 1];
      last.replaceChildren(
        s
          ? jsonView({
              step: s.step,
              epoch: s.epoch,
              loss: s.loss,
              lr: s.lr,
              grad_norm: s.grad_norm,
              'tokens/s': s.tokens_per_s,
              val_loss: s.val_loss,
            })
          : h('p', { class: 'muted', text: 'No steps logged yet.' }),
      );
    });
  };
  ctx.onLeave(() => cancelAnimationFrame(frame));

  /** Reloads the status; shows the outcome once the job finished. */
  const refresh = async () => {
    job = await getJSON(`/admin/finetune/jobs/${seg(id)}`, ctx.signal);
    fill(
      statusBox,
      statusBox.firstChild,
      statusView(job),
      FINISHED.has(job.state) ? null : h('div', { class: 'actions' }, cancel),
    );
    if (FINISHED.has(job.state) && outcome.hidden) {
      outcome.hidden = false;
      await outcomeView(outcome, job, ctx);
    }
  };

  cancel.addEventListener('click', async () => {
    if (!(await confirmAction(`Cancel job ${id}? A running job stops at its next step.`, 'Cancel job'))) return;
    try {
      await busy(cancel, () => send('POST', `/admin/finetune/jobs/${seg(id)}/cancel`));
      showNotice(`Asked job ${id} to stop.`);
      await refresh();
    } catch (err) {
      showError(err);
    }
  });

  /** Follows the loss curve until the server says [DONE], resuming after a dropped connection. */
  const follow = async () => {
    for (;;) {
      const after = steps.length ? steps[steps.length - 1].step : 0;
      try {
        const res = await request('GET', `/admin/finetune/jobs/${seg(id)}/events?stream=true&after=${after}`, {
          signal: ctx.signal,
        });
        const done = await readSSE(res, (data) => {
          const step = JSON.parse(data);
          if (!steps.length || step.step > steps[steps.length - 1].step) steps.push(step);
          redraw();
        });
        if (done) return;
      } catch (err) {
        if (ctx.signal.aborted || err.status) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };

  await refresh();
  redraw();
  const timer = setInterval(() => {
    if (job && !FINISHED.has(job.state)) refresh().catch(showError);
  }, 5000);
  ctx.onLeave(() => clearInterval(timer));
  await follow();
  await refresh();
  redraw();
}

export const page = {
  title: 'Training',
  admin: true,
  async render(root, ctx) {
    if (ctx.params[0]) {
      await jobPage(root, ctx.params[0], ctx);
      return;
    }
    const listBox = h(
      'section',
      { class: 'card', 'aria-labelledby': 'jobs-title' },
      h('h2', { id: 'jobs-title', text: 'Jobs' }),
      loading(),
    );
    const formBox = h('div', {}, loading());
    root.append(formBox, listBox);
    await Promise.all([jobForm(ctx).then((form) => formBox.replaceChildren(form)), jobsList(listBox, ctx)]);
  },
};
