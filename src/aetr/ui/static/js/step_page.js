// #/steps/NAME and #/steps/new/KIND: a step's tree, its parents, deleting it, starting a run, and its editor.
import {ApiError, api} from './api.js';
import {announce, fmtTime, h, kindBadge, notice, replace, stepLink, toast, withoutUserinfo} from './dom.js';
import {modelFromTree, newModel, specFromModel} from './model.js';
import {stepForm} from './step_form.js';
import {startRunForm} from './runs_list.js';

const MAX_REUSE_LOOKUPS = 60;  // distinct steps whose parents are fetched to mark reuse

/** A step's child links: a map's one child, a parent's children, none for api and wait steps. */
function linksOf(step) {
  if (step.kind === 'map') return step.child ? [step.child] : (step.children || []);
  return step.children || [];
}

/** Every step name in a tree, with how often it appears. */
function occurrences(tree, counts = new Map()) {
  for (const child of linksOf(tree)) {
    counts.set(child.step.name, (counts.get(child.step.name) || 0) + 1);
    occurrences(child.step, counts);
  }
  return counts;
}

async function reuseOf(tree) {
  const counts = occurrences(tree);
  const names = [...counts.keys()].slice(0, MAX_REUSE_LOOKUPS);
  const parents = await Promise.all(names.map((n) => api.parents(n).catch(() => [])));
  const reuse = new Map();
  names.forEach((name, i) => {
    const elsewhere = parents[i].filter((p) => p !== tree.name);
    if (parents[i].length > 1 || counts.get(name) > 1) reuse.set(name, {parents: parents[i], elsewhere, times: counts.get(name)});
  });
  return reuse;
}

function reuseBadge(name, reuse) {
  const info = reuse.get(name);
  if (!info) return null;
  const where = info.parents.length > 1 ? `used by ${info.parents.length} parents: ${info.parents.join(', ')}` : `used ${info.times} times in this tree`;
  return h('span', {class: 'badge reused', title: where}, h('span', {'aria-hidden': 'true'}, '↻ '), `reused — ${where}`);
}

function treeNode(step, mapper, reuse, depth) {
  const badges = [
    mapper ? h('span', {class: 'badge mapper', title: mapper}, 'ƒ mapper') : null,
    step.when ? h('span', {class: 'badge mapper', title: step.when}, 'ƒ when') : null,
    step.kind === 'wait' ? h('span', {class: 'badge'}, step.signal ? 'until a signal' : step.until ? 'until a scripted time'
      : `${step.seconds ?? '?'} s`) : null,
    step.kind === 'parallel' || step.kind === 'map' ? h('span', {class: 'badge'}, `reducer: ${['array', 'last', 'merge'].includes(step.reducer) ? step.reducer : 'JavaScript'}`) : null,
    depth > 0 ? reuseBadge(step.name, reuse) : null,
  ];
  const label = [kindBadge(step.kind), ' ', depth > 0 ? stepLink(step.name, {class: 'strong'}) : h('span', {class: 'strong'}, step.name), ...badges];
  if (step.kind === 'api' || step.kind === 'wait' || step.ref) {
    if (step.kind === 'wait' && !step.ref) return h('li', {class: 'tree-leaf'}, h('div', {class: 'tree-label'}, label));
    const what = step.ref ? ' an existing step' : ` ${step.method} ${withoutUserinfo(step.url)}`;
    return h('li', {class: 'tree-leaf'}, h('div', {class: 'tree-label'}, label,
      h('span', {class: `muted clip small-text${step.ref ? '' : ' mono'}`}, what)));
  }
  const links = linksOf(step);
  return h('li', {}, h('details', {open: true},
    h('summary', {class: 'tree-label'}, label, h('span', {class: 'muted small-text'},
      step.kind === 'map' ? ' · runs its child once per item' : ` · ${links.length} ${links.length === 1 ? 'child' : 'children'}`)),
    links.length
      ? h('ul', {class: 'tree'}, links.map((c) => treeNode(c.when ? {...c.step, when: c.when} : c.step, c.mapper, reuse, depth + 1)))
      : h('p', {class: 'muted small-text'}, 'no children')));
}

function treeCard(tree) {
  const body = h('ul', {class: 'tree root'}, treeNode(tree, null, new Map(), 0));
  const toggleAll = (open) => body.querySelectorAll('details').forEach((d) => { d.open = open; });
  reuseOf(tree).then((reuse) => replace(body, treeNode(tree, null, reuse, 0))).catch(() => {});
  return h('section', {class: 'card', 'aria-labelledby': 'tree-title'},
    h('div', {class: 'card-head'}, h('h2', {id: 'tree-title'}, 'Tree'),
      h('div', {class: 'actions'},
        h('button', {type: 'button', class: 'small', onclick: () => toggleAll(true)}, 'Expand all'),
        h('button', {type: 'button', class: 'small', onclick: () => toggleAll(false)}, 'Collapse all'))),
    body);
}

