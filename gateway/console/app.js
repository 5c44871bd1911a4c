// The Switchyard console: sign-in, the top navigation and the hash router. Each page lives in
// its own module and exports `page = {title, admin, render(root, ctx)}`; `ctx.signal` aborts
// when the user leaves the page, and `ctx.onLeave(fn)` registers timers and streams to stop.

import { session, request, setUnauthorizedHandler } from './api.js';
import { h, showError, clearMessages } from './dom.js';
import { page as models } from './models.js';
import { page as playground } from './playground.js';
import { page as review } from './review.js';
import { page as labelling } from './labelling.js';
import { page as datasets } from './datasets.js';
import { page as training } from './training.js';
import { page as traffic } from './traffic.js';
import { page as audit } from './audit.js';

const PAGES = { models, playground, review, labelling, datasets, training, traffic, audit };

const view = document.getElementById('view');
const signInView = document.getElementById('sign-in-view');
const top = document.getElementById('top');

/** What the current page registered to stop when the user leaves it. */
let leaving = null;

/** The page a role lands on. */
function home() {
  return session.current && session.current.role === 'admin' ? 'models' : 'labelling';
}

/** Splits `#/training/ftjob-1?x=y` into the page name, the path after it and the query. */
function parseHash() {
  const [path, query = ''] = location.hash.replace(/^#\/?/, '').split('?');
  const [name, ...rest] = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { name, rest, query: new URLSearchParams(query) };
}

/** Stops the current page's timers, streams and requests. */
function leavePage() {
  if (leaving) leaving();
  leaving = null;
}

/** Renders the page the hash names (or sends the user to their home page). */
async function route() {
  if (!session.current) return;
  leavePage();
  clearMessages();
  const { name, rest, query } = parseHash();
  const def = PAGES[name];
  if (!def) {
    location.replace(`#/${home()}`);
    return;
  }
  for (const link of top.querySelectorAll('nav a')) {
    if (link.id === `nav-${name}`) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  document.title = `${def.title} · Switchyard console`;
  const heading = h('h1', { tabindex: '-1', text: def.title });
  const root = h('div', { class: `page page-${name}` });
  view.replaceChildren(heading, root);
  heading.focus();
  if (def.admin && session.current.role !== 'admin') {
    root.append(
      h('p', {
        class: 'not-allowed',
        id: 'not-allowed',
        role: 'alert',
        text: 'Not allowed: this page is for admins. Your role can use the labelling page.',
      }),
    );
    return;
  }
  const controller = new AbortController();
  const stops = [() => controller.abort()];
  leaving = () => stops.forEach((stop) => stop());
  const ctx = {
    signal: controller.signal,
    params: rest,
    query,
    onLeave: (fn) => stops.push(fn),
    role: session.current.role,
  };
  try {
    await def.render(root, ctx);
  } catch (err) {
    if (!controller.signal.aborted) showError(err);
  }
}

/**
 * Shows the console for a signed-in session. After the form (not on a reload), a labeller left
 * on an admin page by the previous user goes to their home page instead.
 */
function signedIn(s, fromForm) {
  session.current = s;
  signInView.hidden = true;
  top.hidden = false;
  view.hidden = false;
  document.getElementById('whoami').textContent = s.sub;
  document.getElementById('role').textContent = s.role;
  for (const link of top.querySelectorAll('nav a[data-admin]')) link.parentElement.hidden = s.role !== 'admin';
  const current = PAGES[parseHash().name];
  if (fromForm && current && current.admin && s.role !== 'admin') location.hash = `#/${home()}`;
  else route();
}

/** Shows the sign-in form; the CSRF token is forgotten with the session. */
function signedOut(message) {
  leavePage();
  session.current = null;
  top.hidden = true;
  view.hidden = true;
  view.replaceChildren();
  signInView.hidden = false;
  clearMessages();
  if (message) showError(message);
  document.title = 'Sign in · Switchyard console';
  document.getElementById('token').focus();
}

/** Posts the token; the server answers with the session and sets its HttpOnly cookie. */
async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById('token');
  const button = document.getElementById('sign-in');
  clearMessages();
  if (!input.value.trim()) {
    showError('Enter an admin token, a JWT or an API key.');
    input.focus();
    return;
  }
  button.disabled = true;
  try {
    const res = await request('POST', '/console/session', { json: { token: input.value.trim() } });
    input.value = '';
    signedIn(await res.json(), true);
  } catch (err) {
    showError(err);
    input.focus();
  } finally {
    button.disabled = false;
  }
}

/** Ends the session on the server, then shows the sign-in form (also when it had already ended). */
async function signOut() {
  try {
    await request('DELETE', '/console/session');
  } catch (err) {
    if (err.status !== 401) {
      showError(err);
      return;
    }
  }
  signedOut();
}

/** Asks the server whether the cookie names a live session. */
async function start() {
  try {
    const res = await request('GET', '/console/session');
    signedIn(await res.json());
  } catch (err) {
    signedOut(err.status === 401 ? null : err);
  }
}

setUnauthorizedHandler(() => signedOut('Your session has ended. Sign in again.'));
document.getElementById('sign-in-form').addEventListener('submit', signIn);
document.getElementById('sign-out').addEventListener('click', signOut);
for (const dismiss of document.querySelectorAll('.banner .dismiss')) {
  dismiss.addEventListener('click', () => {
    dismiss.parentElement.hidden = true;
  });
}
window.addEventListener('hashchange', route);
start();
