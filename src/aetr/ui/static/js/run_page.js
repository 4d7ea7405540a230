// #/runs/ID: one run, live — its tree coloured by state, each node's data, a timeline, the history,
// and the cancel and retry buttons. The tree arrives over the run's event stream, not by polling.
import {ApiError, api, watchRun} from './api.js';
import {box, compact, fmtDuration, fmtTime, fromNow, h, jsonBlock, kindBadge, notice, pretty, replace, shortId, span, stepLink, toast, uid}
  from './dom.js';
import {STATES, TERMINAL, stateBadge, stateIcon} from './states.js';

const EVENTS_REFRESH_MS = 400;  // at most one history reload per this many ms while the run changes
const TICK_MS = 1000;  // running durations and the timeline's "now" move on this often
const MAP_PAGE = 50;  // a map's items shown at once: a map may have 10,000 of them
const FINISHED = ['complete', 'error', 'cancelled', 'skipped'];

const LIVE_TEXT = {
  connecting: 'Connecting…', live: 'Live', reconnecting: 'Connection lost — reconnecting…',
  ended: 'Run over', gone: 'Not found', error: 'Not live',
};

/** Every node of a run tree with its depth, in tree order; `intoMaps` false stops at a map's items. */
function flatten(tree, intoMaps = true) {
  const out = [];
  const walk = (node, depth) => {
    out.push({node, depth});
    if (intoMaps || node.step.kind !== 'map') node.children.forEach((c) => walk(c, depth + 1));
  };
  walk(tree, 0);
  return out;
}

/** A map's items counted by state, and how many are finished. */
function mapCounts(node) {
  const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const c of node.children) counts[c.state] = (counts[c.state] || 0) + 1;
  const done = FINISHED.reduce((n, s) => n + counts[s], 0);
  return {counts, done, total: node.children.length};
}

/** The child a choice took: its one child not skipped, once the choice has decided. */
function takenChild(node) {
  if (node.step.kind !== 'choice') return null;
  const decided = node.children.some((c) => c.state !== 'pending');
  return decided ? node.children.find((c) => c.state !== 'skipped') || null : null;
}

/** A wait's end in words: "until 14:05:00 (in 5 min)", or that it awaits its signal. */
function waitNote(node, long = false) {
  if (node.awaits_signal) return h('span', {class: 'wait-note signal'}, long ? '‖ Awaits a signal: answer it below.' : '‖ awaiting signal');
  if (node.wait_until && !TERMINAL.has(node.state)) {
    return h('span', {class: 'wait-note', title: node.wait_until}, long ? '◷ Waits until ' : '◷ until ',
      fmtTime(node.wait_until), ' (', h('span', {dataset: {until: node.wait_until}}, fromNow(node.wait_until)), ')');
  }
  return null;
}

const NOTIFY_OUTCOMES = {queued: 'queued', delivered: 'delivered', failed: 'to be tried again', gave_up: 'given up',
  superseded: 'not sent: the run went on'};
// After a run ends, its history is read again while a notification of its end is still to be delivered.
const NOTIFY_LOOK_MS = 1000;
const NOTIFY_MAX_LOOK_MS = 30000;

/** When to read an ended run's history again for its notification's next try (null: nothing pending). */
function notifyRecheckMs(events) {
  const latest = new Map();  // each notification's id -> its latest line
  for (const e of events) if (e.kind === 'notify') latest.set(e.data?.id, e.data || {});
  let soonest = null;
  for (const d of latest.values()) {
    let ms = null;
    if (d.outcome === 'queued') ms = NOTIFY_LOOK_MS;
    else if (d.outcome === 'failed') {
      const due = Date.parse(d.next_at) - Date.now();
      ms = Math.min(NOTIFY_MAX_LOOK_MS, Math.max(NOTIFY_LOOK_MS / 2, Number.isFinite(due) ? due + 500 : NOTIFY_LOOK_MS));
    }
    if (ms !== null && (soonest === null || ms < soonest)) soonest = ms;
  }
  return soonest;
}

