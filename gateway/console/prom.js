// The Prometheus text exposition format, read into samples, and histogram quantiles computed
// the way Prometheus' histogram_quantile does (linear interpolation inside a bucket).

/** A sample value: a float, `NaN`, `+Inf` or `-Inf`. */
function parseValue(text) {
  if (text === '+Inf' || text === 'Inf') return Infinity;
  if (text === '-Inf') return -Infinity;
  return Number(text);
}

/** Reads `{a="x",b="y\"z"}` starting at `line[i] === '{'`; returns [labels, index after '}']. */
function parseLabels(line, i) {
  const labels = {};
  i += 1;
  while (i < line.length && line[i] !== '}') {
    const eq = line.indexOf('=', i);
    const key = line.slice(i, eq).trim();
    i = eq + 2; // past `="`
    let value = '';
    while (i < line.length && line[i] !== '"') {
      if (line[i] === '\\' && i + 1 < line.length) {
        const next = line[i + 1];
        value += next === 'n' ? '\n' : next;
        i += 2;
      } else {
        value += line[i];
        i += 1;
      }
    }
    labels[key] = value;
    i += 1; // past the closing quote
    while (i < line.length && (line[i] === ',' || line[i] === ' ')) i += 1;
  }
  return [labels, i + 1];
}

/** Every sample of a scrape as `{name, labels, value}`; comments and blank lines are skipped. */
export function parseProm(text) {
  const samples = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const nameEnd = line.search(/[{\s]/);
    if (nameEnd < 0) continue;
    const name = line.slice(0, nameEnd);
    let labels = {};
    let rest = line.slice(nameEnd);
    if (line[nameEnd] === '{') {
      const [parsed, after] = parseLabels(line, nameEnd);
      labels = parsed;
      rest = line.slice(after);
    }
    const value = parseValue(rest.trim().split(/\s+/)[0]);
    samples.push({ name, labels, value });
  }
  return samples;
}

/**
 * The q-quantile (0..1) of a histogram from its cumulative buckets `[{le, count}]` (any
 * order; the +Inf bucket is the total). Null when there are no observations. A rank in the
 * +Inf bucket answers the highest finite bound, as Prometheus does.
 */
export function histogramQuantile(q, buckets) {
  const sorted = [...buckets].sort((a, b) => a.le - b.le);
  if (!sorted.length) return null;
  const total = sorted[sorted.length - 1].count;
  if (!(total > 0)) return null;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of sorted) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe;
      const inBucket = b.count - prevCount;
      return inBucket > 0 ? prevLe + (b.le - prevLe) * ((rank - prevCount) / inBucket) : b.le;
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}
