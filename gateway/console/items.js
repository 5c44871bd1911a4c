// What the review and labelling pages share: a feedback item card (the conversation, the
// answer, what the user said, an edit box for the correction) and the keyboard shortcuts
// that work on the focused card.

import { h, fmtTime } from './dom.js';

/** The text of a chat message's content: a string, a list of content parts, or other JSON. */
function contentText(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content))
    return content.map((p) => (p && typeof p.text === 'string' ? p.text : JSON.stringify(p))).join('\n');
  return content === null || content === undefined ? '' : JSON.stringify(content);
}

/** The logged prompt (chat messages or raw text) and the answer, or a note that none was logged. */
function conversation(completion) {
  if (!completion)
    return h('p', {
      class: 'muted',
      text: 'The prompt and answer were not logged (completion logging is off or redacted).',
    });
  const prompt = Array.isArray(completion.prompt)
    ? completion.prompt.map((m) =>
        h(
          'div',
          { class: `msg role-${m.role}` },
          h('span', { class: 'role', text: m.role }),
          h('div', { class: 'content', text: contentText(m.content) }),
        ),
      )
    : h(
        'div',
        { class: 'msg role-user' },
        h('span', { class: 'role', text: 'prompt' }),
        h('div', { class: 'content', text: contentText(completion.prompt) }),
      );
  return h(
    'div',
    { class: 'conversation' },
    completion.task ? h('p', { class: 'muted', text: `Task: ${completion.task}` }) : null,
    prompt,
    h(
      'div',
      { class: 'msg answer' },
      h('span', { class: 'role', text: 'answer' }),
      h('div', { class: 'content', text: completion.answer }),
    ),
  );
}

/** What the user said about the answer: thumbs, rating, correction, comment, tags. */
function userFeedback(fb) {
  const rows = [
    ['Thumbs', fb.thumbs === 'up' ? 'up' : fb.thumbs === 'down' ? 'down' : null],
    ['Rating', fb.rating ? `${fb.rating} / 5` : null],
    ['Correction', fb.correction],
    ['Comment', fb.comment],
    ['Tags', fb.tags && fb.tags.length ? fb.tags.join(', ') : null],
    ['Reviewed correction', fb.accepted_correction],
  ].filter(([, v]) => v !== null && v !== undefined && v !== '');
  if (!rows.length) return h('p', { class: 'muted', text: 'No thumbs, rating or text.' });
  return h(
    'dl',
    { class: 'kv feedback' },
    rows.map(([k, v]) => [h('dt', { text: k }), h('dd', { class: 'pre', text: v })]),
  );
}

/**
 * A focusable card for one feedback record. `opts`: `lead` (nodes before the title, e.g. a
 * checkbox), `badge` (after the title), `aside` (beside the content, e.g. the queue's rules),
 * `extra` (after the user's feedback), `actions` (buttons), and for the edit box `prefill`
 * (default: the user's correction), `editPrompt` (its label), `editLabel` (its button) and
 * `onEditAccept(text, button)` (its button's action). The edit box starts hidden.
 */
export function itemCard(fb, completion, opts) {
  const id = fb.id;
  const editText = h('textarea', { id: `edit-text-${id}`, rows: 4, testid: `edit-text-${id}` });
  editText.value = opts.prefill ?? fb.correction ?? '';
  const editAccept = h('button', {
    type: 'button',
    class: 'primary',
    testid: `edit-submit-${id}`,
    text: opts.editLabel || 'Accept with this correction',
  });
  const editBox = h(
    'div',
    { class: 'edit-box', hidden: true },
    h('label', { for: editText.id, text: opts.editPrompt || 'Correction to train on' }),
    editText,
    h(
      'div',
      { class: 'actions' },
      editAccept,
      h('button', { type: 'button', text: 'Cancel', on: { click: () => closeEdit(card) } }),
    ),
  );
  editAccept.addEventListener('click', () => opts.onEditAccept(editText.value, editAccept));
  const title = [fb.adapter || fb.model || 'base model', fmtTime(fb.created), fb.sub ? `by ${fb.sub}` : null]
    .filter(Boolean)
    .join(' · ');
  const card = h(
    'article',
    {
      class: 'item',
      tabindex: '0',
      testid: `item-${id}`,
      'data-id': id,
      'aria-label': `Feedback ${id}`,
      'aria-keyshortcuts': 'a r e j k',
    },
    h(
      'header',
      {},
      opts.lead,
      h('span', { class: 'item-id', text: id }),
      h('span', { class: 'muted', text: title }),
      opts.badge,
    ),
    h(
      'div',
      { class: 'item-body' },
      h('div', { class: 'item-main' }, conversation(completion), userFeedback(fb), opts.extra, editBox),
      opts.aside,
    ),
    h('div', { class: 'actions' }, opts.actions),
  );
  card.editBox = editBox;
  card.editText = editText;
  return card;
}

/** Shows a card's edit box and puts the cursor in it. */
export function openEdit(card) {
  card.editBox.hidden = false;
  card.editText.focus();
}

/** Hides a card's edit box and gives focus back to the card. */
function closeEdit(card) {
  card.editBox.hidden = true;
  card.focus();
}

/** Focuses the card after `card` (or before it, with `step` -1); false when there is none. */
export function focusSibling(card, step = 1) {
  let next = step > 0 ? card.nextElementSibling : card.previousElementSibling;
  while (next && !next.classList.contains('item'))
    next = step > 0 ? next.nextElementSibling : next.previousElementSibling;
  if (next) next.focus();
  return Boolean(next);
}

/**
 * Keyboard shortcuts on the focused card of `list`: `j`/`k` move to the next/previous card;
 * other keys call `keymap[key](card)`. Typing in a field is never taken as a shortcut;
 * Escape in the edit box closes it.
 */
export function attachShortcuts(list, keymap) {
  list.addEventListener('keydown', (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const card = event.target.closest('.item');
    if (!card) return;
    if (event.target.matches('textarea, input, select')) {
      if (event.key === 'Escape' && event.target === card.editText) closeEdit(card);
      return;
    }
    if (event.target !== card) return;
    const key = event.key.toLowerCase();
    if (key === 'j' || key === 'k') focusSibling(card, key === 'j' ? 1 : -1);
    else if (keymap[key]) keymap[key](card);
    else return;
    event.preventDefault();
  });
}

/** The shortcut legend shown above a list of cards. */
export function shortcutHelp(pairs) {
  return h(
    'details',
    { class: 'shortcuts', open: true },
    h('summary', { text: 'Keyboard shortcuts' }),
    h('p', { text: 'Focus an item (Tab or click its border), then:' }),
    h(
      'dl',
      { class: 'kv' },
      pairs.map(([key, what]) => [h('dt', {}, h('kbd', { text: key })), h('dd', { text: what })]),
    ),
  );
}
