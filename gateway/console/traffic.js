// Traffic (#/traffic): polls /admin/metrics every 5 s and, per served model or adapter version,
// charts requests/s, completion tokens/s, time to first token p50/p95 and the error rate over
// each interval between two polls (the last 60 points); below, the releases now running.

import { getJSON, request, seg } from './api.js';
import { h, fmtNum, fmtPct, fmtMs, loading, showError } from './dom.js';
import { chartSvg, renderLineChart } from './charts.js';
import { parseProm, histogramQuantile } from './prom.js';
import { releasesTable } from './models.js';

const POLL_MS = 5000;
const KEEP = 60;

/**
 * One scrape's counters per series: the adapter version (`name@version`), or the model id for
 * the base model. Requests and errors (status 400 and above) count answers that resolved a
 * model; TTFT buckets are cumulative counts by upper bound.
 */
function countersBySeries(samples) {
  const baseId = (
    samples.find((s) => s.name === 'switchyard_requests_total' && s.labels.model && !s.labels.adapter) || { labels: {} }
  ).labels.model;
  const series = new Map();
  const get = (key) => {
    if (!series.has(key)) series.set(key, { requests: 0, errors: 0, tokens: 0, ttft: new Map() });
    return series.get(key);
  };
  for (const s of samples) {
    if (s.name === 'switchyard_requests_total' && s.labels.model) {
      const e = get(s.labels.adapter || s.labels.model);
      e.requests += s.value;
      if (Number(s.labels.status) >= 400) e.errors += s.value;
    } else if (s.name === 'switchyard_completion_tokens_total') {
      get(s.labels.adapter || s.labels.model).tokens += s.value;
    } else if (s.name === 'switchyard_time_to_first_token_seconds_bucket') {
      const e = get(s.labels.adapter || baseId || 'base model');
      const le = s.labels.le === '+Inf' ? Infinity : Number(s.labels.le);
      e.ttft.set(le, (e.ttft.get(le) || 0) + s.value);
    }
  }
  return series;
}

/** A counter's increase; a smaller value means the process restarted, so it counts from 0. */
const increase = (now, before) => (now >= before ? now - before : now);

/** The rates of one series between two scrapes `secs` apart. */
function ratesBetween(now, before, secs) {
  const b = before || { requests: 0, errors: 0, tokens: 0, ttft: new Map() };
  const requests = increase(now.requests, b.requests);
  const buckets = [...now.ttft].map(([le, count]) => ({ le, count: increase(count, b.ttft.get(le) || 0) }));
  const p50 = histogramQuantile(0.5, buckets);
  const p95 = histogramQuantile(0.95, buckets);
  return {
    rps: requests / secs,
    tps: increase(now.tokens, b.tokens) / secs,
    p50: p50 === null ? null : p50 * 1000,
    p95: p95 === null ? null : p95 * 1000,
    errorRate: requests > 0 ? increase(now.errors, b.errors) / requests : null,
  };
}

/** The four small charts of one series, created once and redrawn in place. */
function seriesCard(key) {
  const charts = {
    rps: chartSvg(`Requests per second for ${key}`, { cls: 'small' }),
    tps: chartSvg(`Completion tokens per second for ${key}`, { cls: 'small' }),
    ttft: chartSvg(`Time to first token p50 and p95 for ${key}`, { cls: 'small' }),
    err: chartSvg(`Error rate for ${key}`, { cls: 'small' }),
  };
  const latest = h('p', { class: 'latest' });
  const figure = (chart, caption) => h('figure', {}, h('figcaption', { text: caption }), chart);
  const el = h(
    'section',
    { class: 'card traffic-series', testid: `traffic-${key}` },
    h('h3', { text: key }),
    latest,
    h(
      'div',
      { class: 'chart-grid' },
      figure(charts.rps, 'Requests/s'),
      figure(charts.tps, 'Tokens/s'),
      figure(charts.ttft, 'Time to first token (ms)'),
      figure(charts.err, 'Error rate (%)'),
    ),
  );
  return { el, charts, latest, points: [] };
}

