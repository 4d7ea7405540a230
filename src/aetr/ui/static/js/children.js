// A parent step's children: add (existing step by search, or a new inline one), reorder (drag and drop,
// keyboard, buttons), remove, and edit each link's mapper with its test bench.
import {announce, h, kindBadge, uid} from './dom.js';
import {codeEditor} from './code.js';
import {createBench} from './bench.js';
import {newChild, newModel} from './model.js';

const MAX_SUGGESTIONS = 8;

function labelOf(child) {
  if (child.ref) return child.ref;
  return child.inline.name.trim() || 'new inline step';
}

/** The children list of `model` (a sequential or parallel step). `stepForm` renders inline children. */
export function childrenEditor(model, env, stepForm) {
  const helpId = uid('reorder-help');
  const list = h('ol', {class: 'children', 'aria-describedby': helpId});
  const rows = new Map();  // child.key -> {li, refresh()}
  const empty = h('p', {class: 'empty-children muted'}, 'No children yet: add an existing step or a new inline one below.');
  let dragging = null;

  function refreshAll() {
    model.children.forEach((child, i) => rows.get(child.key)?.refresh(i));
    empty.hidden = model.children.length > 0;
  }

  function move(child, to, focusHandle = true) {
    const from = model.children.indexOf(child);
    const target = Math.max(0, Math.min(model.children.length - 1, to));
    if (from < 0 || target === from) return;
    model.children.splice(from, 1);
    model.children.splice(target, 0, child);
    const next = model.children[target + 1];
    list.insertBefore(rows.get(child.key).li, next ? rows.get(next.key).li : null);
    refreshAll();
    env.onChange();
    if (focusHandle) rows.get(child.key).handle.focus();
    announce(`${labelOf(child)} moved to position ${target + 1} of ${model.children.length}`);
  }

  function remove(child) {
    const index = model.children.indexOf(child);
    model.children.splice(index, 1);
    rows.get(child.key).li.remove();
    rows.delete(child.key);
    refreshAll();
    env.onChange();
    const neighbour = model.children[Math.min(index, model.children.length - 1)];
    (neighbour ? rows.get(neighbour.key).handle : search).focus();
    announce(`${labelOf(child)} removed`);
  }

  function addRow(child) {
    const pos = h('span', {class: 'pos', 'aria-hidden': 'true'});
    const handle = h('button', {type: 'button', class: 'handle ghost icon', draggable: true, 'aria-describedby': helpId}, '⠿');
    const title = h('span', {class: 'child-title'});
    const mapperToggle = h('button', {type: 'button', class: 'small mapper-toggle'});
    const up = h('button', {type: 'button', class: 'ghost icon', onclick: () => move(child, model.children.indexOf(child) - 1, false)}, '↑');
    const down = h('button', {type: 'button', class: 'ghost icon', onclick: () => move(child, model.children.indexOf(child) + 1, false)}, '↓');
    const removeButton = h('button', {type: 'button', class: 'small danger-ghost', onclick: () => remove(child)}, 'Remove');

    const editor = codeEditor({label: 'Mapper', value: child.mapper, rows: 6, placeholder: '(input, ctx) => input',
      onInput: (text) => {
        child.mapper = text;
        env.onChange();
        refresh(model.children.indexOf(child));
      }});
    const bench = createBench({
      kind: 'mapper',
      editor,
      source: () => child.mapper,
      link: () => ({kind: 'mapper', rootName: env.rootName(), path: env.getPath(), parentName: model.name.trim(),
        parentKind: model.kind, index: model.children.indexOf(child), childName: labelOf(child)}),
    });
    const mapperPanel = h('div', {class: 'mapper-panel stack', id: uid('mapper')},
      h('p', {class: 'hint'}, model.kind === 'sequential'
        ? 'Reshapes the value this child receives: the parent\'s input for the first child, the previous child\'s output for the others. Empty: passed unchanged.'
        : 'Reshapes the parent\'s input before this child receives it. Empty: passed unchanged.'),
      editor.el, bench.el);
    mapperToggle.setAttribute('aria-controls', mapperPanel.id);
    mapperToggle.addEventListener('click', () => {
      child.mapperOpen = !child.mapperOpen;
      refresh(model.children.indexOf(child));
      if (child.mapperOpen) {
        editor.fit();
        editor.textarea.focus();
      }
    });

    let inlineBox = null;
    if (child.inline) {
      const childEnv = {
        allSteps: env.allSteps, rootName: env.rootName, depth: env.depth + 1,
        getPath: () => [...env.getPath(), model.children.indexOf(child)],
        onChange: () => {
          env.onChange();
          refresh(model.children.indexOf(child));
        },
      };
      inlineBox = h('div', {class: 'inline-step'}, stepForm(child.inline, childEnv));
    }

    // A choice's link: the condition that picks this child (the first that holds wins; the last may have none).
    const whenEditor = model.kind === 'choice' ? codeEditor({label: 'When', value: child.when, rows: 2,
      placeholder: '(input, ctx) => input.total > 100', onInput: (text) => {
        child.when = text;
        env.onChange();
      }}) : null;
    const head = h('div', {class: 'child-head'}, handle, pos, kindBadge(child.ref ? child.refKind : child.inline.kind), title,
      h('div', {class: 'child-actions'}, mapperToggle, up, down, removeButton));
    const li = h('li', {class: 'child', dataset: {key: String(child.key)}}, head,
      whenEditor ? h('div', {class: 'when-panel'}, whenEditor.el) : null, mapperPanel, inlineBox);

    function refresh(i) {
      const name = labelOf(child);
      const n = model.children.length;
      pos.textContent = String(i + 1);
      title.replaceChildren(child.ref
        ? h('a', {href: `#/steps/${encodeURIComponent(child.ref)}`, class: 'strong'}, child.ref)
        : h('span', {class: 'strong'}, name, h('span', {class: 'muted'}, ' (inline, new)')));
      handle.setAttribute('aria-label', `Reorder ${name}, child ${i + 1} of ${n}`);
      up.setAttribute('aria-label', `Move ${name} up`);
      down.setAttribute('aria-label', `Move ${name} down`);
      up.disabled = i === 0;
      down.disabled = i === n - 1;
      removeButton.setAttribute('aria-label', `Remove ${name}`);
      const hasMapper = Boolean(child.mapper.trim());
      mapperToggle.textContent = hasMapper ? 'ƒ Mapper ✓' : 'ƒ Mapper';
      mapperToggle.setAttribute('aria-label', `${child.mapperOpen ? 'Hide' : 'Edit'} the mapper of ${name}${hasMapper ? ' (set)' : ''}`);
      mapperToggle.setAttribute('aria-expanded', String(child.mapperOpen));
      mapperPanel.hidden = !child.mapperOpen;
      editor.el.querySelector('label').textContent = `Mapper for child ${i + 1} (${name})`;
      if (whenEditor) {
        whenEditor.el.querySelector('label').textContent = `When for child ${i + 1} (${name})${i === n - 1 ? ' — may stay empty: the default' : ''}`;
      }
    }

    handle.addEventListener('keydown', (event) => {
      const i = model.children.indexOf(child);
      const to = {ArrowUp: i - 1, ArrowDown: i + 1, Home: 0, End: model.children.length - 1}[event.key];
      if (to === undefined) return;
      event.preventDefault();
      move(child, to);
    });
    head.addEventListener('keydown', (event) => {
      if (!event.altKey || (event.key !== 'ArrowUp' && event.key !== 'ArrowDown') || event.target === handle) return;
      event.preventDefault();
      const i = model.children.indexOf(child);
      move(child, event.key === 'ArrowUp' ? i - 1 : i + 1, false);
      event.target.focus();
    });
    // Mouse: only the handle is draggable (the row's fields stay selectable); the drag image is the whole row.
    handle.addEventListener('dragstart', (event) => {
      dragging = child;
      event.dataTransfer.effectAllowed = 'move';
      event.dataTransfer.setData('text/plain', labelOf(child));
      event.dataTransfer.setDragImage(li, 16, 16);
      li.classList.add('dragging');
    });
    handle.addEventListener('dragend', () => {
      li.classList.remove('dragging');
      dragging = null;
      clearMarks();
    });

    rows.set(child.key, {li, handle, refresh});
    list.append(li);
  }

  function clearMarks() {
    for (const {li} of rows.values()) li.classList.remove('drop-before', 'drop-after');
  }

  function dropIndex(y) {
    const items = model.children.map((c) => rows.get(c.key).li);
    for (const [i, li] of items.entries()) {
      const box = li.getBoundingClientRect();
      if (y < box.top + box.height / 2) return i;
    }
    return items.length;
  }

  list.addEventListener('dragover', (event) => {
    if (!dragging) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'move';
    clearMarks();
    const i = dropIndex(event.clientY);
    const items = model.children.map((c) => rows.get(c.key).li);
    if (i < items.length) items[i].classList.add('drop-before');
    else items.at(-1)?.classList.add('drop-after');
  });
  list.addEventListener('drop', (event) => {
    if (!dragging) return;
    event.preventDefault();
    const from = model.children.indexOf(dragging);
    let to = dropIndex(event.clientY);
    if (to > from) to -= 1;
    const child = dragging;
    clearMarks();
    move(child, to);
  });

  // Adding children: an existing step found by search, or a new inline step.
  const searchId = uid('add');
  const suggestions = h('ul', {class: 'suggestions', id: uid('suggest'), 'aria-label': 'Matching steps'});
  const search = h('input', {id: searchId, type: 'search', autocomplete: 'off', spellcheck: false,
    placeholder: 'type to search steps', 'aria-controls': suggestions.id});

  function add(child, how) {
    model.children.push(child);
    addRow(child);
    refreshAll();
    env.onChange();
    announce(`${labelOf(child)} added as child ${model.children.length}${how}`);
  }

  function suggest() {
    const q = search.value.trim().toLowerCase();
    suggestions.replaceChildren();
    if (!q) return;
    const own = new Set([model.name.trim(), env.rootName()].filter(Boolean));
    const found = env.allSteps().filter((s) => s.name.toLowerCase().includes(q) && !own.has(s.name)).slice(0, MAX_SUGGESTIONS);
    if (!found.length) {
      suggestions.append(h('li', {class: 'muted'}, `No step matches “${search.value.trim()}”.`));
      return;
    }
    for (const step of found) {
      suggestions.append(h('li', {}, h('button', {type: 'button', class: 'suggestion', onclick: () => {
        add(newChild({ref: step.name, refKind: step.kind}), '');
        search.value = '';
        suggest();
        search.focus();
      }}, h('span', {class: 'strong'}, step.name), ' ', kindBadge(step.kind))));
    }
  }
  search.addEventListener('input', suggest);
  search.addEventListener('keydown', (event) => {
    const first = suggestions.querySelector('button');
    if (event.key === 'Enter') {
      event.preventDefault();
      first?.click();
    } else if (event.key === 'ArrowDown' && first) {
      event.preventDefault();
      first.focus();
    } else if (event.key === 'Escape') {
      search.value = '';
      suggest();
    }
  });
  suggestions.addEventListener('keydown', (event) => {
    const buttons = [...suggestions.querySelectorAll('button')];
    const i = buttons.indexOf(document.activeElement);
    if (i < 0) return;
    if (event.key === 'ArrowDown' || event.key === 'ArrowUp') {
      event.preventDefault();
      const j = i + (event.key === 'ArrowDown' ? 1 : -1);
      (j < 0 ? search : buttons[Math.min(j, buttons.length - 1)]).focus();
    } else if (event.key === 'Escape') search.focus();
  });

  const kindId = uid('kind');
  const kindPicker = h('select', {id: kindId},
    ['api', 'sequential', 'parallel', 'map', 'choice', 'wait'].map((k) => h('option', {value: k}, k)));
  const addInline = h('button', {type: 'button', onclick: () => {
    add(newChild({inline: newModel(kindPicker.value)}), ` (a new inline ${kindPicker.value} step)`);
    const row = rows.get(model.children.at(-1).key);
    row.li.querySelector('[data-field="name"]')?.focus();
  }}, '+ Add inline step');

  model.children.forEach(addRow);
  refreshAll();

  return h('fieldset', {class: 'subtle children-box'},
    h('legend', {}, {sequential: 'Children — run one after the other', parallel: 'Children — run all at once',
      map: 'Child — runs once per item (give exactly one)',
      choice: 'Children — the first whose “when” holds runs, the others are skipped'}[model.kind]),
    h('p', {class: 'hint', id: helpId}, 'Drag a child by its handle ⠿, or focus the handle and press ↑/↓ (Alt+↑/↓ anywhere on the row) to reorder.'),
    list, empty,
    h('div', {class: 'add-child'},
      h('div', {class: 'field grow'}, h('label', {for: searchId}, 'Add an existing step'), search, suggestions),
      h('div', {class: 'field'}, h('label', {for: kindId}, 'or a new inline step'),
        h('div', {class: 'inline-add'}, kindPicker, addInline))));
}
