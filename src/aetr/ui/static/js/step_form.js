// The step editor's form: api fields, or a parent's reducer and children; inline children nest the same form.
import {field, h, uid} from './dom.js';
import {BUILTIN_REDUCERS} from './model.js';
import {codeEditor} from './code.js';
import {createBench} from './bench.js';
import {childrenEditor} from './children.js';

const METHODS = ['POST', 'PUT', 'PATCH', 'GET', 'DELETE'];

function bound(input, model, key, env) {
  input.value = model[key] ?? '';
  input.addEventListener('input', () => {
    model[key] = input.value;
    env.onChange();
  });
  return input;
}

function nameField(model, env) {
  const input = h('input', {type: 'text', required: true, autocomplete: 'off', spellcheck: false,
    pattern: '(?!\\.+$)[A-Za-z0-9._\\-]{1,200}', maxlength: '200', placeholder: 'e.g. ingest', 'data-field': 'name'});
  const {wrap} = field('Name', bound(input, model, 'name', env), 'Letters, digits, “-”, “_” and “.” (not dots alone); unique.');
  const warning = h('span', {class: 'hint warn', 'aria-live': 'polite'});
  const check = () => {
    const taken = env.allSteps().some((s) => s.name === input.value.trim());
    warning.textContent = !taken ? '' : env.depth === 0
      ? 'A step with this name exists: open it to edit it, or choose another name.'
      : 'A step with this name exists: saving replaces it with this definition.';
  };
  input.addEventListener('input', check);
  check();
  wrap.append(warning);
  return wrap;
}

function select(options, value) {
  const el = h('select', {}, Object.entries(options).map(([v, label]) => h('option', {value: v}, label)));
  el.value = value;
  return el;
}

function headersEditor(model, env) {
  const rows = h('div', {class: 'header-rows'});
  const addRow = (entry, focus) => {
    const nameId = uid('hname');
    const key = h('input', {id: nameId, type: 'text', value: entry.name, placeholder: 'X-Tenant', autocomplete: 'off',
      spellcheck: false});
    const value = h('input', {type: 'text', value: entry.value, placeholder: 'acme', autocomplete: 'off',
      spellcheck: false, 'aria-label': 'Header value'});
    key.setAttribute('aria-label', 'Header name');
    key.addEventListener('input', () => { entry.name = key.value; env.onChange(); });
    value.addEventListener('input', () => { entry.value = value.value; env.onChange(); });
    const row = h('div', {class: 'header-row'}, key, value,
      h('button', {type: 'button', class: 'ghost icon', 'aria-label': 'Remove this header', title: 'Remove header',
        onclick: () => {
          model.headers.splice(model.headers.indexOf(entry), 1);
          row.remove();
          env.onChange();
          addButton.focus();
        }}, '✕'));
    rows.append(row);
    if (focus) key.focus();
  };
  const addButton = h('button', {type: 'button', class: 'small', onclick: () => {
    const entry = {name: '', value: ''};
    model.headers.push(entry);
    addRow(entry, true);
    env.onChange();
  }}, '+ Add header');
  model.headers.forEach((entry) => addRow(entry, false));
  return h('fieldset', {class: 'subtle'}, h('legend', {}, 'Headers'), rows, addButton);
}

function apiFields(model, env) {
  const url = bound(h('input', {type: 'url', required: true, placeholder: 'http://service:8000/step', autocomplete: 'off',
    spellcheck: false, 'data-field': 'url'}), model, 'url', env);
  const method = select(Object.fromEntries(METHODS.map((m) => [m, m])), model.method);
  method.addEventListener('change', () => { model.method = method.value; env.onChange(); });
  const mode = select({callback: 'callback — posts its output later', sync: 'sync — answers with its output'}, model.mode);
  mode.addEventListener('change', () => { model.mode = mode.value; env.onChange(); });
  const num = (key, attrs = {}) => bound(h('input', {type: 'number', min: '0', step: 'any', inputmode: 'decimal', ...attrs}),
    model, key, env);
  const retryNum = (key, attrs) => {
    const input = h('input', {type: 'number', min: '0', step: 'any', inputmode: 'decimal', ...attrs});
    input.value = model.retry[key];
    input.addEventListener('input', () => { model.retry[key] = input.value; env.onChange(); });
    return input;
  };
  return [
    field('URL', url, 'The step service AETR calls with the node\'s input as the JSON body.').wrap,
    h('div', {class: 'row'},
      field('Method', method).wrap,
      h('div', {class: 'grow'}, field('Mode', mode).wrap)),
    h('div', {class: 'row'},
      field('Timeout (s)', num('timeout_s', {'data-field': 'timeout'})).wrap,
      field('Heartbeat (s)', num('heartbeat_s', {placeholder: 'none'}), 'Optional.').wrap),
    h('fieldset', {class: 'subtle'}, h('legend', {}, 'Retry'),
      h('div', {class: 'row'},
        field('Max attempts', retryNum('max_attempts', {min: '1', step: '1', inputmode: 'numeric'}), '1 = no retry').wrap,
        field('Backoff (s)', retryNum('backoff_s')).wrap,
        field('Max backoff (s)', retryNum('max_backoff_s')).wrap)),
    headersEditor(model, env),
  ];
}

