// Hand-written SVG charts: line charts (the loss curve, live traffic) and bar charts (length
// histograms). A chart's <svg> element is created once and redrawn in place, so it keeps its
// identity (tests, focus, screen readers) while its data changes. Colours come from CSS
// classes (s1, s2, s3...), geometry from attributes.

import { svg, fmtNum } from './dom.js';

/** An empty chart to draw into: an <svg role="img"> with an accessible name. */
export function chartSvg(label, { testid, cls = '' } = {}) {
  const el = svg('svg', { class: `chart ${cls}`.trim(), role: 'img', 'aria-label': label });
  if (testid) el.dataset.testid = testid;
  return el;
}

/** Round tick values covering [min, max], about `count` of them. */
function niceTicks(min, max, count = 4) {
  const span = max - min;
  if (!(span > 0)) return [min];
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  const step = (n < 1.5 ? 1 : n < 3 ? 2 : n < 7 ? 5 : 10) * mag;
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** [min, max] of the finite numbers in `values`, widened when empty or flat. */
function extent(values, includeZero) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (Number.isFinite(v)) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  }
  if (lo === Infinity) return null;
  if (includeZero) {
    lo = Math.min(lo, 0);
    hi = Math.max(hi, 0);
  }
  if (lo === hi) {
    // Only an all-zero series is flat after including 0: show it at the bottom.
    if (includeZero) return [0, 1];
    const pad = Math.abs(lo) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }
  return [lo, hi];
}

/**
 * Draws line series into `el` (from chartSvg). Each series is `{label, cls, points: [[x, y]],
 * axis: 'left' | 'right', marker}`: a null y breaks the line; `marker` names the class of a
 * <circle> drawn at every point (e.g. `point`). Options: width, height, yZero (include 0 on
 * the y axes), xDomain ([min, max], else the data's), fmtX, fmtY, fmtRight (tick
 * formatters), empty (text shown without data). A point with no neighbour gets a dot.
 */
export function renderLineChart(el, series, opts = {}) {
  const W = opts.width || 640;
  const H = opts.height || 220;
  const fmtX = opts.fmtX || fmtNum;
  const fmtY = opts.fmtY || fmtNum;
  const fmtRight = opts.fmtRight || fmtNum;
  const hasRight = series.some((s) => s.axis === 'right');
  const m = { l: 56, r: hasRight ? 60 : 12, t: 22, b: 24 };
  el.setAttribute('viewBox', `0 0 ${W} ${H}`);
  el.replaceChildren();

  const all = series.flatMap((s) => s.points);
  const xs =
    opts.xDomain ||
    extent(
      all.map((p) => p[0]),
      false,
    );
  const ys = {
    left: extent(
      series.filter((s) => s.axis !== 'right').flatMap((s) => s.points.map((p) => p[1])),
      opts.yZero,
    ),
    right: extent(
      series.filter((s) => s.axis === 'right').flatMap((s) => s.points.map((p) => p[1])),
      opts.yZero,
    ),
  };
  legend(el, series, m.l);
  if (!xs || (!ys.left && !ys.right)) {
    el.append(
      svg('text', { x: W / 2, y: H / 2, class: 'empty', 'text-anchor': 'middle' }, opts.empty || 'No data yet'),
    );
    return;
  }
  const x = (v) => m.l + ((v - xs[0]) / (xs[1] - xs[0])) * (W - m.l - m.r);
  const yOf = (axis) => {
    const d = ys[axis];
    return (v) => H - m.b - ((v - d[0]) / (d[1] - d[0])) * (H - m.t - m.b);
  };

  // Grid lines and tick labels.
  if (ys.left) {
    const y = yOf('left');
    for (const t of niceTicks(ys.left[0], ys.left[1])) {
      el.append(svg('line', { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t), class: 'grid' }));
      el.append(svg('text', { x: m.l - 6, y: y(t) + 4, class: 'tick', 'text-anchor': 'end' }, fmtY(t)));
    }
  }
  if (ys.right) {
    const y = yOf('right');
    for (const t of niceTicks(ys.right[0], ys.right[1])) {
      el.append(svg('text', { x: W - m.r + 6, y: y(t) + 4, class: 'tick' }, fmtRight(t)));
    }
  }
  for (const t of niceTicks(xs[0], xs[1], 5)) {
    el.append(svg('text', { x: x(t), y: H - 6, class: 'tick', 'text-anchor': 'middle' }, fmtX(t)));
  }
  el.append(svg('line', { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: 'axis' }));

  for (const s of series) {
    if (!ys[s.axis === 'right' ? 'right' : 'left']) continue;
    const y = yOf(s.axis === 'right' ? 'right' : 'left');
    let d = '';
    let pen = 'M';
    s.points.forEach(([px, py], i) => {
      if (!Number.isFinite(py)) {
        pen = 'M';
        return;
      }
      d += `${pen}${x(px).toFixed(1)},${y(py).toFixed(1)}`;
      const next = s.points[i + 1];
      if (pen === 'M' && !s.marker && !(next && Number.isFinite(next[1]))) {
        el.append(svg('circle', { cx: x(px).toFixed(1), cy: y(py).toFixed(1), r: 2.5, class: `dot ${s.cls}` }));
      }
      pen = 'L';
    });
    if (d) el.append(svg('path', { d, class: `line ${s.cls}` }));
    if (s.marker) {
      for (const [px, py] of s.points) {
        if (Number.isFinite(py)) {
          el.append(
            svg('circle', { cx: x(px).toFixed(1), cy: y(py).toFixed(1), r: 2.5, class: `${s.marker} ${s.cls}` }),
          );
        }
      }
    }
  }
}

