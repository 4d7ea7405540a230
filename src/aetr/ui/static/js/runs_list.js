// #/runs: start a run, and list runs with state and step filters, newest first, a page at a time.
import {api} from './api.js';
import {compact, fmtDuration, fmtTime, h, notice, replace, shortId, span, stepLink, uid} from './dom.js';
import {jsonField} from './code.js';
import {STATES, stateBadge} from './states.js';

const PAGE_SIZE = 25;  // runs per page; #/runs?limit=N changes it

/** A form that starts a run: the step (fixed, or chosen from `steps`) and a JSON input checked as you type. */
export function startRunForm({step = null, steps = null, input = '{}'} = {}) {
  const stepId = uid('step');
  const listId = uid('steps');
  const stepInput = step ? null : h('input', {id: stepId, type: 'text', list: listId, required: true, autocomplete: 'off',
    spellcheck: false, placeholder: 'step name', 'data-field': 'run-step'});
  const options = h('datalist', {id: listId});
  const fill = (list) => options.replaceChildren(...list.map((s) => h('option', {value: s.name}, s.kind)));
  if (steps) fill(steps);
  const error = h('div', {'aria-live': 'polite'});
  const json = jsonField({label: 'Input (JSON)', value: input, rows: 4, emptyAs: null,
    hint: 'The root step receives it. Empty means null.', onChange: () => sync()});
  json.textarea.setAttribute('data-field', 'run-input');
  const submit = h('button', {type: 'submit', class: 'primary'}, '▶ Start run');

  function sync() {
    submit.disabled = !json.result().ok || (stepInput !== null && !stepInput.value.trim());
  }
  stepInput?.addEventListener('input', sync);
  sync();

  const form = h('form', {class: 'stack start-run', novalidate: true},
    stepInput ? h('div', {class: 'field'}, h('label', {for: stepId}, 'Step'), stepInput, options) : null,
    json.el, h('div', {class: 'actions'}, submit), error);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const parsed = json.result();
    if (!parsed.ok) return;
    const name = step || stepInput.value.trim();
    submit.disabled = true;
    replace(error);
    try {
      const run = await api.startRun(name, parsed.value);
      location.hash = `#/runs/${run.id}`;
    } catch (e) {
      replace(error, notice('error', 'The run was not started', e.message));
      sync();
    }
  });
  return {el: form, fillSteps: fill};
}

function runRow(run) {
  const took = span(run.started_at || run.created_at, run.completed_at);
  return h('tr', {},
    h('td', {'data-label': 'State'}, stateBadge(run.state, {small: true})),
    h('td', {'data-label': 'Step', class: 'nowrap'}, stepLink(run.step.name)),
    h('td', {'data-label': 'Run', class: 'nowrap'}, h('a', {href: `#/runs/${run.id}`, class: 'mono nowrap', 'aria-label': `Run ${run.id}`},
      shortId(run.id))),
    h('td', {'data-label': 'Input', class: 'mono clip'}, compact(run.input, 48)),
    h('td', {'data-label': 'Started'}, fmtTime(run.started_at || run.created_at)),
    h('td', {'data-label': 'Duration'}, run.completed_at || run.state === 'executing' ? fmtDuration(took) : '—'));
}

export function renderRunsList(ctx) {
  ctx.setTitle('Runs');
  const stateId = uid('state');
  const stepId = uid('stepf');
  const listId = uid('steps');
  const stateFilter = h('select', {id: stateId},
    h('option', {value: ''}, 'any state'), STATES.map((s) => h('option', {value: s}, s)));
  stateFilter.value = ctx.query.get('state') || '';
  const stepFilter = h('input', {id: stepId, type: 'search', list: listId, autocomplete: 'off', spellcheck: false,
    placeholder: 'any step', 'data-search': true, value: ctx.query.get('step') || ''});
  const stepOptions = h('datalist', {id: listId});
  const tbody = h('tbody');
  const table = h('table', {class: 'table responsive'},
    h('caption', {class: 'visually-hidden'}, 'Runs, newest first'),
    h('thead', {}, h('tr', {}, ['State', 'Step', 'Run', 'Input', 'Started', 'Duration'].map((c) => h('th', {scope: 'col'}, c)))),
    tbody);
  const status = h('div', {'aria-live': 'polite'});
  const more = h('button', {type: 'button', onclick: () => load(false)}, 'Load older runs');
  const refresh = h('button', {type: 'button', class: 'small', onclick: () => load(true)}, '↻ Refresh');
  const starter = startRunForm({steps: []});
  const pageSize = Math.min(500, Math.max(1, Number.parseInt(ctx.query.get('limit'), 10) || PAGE_SIZE));
  let cursor = null;
  let generation = 0;

  const moreBox = h('div', {class: 'pad center', hidden: true}, more);
  ctx.main.append(
    h('div', {class: 'page-head'}, h('h1', {}, 'Runs'), refresh),
    h('div', {class: 'grid-2 runs-layout'},
      h('div', {class: 'stack'},
        h('div', {class: 'toolbar'},
          h('div', {class: 'field'}, h('label', {for: stateId}, 'State'), stateFilter),
          h('div', {class: 'field grow'}, h('label', {for: stepId}, 'Step'), stepFilter, stepOptions)),
        h('div', {class: 'card flush'}, table, status, moreBox)),
      h('section', {class: 'card', 'aria-labelledby': 'start-title'}, h('h2', {id: 'start-title'}, 'Start a run'), starter.el)));

  async function load(fresh) {
    const mine = ++generation;
    if (fresh) cursor = null;
    const query = {limit: String(pageSize)};
    if (stateFilter.value) query.state = stateFilter.value;
    if (stepFilter.value.trim()) query.step = stepFilter.value.trim();
    if (cursor) query.cursor = cursor;
    more.disabled = true;
    replace(status, h('p', {class: 'muted pad'}, 'Loading runs…'));
    try {
      const page = await api.runs(query);
      if (mine !== generation) return;
      if (fresh) tbody.replaceChildren();
      tbody.append(...page.runs.map(runRow));
      cursor = page.next_cursor;
      moreBox.hidden = !cursor;
      replace(status, tbody.childElementCount ? null : h('p', {class: 'empty pad'},
        query.state || query.step ? 'No run matches these filters.' : 'No runs yet: start one above, or from a step\'s page.'));
    } catch (error) {
      if (mine !== generation) return;
      replace(status, notice('error', 'Could not load the runs', error.message));
    } finally {
      more.disabled = false;
    }
  }

  function applyFilters() {
    const q = new URLSearchParams();
    if (stateFilter.value) q.set('state', stateFilter.value);
    if (stepFilter.value.trim()) q.set('step', stepFilter.value.trim());
    if (pageSize !== PAGE_SIZE) q.set('limit', String(pageSize));
    const hash = `#/runs${q.toString() ? `?${q}` : ''}`;
    if (location.hash !== hash) history.replaceState(null, '', hash);
    load(true);
  }
  stateFilter.addEventListener('change', applyFilters);
  let typing = null;
  stepFilter.addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(applyFilters, 300);
  });

  api.steps().then((steps) => {
    starter.fillSteps(steps);
    stepOptions.replaceChildren(...steps.map((s) => h('option', {value: s.name})));
  }).catch(() => {});
  load(true);
  return {cleanup: () => { generation += 1; clearTimeout(typing); }};
}
