// Labelling (#/labelling, #/labelling/<queue>): labellers and admins work through queues of
// feedback, each item shown beside the queue's rules. A `label` item gets accept / edit+accept
// / reject; a `review` item (a second labeller checking the first) gets agree / disagree.
// Admins also create and edit queues; everyone sees each queue's agreement statistics.

import { getJSON, send, seg } from './api.js';
import { h, append, NAME_PATTERN, field, table, fmtInt, fmtPct, loading, showError, showNotice, busy } from './dom.js';
import { itemCard, openEdit, attachShortcuts, focusSibling, shortcutHelp } from './items.js';

/** A queue's filter in words. */
function filterText(f) {
  if (!f) return 'all feedback';
  const parts = [
    f.adapter && `adapter ${f.adapter}`,
    f.task && `task ${f.task}`,
    f.tag && `tag ${f.tag}`,
    f.max_rating !== undefined && f.max_rating !== null && `rating ≤ ${f.max_rating}`,
    f.thumbs && `thumbs ${f.thumbs}`,
  ].filter(Boolean);
  return parts.length ? parts.join(', ') : 'all feedback';
}

/** The admin form that creates a queue or replaces one's settings (PUT). */
function queueForm(onSaved) {
  const input = (id, attrs = {}) => h('input', { id, autocomplete: 'off', ...attrs });
  const els = {
    name: input('queue-name', { required: true, pattern: NAME_PATTERN }),
    rules: h('textarea', { id: 'queue-rules', rows: 5 }),
    adapter: input('queue-filter-adapter'),
    task: input('queue-filter-task'),
    tag: input('queue-filter-tag'),
    maxRating: input('queue-filter-max-rating', { type: 'number', min: 1, max: 5, step: 1 }),
    thumbs: h(
      'select',
      { id: 'queue-filter-thumbs' },
      h('option', { value: '', text: 'any' }),
      h('option', { value: 'up', text: 'up' }),
      h('option', { value: 'down', text: 'down' }),
    ),
    double: input('queue-double', { type: 'checkbox' }),
    share: input('queue-review-share', { type: 'number', min: 0, max: 1, step: 0.05, value: '0' }),
  };
  const save = h('button', { type: 'submit', id: 'queue-save', class: 'primary', text: 'Save queue' });
  const form = h(
    'form',
    { id: 'queue-form', class: 'card', 'aria-labelledby': 'queue-form-title' },
    h('h2', { id: 'queue-form-title', text: 'Create or edit a queue' }),
    h('div', { class: 'form-grid' }, field('Queue name', els.name, 'Saving an existing name replaces its settings.')),
    field('Rules for labellers', els.rules, 'Shown beside every item of the queue.'),
    h(
      'fieldset',
      {},
      h('legend', { text: 'Which feedback enters the queue' }),
      h(
        'div',
        { class: 'form-grid' },
        field('Adapter', els.adapter),
        field('Task', els.task),
        field('Tag', els.tag),
        field('Rating at most', els.maxRating),
        field('Thumbs', els.thumbs),
      ),
    ),
    h(
      'div',
      { class: 'form-grid' },
      h(
        'div',
        { class: 'field checkbox' },
        els.double,
        h('label', { for: 'queue-double', text: 'Double labelling (every item labelled by two people)' }),
      ),
      field('Review share', els.share, 'Share (0 to 1) of labelled items a second labeller reviews.'),
    ),
    h('div', { class: 'actions' }, save),
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!els.name.value) {
      showError('Give the queue a name.');
      return;
    }
    const filter = {};
    if (els.adapter.value) filter.adapter = els.adapter.value;
    if (els.task.value) filter.task = els.task.value;
    if (els.tag.value) filter.tag = els.tag.value;
    if (els.maxRating.value) filter.max_rating = Number(els.maxRating.value);
    if (els.thumbs.value) filter.thumbs = els.thumbs.value;
    const body = {
      rules: els.rules.value,
      filter,
      double: els.double.checked,
      review_share: Number(els.share.value || 0),
    };
    try {
      await busy(save, () => send('PUT', `/admin/labelling/queues/${seg(els.name.value)}`, body));
      showNotice(`Queue ${els.name.value} saved.`);
      await onSaved();
    } catch (err) {
      showError(err);
    }
  });
  /** Fills the form with an existing queue's settings. */
  form.fill = (q) => {
    const f = q.filter || {};
    els.name.value = q.name;
    els.rules.value = q.rules || '';
    els.adapter.value = f.adapter || '';
    els.task.value = f.task || '';
    els.tag.value = f.tag || '';
    els.maxRating.value = f.max_rating ?? '';
    els.thumbs.value = f.thumbs || '';
    els.double.checked = Boolean(q.double);
    els.share.value = String(q.review_share ?? 0);
    els.rules.focus();
  };
  return form;
}