/** The series' names along the top, each with a swatch of its colour. */
function legend(el, series, left) {
  let at = left;
  for (const s of series) {
    el.append(svg('rect', { x: at, y: 6, width: 10, height: 10, class: `swatch ${s.cls}` }));
    el.append(svg('text', { x: at + 14, y: 15, class: 'legend' }, s.label));
    at += 24 + s.label.length * 7;
  }
}

/**
 * Draws a bar chart into `el`: `bars` are `{label, value}`; every bar has a <title> with its
 * label and value. Options: width, height, fmtY, xLabel (a caption under the axis).
 */
export function renderBarChart(el, bars, opts = {}) {
  const W = opts.width || 640;
  const H = opts.height || 220;
  const m = { l: 56, r: 12, t: 12, b: opts.xLabel ? 40 : 26 };
  el.setAttribute('viewBox', `0 0 ${W} ${H}`);
  el.replaceChildren();
  if (!bars.length) {
    el.append(svg('text', { x: W / 2, y: H / 2, class: 'empty', 'text-anchor': 'middle' }, 'No data'));
    return;
  }
  const max = Math.max(...bars.map((b) => b.value), 1);
  const y = (v) => H - m.b - (v / max) * (H - m.t - m.b);
  for (const t of niceTicks(0, max)) {
    el.append(svg('line', { x1: m.l, x2: W - m.r, y1: y(t), y2: y(t), class: 'grid' }));
    el.append(svg('text', { x: m.l - 6, y: y(t) + 4, class: 'tick', 'text-anchor': 'end' }, (opts.fmtY || fmtNum)(t)));
  }
  const slot = (W - m.l - m.r) / bars.length;
  const every = Math.ceil(bars.length / Math.max(1, Math.floor((W - m.l - m.r) / 60)));
  bars.forEach((b, i) => {
    const rect = svg('rect', {
      x: (m.l + i * slot + slot * 0.1).toFixed(1),
      y: y(b.value).toFixed(1),
      width: (slot * 0.8).toFixed(1),
      height: (H - m.b - y(b.value)).toFixed(1),
      class: 'bar',
    });
    rect.append(svg('title', {}, `${b.label}: ${fmtNum(b.value)}`));
    el.append(rect);
    if (i % every === 0) {
      el.append(
        svg('text', { x: m.l + (i + 0.5) * slot, y: H - m.b + 14, class: 'tick', 'text-anchor': 'middle' }, b.label),
      );
    }
  });
  el.append(svg('line', { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: 'axis' }));
  if (opts.xLabel)
    el.append(svg('text', { x: (m.l + W - m.r) / 2, y: H - 4, class: 'tick', 'text-anchor': 'middle' }, opts.xLabel));
}
