// The test bench: run a mapper or reducer in the server's sandbox (POST /sandbox/evaluate, the limits runs get)
// on a sample value, or on the value that link received in a past run of the step being edited.
import {ApiError, api} from './api.js';
import {compact, fmtTime, h, jsonBlock, notice, replace, shortId, uid} from './dom.js';
import {jsonField} from './code.js';

const RECENT_RUNS = 12;  // past runs looked at for recorded data

// The built-in reducers, written as the scripts they are equivalent to, so the sandbox can run them too.
const BUILTIN_JS = {
  array: '(outputs) => outputs',
  last: '(outputs) => (outputs.length ? outputs[outputs.length - 1] : null)',
  merge: `(outputs) => {
  const merged = {};
  outputs.forEach((out, i) => {
    if (out === null) return;
    if (typeof out !== 'object' || Array.isArray(out)) {
      throw new Error("reducer 'merge' needs object outputs, but child " + i + ' returned ' +
        (Array.isArray(out) ? 'an array' : typeof out) + "; use 'array' or a JavaScript reducer");
    }
    Object.assign(merged, out);
  });
  return merged;
}`,
};

/** JSON with sorted keys, to compare two values whatever their key order. */
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (value && typeof value === 'object') {
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** The node at `path` (child positions from the root) of a run tree. */
function nodeAt(tree, path) {
  let node = tree;
  for (const i of path) node = node?.children?.[i];
  return node;
}

/** What a link received in one run, or null when that run cannot tell (other tree, not reached yet). */
function recordedFor(tree, link) {
  const parent = nodeAt(tree, link.path);
  if (!parent || parent.step.name !== link.parentName) return null;
  const run = {id: tree.id, input: tree.input};
  if (link.kind === 'reducer') {
    if (!parent.children.length || !parent.children.every((c) => c.state === 'complete')) return null;
    return {value: parent.children.map((c) => c.output), ctx: {run, step: {name: parent.step.name}, index: parent.position},
      recorded: parent.state === 'complete' ? {value: parent.output, what: 'the reducer\'s output'} : null};
  }
  const kid = parent.children[link.index];
  if (!kid || kid.step.name !== link.childName) return null;
  let value;
  if (parent.step.kind === 'parallel' || link.index === 0) {
    if (parent.state === 'pending') return null;
    value = parent.input;
  } else {
    const previous = parent.children[link.index - 1];
    if (previous.state !== 'complete') return null;
    value = previous.output;
  }
  return {value, ctx: {run, step: {name: kid.step.name}, index: link.index},
    recorded: kid.state !== 'pending' ? {value: kid.input, what: `the input ${kid.step.name} received`} : null};
}

async function loadRecorded(link) {
  if (!link.rootName) return {samples: [], why: 'This step is not saved yet: save it and start a run to test on recorded data.'};
  const page = await api.runs({step: link.rootName, limit: String(RECENT_RUNS)});
  const trees = await Promise.all(page.runs.map((r) => api.run(r.id).catch(() => null)));
  const samples = [];
  for (const tree of trees) {
    const found = tree && recordedFor(tree, link);
    if (found) samples.push({tree, ...found});
  }
  const why = page.runs.length
    ? `None of the last ${page.runs.length} runs of ${link.rootName} reached this ${link.kind} with the same tree.`
    : `${link.rootName} has no runs of its own yet (runs of other trees that contain it are not searched): start one, then come back.`;
  return {samples, why};
}

/**
 * A test bench for a mapper or a reducer.
 * kind: 'mapper' | 'reducer'; editor: the code editor (for "go to line"); source(): the script, or a built-in
 * reducer's name; link(): {kind, rootName, path, parentName, parentKind, index, childName}.
 */
export function createBench({kind, editor, source, link}) {
  const group = uid('bench');
  const result = h('div', {class: 'bench-result', 'aria-live': 'polite'});
  const sample = jsonField({
    label: kind === 'mapper' ? 'Sample input (the value the mapper receives)' : 'Sample child outputs (a JSON array, in child order)',
    value: kind === 'mapper' ? '{}' : '[{}, {}]', rows: 4});
  const pickId = uid('pick');
  const picker = h('select', {id: pickId, disabled: true}, h('option', {value: ''}, 'Loading…'));
  const recordedView = h('div', {class: 'stack'});
  const recordedPart = h('div', {class: 'stack', hidden: true},
    h('div', {class: 'field'}, h('label', {for: pickId}, 'Past run'), picker), recordedView);
  let samples = null;

  const radio = (value, label, checked) => {
    const id = uid('src');
    return h('span', {class: 'radio'}, h('input', {type: 'radio', name: group, id, value, checked,
      onchange: () => choose(value)}), h('label', {for: id}, label));
  };

  function showPicked() {
    const picked = samples?.[Number(picker.value)];
    if (!picked) {
      replace(recordedView);
      return;
    }
    replace(recordedView,
      h('p', {class: 'hint'}, kind === 'mapper' ? 'The value this mapper received in that run:' : 'The children\'s outputs in that run:'),
      jsonBlock(picked.value, 'Recorded value'));
  }

  async function choose(value) {
    replace(result);
    sample.el.hidden = value !== 'sample';
    recordedPart.hidden = value !== 'recorded';
    if (value !== 'recorded') return;  // (re)load each time: new runs may have ended since
    picker.disabled = true;
    picker.replaceChildren(h('option', {value: ''}, 'Loading…'));
    try {
      const found = await loadRecorded(link());
      samples = found.samples;
      picker.replaceChildren(...(samples.length
        ? samples.map((s, i) => h('option', {value: String(i)},
          `${fmtTime(s.tree.started_at || s.tree.created_at)} · ${s.tree.state} · run ${shortId(s.tree.id)} · ${compact(s.tree.input, 40)}`))
        : [h('option', {value: ''}, 'No recorded data')]));
      picker.disabled = !samples.length;
      if (!samples.length) replace(recordedView, h('p', {class: 'muted'}, found.why));
      else showPicked();
    } catch (error) {
      samples = null;
      picker.replaceChildren(h('option', {value: ''}, 'Could not load runs'));
      replace(recordedView, notice('error', 'Could not load past runs', error.message));
    }
  }
  picker.addEventListener('change', showPicked);

  const runButton = h('button', {type: 'button', class: 'primary small', onclick: () => run()}, '▶ Run test');

  async function run() {
    const info = link();
    const src = source();
    let script = src;
    let note = null;
    if (kind === 'reducer' && src in BUILTIN_JS) {
      script = BUILTIN_JS[src];
      note = `The built-in reducer “${src}”, run as its JavaScript equivalent.`;
    } else if (!String(src).trim()) {
      script = '(input) => input';
      note = 'The mapper is empty: the child receives the value unchanged.';
    }
    let input;
    let ctx;
    let recorded = null;
    if (!recordedPart.hidden) {
      const picked = samples?.[Number(picker.value)];
      if (!picked) {
        replace(result, notice('warn', null, 'Pick a past run first.'));
        return;
      }
      ({value: input, ctx, recorded} = picked);
    } else {
      const parsed = sample.result();
      if (!parsed.ok) {
        replace(result, notice('error', 'The sample is not valid JSON', parsed.message));
        sample.textarea.focus();
        return;
      }
      input = parsed.value;
      ctx = {run: {id: null, input}, step: {name: kind === 'mapper' ? info.childName : info.parentName || 'test'},
        index: info.index ?? 0};
    }
    runButton.disabled = true;
    replace(result, h('p', {class: 'muted'}, 'Running in the sandbox…'));
    editor?.markLine(null);
    try {
      const answer = await api.evaluate({source: script, kind, input, ctx});
      if (answer.ok) {
        const parts = [note ? h('p', {class: 'hint'}, note) : null, jsonBlock(answer.output, 'Test result')];
        if (recorded) {
          const same = canonical(recorded.value) === canonical(answer.output);
          parts.push(h('p', {class: same ? 'hint ok' : 'hint warn'}, same
            ? `✓ Same as ${recorded.what} in that run.`
            : `≠ Differs from ${recorded.what} in that run:`), same ? null : jsonBlock(recorded.value, 'Recorded value'));
        }
        replace(result, notice('ok', '✓ Result', ...parts));
      } else {
        const {message, line, column, kind: errorKind} = answer.error;
        const builtin = note && kind === 'reducer';
        const goTo = line && editor && !builtin
          ? h('button', {type: 'button', class: 'small', onclick: () => editor.goToLine(line)}, `Go to line ${line}`) : null;
        if (line && !builtin) editor?.markLine(line);
        // Line and column in the script as written in the editor (a syntax error's column too).
        const at = line && !builtin ? ` on line ${line}${column ? `, column ${column}` : ''}` : '';
        replace(result, notice('error', `✕ Script error${at}`,
          h('p', {class: 'mono'}, message), h('p', {class: 'hint'}, `kind: ${errorKind}`), goTo));
      }
    } catch (error) {
      const detail = error instanceof ApiError ? error.message : String(error);
      replace(result, notice('error', 'The server refused the test', detail));
    } finally {
      runButton.disabled = false;
    }
  }

  const onKey = (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === 'Enter') {
      event.preventDefault();
      run();
    }
  };
  editor?.textarea.addEventListener('keydown', onKey);
  sample.textarea.addEventListener('keydown', onKey);
  editor?.textarea.addEventListener('input', () => editor.markLine(null));

  const el = h('section', {class: 'bench stack', 'aria-label': `Test bench for this ${kind}`},
    h('h4', {}, 'Test bench ', h('span', {class: 'muted small-text'}, '— runs in the server\'s sandbox, with the limits runs get')),
    h('fieldset', {class: 'radios'}, h('legend', {}, 'Test on'),
      radio('sample', 'a sample value', true), radio('recorded', 'data recorded in a past run', false)),
    sample.el, recordedPart,
    h('div', {class: 'actions'}, runButton, h('span', {class: 'hint'}, 'Ctrl+Enter in the script or the sample runs it too.')),
    result);
  return {el, run};
}
