// Models (#/models): the base models, every adapter with its versions (hashes, sizes,
// lineage, evaluation), aliases, routes and releases; uploading a version; promoting,
// deleting and rolling back, each after a confirmation. Alias moves are compare-and-set:
// a 409 means someone else moved the alias, which the page explains and then reloads.

import { getJSON, send, request, seg } from './api.js';
import {
  h,
  NAME_PATTERN,
  field,
  table,
  jsonView,
  fmtBytes,
  fmtTime,
  fmtPct,
  fmtInt,
  loading,
  clearMessages,
  showError,
  showNotice,
  confirmAction,
  busy,
} from './dom.js';

/** Every model card, every adapter listing, and each adapter's releases (with live decisions). */
async function loadRegistry(signal) {
  const [models, adapters] = await Promise.all([getJSON('/v1/models', signal), getJSON('/admin/adapters', signal)]);
  const releases = await Promise.all(
    adapters.data.map((a) =>
      getJSON(`/admin/adapters/${seg(a.name)}/releases`, signal).then(
        (r) => r.data,
        () => [],
      ),
    ),
  );
  return { models: models.data, adapters: adapters.data.map((a, i) => ({ ...a, releaseList: releases[i] })) };
}

/** "version 3", or "unset" for an alias that does not exist yet. */
const vText = (v) => (v === null || v === undefined ? 'unset' : `version ${v}`);

/**
 * Asks for confirmation, then points `prod` of `name` at `version` by compare-and-set against
 * `current` (the version the user saw). Resolves to the alias change, or null when cancelled;
 * a 409 means prod moved meanwhile.
 */
export async function promoteToProd(name, version, current, button) {
  const text = `${name} prod: ${vText(current)} → version ${version}. Callers of "${name}" and "${name}@prod" will be served by version ${version}.`;
  if (!(await confirmAction(text, 'Promote'))) return null;
  const change = await busy(button, () =>
    send('PUT', `/admin/adapters/${seg(name)}/aliases/prod`, { version, expected_version: current }),
  );
  showNotice(`${name} prod: ${vText(change.from)} → version ${change.to}.`);
  return change;
}

/** The words for a lost compare-and-set: where the alias is now. */
export function movedMessage(alias, now) {
  return `${alias} moved to ${vText(now)} since you loaded this page; the page now shows the current state: check and try again.`;
}

/** How an alias serves: one version, or its weighted split. */
function aliasServes(state) {
  if (!state) return 'unset';
  if (state.routes && state.routes.length) return state.routes.map((r) => `v${r.version} ${r.weight}%`).join(' · ');
  return vText(state.version);
}

/** The lineage cells of a version: dataset, training job and parent. */
function lineage(m) {
  const l = m.lineage && typeof m.lineage === 'object' ? m.lineage : {};
  const ds = l.dataset;
  const dataset =
    ds && typeof ds === 'object'
      ? [...new Set([ds.source, ds.format, ds.hash ? `sha ${String(ds.hash).slice(0, 12)}…` : null])]
          .filter(Boolean)
          .join(', ')
      : ds;
  const job = (m.source && m.source.job_id) || l.job_id;
  const parent = l.parent ?? l.init_adapter ?? null;
  const rows = [
    ['Source', m.source ? m.source.kind + (m.source.path ? `: ${m.source.path}` : '') : null],
    ['Dataset', dataset || null],
    ['Job', job || null],
    ['Parent', parent],
    ['Compared with', l.compared_with || null],
  ].filter(([, v]) => v !== null && v !== undefined && v !== '');
  const summary = h(
    'dl',
    { class: 'kv' },
    rows.map(([k, v]) => [h('dt', { text: k }), h('dd', { text: String(v) })]),
  );
  const hasMore = Object.keys(l).length > 0;
  return [summary, hasMore ? h('details', {}, h('summary', { text: 'Full lineage' }), jsonView(l)) : null];
}

/** The versions table of one adapter, with Promote and Delete per version. */
function versionsTable(ad, actions) {
  if (!ad.versions.length) return h('p', { class: 'muted', text: 'No versions: upload one above.' });
  const prod = ad.aliases.prod;
  const rows = [...ad.versions].reverse().map((m) => {
    const aliases = Object.entries(ad.aliases)
      .filter(
        ([, s]) =>
          s.version === m.version ||
          (s.routes || []).some((r) => r.version === m.version) ||
          (s.shadow && s.shadow.version === m.version),
      )
      .map(([a]) => a);
    const isProd = prod && prod.version === m.version && !(prod.routes && prod.routes.length);
    const promote = h('button', {
      type: 'button',
      class: 'primary',
      testid: `promote-${ad.name}-${m.version}`,
      'aria-label': `Promote ${ad.name} version ${m.version} to prod`,
      text: 'Promote to prod',
      disabled: isProd,
    });
    const del = h('button', {
      type: 'button',
      class: 'danger',
      testid: `delete-${ad.name}-${m.version}`,
      'aria-label': `Delete ${ad.name} version ${m.version}`,
      text: 'Delete',
    });
    promote.addEventListener('click', () => actions.promote(ad, m.version, promote));
    del.addEventListener('click', () => actions.remove(ad, m.version, del));
    const metrics =
      m.metrics && typeof m.metrics === 'object' && Object.keys(m.metrics).length
        ? h('details', {}, h('summary', { text: 'Evaluation' }), jsonView(m.metrics))
        : h('span', { class: 'muted', text: '–' });
    return [
      h('strong', { text: `v${m.version}` }),
      fmtTime(m.created),
      fmtBytes(m.size_bytes),
      h('code', { title: m.sha256, text: `${m.sha256.slice(0, 12)}…` }),
      `r ${m.rank}, α ${m.alpha}${m.use_rslora ? ', rsLoRA' : ''} · ${m.target_modules.join(', ')}`,
      lineage(m),
      aliases.join(', ') || '–',
      metrics,
      h('div', { class: 'actions' }, promote, del),
    ];
  });
  return table(['Version', 'Created', 'Size', 'SHA-256', 'LoRA', 'Lineage', 'Aliases', 'Metrics', 'Actions'], rows, {
    class: 'versions',
  });
}