/** The queues table with Open, Stats and (for admins) Edit per queue. */
function queuesTable(queues, admin, form) {
  if (!queues.length)
    return h('p', {
      class: 'empty',
      text: admin ? 'No queues yet: create one below.' : 'No queues yet: ask an admin to create one.',
    });
  const rows = queues.map((q) => [
    h('strong', { text: q.name }),
    filterText(q.filter),
    q.double ? 'double' : 'single',
    fmtPct(q.review_share),
    fmtInt(q.pending),
    fmtInt(q.labelled),
    fmtInt(q.done),
    h(
      'div',
      { class: 'actions' },
      h('a', {
        class: 'button primary',
        href: `#/labelling/${encodeURIComponent(q.name)}`,
        testid: `open-queue-${q.name}`,
        text: 'Open',
      }),
      admin
        ? h('button', {
            type: 'button',
            testid: `edit-queue-${q.name}`,
            text: 'Edit',
            on: { click: () => form.fill(q) },
          })
        : null,
    ),
  ]);
  return table(['Queue', 'Filter', 'Labelling', 'Review share', 'Pending', 'Labelled', 'Done', 'Actions'], rows, {
    id: 'queues',
  });
}

/** The per-labeller statistics of a queue. */
async function renderStats(box, name, signal) {
  box.replaceChildren(loading());
  const stats = await getJSON(`/v1/labelling/queues/${seg(name)}/stats`, signal);
  box.replaceChildren(
    h(
      'p',
      {},
      'Overall agreement: ',
      h('strong', {
        testid: 'agreement',
        text:
          stats.agreement === null || stats.agreement === undefined
            ? 'not enough overlap yet'
            : fmtPct(stats.agreement),
      }),
    ),
    table(
      ['Labeller', 'Labelled', 'Reviewed', 'Agreement', 'Compared'],
      (stats.labellers || []).map((l) => [
        l.sub,
        fmtInt(l.labelled),
        fmtInt(l.reviewed),
        fmtPct(l.agreement),
        fmtInt(l.compared),
      ]),
      { id: 'queue-stats-table' },
    ),
  );
}

/** The first labeller's decision, shown on a review item. */
function firstLabel(first) {
  if (!first) return null;
  return h(
    'div',
    { class: 'first-label' },
    h('h4', { text: 'First label' }),
    h(
      'dl',
      { class: 'kv' },
      h('dt', { text: 'Labeller' }),
      h('dd', { text: first.labeller }),
      h('dt', { text: 'Decision' }),
      h('dd', { text: first.action }),
      first.correction ? [h('dt', { text: 'Correction' }), h('dd', { class: 'pre', text: first.correction })] : null,
    ),
  );
}

/** One queue item as a card with the actions its stage allows. */
function queueItem(entry, queue, decide) {
  const fb = entry.feedback;
  const review = entry.stage === 'review';
  const rules = h(
    'aside',
    { class: 'rules', 'aria-label': `Rules of queue ${queue.name}` },
    h('h4', { text: 'Rules' }),
    h('div', { class: 'pre', text: queue.rules || 'No rules given.' }),
  );
  const button = (testid, text, cls) =>
    h('button', { type: 'button', testid: `${testid}-${fb.id}`, 'aria-label': `${text}: ${fb.id}`, text, class: cls });
  const yes = review ? button('agree', 'Agree', 'primary') : button('accept', 'Accept', 'primary');
  const edit = button('edit', review ? 'Disagree with a correction' : 'Edit correction');
  const no = review ? button('disagree', 'Disagree', 'danger') : button('reject', 'Reject', 'danger');
  const card = itemCard(fb, entry.completion, {
    aside: rules,
    badge: h('span', { class: `badge stage-${entry.stage}`, text: review ? 'review' : 'label' }),
    extra: review ? firstLabel(entry.first) : null,
    actions: [yes, edit, no],
    prefill: review && entry.first && entry.first.correction ? entry.first.correction : undefined,
    editPrompt: review ? 'Your correction (optional)' : 'Correction to train on',
    editLabel: review ? 'Disagree with this correction' : 'Accept with this correction',
    onEditAccept: (text, btn) => decide(card, fb, review ? 'disagree' : 'accept', btn, text),
  });
  yes.addEventListener('click', () => decide(card, fb, review ? 'agree' : 'accept', yes));
  no.addEventListener('click', () => decide(card, fb, review ? 'disagree' : 'reject', no));
  edit.addEventListener('click', () => openEdit(card));
  card.actions = { yes, no };
  return card;
}