function eventSummary(event) {
  const d = {...(event.data || {})};
  const attempt = d.attempt ? `attempt ${d.attempt}` : null;
  switch (event.kind) {
    case 'run.started': return `step ${d.step} version ${d.version}`;
    case 'state': return `${d.from} → ${d.to}`;
    case 'dispatch': return [attempt, d.status && `answered HTTP ${d.status}`, d.ms !== undefined && `in ${d.ms} ms`,
      d.status ? null : d.outcome && `report ${d.outcome}`, d.reason].filter(Boolean).join(' · ');
    case 'retry': return `${attempt} failed (${d.kind}): ${d.error} — attempt ${d.next_attempt} in ${fmtDuration((d.delay_s || 0) * 1000)}`;
    case 'timeout': return `${attempt}: ${d.heartbeat_s ? `no heartbeat within ${d.heartbeat_s} s` : `no answer within ${d.timeout_s} s`}`;
    case 'notify': return [`notification to ${d.url}`, d.attempt && `try ${d.attempt}`, d.status && `answered HTTP ${d.status}`, d.error,
      NOTIFY_OUTCOMES[d.outcome] || d.outcome, d.next_at && `next try at ${fmtTime(d.next_at)}`, d.reason]
      .filter(Boolean).join(' · ');
    default: {
      const parts = [attempt, d.outcome, d.reason];
      for (const key of ['attempt', 'outcome', 'reason', 'step']) delete d[key];
      if (Object.keys(d).length) parts.push(compact(d, 140));
      return parts.filter(Boolean).join(' · ');
    }
  }
}

/** A duration; while it runs (no end yet) the page's ticker moves it on. */
function duration(start, end, tag = 'span') {
  return h(tag, {dataset: end ? {} : {runningSince: start}}, fmtDuration(span(start, end)));
}

