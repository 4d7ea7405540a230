// The page's entry point: a hash router (#/steps, #/steps/NAME, #/runs, #/runs/ID, #/schedules) and keyboard shortcuts.
import {h, isTyping, notice, replace} from './dom.js';
import {renderStepsList} from './steps_list.js';
import {renderStepPage} from './step_page.js';
import {renderRunsList} from './runs_list.js';
import {renderRunPage} from './run_page.js';
import {renderSchedulesList} from './schedules_list.js';

const ROUTES = [
  {pattern: /^\/steps$/, nav: 'steps', view: (ctx) => renderStepsList(ctx)},
  {pattern: /^\/steps\/new\/(api|sequential|parallel|map|choice|wait)$/, nav: 'steps', view: (ctx, kind) => renderStepPage(ctx, null, kind)},
  {pattern: /^\/steps\/([^/]+)$/, nav: 'steps', view: (ctx, name) => renderStepPage(ctx, name)},
  {pattern: /^\/runs$/, nav: 'runs', view: (ctx) => renderRunsList(ctx)},
  {pattern: /^\/runs\/([^/]+)$/, nav: 'runs', view: (ctx, id) => renderRunPage(ctx, id)},
  {pattern: /^\/schedules$/, nav: 'schedules', view: (ctx) => renderSchedulesList(ctx)},
];

const SHORTCUTS = [
  ['g then s', 'go to Steps'],
  ['g then r', 'go to Runs'],
  ['/', 'focus the search or filter field'],
  ['Ctrl+S (⌘S)', 'save the step being edited'],
  ['Ctrl+Enter', 'in a script or test input: run the test bench'],
  ['Alt+↑ / Alt+↓', 'on a child of a parent step: move it up or down (↑/↓ on its handle too)'],
  ['Esc', 'close a dialog'],
  ['?', 'show this help'],
];

const main = document.getElementById('main');
let current = null;  // {cleanup?, isDirty?} of the view on screen
let currentHash = null;

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/steps';
  const [path, queryString = ''] = raw.split('?');
  return {path, query: new URLSearchParams(queryString)};
}

function route() {
  if (current?.isDirty?.() && location.hash !== currentHash) {
    // eslint-disable-next-line no-alert -- the browser's own prompt is the accessible one here
    if (!window.confirm('Leave this page? Your unsaved changes to the step will be lost.')) {
      history.replaceState(null, '', currentHash);
      return;
    }
  }
  current?.cleanup?.();
  current = null;
  currentHash = location.hash;
  const {path, query} = parseHash();
  if (path === '/' || path === '') {
    location.replace('#/steps');
    return;
  }
  for (const {pattern, nav, view} of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const link of document.querySelectorAll('[data-nav]')) {
      if (link.dataset.nav === nav) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    replace(main);
    const params = match.slice(1).map((p) => {
      try { return decodeURIComponent(p); } catch { return p; }
    });
    const ctx = {
      main,
      query,
      setTitle: (title) => { document.title = `${title} · AETR`; },
    };
    try {
      current = view(ctx, ...params) || null;
    } catch (error) {
      replace(main, notice('error', 'This page failed to open', String(error?.message || error)));
    }
    // Move focus to the new page's heading, so screen readers and keyboard users start there.
    requestAnimationFrame(() => {
      const heading = main.querySelector('h1');
      if (heading && !main.contains(document.activeElement) && !document.querySelector('dialog[open]')) {
        heading.setAttribute('tabindex', '-1');
        heading.focus({preventScroll: true});
      }
    });
    return;
  }
  replace(main, h('h1', {}, 'Not found'),
    notice('warn', null, `Nothing lives at #${path}. `, h('a', {href: '#/steps'}, 'Go to the steps')));
}

function showHelp() {
  if (document.querySelector('dialog.help-dialog')) return;
  const close = h('button', {type: 'button', class: 'primary', onclick: () => dialog.close()}, 'Close');
  const dialog = h('dialog', {class: 'help-dialog', 'aria-labelledby': 'help-title'},
    h('h2', {id: 'help-title'}, 'Keyboard shortcuts'),
    h('dl', {class: 'shortcuts'}, SHORTCUTS.map(([keys, what]) => [h('dt', {}, h('kbd', {}, keys)), h('dd', {}, what)])),
    h('p', {class: 'muted'}, 'Every control is reachable with Tab; Enter or Space activates buttons.'),
    h('div', {class: 'actions'}, close));
  dialog.addEventListener('close', () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
  close.focus();
}

let pendingG = 0;
document.addEventListener('keydown', (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === 's') {
    const save = main.querySelector('[data-shortcut="save"]');
    if (save) {
      event.preventDefault();
      if (!save.disabled) save.click();
    }
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || isTyping(event) || document.querySelector('dialog[open]')) return;
  if (event.key === '?') {
    event.preventDefault();
    showHelp();
  } else if (event.key === '/') {
    const search = main.querySelector('[data-search]');
    if (search) {
      event.preventDefault();
      search.focus();
      search.select?.();
    }
  } else if (event.key === 'g') {
    pendingG = Date.now();
  } else if (pendingG && Date.now() - pendingG < 1500 && (event.key === 's' || event.key === 'r')) {
    location.hash = event.key === 's' ? '#/steps' : '#/runs';
    pendingG = 0;
  } else {
    pendingG = 0;
  }
});

window.addEventListener('beforeunload', (event) => {
  if (current?.isDirty?.()) event.preventDefault();
});
document.getElementById('help-button').addEventListener('click', showHelp);
window.addEventListener('hashchange', route);
route();
