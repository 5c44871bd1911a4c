// Review (#/review): the admin queue of user feedback. Filters live in the hash's query
// (#/review?status=pending&adapter=bot), so a filtered view can be reloaded or shared.

import { getJSON, send, seg } from './api.js';
import { h, field, loading, showError, showNotice, confirmAction, busy } from './dom.js';
import { itemCard, openEdit, attachShortcuts, focusSibling, shortcutHelp } from './items.js';

const STATUSES = ['pending', 'accepted', 'rejected'];
const FILTERS = ['adapter', 'task', 'tag', 'rating', 'since', 'until'];
const PAGE_SIZES = ['20', '50', '100', '200'];

/** Local midnight of a yyyy-mm-dd date (or the next midnight, for `until`) as unix seconds. */
function dayToUnix(day, endOfDay) {
  const [y, m, d] = day.split('-').map(Number);
  return Math.floor(new Date(y, m - 1, d + (endOfDay ? 1 : 0)).getTime() / 1000);
}

/** The list's query string for the server from the page's hash query. */
function serverQuery(q) {
  const out = new URLSearchParams({
    status: q.get('status') || 'pending',
    limit: q.get('limit') || '50',
    offset: q.get('offset') || '0',
  });
  for (const name of FILTERS) {
    const value = q.get(name);
    if (!value) continue;
    out.set(name, name === 'since' || name === 'until' ? String(dayToUnix(value, name === 'until')) : value);
  }
  return out;
}

/** Navigates to the review page with `changes` applied to the current filters. */
function go(q, changes) {
  const next = new URLSearchParams(q);
  for (const [k, v] of Object.entries(changes)) {
    if (v === '' || v === null || v === undefined) next.delete(k);
    else next.set(k, v);
  }
  location.hash = `#/review?${next}`;
}

/** The status switch (pending, accepted, rejected) and the filter form. */
function filters(q) {
  const status = q.get('status') || 'pending';
  const tabs = h(
    'div',
    { class: 'tabs', role: 'group', 'aria-label': 'Review status' },
    STATUSES.map((s) =>
      h('button', {
        type: 'button',
        id: `status-${s}`,
        'aria-pressed': String(s === status),
        text: s,
        on: { click: () => go(q, { status: s, offset: '' }) },
      }),
    ),
  );
  const input = (name, type = 'text') => h('input', { id: `filter-${name}`, name, type, value: q.get(name) || '' });
  const rating = h(
    'select',
    { id: 'filter-rating', name: 'rating' },
    h('option', { value: '', text: 'any' }),
    ['1', '2', '3', '4', '5'].map((r) => h('option', { value: r, text: r, selected: q.get('rating') === r })),
  );
  const limit = h(
    'select',
    { id: 'filter-limit', name: 'limit' },
    PAGE_SIZES.map((n) => h('option', { value: n, text: n, selected: (q.get('limit') || '50') === n })),
  );
  const form = h(
    'form',
    { id: 'review-filters', class: 'filters' },
    field('Adapter', input('adapter')),
    field('Task', input('task')),
    field('Tag', input('tag')),
    field('Rating', rating),
    field('Since', input('since', 'date')),
    field('Until', input('until', 'date')),
    field('Per page', limit),
    h('div', { class: 'field' }, h('button', { type: 'submit', id: 'filter-apply', text: 'Apply filters' })),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    go(q, { ...Object.fromEntries(FILTERS.map((n) => [n, data.get(n)])), limit: data.get('limit'), offset: '' });
  });
  return [tabs, form];
}