export function renderRunPage(ctx, runId) {
  let run = null;
  let byId = new Map();
  let selected = null;
  let events = [];
  let onlySelected = false;
  let liveState = 'connecting';
  let stopWatching = null;
  let eventsTimer = null;
  let eventsLoading = false;
  let eventsAgain = false;
  let resultKey = null;
  let detailsKey = null;
  let userSelected = false;
  const collapsed = new Set();
  const mapViews = new Map();  // a map node's id -> {page, failedOnly}
  const signalForms = new Map();  // a signal wait's id -> its form, kept while the run is redrawn (typed text stays)

  ctx.setTitle(`Run ${shortId(runId)}`);
  const heading = h('h1', {}, 'Run ', h('span', {class: 'mono'}, shortId(runId)));
  const badgeSlot = h('span');
  const live = h('span', {class: 'live', role: 'status'});
  const meta = h('dl', {class: 'meta'});
  const cancelButton = h('button', {type: 'button', class: 'danger-ghost', disabled: true, onclick: () => act('cancel')}, '■ Cancel run');
  const retryButton = h('button', {type: 'button', disabled: true, onclick: () => act('retry')}, '↻ Retry run');
  const againButton = h('button', {type: 'button', disabled: true, onclick: () => startAgain()}, 'Start again with this input');
  const actionStatus = h('div', {'aria-live': 'polite'});
  const resultSlot = h('div');
  const treeList = h('ul', {class: 'run-tree'});
  const details = h('div', {class: 'node-details', 'aria-live': 'off'});
  const gantt = h('div', {class: 'gantt'});
  const eventsBody = h('tbody');
  const onlyId = `only-${runId}`;
  const onlyBox = h('input', {type: 'checkbox', id: onlyId, onchange: () => { onlySelected = onlyBox.checked; renderEvents(); }});
  const body = h('div', {class: 'stack', hidden: true},
    resultSlot,
    h('div', {class: 'grid-2'},
      h('section', {class: 'card', 'aria-labelledby': 'rt-title'}, h('h2', {id: 'rt-title'}, 'Tree'), treeList),
      h('section', {class: 'card', 'aria-labelledby': 'nd-title'}, h('h2', {id: 'nd-title'}, 'Node'), details)),
    h('section', {class: 'card', 'aria-labelledby': 'tl-title'}, h('h2', {id: 'tl-title'}, 'Timeline'), gantt),
    h('section', {class: 'card flush', 'aria-labelledby': 'ev-title'},
      h('div', {class: 'card-head pad'}, h('h2', {id: 'ev-title'}, 'History'),
        h('span', {class: 'check'}, onlyBox, h('label', {for: onlyId}, 'only the selected node'))),
      h('table', {class: 'table responsive events'},
        h('caption', {class: 'visually-hidden'}, 'The run\'s events, oldest first'),
        h('thead', {}, h('tr', {}, ['Time', 'Event', 'Step', 'Details'].map((c) => h('th', {scope: 'col'}, c)))),
        eventsBody)));
  const waiting = h('p', {class: 'loading'}, 'Loading the run…');

  ctx.main.append(
    h('nav', {class: 'crumbs', 'aria-label': 'Breadcrumb'}, h('a', {href: '#/runs'}, 'Runs'), ' / ', shortId(runId)),
    h('div', {class: 'page-head'}, h('div', {class: 'title-line'}, heading, badgeSlot, live),
      h('div', {class: 'actions'}, cancelButton, retryButton, againButton)),
    actionStatus, meta, waiting, body);

  function renderHeader() {
    const root = run;
    replace(heading, stepLink(root.step.name), h('span', {class: 'muted'}, ' run '), h('span', {class: 'mono small-text'}, shortId(root.id)));
    replace(badgeSlot, stateBadge(root.state));
    replace(meta,
      h('div', {}, h('dt', {}, 'Run id'), h('dd', {class: 'mono'}, root.id)),
      h('div', {}, h('dt', {}, 'Step'), h('dd', {}, `${root.step.name} (version ${root.step.version})`)),
      h('div', {}, h('dt', {}, 'Started'), h('dd', {}, fmtTime(root.started_at || root.created_at))),
      h('div', {}, h('dt', {}, 'Ended'), h('dd', {}, fmtTime(root.completed_at))),
      h('div', {}, h('dt', {}, 'Duration'), duration(root.started_at || root.created_at, root.completed_at, 'dd')));
    cancelButton.disabled = TERMINAL.has(root.state);
    retryButton.disabled = !['error', 'cancelled'].includes(root.state);
  }

  function renderLive() {
    const over = run && TERMINAL.has(run.state);
    const state = liveState === 'ended' || (over && liveState !== 'reconnecting') ? 'ended' : liveState;
    live.className = `live live-${state}`;
    replace(live, h('span', {class: 'live-dot', 'aria-hidden': 'true'}), LIVE_TEXT[state] || state);
  }

  function renderResult() {
    const root = run;
    // Redrawn only when the outcome changes: the box is announced to screen readers each time it appears.
    const awaiting = flatten(root).map(({node}) => node).filter((n) => n.awaits_signal);
    const key = `${root.state} ${JSON.stringify(root.error)} ${root.completed_at} ${awaiting.map((n) => n.id)}`;
    if (key === resultKey) return;
    resultKey = key;
    if (root.state === 'complete') {
      replace(resultSlot, h('section', {class: 'card result ok', 'aria-labelledby': 'out-title'},
        h('h2', {id: 'out-title'}, '✓ Output'), jsonBlock(root.output, 'Run output')));
    } else if (root.state === 'error' || root.state === 'cancelled') {
      const err = root.error || {};
      const cancelled = root.state === 'cancelled' || err.kind === 'cancelled';
      const origin = err.node_id && byId.get(err.node_id);
      replace(resultSlot, notice(cancelled ? 'warn' : 'error',
        cancelled ? '⊘ The run was cancelled' : `✕ The run failed${err.step ? ` at step ${err.step}` : ''}`,
        h('p', {class: 'mono error-message'}, err.message || '(no message)'),
        h('p', {class: 'hint'}, `kind: ${err.kind || 'unknown'}`),
        origin && origin !== root ? h('button', {type: 'button', class: 'small', onclick: () => select(origin.id, true)},
          `Show ${origin.step.name}`) : null));
    } else if (awaiting.length) {
      replace(resultSlot, notice('warn', `‖ ${awaiting.length === 1 ? 'A step awaits' : `${awaiting.length} steps await`} a signal`,
        h('p', {}, 'The run goes on when someone approves or rejects it.'),
        h('div', {class: 'actions'}, awaiting.slice(0, 5).map((n) => h('button', {type: 'button', class: 'small',
          onclick: () => select(n.id, true, true)}, `Answer ${n.step.name}`)))));
    } else {
      replace(resultSlot, notice('info', null, run.state === 'pending' ? 'The run is about to start…'
        : 'The run is going on: this page follows it live.'));
    }
  }

  function focusKey() {
    return document.activeElement?.dataset?.focusKey || null;
  }
  function restoreFocus(key) {
    if (!key) return;
    const el = ctx.main.querySelector(`[data-focus-key="${CSS.escape(key)}"]`);
    if (el && document.activeElement !== el) el.focus({preventScroll: true});
  }

  function mapView(node) {
    if (!mapViews.has(node.id)) mapViews.set(node.id, {page: 0, failedOnly: false});
    return mapViews.get(node.id);
  }

  function mapSummary(node) {
    const {counts, done, total} = mapCounts(node);
    const pct = total ? Math.floor((done / total) * 100) : 0;
    const bar = h('div', {class: 'map-progress', role: 'progressbar', 'aria-valuemin': '0', 'aria-valuemax': String(total),
      'aria-valuenow': String(done), 'aria-label': `${node.step.name}: ${done} of ${total} items finished`},
    FINISHED.map((s) => {
      const part = h('span', {class: `state-${s}`});
      part.style.width = `${total ? (counts[s] / total) * 100 : 0}%`;
      return part;
    }));
    return [
      h('div', {class: 'map-counts', 'data-map-counts': node.id},
        h('span', {class: 'strong'}, `${done} / ${total} items done (${pct}%)`),
        STATES.filter((s) => counts[s]).map((s) => h('span', {class: `state state-${s} small`},
          h('span', {class: 'state-icon', 'aria-hidden': 'true'}, stateIcon(s).textContent), ` ${counts[s]} ${s}`))),
      bar,
    ];
  }

  /** A map's items: its counts, and one page of its children (or of the failed ones only). */
  function mapPanel(node, open) {
    const view = mapView(node);
    const all = node.children.map((child, index) => ({child, index}));
    const failed = all.filter(({child}) => child.state === 'error');
    const shown = view.failedOnly ? failed : all;
    const pages = Math.max(1, Math.ceil(shown.length / MAP_PAGE));
    view.page = Math.max(0, Math.min(view.page, pages - 1));
    const from = view.page * MAP_PAGE;
    const slice = shown.slice(from, from + MAP_PAGE);
    const redraw = (change) => () => {
      change();
      renderTree();
    };
    const failedToggle = h('button', {type: 'button', class: 'small', 'aria-pressed': String(view.failedOnly),
      dataset: {focusKey: `mf-${node.id}`}, onclick: redraw(() => { view.failedOnly = !view.failedOnly; view.page = 0; })},
    view.failedOnly ? 'Show all items' : `Show failed (${failed.length})`);
    const prev = h('button', {type: 'button', class: 'small', disabled: view.page === 0, dataset: {focusKey: `mp-${node.id}`},
      'aria-label': `Previous items of ${node.step.name}`, onclick: redraw(() => { view.page -= 1; })}, '‹ Prev');
    const next = h('button', {type: 'button', class: 'small', disabled: view.page >= pages - 1, dataset: {focusKey: `mn-${node.id}`},
      'aria-label': `Next items of ${node.step.name}`, onclick: redraw(() => { view.page += 1; })}, 'Next ›');
    const range = shown.length ? `${view.failedOnly ? 'Failed items' : 'Items'} ${from + 1}–${from + slice.length} of ${shown.length}`
      : (view.failedOnly ? 'No failed items.' : 'No items yet.');
    return h('div', {class: 'map-panel'},
      mapSummary(node),
      open ? [
        h('div', {class: 'map-nav'}, failedToggle, h('span', {class: 'grow muted', 'aria-live': 'polite'}, range),
          pages > 1 ? [prev, h('span', {class: 'muted'}, `page ${view.page + 1} of ${pages}`), next] : null),
        slice.length ? h('ul', {class: 'map-items', 'aria-label': `Items of ${node.step.name}`},
          slice.map(({child, index}) => treeItem(child, index))) : null,
      ] : null);
  }

  function treeItem(node, itemIndex = null) {
    const isMap = node.step.kind === 'map';
    const isParent = node.children.length > 0;
    const open = !collapsed.has(node.id);
    const toggle = isParent
      ? h('button', {type: 'button', class: 'ghost icon toggle', 'aria-expanded': String(open), dataset: {focusKey: `t-${node.id}`},
        'aria-label': `${open ? 'Collapse' : 'Expand'} ${node.step.name}`, onclick: () => {
          if (open) collapsed.add(node.id);
          else collapsed.delete(node.id);
          renderTree();
        }}, open ? '▾' : '▸')
      : h('span', {class: 'toggle-space', 'aria-hidden': 'true'});
    const taken = takenChild(node);
    const choose = h('button', {type: 'button', class: `node-button state-border-${node.state}`, 'aria-pressed': String(selected === node.id),
      dataset: {focusKey: `n-${node.id}`, node: node.id}, onclick: () => select(node.id, false, true)},
      stateIcon(node.state), itemIndex === null ? null : h('span', {class: 'item-index'}, `#${itemIndex}`),
      h('span', {class: 'node-name'}, node.step.name),
      taken ? h('span', {class: 'badge taken'}, `took ${taken.step.name}`) : null,
      waitNote(node),
      h('span', {class: 'node-meta'}, node.state, node.started_at ? [' · ', duration(node.started_at, node.completed_at)] : null));
    let below = null;
    if (isMap) below = mapPanel(node, open);
    else if (isParent && open) below = h('ul', {}, node.children.map((c) => treeItem(c)));
    return h('li', {class: `run-node state-${node.state}${node.step.kind === 'choice' ? ' choice' : ''}`,
      dataset: {nodeId: node.id}},
    h('div', {class: 'node-row'}, toggle, choose), below);
  }

  /** The answer form of a signal wait: Approve with a JSON output, or Reject with a message. */
  function signalForm(node) {
    if (signalForms.has(node.id)) return signalForms.get(node.id);
    const outId = uid('signal-out');
    const msgId = uid('signal-msg');
    const output = h('textarea', {id: outId, rows: '4', spellcheck: false, dataset: {focusKey: `so-${node.id}`}});
    output.value = pretty(node.input ?? null);
    const message = h('input', {id: msgId, type: 'text', autocomplete: 'off', placeholder: 'why it is rejected',
      dataset: {focusKey: `sm-${node.id}`}});
    const status = h('div', {'aria-live': 'polite'});
    const approve = h('button', {type: 'submit', class: 'primary'}, '✓ Approve');
    const reject = h('button', {type: 'button', class: 'danger-ghost'}, '✕ Reject');
    async function send(body) {
      approve.disabled = true;
      reject.disabled = true;
      replace(status);
      try {
        const tree = await api.signal(runId, node.id, body);
        signalForms.delete(node.id);
        toast(body.error === undefined ? `${node.step.name} approved` : `${node.step.name} rejected`, 'ok');
        show(tree);
      } catch (error) {
        replace(status, notice('error', 'The signal was not sent', error instanceof ApiError ? error.message : String(error)));
      } finally {
        approve.disabled = false;
        reject.disabled = false;
      }
    }
    const form = h('form', {class: 'signal-form stack', 'aria-label': `Answer ${node.step.name}`},
      h('div', {class: 'field'}, h('label', {for: outId}, 'Output (JSON)'), output,
        h('span', {class: 'hint'}, 'Approve completes the wait with this output; the run goes on with it.')),
      h('div', {class: 'actions'}, approve),
      h('div', {class: 'reject-row'}, h('div', {class: 'field'}, h('label', {for: msgId}, 'Reason to reject'), message), reject),
      status);
    output.addEventListener('input', () => replace(status));
    message.addEventListener('input', () => replace(status));
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      let value;
      try {
        value = output.value.trim() ? JSON.parse(output.value) : null;
      } catch (error) {
        replace(status, notice('error', 'The output is not valid JSON', error.message));
        output.focus();
        return;
      }
      send({output: value});
    });
    reject.addEventListener('click', () => {
      const text = message.value.trim();
      if (!text) {
        replace(status, notice('error', 'Say why', 'Enter a reason: the run\'s error will carry it.'));
        message.focus();
        return;
      }
      send({error: text});
    });
    signalForms.set(node.id, form);
    return form;
  }

  function renderTree() {
    const key = focusKey();
    replace(treeList, treeItem(run));
    restoreFocus(key);
  }

  function renderDetails() {
    const node = byId.get(selected) || run;
    const mine = events.filter((e) => e.node_id === node.id && e.kind !== 'state');
    const err = node.error;
    // Redrawn only when the node changed: an answer being typed into the signal form keeps its focus.
    const key = JSON.stringify({...node, children: node.children.map((c) => c.state)}) + mine.length;
    if (key === detailsKey) return;
    detailsKey = key;
    const focused = focusKey();
    const taken = takenChild(node);
    replace(details,
      h('div', {class: 'title-line'}, h('h3', {}, node.step.name), stateBadge(node.state, {small: true}), kindBadge(node.step.kind)),
      node.step.kind === 'wait' ? h('p', {}, waitNote(node, true)) : null,
      node.awaits_signal ? signalForm(node) : null,
      node.step.kind === 'map' ? h('div', {class: 'stack'}, mapSummary(node)) : null,
      taken ? h('p', {}, 'Took ', h('strong', {}, `${taken.step.name}`), ` (child ${taken.position + 1} of ${node.children.length})`,
        node.children.length > 1 ? '; the others were skipped.' : '.') : null,
      h('dl', {class: 'meta compact'},
        h('div', {}, h('dt', {}, 'Attempt'), h('dd', {}, String(node.attempt))),
        h('div', {}, h('dt', {}, 'Started'), h('dd', {}, fmtTime(node.started_at))),
        h('div', {}, h('dt', {}, 'Ended'), h('dd', {}, fmtTime(node.completed_at))),
        h('div', {}, h('dt', {}, 'Duration'), node.started_at ? duration(node.started_at, node.completed_at, 'dd') : h('dd', {}, '—')),
        h('div', {}, h('dt', {}, 'Node id'), h('dd', {class: 'mono'}, node.id))),
      err ? box(err.kind === 'cancelled' ? 'warn' : 'error', `Error (${err.kind})`, h('p', {class: 'mono error-message'}, err.message),
        err.step && err.step !== node.step.name ? h('p', {class: 'hint'}, `started at step ${err.step}`) : null) : null,
      h('h4', {}, 'Input'), node.state === 'pending' ? h('p', {class: 'muted'}, 'Not received yet.') : jsonBlock(node.input, `Input of ${node.step.name}`),
      h('h4', {}, 'Output'), node.state === 'complete' ? jsonBlock(node.output, `Output of ${node.step.name}`) : h('p', {class: 'muted'}, 'None yet.'),
      mine.length ? [h('h4', {}, 'Calls and callbacks'), h('ul', {class: 'plain small-text'},
        mine.map((e) => h('li', {}, h('span', {class: 'mono'}, fmtTime(e.at)), ` ${e.kind} — ${eventSummary(e)}`)))] : null);
    restoreFocus(focused);
  }

  function renderGantt() {
    const rows = flatten(run, false);  // a map's items are counted on its tree row, not drawn here
    const starts = rows.map(({node}) => Date.parse(node.started_at || node.created_at)).filter(Number.isFinite);
    const t0 = Math.min(...starts);
    const ends = rows.map(({node}) => (node.completed_at ? Date.parse(node.completed_at) : (node.started_at ? Date.now() : NaN)))
      .filter(Number.isFinite);
    const t1 = Math.max(t0 + 1, ...ends);
    const total = t1 - t0;
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => {
      const tick = h('span', {class: 'tick'}, fmtDuration(f * total));
      tick.style.left = `${f * 100}%`;
      return tick;
    });
    const key = focusKey();
    replace(gantt,
      h('div', {class: 'g-row g-axis', 'aria-hidden': 'true'}, h('div', {class: 'g-label'}), h('div', {class: 'g-track'}, ticks)),
      rows.map(({node, depth}) => {
        let bar = h('span', {class: 'g-none'}, node.state);
        if (node.started_at) {
          const a = Date.parse(node.started_at);
          const b = node.completed_at ? Date.parse(node.completed_at) : Date.now();
          bar = h('div', {class: `g-bar state-${node.state}`, title: `${node.step.name}: ${fmtDuration(b - a)}`});
          bar.style.left = `${((a - t0) / total) * 100}%`;
          bar.style.width = `max(3px, ${((b - a) / total) * 100}%)`;
        }
        const label = h('button', {type: 'button', class: 'g-label link-button', dataset: {focusKey: `g-${node.id}`},
          'aria-label': `${node.step.name}: ${node.state}${node.started_at ? `, ${fmtDuration(span(node.started_at, node.completed_at))}` : ''}`,
          onclick: () => select(node.id, false, true)},
        stateIcon(node.state), h('span', {class: 'clip'}, node.step.name));
        label.style.paddingLeft = `${0.25 + depth * 0.9}rem`;
        const time = h('span', {class: 'g-time', 'aria-hidden': 'true'}, node.started_at ? fmtDuration(span(node.started_at, node.completed_at)) : '');
        return h('div', {class: `g-row${selected === node.id ? ' selected' : ''}`}, label, h('div', {class: 'g-track'}, bar), time);
      }));
    restoreFocus(key);
  }

  function renderEvents() {
    const t0 = run ? Date.parse(run.created_at) : 0;
    const shown = onlySelected && selected ? events.filter((e) => e.node_id === selected) : events;
    eventsBody.replaceChildren(...shown.map((e) => {
      const node = byId.get(e.node_id);
      return h('tr', {class: e.kind === 'state' ? `ev-state ev-${e.data?.to}` : ''},
        h('td', {'data-label': 'Time', class: 'mono nowrap'}, `+${fmtDuration(Date.parse(e.at) - t0)}`),
        h('td', {'data-label': 'Event'}, e.kind === 'state' ? stateBadge(e.data?.to, {small: true}) : h('span', {class: 'badge'}, e.kind)),
        h('td', {'data-label': 'Step'}, node ? node.step.name : (e.data?.step || '')),
        h('td', {'data-label': 'Details', class: 'small-text'}, eventSummary(e)));
    }));
    if (!shown.length) eventsBody.append(h('tr', {}, h('td', {colspan: '4', class: 'muted'}, 'No events yet.')));
  }

  async function loadEvents() {
    if (eventsLoading) {
      eventsAgain = true;
      return;
    }
    eventsLoading = true;
    try {
      events = await api.events(runId);
      renderEvents();
      renderDetails();
      const again = run && TERMINAL.has(run.state) ? notifyRecheckMs(events) : null;
      if (again !== null) later(again);
    } catch {
      // the next change retries; the tree stays right meanwhile
    } finally {
      eventsLoading = false;
      if (eventsAgain) {
        eventsAgain = false;
        scheduleEvents();
      }
    }
  }
  let laterTimer = null;
  let closed = false;  // the page was left: a history read still under way schedules nothing more
  function later(ms) {
    clearTimeout(laterTimer);
    if (closed) return;
    laterTimer = setTimeout(loadEvents, ms);
  }

  function scheduleEvents() {
    if (eventsTimer) return;
    eventsTimer = setTimeout(() => {
      eventsTimer = null;
      loadEvents();
    }, EVENTS_REFRESH_MS);
  }

  function select(id, scroll, byUser = false) {
    selected = id;
    userSelected = userSelected || byUser;
    renderTree();
    renderDetails();
    renderGantt();
    if (onlySelected) renderEvents();
    if (scroll) details.scrollIntoView({block: 'nearest', behavior: 'smooth'});
  }

  function show(tree) {
    run = tree;
    byId = new Map(flatten(tree).map(({node}) => [node.id, node]));
    if (!selected || !byId.has(selected)) selected = tree.id;
    if (!userSelected) {  // until the user picks a node, a wait awaiting its signal shows its answer form
      const awaiting = flatten(tree).find(({node}) => node.awaits_signal);
      if (awaiting) selected = awaiting.node.id;
    }
    for (const id of signalForms.keys()) if (!byId.get(id)?.awaits_signal) signalForms.delete(id);
    waiting.remove();
    body.hidden = false;
    againButton.disabled = false;
    ctx.setTitle(`${tree.step.name} run ${shortId(tree.id)} — ${tree.state}`);
    renderHeader();
    renderLive();
    renderResult();
    renderTree();
    renderDetails();
    renderGantt();
    scheduleEvents();
  }

  function follow() {
    stopWatching?.();
    stopWatching = watchRun(runId, {
      onRun: show,
      onStatus: (status) => {
        liveState = status;
        if (status === 'gone') {
          replace(waiting, notice('warn', 'No such run', `There is no run with id ${runId}. `, h('a', {href: '#/runs'}, 'See the runs')));
        } else if (status === 'ended') {
          loadEvents();
        }
        if (run) renderLive();
        else if (status !== 'gone') replace(live, LIVE_TEXT[status] || status);
      },
    });
  }

  async function act(what) {
    const button = what === 'cancel' ? cancelButton : retryButton;
    button.disabled = true;
    replace(actionStatus);
    try {
      const tree = what === 'cancel' ? await api.cancel(runId) : await api.retry(runId);
      show(tree);
      toast(what === 'cancel' ? 'Run cancelled' : 'Run retried: failed and cancelled nodes run again', 'ok');
      if (what === 'retry') follow();  // the previous stream ended with the run
    } catch (error) {
      const msg = error instanceof ApiError ? error.message : String(error);
      replace(actionStatus, notice('error', what === 'cancel' ? 'Not cancelled' : 'Not retried', msg));
      if (run) renderHeader();
    }
  }

  async function startAgain() {
    try {
      const started = await api.startRun(run.step.name, run.input);
      location.hash = `#/runs/${started.id}`;
    } catch (error) {
      replace(actionStatus, notice('error', 'The run was not started', error.message));
    }
  }

  const ticker = setInterval(() => {
    if (run && !TERMINAL.has(run.state)) {
      for (const el of ctx.main.querySelectorAll('[data-running-since]')) el.textContent = fmtDuration(span(el.dataset.runningSince));
      for (const el of ctx.main.querySelectorAll('[data-until]')) el.textContent = fromNow(el.dataset.until);
      renderGantt();
    }
  }, TICK_MS);
  follow();
  return {cleanup: () => {
    stopWatching?.();
    clearInterval(ticker);
    clearTimeout(eventsTimer);
    clearTimeout(laterTimer);
    closed = true;
  }};
}
