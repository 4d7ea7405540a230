// The AETR HTTP API as the page uses it: JSON in and out, the bearer token, and a run's live stream.
import {h, uid} from './dom.js';

const BASE = '/api/v1';
const TOKEN_KEY = 'aetr.api-token';
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 10000;

/** A refused request: `status` (0 when the server could not be reached) and the server's `detail`. */
export class ApiError extends Error {
  constructor(status, detail, body = null) {
    super(detail);
    this.status = status;
    this.body = body;
  }
}

export function savedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const token = savedToken();
  return token ? {Authorization: `Bearer ${token}`} : {};
}

let pendingPrompt = null;

/** Ask for the API token once, whoever needs it; resolves when the user gave one. */
export function askToken(refused) {
  if (!pendingPrompt) {
    pendingPrompt = showTokenDialog(refused).finally(() => { pendingPrompt = null; });
  }
  return pendingPrompt;
}

function showTokenDialog(refused) {
  return new Promise((resolve, reject) => {
    const inputId = uid('token');
    const input = h('input', {id: inputId, type: 'password', name: 'token', autocomplete: 'current-password',
      required: true, spellcheck: false, 'aria-describedby': `${inputId}-hint`});
    const form = h('form', {method: 'dialog', class: 'stack'},
      h('h2', {id: `${inputId}-title`}, 'API token needed'),
      h('p', {id: `${inputId}-hint`, class: 'muted'},
        refused ? 'The server refused that token. Enter the value of AETR_API_TOKEN again.'
          : 'This AETR server is protected by AETR_API_TOKEN. Enter it once; it is kept for this browser tab only.'),
      h('div', {class: 'field'}, h('label', {for: inputId}, 'API token'), input),
      h('div', {class: 'actions'},
        h('button', {type: 'submit', class: 'primary'}, 'Use this token'),
        h('button', {type: 'button', value: 'cancel', onclick: () => dialog.close('cancel')}, 'Cancel')));
    const dialog = h('dialog', {class: 'token-dialog', 'aria-labelledby': `${inputId}-title`}, form);
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      dialog.close('ok');
    });
    dialog.addEventListener('close', () => {
      dialog.remove();
      if (dialog.returnValue === 'ok') resolve();
      else reject(new ApiError(401, 'an API token is needed: reload the page to enter it'));
    });
    document.body.append(dialog);
    dialog.showModal();
    input.focus();
  });
}

function detailOf(data, response) {
  if (data && typeof data === 'object' && 'detail' in data) {
    const d = data.detail;
    return typeof d === 'string' ? d : JSON.stringify(d);
  }
  if (typeof data === 'string' && data) return data;
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

/** One API call: {status, data, etag}; ApiError for anything but 2xx. Asks for the token on 401 and tries again. */
export async function request(method, path, {body, headers = {}, signal} = {}) {
  let refused = false;
  for (;;) {
    const init = {method, headers: {Accept: 'application/json', ...authHeaders(), ...headers}, signal};
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
    let response;
    try {
      response = await fetch(BASE + path, init);
    } catch (error) {
      if (error.name === 'AbortError') throw error;
      throw new ApiError(0, `cannot reach the AETR server (${error.message}); is \`aetr serve\` running?`);
    }
    if (response.status === 401) {
      await askToken(refused || Boolean(savedToken()));
      refused = true;
      continue;
    }
    const text = await response.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch { data = text; }
    }
    if (!response.ok) throw new ApiError(response.status, detailOf(data, response), data);
    return {status: response.status, data, etag: response.headers.get('ETag')};
  }
}

const enc = encodeURIComponent;

export const api = {
  steps: () => request('GET', '/steps').then((r) => r.data),
  step: (name, opts) => request('GET', `/steps/${enc(name)}`, opts).then((r) => r.data),
  parents: (name, opts) => request('GET', `/steps/${enc(name)}/parents`, opts).then((r) => r.data),
  putStep: (spec, version) => request('PUT', `/steps/${enc(spec.name)}`, {
    body: spec, headers: version === undefined || version === null ? {} : {'If-Match': String(version)}}),
  deleteStep: (name) => request('DELETE', `/steps/${enc(name)}`),
  runs: (query, opts) => request('GET', `/runs?${new URLSearchParams(query)}`, opts).then((r) => r.data),
  run: (id, opts) => request('GET', `/runs/${enc(id)}`, opts).then((r) => r.data),
  events: (id, opts) => request('GET', `/runs/${enc(id)}/events`, opts).then((r) => r.data),
  startRun: (step, input) => request('POST', '/runs', {body: {step, input}}).then((r) => r.data),
  cancel: (id) => request('POST', `/runs/${enc(id)}/cancel`).then((r) => r.data),
  retry: (id) => request('POST', `/runs/${enc(id)}/retry`).then((r) => r.data),
  // A signal wait's answer: {output} completes it, {error} fails it; the run tree afterwards.
  signal: (runId, nodeId, body) => request('POST', `/runs/${enc(runId)}/nodes/${enc(nodeId)}/signal`, {body}).then((r) => r.data),
  schedules: () => request('GET', '/schedules').then((r) => r.data),
  putSchedule: (name, spec) => request('PUT', `/schedules/${enc(name)}`, {body: spec}).then((r) => r.data),
  evaluate: (body) => request('POST', '/sandbox/evaluate', {body}).then((r) => r.data),
};

function parseMessage(raw) {
  let event = 'message';
  const data = [];
  for (const line of raw.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (name === 'event') event = value;
    else if (name === 'data') data.push(value);
  }
  return data.length ? {event, data: data.join('\n')} : null;
}

/**
 * Follow a run live over Server-Sent Events, read with fetch() so the Authorization header can be sent.
 * Calls onRun(tree) on every change and onStatus('connecting'|'live'|'reconnecting'|'ended'|'gone'|'error').
 * Reconnects with backoff when the connection drops. Returns a function that stops watching.
 */
export function watchRun(id, {onRun, onStatus}) {
  const controller = new AbortController();
  let stopped = false;
  let delay = RECONNECT_MIN_MS;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function once() {
    const response = await fetch(`${BASE}/runs/${enc(id)}/stream`, {
      headers: {Accept: 'text/event-stream', ...authHeaders()}, signal: controller.signal, cache: 'no-store'});
    if (response.status === 401) {
      await askToken(Boolean(savedToken()));
      return 'again';
    }
    if (response.status === 404) return 'gone';
    if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
    onStatus('live');
    delay = RECONNECT_MIN_MS;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return 'again';  // the server's stream limit: reconnect at once
      buffer += value.replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const message = parseMessage(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!message) continue;
        if (message.event === 'run') onRun(JSON.parse(message.data));
        else if (message.event === 'end') return 'ended';
        else if (message.event === 'error') throw new Error(message.data);
      }
    }
  }

  (async () => {
    onStatus('connecting');
    while (!stopped) {
      try {
        const outcome = await once();
        if (outcome === 'ended' || outcome === 'gone') {
          onStatus(outcome);
          return;
        }
      } catch (error) {
        if (stopped || error.name === 'AbortError') return;
        if (error instanceof ApiError) {
          onStatus('error');
          return;
        }
        onStatus('reconnecting');
        await sleep(delay);
        delay = Math.min(delay * 2, RECONNECT_MAX_MS);
      }
    }
  })();

  return () => {
    stopped = true;
    controller.abort();
  };
}
