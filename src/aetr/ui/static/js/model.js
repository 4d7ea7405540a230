// The step editor's data: a plain "model" object per step that the form edits in place, built from a stored
// tree (GET /steps/{name}) or fresh, and turned back into the body of PUT /steps/{name}.
import {STEP_NAME} from './dom.js';

export const BUILTIN_REDUCERS = {
  array: 'array — the list of child outputs, in child order',
  last: 'last — the last child\'s output',
  merge: 'merge — shallow merge of object outputs, later children win',
};

/** A fresh model for a new step of `kind`. */
export function newModel(kind, name = '') {
  return {
    name, kind, isNew: true, url: '', method: 'POST', headers: [], mode: 'callback', timeout_s: '3600',
    heartbeat_s: '', retry: {max_attempts: '3', backoff_s: '1', max_backoff_s: '60'},
    reducer: 'array', reducerJs: '(outputs, ctx) => outputs', children: [],
    // map
    items: '', max_concurrency: '', tolerated_failures: '0',
    // wait: one of seconds, until (a script) or signal
    waitMode: 'seconds', seconds: '60', until: '(input, ctx) => input.remind_at', timeout_s_signal: '3600',
  };
}

/** The model of a stored step tree (GET /steps/{name}); its children are links to steps by name. */
export function modelFromTree(tree) {
  const model = newModel(tree.kind, tree.name);
  model.isNew = false;
  model.version = tree.version;
  if (tree.kind === 'api') {
    Object.assign(model, {
      url: tree.url || '', method: tree.method || 'POST', mode: tree.mode || 'callback',
      headers: Object.entries(tree.headers || {}).map(([name, value]) => ({name, value})),
      timeout_s: String(tree.timeout_s ?? 3600), heartbeat_s: tree.heartbeat_s == null ? '' : String(tree.heartbeat_s),
      retry: {max_attempts: String(tree.retry?.max_attempts ?? 3), backoff_s: String(tree.retry?.backoff_s ?? 1),
        max_backoff_s: String(tree.retry?.max_backoff_s ?? 60)},
    });
    return model;
  }
  if (tree.kind === 'wait') {
    model.waitMode = tree.signal ? 'signal' : tree.until ? 'until' : 'seconds';
    if (tree.seconds != null) model.seconds = String(tree.seconds);
    if (tree.until) model.until = tree.until;
    if (tree.timeout_s != null) model.timeout_s_signal = String(tree.timeout_s);
    return model;
  }
  if (tree.kind === 'map') {
    model.items = tree.items || '';
    model.max_concurrency = tree.max_concurrency == null ? '' : String(tree.max_concurrency);
    model.tolerated_failures = String(tree.tolerated_failures ?? 0);
  }
  if (tree.kind === 'parallel' || tree.kind === 'map') {
    if (tree.reducer in BUILTIN_REDUCERS) model.reducer = tree.reducer;
    else {
      model.reducer = 'js';
      model.reducerJs = tree.reducer;
    }
  }
  const links = tree.kind === 'map' ? [tree.child].filter(Boolean) : (tree.children || []);
  model.children = links.map((c) => newChild({ref: c.step.name, refKind: c.step.kind, mapper: c.mapper, when: c.when}));
  return model;
}

let childKeys = 0;
/** A child link: a step by name (`ref`) or a new inline step (`inline`, a model). */
export function newChild({ref = null, refKind = null, inline = null, mapper = null, when = null}) {
  childKeys += 1;
  return {key: childKeys, ref, refKind, inline, mapper: mapper || '', mapperOpen: Boolean(mapper), when: when || ''};
}

function number(value, what, {integer = false, optional = false} = {}) {
  const text = String(value ?? '').trim();
  if (!text) {
    if (optional) return null;
    throw new Error(`${what}: enter a number`);
  }
  const n = Number(text);
  if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) throw new Error(`${what}: “${text}” is not ${integer ? 'a whole number' : 'a number'}`);
  return n;
}

/** The PUT body of a model; throws Error naming the field when something is missing. */
export function specFromModel(model, where = 'the step') {
  const name = model.name.trim();
  if (!STEP_NAME.test(name)) throw new Error(`${where}: the name must be 1–200 letters, digits, “-”, “_” or “.”, and not dots alone`);
  const spec = {name, kind: model.kind};
  if (model.kind === 'api') {
    if (!model.url.trim()) throw new Error(`${name}: enter the URL of the step's HTTP service`);
    const headers = {};
    for (const {name: key, value} of model.headers) {
      if (key.trim()) headers[key.trim()] = value;
    }
    Object.assign(spec, {
      url: model.url.trim(), method: model.method, headers, mode: model.mode,
      timeout_s: number(model.timeout_s, `${name}: timeout`),
      heartbeat_s: number(model.heartbeat_s, `${name}: heartbeat`, {optional: true}),
      retry: {
        max_attempts: number(model.retry.max_attempts, `${name}: retry attempts`, {integer: true}),
        backoff_s: number(model.retry.backoff_s, `${name}: retry backoff`),
        max_backoff_s: number(model.retry.max_backoff_s, `${name}: retry max backoff`),
      },
    });
    return spec;
  }
  if (model.kind === 'wait') {
    if (model.waitMode === 'seconds') spec.seconds = number(model.seconds, `${name}: seconds`);
    else if (model.waitMode === 'until') {
      if (!model.until.trim()) throw new Error(`${name}: enter the script that gives the time to wait until`);
      spec.until = model.until;
    } else {
      spec.signal = true;
      spec.timeout_s = number(model.timeout_s_signal, `${name}: signal timeout`, {optional: true});
    }
    return spec;
  }
  if (model.kind === 'parallel' || model.kind === 'map') spec.reducer = model.reducer === 'js' ? model.reducerJs : model.reducer;
  const links = model.children.map((child, i) => {
    const link = {step: child.inline ? specFromModel(child.inline, `${name}, child ${i + 1}`) : child.ref};
    if (child.mapper.trim()) link.mapper = child.mapper;
    if (model.kind === 'choice' && child.when.trim()) link.when = child.when;
    return link;
  });
  if (model.kind === 'map') {
    if (links.length !== 1) throw new Error(`${name}: a map runs one child step per item: give it exactly one child`);
    spec.child = links[0];
    if (model.items.trim()) spec.items = model.items;
    spec.max_concurrency = number(model.max_concurrency, `${name}: max concurrency`, {integer: true, optional: true});
    const tolerated = String(model.tolerated_failures ?? '').trim() || '0';
    spec.tolerated_failures = tolerated.endsWith('%') ? tolerated : number(tolerated, `${name}: tolerated failures`, {integer: true});
    return spec;
  }
  if (model.kind === 'choice') {
    const open = links.slice(0, -1).findIndex((l) => !l.when);
    if (open >= 0) throw new Error(`${name}: child ${open + 1} needs a “when” script: only the last child may go without one`);
  }
  spec.children = links;
  return spec;
}

