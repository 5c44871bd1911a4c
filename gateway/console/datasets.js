// Datasets (#/datasets, #/datasets/<id>): upload a dataset file as it is, see what the server
// parsed from it, list the uploaded datasets and preview one (parsed rows and its curation
// report, with an SVG histogram of example lengths).

import { getJSON, request, seg } from './api.js';
import {
  h,
  fill,
  field,
  table,
  jsonView,
  fmtInt,
  fmtBytes,
  fmtTime,
  loading,
  clearMessages,
  showError,
  showNotice,
  busy,
} from './dom.js';
import { chartSvg, renderBarChart } from './charts.js';

/** The server's list of uploaded datasets, newest first. */
export async function listDatasets(signal) {
  return (await getJSON('/admin/finetune/datasets', signal)).data || [];
}

/** A short summary table of datasets, each linking to its preview. */
function datasetsTable(rows) {
  return table(
    ['Dataset', 'Format', 'Records', 'Examples', 'Dropped', 'Size', 'Uploaded', ''],
    rows.map((d) => [
      h('a', { href: `#/datasets/${encodeURIComponent(d.id)}`, testid: `dataset-${d.id}` }, h('code', { text: d.id })),
      d.format || '–',
      fmtInt(d.records),
      fmtInt(d.examples),
      fmtInt(d.dropped),
      fmtBytes(d.bytes),
      fmtTime(d.created),
      h('a', { href: `#/training?dataset=${encodeURIComponent(d.id)}`, text: 'Train on it' }),
    ]),
    { id: 'datasets' },
  );
}

/** The curation report: drops by reason, duplicates, PII scrubbed and the length histogram. */
function reportView(report) {
  if (!report) return null;
  const parts = [];
  const dropped = report.dropped_by_reason || {};
  parts.push(h('h3', { text: 'Dropped rows by reason' }));
  parts.push(
    Object.keys(dropped).length
      ? table(
          ['Reason', 'Rows'],
          Object.entries(dropped).map(([r, n]) => [r, fmtInt(n)]),
          { id: 'dropped-by-reason' },
        )
      : h('p', { class: 'muted', text: 'Nothing was dropped.' }),
  );
  if (report.duplicates !== undefined)
    parts.push(h('p', {}, 'Duplicates removed: ', h('strong', { text: fmtInt(report.duplicates) })));
  if (report.pii) {
    parts.push(h('h3', { text: 'PII scrubbed' }));
    parts.push(jsonView(report.pii));
  }
  const hist = report.length_histogram;
  if (Array.isArray(hist) && hist.length) {
    parts.push(h('h3', { text: 'Example length (tokens)' }));
    const chart = chartSvg('Histogram of example lengths in tokens', { testid: 'length-histogram' });
    renderBarChart(
      chart,
      hist.map((b) => ({
        label: b.max === undefined || b.max === null ? `${b.min}+` : `${b.min}–${b.max}`,
        value: b.count,
      })),
      { xLabel: 'tokens per example' },
    );
    parts.push(h('figure', {}, chart, h('figcaption', { text: 'Examples per length bucket.' })));
  }
  const known = new Set(['dropped_by_reason', 'duplicates', 'pii', 'length_histogram', 'dropped']);
  const rest = Object.fromEntries(Object.entries(report).filter(([k]) => !known.has(k)));
  if (Object.keys(rest).length) parts.push(h('details', {}, h('summary', { text: 'Full report' }), jsonView(rest)));
  return parts;
}

/** The preview of one dataset: its summary, first parsed rows and curation report. */
async function preview(box, id, signal) {
  box.replaceChildren(loading());
  const d = await getJSON(`/admin/finetune/datasets/${seg(id)}`, signal);
  const rows = Array.isArray(d.rows) ? d.rows : [];
  fill(
    box,
    h('h2', { id: 'preview-title', text: `Dataset ${d.id || id}` }),
    jsonView({ format: d.format, records: d.records, examples: d.examples, dropped: d.dropped, bytes: d.bytes }),
    h(
      'p',
      {},
      h('a', {
        class: 'button primary',
        href: `#/training?dataset=${encodeURIComponent(d.id || id)}`,
        text: 'Train on this dataset',
      }),
    ),
    h('h3', { text: `Parsed rows (first ${rows.length})` }),
    rows.length
      ? h(
          'div',
          { class: 'rows', id: 'dataset-rows' },
          rows.map((r) => h('pre', { class: 'row', text: JSON.stringify(r, null, 2) })),
        )
      : h('p', { class: 'muted', text: 'No rows to show.' }),
    reportView(d.report),
  );
}

export const page = {
  title: 'Datasets',
  admin: true,
  async render(root, ctx) {
    const file = h('input', { id: 'dataset-file', type: 'file', accept: '.json,.jsonl,application/json' });
    const upload = h('button', { type: 'submit', id: 'dataset-upload', class: 'primary', text: 'Upload dataset' });
    const result = h('div', { id: 'dataset-result', role: 'status' });
    const form = h(
      'form',
      { id: 'dataset-form', class: 'card', 'aria-labelledby': 'dataset-form-title' },
      h('h2', { id: 'dataset-form-title', text: 'Upload a dataset' }),
      field('Dataset file', file, 'JSON array or JSONL: alpaca, sharegpt, OpenAI messages, preference pairs or KTO.'),
      h('div', { class: 'actions' }, upload),
      result,
    );
    const listBox = h(
      'section',
      { class: 'card', 'aria-labelledby': 'datasets-title' },
      h('h2', { id: 'datasets-title', text: 'Uploaded datasets' }),
      loading(),
    );
    const previewBox = h('section', { class: 'card', id: 'dataset-preview', 'aria-live': 'polite' });
    previewBox.hidden = !ctx.params[0];
    root.append(form, listBox, previewBox);

    const showList = async () => {
      const rows = await listDatasets(ctx.signal);
      fill(
        listBox,
        listBox.firstChild,
        rows.length ? datasetsTable(rows) : h('p', { class: 'empty', text: 'No datasets uploaded yet.' }),
      );
    };

    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      if (!file.files.length) {
        showError('Choose a dataset file first.');
        return;
      }
      const chosen = file.files[0];
      showNotice(`Uploading ${chosen.name} (${fmtBytes(chosen.size)})…`);
      try {
        const res = await busy(upload, () =>
          request('POST', '/admin/finetune/datasets', {
            body: chosen,
            headers: { 'content-type': 'application/octet-stream' },
          }),
        );
        const d = await res.json();
        showNotice(`Uploaded ${chosen.name} as ${d.id}.`);
        result.replaceChildren(
          h(
            'p',
            {},
            'Stored as ',
            h('code', { testid: 'dataset-id', text: d.id }),
            ` (${d.format}): ${fmtInt(d.records)} records, ${fmtInt(d.examples)} examples, ${fmtInt(d.dropped)} dropped while reading, ${fmtBytes(d.bytes)}.`,
          ),
          h(
            'p',
            {},
            h('a', { href: `#/datasets/${encodeURIComponent(d.id)}`, text: 'Preview' }),
            ' · ',
            h('a', { href: `#/training?dataset=${encodeURIComponent(d.id)}`, text: 'Train on it' }),
          ),
        );
        form.reset();
        await showList();
      } catch (err) {
        clearMessages();
        showError(err);
      }
    });

    await Promise.all([showList(), ctx.params[0] ? preview(previewBox, ctx.params[0], ctx.signal) : null]);
  },
};