/** Redraws one series' charts from its kept points (x: seconds before now). */
function drawSeries(card, now) {
  const pts = card.points;
  const x = (p) => (p.t - now) / 1000;
  const opts = {
    width: 320,
    height: 140,
    yZero: true,
    xDomain: [(-KEEP * POLL_MS) / 1000, 0],
    fmtX: (v) => `${Math.round(v)} s`,
  };
  renderLineChart(card.charts.rps, [{ label: 'req/s', cls: 's1', points: pts.map((p) => [x(p), p.rps]) }], opts);
  renderLineChart(card.charts.tps, [{ label: 'tokens/s', cls: 's2', points: pts.map((p) => [x(p), p.tps]) }], opts);
  renderLineChart(
    card.charts.ttft,
    [
      { label: 'p50', cls: 's1', points: pts.map((p) => [x(p), p.p50]) },
      { label: 'p95', cls: 's3', points: pts.map((p) => [x(p), p.p95]) },
    ],
    { ...opts, empty: 'No first tokens yet' },
  );
  renderLineChart(
    card.charts.err,
    [{ label: 'errors', cls: 's4', points: pts.map((p) => [x(p), p.errorRate === null ? null : p.errorRate * 100]) }],
    { ...opts, empty: 'No requests yet' },
  );
  const p = pts[pts.length - 1];
  card.latest.textContent = p
    ? `Last ${fmtNum(p.secs)} s: ${fmtNum(p.rps)} req/s · ${fmtNum(p.tps)} tokens/s · first token p50 ${fmtMs(p.p50)}, p95 ${fmtMs(p.p95)} · errors ${fmtPct(p.errorRate)}`
    : 'Waiting for the second sample…';
}

/** The releases running or paused now, with what their evidence says. */
async function runningReleases(box, signal) {
  const adapters = (await getJSON('/admin/adapters', signal)).data || [];
  const active = adapters.filter((a) =>
    Object.values(a.releases || {}).some((r) => r.status === 'running' || r.status === 'paused'),
  );
  const lists = await Promise.all(
    active.map((a) =>
      getJSON(`/admin/adapters/${seg(a.name)}/releases`, signal).then((r) =>
        r.data.filter((x) => x.status === 'running' || x.status === 'paused'),
      ),
    ),
  );
  const tables = active.map((a, i) => releasesTable(a.name, lists[i])).filter(Boolean);
  box.replaceChildren(
    box.firstChild,
    ...(tables.length ? tables : [h('p', { class: 'empty', id: 'no-releases', text: 'No release is running.' })]),
  );
}

export const page = {
  title: 'Traffic',
  admin: true,
  async render(root, ctx) {
    const status = h('p', {
      class: 'muted',
      id: 'traffic-status',
      role: 'status',
      text: 'Rates appear after the second sample, 5 s from now.',
    });
    const grid = h('div', { class: 'traffic', id: 'traffic-series' });
    const releases = h(
      'section',
      { class: 'card', id: 'running-releases', 'aria-labelledby': 'releases-title' },
      h('h2', { id: 'releases-title', text: 'Running releases' }),
      loading(),
    );
    root.append(status, grid, releases);

    const cards = new Map();
    let previous = null;

    /** One poll: scrape, compute the interval's rates, redraw; then the releases. */
    const poll = async () => {
      const text = await (await request('GET', '/admin/metrics', { signal: ctx.signal })).text();
      const at = performance.now();
      const counters = countersBySeries(parseProm(text));
      if (previous) {
        const secs = (at - previous.at) / 1000;
        for (const [key, now] of counters) {
          if (!cards.has(key)) {
            const card = seriesCard(key);
            cards.set(key, card);
            grid.append(card.el);
          }
          const card = cards.get(key);
          card.points.push({ t: at, secs, ...ratesBetween(now, previous.counters.get(key), secs) });
          if (card.points.length > KEEP) card.points.shift();
        }
        for (const card of cards.values()) drawSeries(card, at);
        status.textContent = cards.size
          ? `Updated ${new Date().toLocaleTimeString()}; every 5 s, the last ${KEEP} samples.`
          : 'No model has served a request yet.';
      }
      previous = { at, counters };
      await runningReleases(releases, ctx.signal);
    };

    const timer = setInterval(() => poll().catch(showError), POLL_MS);
    ctx.onLeave(() => clearInterval(timer));
    await poll();
  },
};
