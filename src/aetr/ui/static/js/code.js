// Text areas for code: a script editor with line numbers, and a JSON field checked as you type.
import {h, uid} from './dom.js';

const MAX_ROWS = 24;  // a script's editor starts this tall at most (it grows as you type, up to the CSS max-height)

/**
 * A JavaScript editor: a textarea with a line-number gutter.
 * Returns {el, textarea, value(), set(text), goToLine(n), markLine(n|null)}.
 */
export function codeEditor({label, value = '', rows = 6, placeholder = '', onInput, describedBy, name}) {
  const id = uid('code');
  const gutter = h('div', {class: 'gutter', 'aria-hidden': 'true'});
  const lines = value.split('\n').length;
  const textarea = h('textarea', {id, rows: Math.min(MAX_ROWS, Math.max(rows, lines + 1)), spellcheck: false,
    autocapitalize: 'off', autocomplete: 'off', wrap: 'off', placeholder, class: 'code', name, 'aria-describedby': describedBy});
  textarea.value = value;
  let marked = null;

  function renderGutter() {
    const lines = textarea.value.split('\n').length;
    if (gutter.childElementCount !== lines) {
      gutter.replaceChildren(...Array.from({length: lines}, (_, i) => h('span', {}, String(i + 1))));
    }
    for (const [i, span] of Array.from(gutter.children).entries()) span.classList.toggle('marked', i + 1 === marked);
  }

  // Grow with the script, so it reads without scrolling (up to the CSS max-height).
  const fit = () => {
    if (!textarea.isConnected || textarea.offsetParent === null) return;  // hidden: its size is unknown
    textarea.style.height = 'auto';
    const scrollbar = textarea.scrollWidth > textarea.clientWidth ? 18 : 0;
    textarea.style.height = `${textarea.scrollHeight + scrollbar + 2}px`;
  };
  textarea.addEventListener('input', () => {
    renderGutter();
    fit();
    onInput?.(textarea.value);
  });
  textarea.addEventListener('scroll', () => { gutter.scrollTop = textarea.scrollTop; });
  renderGutter();

  const wrapper = h('div', {class: 'code-editor'}, gutter, textarea);
  const el = h('div', {class: 'field'}, h('label', {for: id}, label), wrapper);
  return {
    el,
    textarea,
    value: () => textarea.value,
    set(text) {
      textarea.value = text;
      renderGutter();
      fit();
    },
    fit,
    markLine(line) {
      marked = line || null;
      renderGutter();
    },
    goToLine(line) {
      const lines = textarea.value.split('\n');
      const n = Math.min(Math.max(1, line), lines.length);
      const start = lines.slice(0, n - 1).reduce((sum, l) => sum + l.length + 1, 0);
      textarea.focus();
      textarea.setSelectionRange(start, start + lines[n - 1].length);
      const lineHeight = parseFloat(getComputedStyle(textarea).lineHeight) || 20;
      textarea.scrollTop = Math.max(0, (n - 3) * lineHeight);
    },
  };
}

/** Where a JSON.parse error happened, as "line L, column C", from the message's position. */
function whereInText(text, message) {
  const lc = /line (\d+) column (\d+)/.exec(message);
  if (lc) return `line ${lc[1]}, column ${lc[2]}`;
  const at = /position (\d+)/.exec(message);
  if (!at) return null;
  const before = text.slice(0, Number(at[1]));
  const line = before.split('\n').length;
  return `line ${line}, column ${before.length - before.lastIndexOf('\n')}`;
}

/** Parse JSON: {ok: true, value} or {ok: false, message}. An empty text is refused unless `emptyAs` is given. */
export function parseJson(text, emptyAs) {
  if (!text.trim()) {
    return emptyAs === undefined ? {ok: false, message: 'enter a JSON value, e.g. {} or null'} : {ok: true, value: emptyAs};
  }
  try {
    return {ok: true, value: JSON.parse(text)};
  } catch (error) {
    const where = whereInText(text, error.message);
    const message = error.message.replace(/\s*\(line \d+ column \d+\)/, '');
    return {ok: false, message: where ? `${where}: ${message}` : message};
  }
}

/**
 * A JSON field checked as you type: shows "valid JSON" or where it is wrong, and sets aria-invalid.
 * Returns {el, textarea, result(), set(text)}; onChange(result) after each edit.
 */
export function jsonField({label, value = '', rows = 4, onChange, emptyAs, hint}) {
  const id = uid('json');
  const statusId = `${id}-status`;
  const textarea = h('textarea', {id, rows, spellcheck: false, autocapitalize: 'off', autocomplete: 'off',
    class: 'code', 'aria-describedby': statusId});
  textarea.value = value;
  const status = h('span', {class: 'json-status', id: statusId, 'aria-live': 'polite'});
  let last = null;

  function check() {
    last = parseJson(textarea.value, emptyAs);
    textarea.setAttribute('aria-invalid', last.ok ? 'false' : 'true');
    status.className = `json-status ${last.ok ? 'ok' : 'bad'}`;
    status.textContent = last.ok ? '✓ valid JSON' : `✕ not valid JSON — ${last.message}`;
    return last;
  }

  textarea.addEventListener('input', () => {
    const result = check();  // (not inside onChange?.(…): that would skip it when there is no onChange)
    onChange?.(result);
  });
  check();
  const el = h('div', {class: 'field'}, h('label', {for: id}, label), textarea,
    hint ? h('span', {class: 'hint'}, hint) : null, status);
  return {
    el,
    textarea,
    result: () => last,
    set(text) {
      textarea.value = text;
      const result = check();
      onChange?.(result);
    },
  };
}