/** The work area of one queue: items fetched ten at a time, and its statistics. */
async function openQueue(box, queue, signal) {
  const list = h('div', { class: 'items', id: 'queue-items' });
  const more = h('button', { type: 'button', id: 'queue-next', text: 'Fetch more items' });
  const statsBox = h('div', { id: 'queue-stats' });
  const refreshStats = h('button', { type: 'button', id: 'queue-stats-refresh', text: 'Refresh statistics' });
  box.replaceChildren(
    h('h2', { id: 'queue-title', text: `Queue ${queue.name}` }),
    shortcutHelp([
      ['a', 'accept (or agree, on a review item)'],
      ['r', 'reject (or disagree)'],
      ['e', 'edit the correction'],
      ['j / k', 'next / previous item'],
      ['Esc', 'leave the correction box'],
    ]),
    list,
    h('div', { class: 'actions' }, more),
    h(
      'section',
      { class: 'card', 'aria-labelledby': 'stats-title' },
      h('h3', { id: 'stats-title', text: 'Statistics' }),
      statsBox,
      refreshStats,
    ),
  );

  /** Sends one decision, then removes the card and moves focus on. */
  const decide = async (card, fb, action, button, correction) => {
    const body = { action };
    if (correction !== undefined && correction.trim()) body.correction = correction;
    try {
      await busy(button, () => send('POST', `/v1/labelling/queues/${seg(queue.name)}/items/${seg(fb.id)}`, body));
      showNotice(`${fb.id}: ${action}.`);
      if (!focusSibling(card, 1)) focusSibling(card, -1);
      card.remove();
      if (!list.querySelector('.item')) {
        list.append(h('p', { class: 'empty', text: 'No items left in this batch.' }));
        more.focus();
      }
    } catch (err) {
      showError(err);
    }
  };
  /** Claims the next batch of items. */
  const fetchMore = async () => {
    list.replaceChildren(loading());
    const next = await send('POST', `/v1/labelling/queues/${seg(queue.name)}/next`, { limit: 10 }, signal);
    list.replaceChildren();
    const entries = (next && next.data) || [];
    if (!entries.length)
      list.append(h('p', { class: 'empty', id: 'queue-empty', text: 'Nothing to label in this queue right now.' }));
    for (const entry of entries) list.append(queueItem(entry, queue, decide));
    const firstCard = list.querySelector('.item');
    if (firstCard) firstCard.focus();
  };
  attachShortcuts(list, {
    a: (card) => card.actions.yes.click(),
    r: (card) => card.actions.no.click(),
    e: (card) => openEdit(card),
  });
  more.addEventListener('click', () => busy(more, fetchMore).catch(showError));
  refreshStats.addEventListener('click', () =>
    busy(refreshStats, () => renderStats(statsBox, queue.name, signal)).catch(showError),
  );
  await Promise.all([fetchMore(), renderStats(statsBox, queue.name, signal)]);
}

export const page = {
  title: 'Labelling',
  admin: false,
  async render(root, ctx) {
    const admin = ctx.role === 'admin';
    const listBox = h(
      'section',
      { class: 'card', 'aria-labelledby': 'queues-title' },
      h('h2', { id: 'queues-title', text: 'Queues' }),
      loading(),
    );
    const work = h('section', { id: 'queue-work', 'aria-live': 'polite' });
    let queues = [];
    const load = async () => {
      queues = (await getJSON('/v1/labelling/queues', ctx.signal)).data || [];
      listBox.replaceChildren(listBox.firstChild, queuesTable(queues, admin, form));
    };
    const form = admin ? queueForm(load) : null;
    append(root, [listBox, work, form]);
    await load();
    const name = ctx.params[0];
    if (!name) return;
    const queue = queues.find((q) => q.name === name);
    if (!queue) {
      work.append(h('p', { class: 'empty', text: `There is no queue named ${name}.` }));
      return;
    }
    await openQueue(work, queue, ctx.signal);
  },
};