/** The aliases table of one adapter, with Roll back per alias. */
function aliasesTable(ad, actions) {
  const rows = Object.entries(ad.aliases).map(([alias, s]) => {
    const back = h('button', {
      type: 'button',
      testid: `rollback-${ad.name}-${alias}`,
      'aria-label': `Roll back ${ad.name} ${alias}`,
      text: 'Roll back',
      disabled: !(s.history && s.history.length),
    });
    back.addEventListener('click', () => actions.rollback(ad, alias, back));
    return [
      h('strong', { text: alias }),
      aliasServes(s),
      s.shadow ? `v${s.shadow.version} (${fmtPct(s.shadow.share)})` : '–',
      s.history && s.history.length ? s.history.map((v) => `v${v}`).join(', ') : '–',
      back,
    ];
  });
  if (!rows.length) return h('p', { class: 'muted', text: 'No aliases yet: promote a version to create prod.' });
  return table(['Alias', 'Serves', 'Shadow', 'History (oldest first)', 'Actions'], rows, { class: 'aliases' });
}

/** The releases of one adapter: where each stands and what its evidence says now. */
export function releasesTable(name, releases) {
  if (!releases || !releases.length) return null;
  const rows = releases.map((r) => [
    name,
    r.alias,
    `v${r.baseline} → v${r.policy.candidate}`,
    r.weight === undefined ? '–' : `${r.weight} %`,
    `${r.step + 1} of ${r.policy.steps.length}`,
    h('span', { class: `badge release-${r.status}`, text: r.status.replace('_', ' ') }),
    r.now ? `${r.now.decision.replace('_', ' ')}: ${r.now.why}` : '–',
    fmtTime(r.updated),
  ]);
  return table(
    ['Adapter', 'Alias', 'Baseline → candidate', 'Candidate weight', 'Step', 'Status', 'Evidence now', 'Updated'],
    rows,
    { class: 'releases' },
  );
}

/** One adapter's section. */
function adapterSection(ad, actions) {
  const releases = releasesTable(ad.name, ad.releaseList);
  return h(
    'section',
    {
      class: 'adapter card',
      id: `adapter-${ad.name}`,
      testid: `adapter-${ad.name}`,
      'aria-labelledby': `adapter-${ad.name}-title`,
    },
    h('h3', { id: `adapter-${ad.name}-title`, text: ad.name }),
    h('h4', { text: 'Aliases' }),
    aliasesTable(ad, actions),
    h('h4', { text: `Versions (${ad.versions.length})` }),
    versionsTable(ad, actions),
    releases ? [h('h4', { text: 'Releases' }), releases] : null,
  );
}

/** The base models (and embedding model) as /v1/models lists them. */
function basesTable(models) {
  const bases = models.filter((m) => !m.parent);
  const routed = models.length - bases.length;
  return [
    table(
      ['Model', 'Kind', 'Context (tokens)', 'Created'],
      bases.map((m) => [h('code', { text: m.id }), m.kind || 'chat', fmtInt(m.max_model_len), fmtTime(m.created)]),
      { id: 'base-models' },
    ),
    h('p', { class: 'muted', text: `${routed} adapter model name(s) route to these bases.` }),
  ];
}

