// Audit (#/audit?offset=N): the registry's audit log, newest first, a page at a time, with a
// filter box that narrows the loaded page by adapter, action or actor.

import { getJSON } from './api.js';
import { h, field, table, fmtTime, loading } from './dom.js';

const LIMIT = 100;

/** What changed, in words: "v1 → v2", a version, a split, or the release event. */
function change(r) {
  const parts = [];
  if (r.from !== undefined || r.to !== undefined)
    parts.push(
      `${r.from === undefined || r.from === null ? '–' : `v${r.from}`} → ${r.to === undefined ? '–' : `v${r.to}`}`,
    );
  if (r.version !== undefined) parts.push(`v${r.version}`);
  if (r.routes) parts.push(r.routes.map((x) => `v${x.version} ${x.weight}%`).join(' · '));
  if (r.detail && r.detail.event) parts.push(String(r.detail.event));
  return parts.join('; ') || '–';
}

export const page = {
  title: 'Audit log',
  admin: true,
  async render(root, ctx) {
    const offset = Math.max(0, Number(ctx.query.get('offset') || 0));
    const filter = h('input', {
      id: 'audit-filter',
      type: 'search',
      autocomplete: 'off',
      placeholder: 'adapter, action or actor',
    });
    const count = h('p', { class: 'muted', id: 'audit-count', role: 'status' });
    const body = h('div', {}, loading());
    const prev = h('a', {
      class: 'button',
      id: 'audit-prev',
      href: `#/audit?offset=${Math.max(0, offset - LIMIT)}`,
      text: '← Newer',
    });
    const next = h('a', {
      class: 'button',
      id: 'audit-next',
      href: `#/audit?offset=${offset + LIMIT}`,
      text: 'Older →',
    });
    prev.hidden = offset === 0;
    root.append(
      h('div', { class: 'filters' }, field('Filter', filter, 'Matches the adapter, the action or the actor.')),
      count,
      body,
      h('div', { class: 'pager' }, prev, next),
    );

    const records = (await getJSON(`/admin/audit?offset=${offset}&limit=${LIMIT}`, ctx.signal)).data || [];
    next.hidden = records.length < LIMIT;
    const rows = records.map((r) => {
      const cells = [
        fmtTime(r.ts),
        r.actor,
        h('span', { class: `badge action-${r.action}`, text: r.action }),
        r.adapter,
        r.alias || '–',
        change(r),
        r.detail
          ? h('details', {}, h('summary', { text: 'detail' }), h('pre', { text: JSON.stringify(r.detail, null, 2) }))
          : '–',
      ];
      return { r, cells };
    });
    const draw = () => {
      const term = filter.value.trim().toLowerCase();
      const shown = rows.filter(
        ({ r }) =>
          !term ||
          [r.adapter, r.action, r.actor].some((v) =>
            String(v || '')
              .toLowerCase()
              .includes(term),
          ),
      );
      count.textContent = `${shown.length} of ${records.length} records on this page${term ? ` match "${filter.value.trim()}"` : ''}.`;
      body.replaceChildren(
        shown.length
          ? table(
              ['Time', 'Actor', 'Action', 'Adapter', 'Alias', 'Change', 'Detail'],
              shown.map((x) => x.cells),
              { id: 'audit' },
            )
          : h('p', {
              class: 'empty',
              text: records.length ? 'No record on this page matches.' : 'The audit log is empty.',
            }),
      );
    };
    filter.addEventListener('input', draw);
    draw();
  },
};
