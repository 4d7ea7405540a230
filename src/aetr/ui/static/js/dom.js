// Small DOM helpers. Every piece of data goes in as text (textContent, attributes), never as markup:
// step names, inputs, outputs and errors come from users and step services.

const BOOLEAN_PROPS = new Set(['checked', 'disabled', 'hidden', 'readOnly', 'required', 'selected', 'open',
  'multiple', 'draggable', 'spellcheck']);

/** Build an element: h('button', {class: 'primary', onclick: fn}, 'Save'). */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'text') el.textContent = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key === 'value') el.value = value;
    else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2).toLowerCase(), value);
    else if (BOOLEAN_PROPS.has(key)) el[key] = Boolean(value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  append(el, ...children);
  return el;
}

/** Append children: nodes, strings (as text) and arrays of them; null and false are skipped. */
export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's content. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, ...children);
}

let nextId = 0;
/** A unique id for label/for pairs. */
export function uid(prefix = 'f') {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

/** A labelled form field: {wrap, input}. */
export function field(label, input, hint) {
  const id = input.id || uid();
  input.id = id;
  const hintEl = hint ? h('span', {class: 'hint', id: `${id}-hint`}, hint) : null;
  if (hintEl) input.setAttribute('aria-describedby', hintEl.id);
  const wrap = h('div', {class: 'field'}, h('label', {for: id}, label), input, hintEl);
  return {wrap, input};
}

/** A JSON value as indented text. */
export function pretty(value) {
  if (value === undefined) return '';
  return JSON.stringify(value, null, 2);
}

/** A value as a short one-line string. */
export function compact(value, limit = 120) {
  const text = typeof value === 'string' ? value : JSON.stringify(value);
  if (text === undefined) return '';
  return text.length > limit ? `${text.slice(0, limit - 1)}…` : text;
}

/** A <pre> of JSON, scrolling within itself. */
export function jsonBlock(value, label) {
  return h('pre', {class: 'json', tabindex: '0', 'aria-label': label}, value === undefined ? '' : pretty(value));
}

/** A URL as drawn outside the step's editor: its user-info (`user:password@`) shown as `***@`, as the server does. */
export function withoutUserinfo(url) {
  return String(url).replace(/([A-Za-z][A-Za-z0-9+.-]*:\/\/)[^/?#\s]*@/g, '$1***@');
}

export function shortId(id) {
  return String(id || '').slice(0, 8);
}

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** A time of day (with the date when not today). */
export function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const today = new Date();
  if (d.toDateString() === today.toDateString()) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

/** A duration in milliseconds, readable. */
export function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s < 10 ? s.toFixed(2) : s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${m - hours * 60} min`;
  return `${Math.floor(hours / 24)} d ${hours % 24} h`;
}

/** How far a time is from now, in words: "in 5 min", "3 s ago". */
export function fromNow(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return '';
  const ms = t - now;
  const words = ms >= 0 && ms < 1000 ? 'now' : fmtDuration(Math.abs(ms)).replace(/\.\d+ s$/, ' s');
  if (words === 'now') return 'now';
  return ms > 0 ? `in ${words}` : `${words} ago`;
}

/** Milliseconds between two ISO times (to now when `end` is missing). */
export function span(start, end) {
  if (!start) return null;
  const a = Date.parse(start);
  const b = end ? Date.parse(end) : Date.now();
  return b - a;
}

/** Say something to screen readers. */
export function announce(message) {
  const region = document.getElementById('announcer');
  if (!region) return;
  region.textContent = '';
  // A new text node after a tick is announced even when the message repeats.
  setTimeout(() => { region.textContent = message; }, 30);
}

const MAX_TOASTS = 2;

/** A short message at the bottom of the screen (also read by screen readers). */
export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  if (!box) return;
  const item = h('div', {class: `toast toast-${kind}`}, message);
  while (box.childElementCount >= MAX_TOASTS) box.firstElementChild.remove();
  box.append(item);
  setTimeout(() => item.remove(), kind === 'error' ? 8000 : 4000);
}

/** A message box, announced when it appears: kind is 'error', 'warn', 'ok' or 'info'. */
export function notice(kind, title, ...body) {
  const role = kind === 'error' || kind === 'warn' ? 'alert' : 'status';
  return h('div', {class: `notice notice-${kind}`, role},
    title ? h('strong', {class: 'notice-title'}, title) : null, ...body);
}

/** The same box, not announced: for content that is redrawn as data changes (screen readers would repeat it). */
export function box(kind, title, ...body) {
  return h('div', {class: `notice notice-${kind}`},
    title ? h('strong', {class: 'notice-title'}, title) : null, ...body);
}

/** Whether a keyboard event is being typed into a field (shortcuts must leave it alone). */
export function isTyping(event) {
  const t = event.target;
  if (!(t instanceof HTMLElement)) return false;
  return t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName);
}

// Not dots alone: '.' and '..' are URL path segments, so no link (#/steps/..) could open such a step.
export const STEP_NAME = /^(?!\.+$)[A-Za-z0-9._-]{1,200}$/;

/** A link to a step's page. */
export function stepLink(name, props = {}) {
  return h('a', {href: `#/steps/${encodeURIComponent(name)}`, ...props}, name);
}

/** A kind badge: api, sequential, parallel, map, choice or wait. */
export function kindBadge(kind) {
  const icon = {api: '⇄', sequential: '→', parallel: '⇉', map: '⊞', choice: '⋔', wait: '‖'}[kind] || '•';
  return h('span', {class: `kind kind-${kind}`}, h('span', {'aria-hidden': 'true'}, icon), ` ${kind}`);
}