/** The tree a model describes, in the shape treeNode() draws (children given by name are not expanded). */
function treeFromModel(model) {
  return {
    name: model.name.trim() || '(no name yet)', kind: model.kind, method: model.method, url: model.url.trim() || '(no URL yet)',
    reducer: model.reducer === 'js' ? 'JavaScript' : model.reducer,
    seconds: model.seconds, signal: model.waitMode === 'signal', until: model.waitMode === 'until',
    children: model.children.map((c) => ({mapper: c.mapper.trim() || null, when: c.when?.trim() || null,
      step: c.inline ? treeFromModel(c.inline) : {name: c.ref, kind: c.refKind, ref: true, children: []}})),
  };
}

function previewCard(model) {
  if (model.kind === 'api') {
    return {el: h('section', {class: 'card', 'aria-labelledby': 'about-title'}, h('h2', {id: 'about-title'}, 'How AETR calls it'),
      h('ul', {class: 'tips'},
        h('li', {}, 'Each run node sends ', h('strong', {}, 'METHOD URL'), ' with its input as the JSON body, and an ',
          h('code', {}, 'AETR-Callback'), ' header (also the ', h('code', {}, '?aetr='), ' query parameter).'),
        h('li', {}, h('strong', {}, 'callback'), ': the service answers 2xx at once and posts its output to the callback URL later — seconds or days.'),
        h('li', {}, h('strong', {}, 'sync'), ': the answer\'s body is the output.'),
        h('li', {}, 'A connection error, a time-out, a 5xx or a 429 is retried with backoff while attempts remain; another 4xx fails the node.'))),
    update() {}};
  }
  const body = h('ul', {class: 'tree root'});
  const update = () => replace(body, treeNode(treeFromModel(model), null, new Map(), 0));
  update();
  return {el: h('section', {class: 'card', 'aria-labelledby': 'preview-title'}, h('h2', {id: 'preview-title'}, 'Preview'),
    h('p', {class: 'hint'}, 'The tree as it will be saved.'), body), update};
}

function parentsCard(name, parents) {
  return h('section', {class: 'card', 'aria-labelledby': 'parents-title'},
    h('h2', {id: 'parents-title'}, 'Used by'),
    parents.length
      ? h('ul', {class: 'plain'}, parents.map((p) => h('li', {}, stepLink(p))))
      : h('p', {class: 'muted'}, `No parent uses ${name}: it can be deleted.`));
}

function deleteControl(name, parents, onDeleted) {
  const box = h('div', {class: 'delete-box'});
  const result = h('div');
  const start = h('button', {type: 'button', class: 'danger-ghost', onclick: () => ask()}, 'Delete…');
  function ask() {
    const yes = h('button', {type: 'button', class: 'danger', onclick: () => run(yes)}, `Delete ${name}`);
    replace(box, h('div', {class: 'confirm', role: 'group', 'aria-label': 'Confirm deletion'},
      h('span', {}, `Delete ${name}? This cannot be undone.`),
      yes, h('button', {type: 'button', onclick: () => { replace(box, start); start.focus(); }}, 'Keep it')));
    yes.focus();
  }
  async function run(button) {
    button.disabled = true;
    try {
      await api.deleteStep(name);
      onDeleted();
    } catch (error) {
      replace(box, start);
      const used = error instanceof ApiError && error.status === 409;
      replace(result, notice('error', used ? `Cannot delete ${name}` : 'Not deleted', error.message,
        used && parents.length ? h('p', {}, 'Open a parent to remove it: ', parents.map((p, i) => [i ? ', ' : '', stepLink(p)])) : null));
      start.focus();
    }
  }
  box.append(start);
  return {box, result};
}