export const page = {
  title: 'Review feedback',
  admin: true,
  async render(root, ctx) {
    const q = ctx.query;
    const status = q.get('status') || 'pending';
    const list = h('div', { class: 'items', id: 'review-list' });
    const selectAll = h('input', { type: 'checkbox', id: 'select-all' });
    const bulkAccept = h('button', { type: 'button', id: 'bulk-accept', text: 'Accept selected' });
    const bulkReject = h('button', { type: 'button', id: 'bulk-reject', text: 'Reject selected' });
    const pager = h('div', { class: 'pager' });
    root.append(
      ...filters(q),
      shortcutHelp([
        ['a', 'accept'],
        ['r', 'reject'],
        ['e', 'edit the correction, then accept'],
        ['j / k', 'next / previous item'],
        ['Esc', 'leave the correction box'],
      ]),
      h(
        'div',
        { class: 'bulk' },
        h('label', { for: 'select-all' }, selectAll, ' Select all on this page'),
        bulkAccept,
        bulkReject,
      ),
      list,
      pager,
    );
    list.append(loading());
    const data = await getJSON(`/admin/feedback?${serverQuery(q)}`, ctx.signal);
    const items = data.data || [];
    list.replaceChildren();
    if (!items.length)
      list.append(
        h('p', {
          class: 'empty',
          id: 'review-empty',
          text: `No ${status} feedback${FILTERS.some((n) => q.get(n)) ? ' matches these filters' : ''}.`,
        }),
      );

    /** Sends one review decision; updates or removes the card. */
    const decide = async (card, fb, action, correction) => {
      const body = { action };
      if (correction !== undefined) body.correction = correction;
      await send('POST', `/admin/feedback/${seg(fb.id)}/review`, body);
      if (status === 'pending') {
        if (!focusSibling(card, 1)) focusSibling(card, -1);
        card.remove();
        if (!list.querySelector('.item')) list.append(h('p', { class: 'empty', text: 'All done on this page.' }));
      } else {
        const now = action === 'accept' ? 'accepted' : 'rejected';
        const badge = card.querySelector('.badge');
        badge.textContent = now;
        badge.className = `badge status-${now}`;
      }
    };
    /** Runs a decision from a button, reporting errors in the banner. */
    const act = (card, fb, action, button, correction) =>
      busy(button, () => decide(card, fb, action, correction)).then(
        () => showNotice(`${fb.id} ${action === 'accept' ? 'accepted' : 'rejected'}.`),
        showError,
      );

    for (const fb of items) {
      const accept = h('button', {
        type: 'button',
        class: 'primary',
        testid: `accept-${fb.id}`,
        'aria-label': `Accept ${fb.id}`,
        text: 'Accept',
      });
      const edit = h('button', {
        type: 'button',
        testid: `edit-${fb.id}`,
        'aria-label': `Edit the correction of ${fb.id}`,
        text: 'Edit correction',
      });
      const reject = h('button', {
        type: 'button',
        class: 'danger',
        testid: `reject-${fb.id}`,
        'aria-label': `Reject ${fb.id}`,
        text: 'Reject',
      });
      const check = h('input', {
        type: 'checkbox',
        class: 'select',
        'aria-label': `Select ${fb.id}`,
        testid: `select-${fb.id}`,
      });
      const card = itemCard(fb, fb.completion, {
        lead: check,
        badge: h('span', { class: `badge status-${fb.status}`, text: fb.status }),
        actions: [accept, edit, reject],
        onEditAccept: (text, button) => act(card, fb, 'accept', button, text),
      });
      card.fb = fb;
      accept.addEventListener('click', () => act(card, fb, 'accept', accept));
      reject.addEventListener('click', () => act(card, fb, 'reject', reject));
      edit.addEventListener('click', () => openEdit(card));
      card.actions = { accept, reject };
      list.append(card);
    }
    attachShortcuts(list, {
      a: (card) => card.actions.accept.click(),
      r: (card) => card.actions.reject.click(),
      e: (card) => openEdit(card),
    });

    selectAll.addEventListener('change', () => {
      for (const c of list.querySelectorAll('.item .select')) c.checked = selectAll.checked;
    });
    /** Applies one decision to every checked card, one request at a time. */
    const bulk = async (action, button) => {
      const cards = [...list.querySelectorAll('.item')].filter((c) => c.querySelector('.select').checked);
      if (!cards.length) {
        showError('Select some items first.');
        return;
      }
      if (
        !(await confirmAction(
          `${action === 'accept' ? 'Accept' : 'Reject'} ${cards.length} feedback item(s)?`,
          action === 'accept' ? 'Accept all' : 'Reject all',
        ))
      )
        return;
      let done = 0;
      const failed = [];
      await busy(button, async () => {
        for (const card of cards) {
          try {
            await decide(card, card.fb, action);
            done += 1;
          } catch (err) {
            failed.push(`${card.fb.id}: ${err.message}`);
          }
        }
      });
      selectAll.checked = false;
      showNotice(`${done} item(s) ${action === 'accept' ? 'accepted' : 'rejected'}.`);
      if (failed.length) showError(`Failed: ${failed.join('; ')}`);
    };
    bulkAccept.addEventListener('click', () => bulk('accept', bulkAccept));
    bulkReject.addEventListener('click', () => bulk('reject', bulkReject));

    const offset = Number(q.get('offset') || 0);
    const limit = Number(q.get('limit') || 50);
    pager.append(
      h('button', {
        type: 'button',
        id: 'page-prev',
        text: '← Previous',
        disabled: offset === 0,
        on: { click: () => go(q, { offset: String(Math.max(0, offset - limit)) }) },
      }),
      h('span', { class: 'muted', text: items.length ? `Items ${offset + 1}–${offset + items.length}` : '' }),
      h('button', {
        type: 'button',
        id: 'page-next',
        text: 'Next →',
        disabled: items.length < limit,
        on: { click: () => go(q, { offset: String(offset + limit) }) },
      }),
    );
  },
};