/** The upload form: a name and the two PEFT files, posted as multipart. */
function uploadForm(onDone) {
  const name = h('input', {
    id: 'upload-name',
    name: 'name',
    required: true,
    pattern: NAME_PATTERN,
    autocomplete: 'off',
  });
  const config = h('input', { id: 'upload-config', type: 'file', accept: '.json,application/json', required: true });
  const weights = h('input', { id: 'upload-weights', type: 'file', accept: '.safetensors', required: true });
  const button = h('button', { type: 'submit', id: 'upload', class: 'primary', text: 'Upload version' });
  const form = h(
    'form',
    { id: 'upload-form', class: 'card form-grid', 'aria-labelledby': 'upload-title' },
    h('h2', { id: 'upload-title', text: 'Upload an adapter version' }),
    field('Adapter name', name, 'Lowercase letters, digits, ".", "_" and "-"; a new name creates the adapter.'),
    field('adapter_config.json', config),
    field('adapter_model.safetensors', weights),
    h('div', { class: 'actions' }, button),
  );
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!name.value || !config.files.length || !weights.files.length) {
      showError('Give the adapter name and both files.');
      return;
    }
    // The server reads each part by its file name, so both are named as PEFT names them.
    const body = new FormData();
    body.append('adapter_config.json', config.files[0], 'adapter_config.json');
    body.append('adapter_model.safetensors', weights.files[0], 'adapter_model.safetensors');
    showNotice(`Uploading ${name.value}…`);
    try {
      const res = await busy(button, () => request('POST', `/admin/adapters/${seg(name.value)}/versions`, { body }));
      const created = await res.json();
      showNotice(`Registered ${created.name} version ${created.version} (sha256 ${created.sha256.slice(0, 12)}…).`);
      form.reset();
      await onDone();
    } catch (err) {
      clearMessages();
      showError(err);
    }
  });
  return form;
}

export const page = {
  title: 'Models and adapters',
  admin: true,
  async render(root, ctx) {
    const basesSec = h(
      'section',
      { class: 'card', 'aria-labelledby': 'bases-title' },
      h('h2', { id: 'bases-title', text: 'Base models' }),
    );
    const list = h(
      'section',
      { id: 'adapters', 'aria-labelledby': 'adapters-title' },
      h('h2', { id: 'adapters-title', text: 'Adapters' }),
    );
    const body = h('div', {}, loading());
    list.append(body);
    let data = null;

    /** Reloads everything and redraws; returns the fresh data. */
    const reload = async () => {
      data = await loadRegistry(ctx.signal);
      basesSec.replaceChildren(basesSec.firstChild, ...basesTable(data.models));
      body.replaceChildren(
        ...(data.adapters.length
          ? data.adapters.map((ad) => adapterSection(ad, actions))
          : [h('p', { class: 'empty', text: 'No adapters yet: upload one above.' })]),
      );
      return data;
    };

    /** Reloads one adapter (GET /admin/adapters/{name}) and its releases, and redraws its section. */
    const refreshAdapter = async (name) => {
      const [ad, rel] = await Promise.all([
        getJSON(`/admin/adapters/${seg(name)}`, ctx.signal),
        getJSON(`/admin/adapters/${seg(name)}/releases`, ctx.signal).then(
          (r) => r.data,
          () => [],
        ),
      ]);
      const fresh = { ...ad, releaseList: rel };
      data.adapters = data.adapters.map((a) => (a.name === name ? fresh : a));
      const old = document.getElementById(`adapter-${name}`);
      if (old) old.replaceWith(adapterSection(fresh, actions));
    };

    /** Explains a lost compare-and-set (or another conflict), then reloads. */
    const conflict = async (name, alias, err) => {
      const fresh = await reload();
      const ad = fresh.adapters.find((a) => a.name === name);
      const now = ad && ad.aliases[alias] ? ad.aliases[alias].version : null;
      showError(
        err.code === 'alias_conflict' ? movedMessage(alias, now) : `${err.message}. The page has reloaded its data.`,
      );
    };

    const actions = {
      async promote(ad, version, button) {
        try {
          const change = await promoteToProd(
            ad.name,
            version,
            ad.aliases.prod ? ad.aliases.prod.version : null,
            button,
          );
          if (change) await refreshAdapter(ad.name);
        } catch (err) {
          if (err.status === 409) await conflict(ad.name, 'prod', err);
          else showError(err);
        }
      },
      async rollback(ad, alias, button) {
        const state = ad.aliases[alias];
        const previous = state.history[state.history.length - 1];
        const text = `${ad.name} ${alias}: ${aliasServes(state)} → version ${previous} (roll back).`;
        if (!(await confirmAction(text, 'Roll back'))) return;
        try {
          const change = await busy(button, () =>
            send('POST', `/admin/adapters/${seg(ad.name)}/aliases/${seg(alias)}/rollback`),
          );
          showNotice(`${ad.name} ${alias}: ${vText(change.from)} → version ${change.to}.`);
          await refreshAdapter(ad.name);
        } catch (err) {
          if (err.status === 409) await conflict(ad.name, alias, err);
          else showError(err);
        }
      },
      async remove(ad, version, button) {
        if (
          !(await confirmAction(
            `Delete ${ad.name} version ${version}? Its files are removed and cannot be recovered.`,
            'Delete',
          ))
        )
          return;
        try {
          await busy(button, () => send('DELETE', `/admin/adapters/${seg(ad.name)}/versions/${version}`));
          showNotice(`Deleted ${ad.name} version ${version}.`);
          await reload();
        } catch (err) {
          if (err.status === 409) await conflict(ad.name, 'prod', err);
          else showError(err);
        }
      },
    };

    root.append(basesSec, uploadForm(reload), list);
    await reload();
  },
};