export function renderStepPage(ctx, name, newKind) {
  let dirty = false;
  let model = null;
  let allSteps = [];
  let alive = true;
  const heading = h('h1', {}, name || `New ${newKind} step`);
  const headMeta = h('div', {class: 'head-meta'});
  const headActions = h('div', {class: 'actions'});
  const content = h('div', {}, h('p', {class: 'loading'}, 'Loading…'));
  ctx.setTitle(name || `New ${newKind} step`);
  ctx.main.append(
    h('nav', {class: 'crumbs', 'aria-label': 'Breadcrumb'}, h('a', {href: '#/steps'}, 'Steps'), ' / ', name || 'new'),
    h('div', {class: 'page-head'}, h('div', {class: 'title-line'}, heading, headMeta), headActions),
    content);

  function editorCard(version, onEdit = () => {}) {
    const status = h('div', {class: 'save-status', 'aria-live': 'polite'});
    const problems = h('div');
    const save = h('button', {type: 'button', class: 'primary', 'data-shortcut': 'save'}, model.isNew ? 'Create step' : 'Save changes');
    const dirtyMark = h('span', {class: 'muted small-text'});
    const env = {
      allSteps: () => allSteps, rootName: () => (model.isNew ? null : model.name), getPath: () => [], depth: 0,
      onChange: () => {
        dirty = true;
        dirtyMark.textContent = 'Unsaved changes';
        onEdit();
      },
    };
    async function put(ifMatch) {
      let spec;
      try {
        spec = specFromModel(model);
      } catch (error) {
        replace(problems, notice('error', 'Not saved', error.message));
        return;
      }
      if (model.isNew && allSteps.some((s) => s.name === spec.name)) {
        replace(problems, notice('error', 'Not saved', `A step named ${spec.name} already exists. `,
          stepLink(spec.name), ' — open it to edit it, or choose another name.'));
        return;
      }
      save.disabled = true;
      replace(status, 'Saving…');
      try {
        const {data} = await api.putStep(spec, ifMatch);
        dirty = false;
        toast(`Saved ${data.name} — version ${data.version}`, 'ok');
        announce(`Saved ${data.name}, version ${data.version}`);
        if (model.isNew) location.hash = `#/steps/${encodeURIComponent(data.name)}`;
        else await load(true);
      } catch (error) {
        replace(status);
        if (error instanceof ApiError && error.status === 412) {
          const reload = h('button', {type: 'button', onclick: async () => {
            // eslint-disable-next-line no-alert -- discarding typed text needs an explicit yes
            if (!window.confirm('Reload the stored version? Your changes in this form will be lost.')) return;
            dirty = false;
            await load(false);
          }}, 'Reload (discard my changes)');
          const overwrite = h('button', {type: 'button', class: 'danger-ghost', onclick: async () => {
            const current = await api.step(model.name).catch(() => null);
            if (current) await put(current.version);
          }}, 'Save mine over theirs');
          replace(problems, notice('warn', 'Changed elsewhere — reload',
            h('p', {}, `${model.name} was saved by someone else since you opened version ${ifMatch}. `,
              'Your changes are still in the form below: copy what you need, then reload, or save yours over theirs.'),
            h('div', {class: 'actions'}, reload, overwrite)));
          reload.focus();
        } else {
          replace(problems, notice('error', 'Not saved', error.message));
        }
      } finally {
        save.disabled = false;
      }
    }
    save.addEventListener('click', () => {
      replace(problems);
      put(model.isNew ? null : version);
    });
    return h('section', {class: 'card editor', 'aria-labelledby': 'editor-title'},
      h('div', {class: 'card-head'}, h('h2', {id: 'editor-title'}, model.isNew ? 'Define the step' : 'Edit'), dirtyMark),
      problems,
      h('form', {class: 'stack', novalidate: true, onsubmit: (e) => e.preventDefault()}, stepForm(model, env)),
      h('div', {class: 'save-bar'}, save, status,
        h('span', {class: 'hint'}, model.isNew ? '' : 'Runs already started keep the version they were started with.')));
  }

  async function load(keepFocus) {
    try {
      const [steps, tree, parents] = await Promise.all([
        api.steps(), name ? api.step(name) : null, name ? api.parents(name) : null]);
      if (!alive) return;
      allSteps = steps;
      if (!name) {
        model = newModel(newKind);
        const preview = previewCard(model);
        let pending = null;
        const later = () => {
          clearTimeout(pending);
          pending = setTimeout(preview.update, 150);
        };
        replace(content, h('div', {class: 'grid-2'}, editorCard(null, later), h('div', {class: 'stack sticky-side'}, preview.el)));
        return;
      }
      model = modelFromTree(tree);
      ctx.setTitle(tree.name);
      replace(headMeta, kindBadge(tree.kind), h('span', {class: 'muted'}, `version ${tree.version}`));
      const del = deleteControl(tree.name, parents, () => {
        toast(`Deleted ${tree.name}`, 'ok');
        location.hash = '#/steps';
      });
      replace(headActions, h('a', {class: 'button', href: `#/runs?step=${encodeURIComponent(tree.name)}`}, 'Runs of this step'), del.box);
      const summary = steps.find((s) => s.name === tree.name);
      const side = [
        tree.kind === 'api' ? null : treeCard(tree),
        h('section', {class: 'card', 'aria-labelledby': 'start-title'}, h('h2', {id: 'start-title'}, 'Start a run'),
          startRunForm({step: tree.name}).el),
        parentsCard(tree.name, parents),
        summary ? h('p', {class: 'muted small-text'}, `Last changed ${fmtTime(summary.updated_at)} · id `, h('span', {class: 'mono'}, tree.id)) : null,
      ];
      replace(content, del.result, h('div', {class: 'grid-2'}, h('div', {class: 'stack'}, editorCard(tree.version)), h('div', {class: 'stack'}, side)));
      if (keepFocus) content.querySelector('[data-shortcut="save"]')?.focus();
    } catch (error) {
      if (!alive) return;
      if (error instanceof ApiError && error.status === 404) {
        replace(content, notice('warn', `No step named ${name}`, 'It may have been deleted. ',
          h('a', {href: '#/steps'}, 'Back to the steps'), ' or ', h('a', {href: '#/steps/new/api'}, 'create an api step'), '.'));
      } else {
        replace(content, notice('error', 'Could not load the step', error.message));
      }
    }
  }

  load(false);
  return {isDirty: () => dirty, cleanup: () => { alive = false; }};
}