function reducerFields(model, env) {
  const options = {...BUILTIN_REDUCERS, js: 'JavaScript — your own (outputs, ctx) => value'};
  const picker = select(options, model.reducer);
  picker.setAttribute('data-field', 'reducer');
  const editor = codeEditor({label: `Reducer script of ${model.name || 'this step'}`, value: model.reducerJs, rows: 5,
    placeholder: '(outputs, ctx) => outputs', onInput: (text) => { model.reducerJs = text; env.onChange(); }});
  const bench = createBench({
    kind: 'reducer',
    editor,
    source: () => model.reducer === 'js' ? model.reducerJs : model.reducer,
    link: () => ({kind: 'reducer', rootName: env.rootName(), path: env.getPath(), parentName: model.name.trim(),
      index: env.getPath().at(-1) ?? 0}),
  });
  const jsPart = h('div', {class: 'stack'}, editor.el);
  const sync = () => {
    jsPart.hidden = model.reducer !== 'js';
    editor.fit();
  };
  picker.addEventListener('change', () => {
    model.reducer = picker.value;
    sync();
    env.onChange();
  });
  sync();
  return h('fieldset', {class: 'subtle reducer'}, h('legend', {}, 'Reducer'),
    h('p', {class: 'hint'}, 'Joins the children\'s outputs, in child order, into this step\'s output.'),
    field('Join the outputs with', picker).wrap, jsPart, bench.el);
}

function mapFields(model, env) {
  const items = codeEditor({label: `Items script of ${model.name || 'this map'}`, value: model.items, rows: 3,
    placeholder: '(input, ctx) => input.images   — empty: the input is the array',
    onInput: (text) => { model.items = text; env.onChange(); }});
  const bench = createBench({
    kind: 'mapper',
    editor: items,
    source: () => model.items,
    link: () => ({kind: 'mapper', rootName: env.rootName(), path: env.getPath(), parentName: model.name.trim(),
      parentKind: 'map', index: 0, childName: 'items'}),
  });
  const concurrency = bound(h('input', {type: 'number', min: '1', step: '1', inputmode: 'numeric', placeholder: 'no limit',
    'data-field': 'max_concurrency'}), model, 'max_concurrency', env);
  const tolerated = bound(h('input', {type: 'text', autocomplete: 'off', spellcheck: false, placeholder: '0, 3 or 10%',
    pattern: '[0-9]+|[0-9]{1,3}(\\.[0-9]{1,4})?%', 'data-field': 'tolerated_failures'}), model, 'tolerated_failures', env);
  return h('fieldset', {class: 'subtle'}, h('legend', {}, 'Items'),
    h('p', {class: 'hint'}, 'A JavaScript function (input, ctx) => array: the child runs once per item, its mapper gets '
      + '(item, ctx) with ctx.index. Empty: the map\'s input must be the array.'),
    items.el, bench.el,
    h('div', {class: 'row'},
      field('Max concurrency', concurrency, 'Items unfinished at once; empty: no limit.').wrap,
      field('Tolerated failures', tolerated, 'A count, or a share such as 10%.').wrap));
}

function waitFields(model, env) {
  const name = uid('wait');
  const panels = {};
  const radio = (mode, label) => {
    const input = h('input', {type: 'radio', name, value: mode, id: uid('wait-mode'), checked: model.waitMode === mode});
    input.addEventListener('change', () => {
      model.waitMode = mode;
      sync();
      env.onChange();
    });
    return h('span', {class: 'check'}, input, h('label', {for: input.id}, label));
  };
  const seconds = bound(h('input', {type: 'number', min: '0', step: 'any', inputmode: 'decimal', 'data-field': 'seconds'}),
    model, 'seconds', env);
  const until = codeEditor({label: 'Until script', value: model.until, rows: 2, placeholder: '(input, ctx) => input.remind_at',
    onInput: (text) => { model.until = text; env.onChange(); }});
  const timeout = bound(h('input', {type: 'number', min: '0', step: 'any', inputmode: 'decimal', placeholder: '3600',
    'data-field': 'signal-timeout'}), model, 'timeout_s_signal', env);
  panels.seconds = field('Seconds', seconds, 'Waits this long, then passes its input on.').wrap;
  panels.until = h('div', {}, until.el,
    h('p', {class: 'hint'}, 'Returns an ISO 8601 time or epoch seconds: the wait ends then.'));
  panels.signal = field('Signal timeout (s)', timeout,
    'Waits until someone answers it (the run page\'s Approve/Reject, or POST …/signal); fails as a timeout after this long.').wrap;
  function sync() {
    for (const [mode, el] of Object.entries(panels)) el.hidden = model.waitMode !== mode;
    until.fit();
  }
  sync();
  return h('fieldset', {class: 'subtle radios-box'}, h('legend', {}, 'Wait'),
    h('div', {class: 'row', role: 'radiogroup', 'aria-label': 'How it waits'},
      radio('seconds', 'a number of seconds'), radio('until', 'until a time a script gives'), radio('signal', 'for a signal')),
    panels.seconds, panels.until, panels.signal);
}

/**
 * The form of one step (a root, or an inline child at any depth).
 * env: {allSteps(), rootName(), getPath(), onChange(), depth}.
 */
export function stepForm(model, env) {
  const parts = [];
  if (model.isNew) parts.push(nameField(model, env));
  if (model.kind === 'api') parts.push(...apiFields(model, env));
  else if (model.kind === 'wait') parts.push(waitFields(model, env));
  else {
    if (model.kind === 'map') parts.push(mapFields(model, env));
    if (model.kind === 'parallel' || model.kind === 'map') parts.push(reducerFields(model, env));
    parts.push(childrenEditor(model, env, stepForm));
  }
  return h('div', {class: `step-form stack kind-form-${model.kind}`}, parts);
}
