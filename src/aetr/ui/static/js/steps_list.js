// #/steps: every step, searchable, and the buttons that create new ones.
import {api} from './api.js';
import {fmtTime, h, kindBadge, notice, replace, stepLink, uid} from './dom.js';

export function renderStepsList(ctx) {
  ctx.setTitle('Steps');
  const searchId = uid('search');
  const search = h('input', {id: searchId, type: 'search', placeholder: 'name or kind', 'data-search': true,
    autocomplete: 'off', value: ctx.query.get('q') || ''});
  const count = h('p', {class: 'muted count', 'aria-live': 'polite'});
  const body = h('div', {class: 'card flush'}, h('p', {class: 'loading pad'}, 'Loading steps…'));
  let steps = [];

  ctx.main.append(
    h('div', {class: 'page-head'},
      h('h1', {}, 'Steps'),
      h('div', {class: 'actions'},
        h('a', {class: 'button primary', href: '#/steps/new/api'}, '+ New api step'),
        h('a', {class: 'button', href: '#/steps/new/sequential'}, '+ New sequential'),
        h('a', {class: 'button', href: '#/steps/new/parallel'}, '+ New parallel'),
        h('a', {class: 'button', href: '#/steps/new/map'}, '+ New map'),
        h('a', {class: 'button', href: '#/steps/new/choice'}, '+ New choice'),
        h('a', {class: 'button', href: '#/steps/new/wait'}, '+ New wait'))),
    h('p', {class: 'lead'}, 'A step is an HTTP call (api) or a parent that runs its children one after the other ',
      '(sequential) or all at once (parallel). Open one to see its tree, edit it or start a run.'),
    h('div', {class: 'toolbar'},
      h('div', {class: 'field grow'}, h('label', {for: searchId}, 'Search steps'), search), count),
    body);

  function show() {
    const q = search.value.trim().toLowerCase();
    const shown = steps.filter((s) => !q || s.name.toLowerCase().includes(q) || s.kind === q);
    count.textContent = q ? `${shown.length} of ${steps.length} steps match` : `${steps.length} steps`;
    if (!steps.length) {
      replace(body, h('div', {class: 'empty pad'},
        h('p', {}, 'No steps yet.'),
        h('p', {class: 'muted'}, 'Create an api step for each of your HTTP services, then a sequential or ',
          'parallel step that composes them. Or load the tutorial\'s catalog: ',
          h('code', {}, 'aetr apply -f src/aetr/examples/catalog.yaml'), '.')));
      return;
    }
    if (!shown.length) {
      replace(body, h('p', {class: 'empty pad'}, `No step matches “${search.value}”.`));
      return;
    }
    replace(body, h('table', {class: 'table responsive'},
      h('caption', {class: 'visually-hidden'}, 'Steps'),
      h('thead', {}, h('tr', {}, h('th', {scope: 'col'}, 'Name'), h('th', {scope: 'col'}, 'Kind'),
        h('th', {scope: 'col'}, 'Version'), h('th', {scope: 'col'}, 'Updated'))),
      h('tbody', {}, shown.map((s) => h('tr', {},
        h('td', {'data-label': 'Name'}, stepLink(s.name, {class: 'strong'})),
        h('td', {'data-label': 'Kind'}, kindBadge(s.kind)),
        h('td', {'data-label': 'Version'}, String(s.version)),
        h('td', {'data-label': 'Updated'}, fmtTime(s.updated_at)))))));
  }

  search.addEventListener('input', () => {
    const q = search.value.trim();
    history.replaceState(null, '', q ? `#/steps?q=${encodeURIComponent(q)}` : '#/steps');
    show();
  });

  api.steps().then((list) => {
    steps = list;
    show();
  }).catch((error) => {
    replace(body, notice('error', 'Could not load the steps', error.message));
  });
  return {};
}
