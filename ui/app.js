// faastastic web UI: one page over the JSON API (/system/*, /function/*). Every value that
// comes from the server (names, labels, annotations, log lines, invocation answers) is put in
// the page as text (textContent, text nodes, attribute values); nothing is parsed as HTML.
'use strict';

const POLL_MS = 1000;
const PAGE_SIZE = 50;
const HISTORY_SECONDS = 300;
const LOG_LINES = 200;
const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b'];
const SCALE_LABELS = [
  ['com.openfaas.scale.min', '1'],
  ['com.openfaas.scale.max', '5'],
  ['com.openfaas.scale.factor', '20'],
  ['com.openfaas.scale.zero', 'true'],
  ['com.openfaas.scale.zero-duration', '15m'],
  ['com.faastastic.scale.initial', '1'],
  ['com.faastastic.scale.target-per-replica', '10'],
  ['com.faastastic.scale.step-up', '2'],
  ['com.faastastic.scale.step-down', '1'],
  ['com.faastastic.scale.up-cooldown', '30s'],
  ['com.faastastic.scale.down-cooldown', '2m'],
  ['com.faastastic.scale.stabilization-window', '5m'],
  ['com.faastastic.scale.max-step-up', '100%'],
  ['com.faastastic.scale.shadow', 'true'],
];

// ---- elements -------------------------------------------------------------------------

// el('p', {class: 'x'}, 'text', child): children are nodes or strings (as text, never HTML).
function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svgEl(tag, attrs, ...children) {
  return build(document.createElementNS('http://www.w3.org/2000/svg', tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) {
      node.addEventListener(k.slice(2), v);
    } else {
      node.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function setText(node, text) {
  node.textContent = text;
}

// ---- API ------------------------------------------------------------------------------

// An absolute URL on this origin: a page opened as http://user:password@host/ui/ would
// otherwise resolve relative URLs with the credentials in them, which fetch refuses.
function here(path) {
  return location.origin + path;
}

// One call. Returns {ok, status, data (parsed JSON or text), message, errors}.
async function api(method, path, body) {
  const init = {method, headers: {Accept: 'application/json'}, credentials: 'same-origin'};
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['Content-Type'] = 'application/json';
  }
  let response;
  try {
    response = await fetch(here(path), init);
  } catch (e) {
    connection(false, 'cannot reach the server');
    return {ok: false, status: 0, message: 'cannot reach the server: ' + e.message, errors: []};
  }
  connection(true);
  const type = response.headers.get('content-type') || '';
  const text = await response.text();
  let data = text;
  if (type.includes('application/json') && text !== '') {
    try { data = JSON.parse(text); } catch (_) { data = text; }
  }
  if (response.ok) return {ok: true, status: response.status, data};
  const message = (data && data.message) || String(text).trim() || response.statusText;
  const errors = (data && Array.isArray(data.errors)) ? data.errors : [];
  return {ok: false, status: response.status, data, message, errors};
}

function connection(ok, why) {
  const node = document.getElementById('connection');
  if (!node) return;
  node.classList.toggle('down', !ok);
  setText(node, ok ? '' : why);
}

// The server's defaults (placement, namespace) and datacenters, read once per page load.
let serverInfo = null;
async function overview() {
  if (!serverInfo) {
    const r = await api('GET', '/system/overview');
    if (r.ok) serverInfo = r.data;
  }
  return serverInfo || {datacenters: [], placement: 'all', defaultNamespace: 'openfaas-fn'};
}

// Runs `fn` now and again `ms` (a number, or a function giving one) after each run ends,
// until the returned stop() is called.
function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const run = async () => {
    if (stopped) return;
    try { await fn(); } catch (e) { console.error(e); }
    if (!stopped) timer = setTimeout(run, typeof ms === 'function' ? ms() : ms);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

function qualified(name, namespace) {
  return name + '.' + namespace;
}

function functionHash(name, namespace) {
  return '#/function/' + encodeURIComponent(name) + '/' + encodeURIComponent(namespace);
}

function fmtTime(iso) {
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleTimeString([], {hour12: false});
}

function fmtRate(r) {
  return r === null || r === undefined ? '–' : r < 10 ? r.toFixed(1) : Math.round(r).toString();
}

// Invocations per second from successive counts, per key.
class Rates {
  constructor() { this.last = new Map(); }
  update(key, count, now) {
    const prev = this.last.get(key);
    this.last.set(key, {count, now});
    if (!prev || now <= prev.now || count < prev.count) return null;
    return (count - prev.count) / ((now - prev.now) / 1000);
  }
}

// The API leaves zero counts out, as OpenFaaS does.
function statusOf(f) {
  const replicas = f.replicas || 0;
  if (replicas === 0) return 'Scaled to zero';
  if ((f.availableReplicas || 0) < replicas) return 'Not ready';
  return 'Ready';
}

function datacentersOf(functions) {
  const names = new Set();
  for (const f of functions) for (const dc of Object.keys(f.datacenters || {})) names.add(dc);
  return [...names].sort();
}

// ---- router ---------------------------------------------------------------------------

let current = null;

function route() {
  if (current) current();
  current = null;
  const main = clear(document.getElementById('main'));
  let parts;
  try {
    parts = (location.hash || '#/').slice(1).split('/').filter(Boolean).map(decodeURIComponent);
  } catch (_) {
    parts = [];
  }
  let name = 'functions';
  if (parts[0] === 'deploy') {
    name = 'deploy';
    current = deployPage(main);
  } else if (parts[0] === 'overview') {
    name = 'overview';
    current = overviewPage(main);
  } else if (parts[0] === 'function' && parts[1]) {
    current = functionPage(main, parts[1], parts[2] || (serverInfo && serverInfo.defaultNamespace) || 'openfaas-fn');
  } else {
    current = functionsPage(main);
  }
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', route);

// ---- functions page -------------------------------------------------------------------

function functionsPage(main) {
  const rates = new Rates();
  let functions = [];
  let paused = new Set();
  let page = 0;
  const filter = el('input', {id: 'filter', type: 'search', placeholder: 'name, image or label', autocomplete: 'off'});
  const namespace = el('select', {id: 'namespace'});
  const summary = el('p', {id: 'summary', 'aria-live': 'polite'});
  const head = el('thead');
  const body = el('tbody');
  const prev = el('button', {type: 'button', id: 'prev-page'}, 'Previous page');
  const next = el('button', {type: 'button', id: 'next-page'}, 'Next page');
  main.append(
    el('h1', {}, 'Functions'),
    el('div', {class: 'controls'},
      el('label', {for: 'filter'}, 'Filter'), filter,
      el('label', {for: 'namespace'}, 'Namespace'), namespace,
      el('a', {href: '#/deploy', class: 'button'}, 'Deploy a function')),
    summary,
    el('div', {class: 'scroll'}, el('table', {id: 'functions'}, head, body)),
    el('div', {class: 'pager'}, prev, next));
  filter.addEventListener('input', () => { page = 0; render(); });
  namespace.addEventListener('change', () => { page = 0; functions = []; poll(); });
  prev.addEventListener('click', () => { page = Math.max(0, page - 1); render(); });
  next.addEventListener('click', () => { page += 1; render(); });

  const namespaces = Promise.all([overview(), api('GET', '/system/namespaces')]).then(([info, r]) => {
    const names = r.ok && Array.isArray(r.data) ? r.data : [];
    if (!names.includes(info.defaultNamespace)) names.unshift(info.defaultNamespace);
    for (const ns of names) namespace.append(el('option', {value: ns, selected: ns === info.defaultNamespace}, ns));
  });

  function matches(f, text) {
    if (!text) return true;
    const hay = [f.name, f.image, f.namespace, ...Object.entries(f.labels || {}).map(([k, v]) => k + '=' + v)];
    return hay.some(s => String(s).toLowerCase().includes(text));
  }

  function render() {
    const text = filter.value.trim().toLowerCase();
    const shown = functions.filter(f => matches(f, text));
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    page = Math.min(page, pages - 1);
    const rows = shown.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
    const dcs = datacentersOf(functions);
    clear(head).append(el('tr', {},
      el('th', {scope: 'col'}, 'Name'), el('th', {scope: 'col', class: 'image'}, 'Image'),
      dcs.map(dc => el('th', {scope: 'col', class: 'num'}, dc + ' ready/replicas')),
      el('th', {scope: 'col', class: 'num'}, 'Invocations/s'), el('th', {scope: 'col'}, 'Status')));
    clear(body);
    for (const f of rows) {
      const id = qualified(f.name, f.namespace);
      const status = statusOf(f) + (paused.has(id) || paused.has('*') ? ', autoscaling paused' : '');
      body.append(el('tr', {'data-function': f.name},
        el('td', {}, el('a', {href: functionHash(f.name, f.namespace)}, f.name)),
        el('td', {class: 'image'}, f.image || ''),
        dcs.map(dc => {
          const d = (f.datacenters || {})[dc];
          return el('td', {class: 'num', 'data-dc': dc}, d ? `${d.availableReplicas || 0}/${d.replicas || 0}` : '–');
        }),
        el('td', {class: 'num rate'}, fmtRate(f.rate)),
        el('td', {class: 'status'}, status)));
    }
    const from = shown.length ? page * PAGE_SIZE + 1 : 0;
    setText(summary, `${functions.length} functions` + (text ? `, ${shown.length} match` : '') +
      (shown.length ? `, showing ${from}–${from + rows.length - 1}` : ''));
    prev.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  async function poll() {
    await namespaces;
    const [list, pauses] = await Promise.all([
      api('GET', '/system/functions?namespace=' + encodeURIComponent(namespace.value)),
      api('GET', '/system/autoscaling'),
    ]);
    if (!list.ok || !Array.isArray(list.data)) return;
    const now = Date.now();
    for (const f of list.data) f.rate = rates.update(qualified(f.name, f.namespace), f.invocationCount || 0, now);
    functions = list.data.sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    if (pauses.ok) paused = new Set((pauses.data.paused || []).map(p => p.scope));
    render();
  }
  // A list of thousands is megabytes of JSON: read it every 2 s instead of every second.
  return every(() => (functions.length > 2000 ? 2 * POLL_MS : POLL_MS), poll);
}

// ---- function page --------------------------------------------------------------------

function functionPage(main, name, namespace) {
  const id = qualified(name, namespace);
  const stops = [];
  const rates = new Rates();
  const history = [];
  let events = [];
  let status = null;
  const started = Date.now();

  const title = el('h1', {}, name);
  const facts = el('p', {class: 'facts'});
  const gone = el('p', {class: 'error', role: 'alert', hidden: true});
  const replicaBody = el('tbody');
  const chart = el('div', {class: 'chart', id: 'chart'});
  const legend = el('ul', {class: 'legend'});
  const timeline = el('ol', {class: 'timeline', id: 'decisions'});
  const pauseState = el('p', {id: 'pause-state'});
  const pauseButton = el('button', {type: 'button', id: 'pause'}, 'Pause autoscaling');
  const resumeButton = el('button', {type: 'button', id: 'resume'}, 'Resume autoscaling');
  const details = el('dl', {class: 'details'});
  const schedule = el('p', {id: 'schedule'});
  const runs = el('ol', {class: 'timeline', id: 'runs'});
  const triggers = el('section', {'aria-labelledby': 'h-triggers', hidden: true},
    el('h2', {id: 'h-triggers'}, 'Schedule'), schedule, runs);

  main.append(
    el('p', {}, el('a', {href: '#/'}, '← Functions')),
    title, facts, gone,
    el('section', {'aria-labelledby': 'h-replicas'},
      el('h2', {id: 'h-replicas'}, 'Replicas'),
      chart, legend,
      el('table', {id: 'replicas'}, el('thead', {}, el('tr', {},
        el('th', {scope: 'col'}, 'Datacenter'), el('th', {scope: 'col', class: 'num'}, 'Replicas'),
        el('th', {scope: 'col', class: 'num'}, 'Ready'))), replicaBody)),
    el('section', {'aria-labelledby': 'h-scale'},
      el('h2', {id: 'h-scale'}, 'Scaling'),
      pauseState, el('div', {class: 'controls'}, pauseButton, resumeButton),
      scaleForm()),
    invokePanel(name, namespace),
    el('section', {'aria-labelledby': 'h-decisions'},
      el('h2', {id: 'h-decisions'}, 'Decisions'), timeline),
    triggers,
    logPanel(),
    el('section', {'aria-labelledby': 'h-details'},
      el('h2', {id: 'h-details'}, 'Details'), details),
    deletePanel());

  pauseButton.addEventListener('click', async () => {
    const r = await api('POST', '/system/autoscaling/pause', {function: id, reason: 'paused from the web UI'});
    setText(pauseState, r.ok ? 'Autoscaling paused.' : r.message);
    refreshPause();
  });
  resumeButton.addEventListener('click', async () => {
    const r = await api('POST', '/system/autoscaling/resume', {function: id});
    setText(pauseState, r.ok ? 'Autoscaling resumed.' : r.message);
    refreshPause();
  });

  async function refreshPause() {
    const r = await api('GET', '/system/autoscaling');
    if (!r.ok) return;
    const p = (r.data.paused || []).find(p => p.scope === id || p.scope === '*');
    setText(pauseState, p ? `Autoscaling is paused${p.scope === '*' ? ' for every function' : ''}: ${p.reason || ''}` : 'Autoscaling is on.');
    pauseState.classList.toggle('paused', !!p);
    pauseButton.disabled = !!p && p.scope === id;
    resumeButton.disabled = !p || p.scope !== id;
  }

  function scaleForm() {
    const dc = el('select', {id: 'scale-dc'}, el('option', {value: ''}, 'all (total, spread)'));
    const replicas = el('input', {id: 'scale-replicas', type: 'number', min: '0', value: '1', required: true});
    const message = el('p', {id: 'scale-message', role: 'status'});
    const confirm = el('div', {class: 'confirm', hidden: true, id: 'scale-confirm'});
    const form = el('form', {id: 'scale-form', class: 'inline'},
      el('label', {for: 'scale-dc'}, 'Datacenter'), dc,
      el('label', {for: 'scale-replicas'}, 'Replicas'), replicas,
      el('button', {type: 'submit'}, 'Scale'), message, confirm);
    form.fillDatacenters = names => {
      if (dc.options.length > 1) return;
      for (const n of names) dc.append(el('option', {value: n}, n));
    };
    async function scale(override) {
      const request = {serviceName: name, namespace, replicas: Number(replicas.value)};
      if (dc.value) request.datacenter = dc.value;
      if (override) request.override = true;
      const r = await api('POST', '/system/scale-function/' + encodeURIComponent(id), request);
      clear(confirm).hidden = true;
      if (r.ok) {
        setText(message, `Asked for ${request.replicas} replicas${dc.value ? ' in ' + dc.value : ''}.`);
      } else if (!override && r.status === 400 && /override/.test(r.message)) {
        setText(message, r.message);
        confirm.hidden = false;
        confirm.append(
          el('span', {}, 'Scale outside the function\'s bounds anyway? The decision is recorded as an override.'),
          el('button', {type: 'button', id: 'scale-override', class: 'danger', onclick: () => scale(true)}, 'Scale anyway'),
          el('button', {type: 'button', onclick: () => { clear(confirm).hidden = true; setText(message, ''); }}, 'Cancel'));
      } else {
        setText(message, r.message);
      }
    }
    form.addEventListener('submit', e => { e.preventDefault(); scale(false); });
    return form;
  }

  function deletePanel() {
    const message = el('p', {role: 'status', id: 'delete-message'});
    const confirm = el('div', {class: 'confirm', hidden: true});
    const start = el('button', {type: 'button', id: 'delete', class: 'danger'}, 'Delete…');
    start.addEventListener('click', () => {
      confirm.hidden = false;
      clear(confirm).append(
        el('span', {}, `Delete ${name} from every datacenter? Its replicas stop now.`),
        el('button', {type: 'button', id: 'delete-confirm', class: 'danger', onclick: remove}, `Delete ${name}`),
        el('button', {type: 'button', onclick: () => { confirm.hidden = true; }}, 'Cancel'));
      confirm.querySelector('#delete-confirm').focus();
    });
    async function remove() {
      const r = await api('DELETE', '/system/functions', {functionName: name, namespace});
      confirm.hidden = true;
      setText(message, r.ok ? `${name} was deleted.` : r.message);
    }
    return el('section', {'aria-labelledby': 'h-delete'}, el('h2', {id: 'h-delete'}, 'Delete'), start, confirm, message);
  }

  function logPanel() {
    const pre = el('pre', {id: 'logs', class: 'logs', tabindex: '0', 'aria-label': 'Log lines'});
    const state = el('p', {class: 'muted', id: 'log-state'});
    const controller = new AbortController();
    stops.push(() => controller.abort());
    (async () => {
      try {
        const url = `/system/logs?name=${encodeURIComponent(name)}&namespace=${encodeURIComponent(namespace)}&tail=50&follow=true`;
        const response = await fetch(here(url), {signal: controller.signal, credentials: 'same-origin'});
        if (!response.ok) { setText(state, 'Logs: ' + (await response.text()).trim()); return; }
        setText(state, 'Following the log.');
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffered = '';
        for (;;) {
          const {value, done} = await reader.read();
          if (done) break;
          buffered += decoder.decode(value, {stream: true});
          let nl;
          while ((nl = buffered.indexOf('\n')) >= 0) {
            const line = buffered.slice(0, nl);
            buffered = buffered.slice(nl + 1);
            if (line.trim()) appendLog(line);
          }
        }
        setText(state, 'The log ended.');
      } catch (e) {
        if (e.name !== 'AbortError') setText(state, 'Logs: ' + e.message);
      }
    })();
    function appendLog(line) {
      let text = line;
      try {
        const m = JSON.parse(line);
        text = `${fmtTime(m.timestamp)} ${m.instance || ''} ${m.text || ''}`;
      } catch (_) { /* shown as it came */ }
      pre.append(document.createTextNode(text + '\n'));
      while (pre.childNodes.length > LOG_LINES) pre.removeChild(pre.firstChild);
      pre.scrollTop = pre.scrollHeight;
    }
    return el('section', {'aria-labelledby': 'h-logs'}, el('h2', {id: 'h-logs'}, 'Logs'), state, pre);
  }

  const scale = main.querySelector('#scale-form');

  function renderStatus() {
    const f = status;
    setText(facts, `${f.image || ''} · namespace ${f.namespace} · ${f.availableReplicas || 0}/${f.replicas || 0} ready · ${statusOf(f)}` +
      (f.envProcess ? ` · command: ${f.envProcess}` : ''));
    const dcs = Object.keys(f.datacenters || {}).sort();
    scale.fillDatacenters(dcs);
    clear(replicaBody);
    for (const dc of dcs) {
      const d = f.datacenters[dc];
      replicaBody.append(el('tr', {'data-dc': dc}, el('th', {scope: 'row'}, dc),
        el('td', {class: 'num replicas'}, d.replicas || 0), el('td', {class: 'num ready'}, d.availableReplicas || 0)));
    }
    clear(details);
    const pairs = (title, obj) => {
      const entries = Object.entries(obj || {});
      if (!entries.length) return;
      details.append(el('dt', {}, title));
      for (const [k, v] of entries) details.append(el('dd', {}, el('code', {}, k), ' = ', el('span', {}, String(v))));
    };
    pairs('Labels', f.labels);
    pairs('Annotations', f.annotations);
    pairs('Environment', f.envVars);
    if (f.constraints && f.constraints.length) pairs('Constraints', Object.fromEntries(f.constraints.map((c, i) => [String(i + 1), c])));
  }

  function renderEvents() {
    clear(timeline);
    if (!events.length) timeline.append(el('li', {class: 'muted'}, 'No decisions yet.'));
    for (const e of events) {
      const clamps = (e.clamps || []).map(c => typeof c === 'string' ? c : JSON.stringify(c));
      timeline.append(el('li', {class: 'decision ' + (e.direction || ''), 'data-outcome': e.outcome},
        el('time', {datetime: e.time}, fmtTime(e.time)), ' ',
        el('strong', {}, `${e.datacenter}: ${e.from} → ${e.to}`), ' ',
        el('span', {class: 'badge'}, e.outcome), ' ',
        el('span', {class: 'badge'}, e.source), ' ',
        el('span', {class: 'reason'}, e.reason || ''),
        clamps.length ? el('span', {class: 'muted'}, ' · clamped: ' + clamps.join(', ')) : null,
        el('details', {}, el('summary', {}, 'Evidence'), el('pre', {}, JSON.stringify(e.evidence || {}, null, 2)))));
    }
  }

  async function poll() {
    const r = await api('GET', '/system/function/' + encodeURIComponent(id));
    if (!r.ok) {
      gone.hidden = false;
      setText(gone, r.status === 404 ? `${name} is not deployed in namespace ${namespace}.` : r.message);
      return;
    }
    gone.hidden = true;
    status = r.data;
    const now = Date.now();
    const sample = {t: now, rate: rates.update(id, status.invocationCount || 0, now), dcs: {}};
    for (const [dc, d] of Object.entries(status.datacenters || {})) sample.dcs[dc] = [d.replicas || 0, d.availableReplicas || 0];
    history.push(sample);
    while (history.length && history[0].t < now - HISTORY_SECONDS * 1000) history.shift();
    renderStatus();
    drawChart(chart, legend, history, events, started);
  }

  // The cron trigger, when the function has one: its schedule and what became of its last
  // due times.
  async function pollRuns() {
    const annotations = (status && status.annotations) || {};
    const cron = String(annotations.topic || '').split(',').map(t => t.trim()).includes('cron-function');
    triggers.hidden = !cron;
    if (!cron) return;
    setText(schedule, `Runs on the schedule ${annotations.schedule || '(none)'}.`);
    const r = await api('GET', `/system/trigger-events?function=${encodeURIComponent(id)}&limit=10`);
    if (!r.ok || !Array.isArray(r.data)) return;
    clear(runs);
    if (!r.data.length) runs.append(el('li', {class: 'muted'}, 'No due time yet.'));
    for (const e of r.data) {
      runs.append(el('li', {'data-outcome': e.outcome},
        el('time', {datetime: e.due}, fmtTime(e.due)), ' ',
        el('span', {class: 'badge'}, e.outcome), ' ',
        e.datacenter ? el('span', {}, e.datacenter + ' ') : null,
        e.status ? `${e.status} in ${Number(e.durationSeconds || 0).toFixed(3)} s ` : '',
        e.missed ? `${e.missed} due time(s) ` : '',
        el('span', {class: 'reason'}, e.reason || '')));
    }
  }

  async function pollEvents() {
    const r = await api('GET', `/system/scale-events?function=${encodeURIComponent(id)}&limit=50`);
    if (r.ok && Array.isArray(r.data)) { events = r.data; renderEvents(); }
    await refreshPause();
    await pollRuns();
  }

  stops.push(every(POLL_MS, poll), every(2 * POLL_MS, pollEvents));
  return () => stops.forEach(s => s());
}

// The live chart: replicas (solid) and ready replicas (dashed) per datacenter against the left
// axis, invocations/s (grey) against the right one, every decision a vertical mark.
function drawChart(holder, legend, history, events, started) {
  const W = 720, H = 220, L = 40, R = 56, T = 10, B = 26;
  const now = Date.now();
  // Applied decisions, oldest first: every replica change goes through the engine, so they
  // give the replica counts before the page opened too.
  const applied = events.filter(e => e.outcome === 'scaled')
    .map(e => ({t: Date.parse(e.time), dc: e.datacenter, from: e.from, to: e.to}))
    .filter(e => e.t > now - HISTORY_SECONDS * 1000)
    .sort((a, b) => a.t - b.t);
  const since = Math.min(started, applied.length ? applied[0].t - 5000 : started);
  const span = Math.min(HISTORY_SECONDS, Math.max(30, (now - since) / 1000)) * 1000;
  const t0 = now - span;
  const x = t => L + (W - L - R) * (Math.max(t, t0) - t0) / span;
  const dcs = [...new Set(history.flatMap(s => Object.keys(s.dcs)))].sort();
  let maxReplicas = 4;
  let maxRate = 1;
  for (const s of history) {
    for (const [r] of Object.values(s.dcs)) maxReplicas = Math.max(maxReplicas, r);
    if (s.rate) maxRate = Math.max(maxRate, s.rate);
  }
  for (const e of applied) maxReplicas = Math.max(maxReplicas, e.from, e.to);
  maxRate *= 1.15;
  const y = v => T + (H - T - B) * (1 - v / maxReplicas);
  const yRate = v => T + (H - T - B) * (1 - v / maxRate);
  const svg = svgEl('svg', {viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'chart-svg',
    'aria-label': `Replicas, ready replicas and invocations per second over the last ${Math.round(span / 60000)} minutes, with scale decisions marked`});
  for (let v = 0; v <= maxReplicas; v += Math.max(1, Math.ceil(maxReplicas / 5))) {
    svg.append(svgEl('line', {x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid'}),
      svgEl('text', {x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'axis'}, String(v)));
  }
  svg.append(svgEl('text', {x: W - R + 6, y: T + 10, class: 'axis'}, fmtRate(maxRate / 1.15) + '/s'),
    svgEl('text', {x: L, y: H - 6, class: 'axis'}, `−${Math.round(span / 1000)} s`),
    svgEl('text', {x: W - R, y: H - 6, 'text-anchor': 'end', class: 'axis'}, 'now'));
  const rate = history.filter(s => s.rate !== null).map(s => `${x(s.t).toFixed(1)},${yRate(s.rate).toFixed(1)}`);
  if (rate.length > 1) svg.append(svgEl('polyline', {points: rate.join(' '), class: 'rate'}));
  dcs.forEach((dc, i) => {
    // Replicas before the page opened, stepped from the decisions (ready replicas and the
    // rate are only known from then on).
    const before = applied.filter(e => e.dc === dc && e.t < started);
    if (before.length) {
      let value = before[0].from;
      const pts = [`${x(t0).toFixed(1)},${y(value).toFixed(1)}`];
      for (const e of before) {
        pts.push(`${x(e.t).toFixed(1)},${y(value).toFixed(1)}`);
        value = e.to;
        pts.push(`${x(e.t).toFixed(1)},${y(value).toFixed(1)}`);
      }
      pts.push(`${x(started).toFixed(1)},${y(value).toFixed(1)}`);
      svg.append(svgEl('polyline', {points: pts.join(' '), stroke: COLORS[i % COLORS.length], class: 'series seeded', 'data-dc': dc}));
    }
    for (const [k, dash] of [[0, null], [1, '5 4']]) {
      const pts = [];
      let last = null;
      for (const s of history) {
        const v = s.dcs[dc];
        if (!v) continue;
        if (last !== null) pts.push(`${x(s.t).toFixed(1)},${y(last).toFixed(1)}`);
        pts.push(`${x(s.t).toFixed(1)},${y(v[k]).toFixed(1)}`);
        last = v[k];
      }
      if (pts.length) svg.append(svgEl('polyline', {points: pts.join(' '), stroke: COLORS[i % COLORS.length], 'stroke-dasharray': dash, class: 'series', 'data-dc': dc}));
    }
  });
  let shown = 0;
  for (const e of [...events].reverse()) {
    const t = Date.parse(e.time);
    if (!(t >= t0)) continue;
    const row = shown++ % 4;
    const up = e.to > e.from;
    svg.append(svgEl('g', {class: 'marker ' + (up ? 'up' : e.to < e.from ? 'down' : 'held')},
      svgEl('title', {}, `${fmtTime(e.time)} ${e.datacenter} ${e.from} → ${e.to} (${e.outcome}): ${e.reason || ''}`),
      svgEl('line', {x1: x(t), x2: x(t), y1: T, y2: H - B}),
      svgEl('text', {x: x(t) + 3, y: T + 12 + 13 * row, class: 'axis'}, `${e.datacenter} ${e.from}→${e.to}`)));
  }
  clear(holder).append(svg);
  clear(legend);
  dcs.forEach((dc, i) => legend.append(el('li', {},
    el('span', {class: 'swatch', 'data-color': String(i % COLORS.length)}), `${dc}: replicas (solid), ready (dashed)`)));
  legend.append(el('li', {}, el('span', {class: 'swatch rate'}), 'invocations/s (right axis)'),
    el('li', {}, el('span', {class: 'swatch marker'}), 'scale decision'));
}

// ---- invoke panel ---------------------------------------------------------------------

function invokePanel(name, namespace) {
  const method = el('select', {id: 'invoke-method'}, ['GET', 'POST', 'PUT', 'PATCH', 'DELETE'].map(m => el('option', {value: m, selected: m === 'POST'}, m)));
  const path = el('input', {id: 'invoke-path', type: 'text', placeholder: '/path?query', autocomplete: 'off'});
  const type = el('input', {id: 'invoke-type', type: 'text', value: 'text/plain'});
  const headers = el('textarea', {id: 'invoke-headers', rows: '2', placeholder: 'X-Name: value (one per line)'});
  const body = el('textarea', {id: 'invoke-body', rows: '4'});
  const async = el('input', {id: 'invoke-async', type: 'checkbox'});
  const result = el('div', {id: 'invoke-result', 'aria-live': 'polite'});
  const form = el('form', {id: 'invoke-form'},
    el('div', {class: 'row'}, el('label', {for: 'invoke-method'}, 'Method'), method,
      el('label', {for: 'invoke-path'}, 'Path and query'), path),
    el('div', {class: 'row'}, el('label', {for: 'invoke-type'}, 'Content type'), type,
      el('label', {for: 'invoke-async'}, async, ' Asynchronous (answer 202 with X-Call-Id)')),
    el('label', {for: 'invoke-headers'}, 'Headers'), headers,
    el('label', {for: 'invoke-body'}, 'Body'), body,
    el('button', {type: 'submit'}, 'Invoke'));
  form.addEventListener('submit', async e => {
    e.preventDefault();
    clear(result);
    let suffix = path.value.trim();
    if (suffix && !suffix.startsWith('/') && !suffix.startsWith('?')) suffix = '/' + suffix;
    const url = `/${async.checked ? 'async-function' : 'function'}/${encodeURIComponent(qualified(name, namespace))}${suffix}`;
    const init = {method: async.checked ? 'POST' : method.value, headers: {}, credentials: 'same-origin'};
    for (const line of headers.value.split('\n')) {
      const i = line.indexOf(':');
      if (i > 0) init.headers[line.slice(0, i).trim()] = line.slice(i + 1).trim();
    }
    if (init.method !== 'GET' && init.method !== 'HEAD') {
      init.body = body.value;
      if (type.value.trim()) init.headers['Content-Type'] = type.value.trim();
    }
    const t = performance.now();
    let response;
    try {
      response = await fetch(here(url), init);
    } catch (err) {
      result.append(el('p', {class: 'error'}, 'The request failed: ' + err.message));
      return;
    }
    const text = await response.text();
    const ms = performance.now() - t;
    const fn = response.headers.get('x-duration-seconds');
    const callId = response.headers.get('x-call-id');
    const list = el('dl', {class: 'headers'});
    for (const [k, v] of response.headers) list.append(el('dt', {}, k), el('dd', {}, v));
    result.append(
      el('p', {id: 'invoke-status', class: response.ok ? 'ok' : 'error'},
        `${response.status} ${response.statusText} in ${ms.toFixed(1)} ms` + (fn ? ` (function ${Number(fn).toFixed(4)} s)` : '') +
        (callId ? ` · X-Call-Id ${callId}` : '')),
      el('details', {}, el('summary', {}, 'Headers'), list),
      el('pre', {id: 'invoke-answer', class: 'answer'}, text));
  });
  return el('section', {'aria-labelledby': 'h-invoke'}, el('h2', {id: 'h-invoke'}, 'Invoke'), form, result);
}

// ---- deploy page ----------------------------------------------------------------------

function deployPage(main) {
  const field = (id, label, input, hint) => el('div', {class: 'field', 'data-field': id},
    el('label', {for: id}, label), input, hint ? el('p', {class: 'hint', id: id + '-hint'}, hint) : null,
    el('p', {class: 'field-error', id: id + '-error', role: 'alert', hidden: true}));
  const name = el('input', {id: 'deploy-name', required: true, autocomplete: 'off', 'aria-describedby': 'deploy-name-hint'});
  const image = el('input', {id: 'deploy-image', required: true, value: 'faastastic/local', 'aria-describedby': 'deploy-image-hint'});
  const namespace = el('input', {id: 'deploy-namespace'});
  const command = el('input', {id: 'deploy-command', placeholder: 'cat', 'aria-describedby': 'deploy-command-hint'});
  const env = el('textarea', {id: 'deploy-env', rows: '3', placeholder: 'KEY=value', 'aria-describedby': 'deploy-env-hint'});
  const labels = el('textarea', {id: 'deploy-labels', rows: '3', placeholder: 'com.openfaas.scale.max=4', 'aria-describedby': 'deploy-labels-hint'});
  const annotations = el('textarea', {id: 'deploy-annotations', rows: '2', placeholder: 'key=value'});
  const offer = el('select', {id: 'deploy-scale-label'}, el('option', {value: ''}, 'Add a scale label…'),
    SCALE_LABELS.map(([k, v]) => el('option', {value: `${k}=${v}`}, k)));
  offer.addEventListener('change', () => {
    if (!offer.value) return;
    labels.value = (labels.value.trim() ? labels.value.trim() + '\n' : '') + offer.value;
    offer.value = '';
    labels.focus();
  });
  const datacenters = el('fieldset', {id: 'deploy-datacenters'}, el('legend', {}, 'Datacenters'));
  const message = el('p', {id: 'deploy-message', role: 'alert'});
  const form = el('form', {id: 'deploy-form', novalidate: true},
    field('deploy-name', 'Name', name, 'Lower-case letters, digits and "-".'),
    field('deploy-image', 'Image', image, 'On the local platform the image is a label; the command runs.'),
    field('deploy-namespace', 'Namespace', namespace),
    field('deploy-command', 'Command (envProcess)', command, 'What each replica runs, once per request (classic) or as a server with mode=http.'),
    field('deploy-env', 'Environment variables', env, 'One KEY=value per line.'),
    field('deploy-labels', 'Labels', el('div', {}, labels, offer), 'One key=value per line; the scale labels set the autoscaler\'s bounds and steps.'),
    field('deploy-annotations', 'Annotations', annotations),
    el('div', {class: 'field', 'data-field': 'deploy-datacenters'}, datacenters,
      el('p', {class: 'field-error', id: 'deploy-datacenters-error', role: 'alert', hidden: true})),
    el('button', {type: 'submit'}, 'Deploy'), message);
  main.append(el('h1', {}, 'Deploy a function'), form);

  // The boxes start as the server places a deployment that names no datacenter.
  let defaultSet = [];
  overview().then(info => {
    if (!namespace.value) namespace.value = info.defaultNamespace;
    for (const d of info.datacenters || []) {
      const chosen = info.placement === 'all' || d.home;
      if (chosen) defaultSet.push(d.name);
      const box = el('input', {type: 'checkbox', id: 'dc-' + d.name, value: d.name, checked: chosen});
      datacenters.append(el('label', {for: 'dc-' + d.name, class: 'check'}, box, ' ' + d.name + (d.home && d.name !== 'home' ? ' (home)' : '')));
    }
  });

  const pairs = (text, sep, what, problems) => {
    const out = {};
    text.split('\n').map(l => l.trim()).filter(Boolean).forEach((line, i) => {
      const at = line.indexOf(sep);
      if (at <= 0) problems.push(`line ${i + 1}: "${line}" is not ${what}`);
      else out[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    });
    return out;
  };
  // Which input an error of the API names (its message starts with the field).
  const inputFor = field => {
    const top = String(field).split(/[.[]/)[0];
    return {service: 'deploy-name', image: 'deploy-image', namespace: 'deploy-namespace',
      envProcess: 'deploy-command', envVars: 'deploy-env', labels: 'deploy-labels',
      annotations: 'deploy-annotations', constraints: 'deploy-datacenters'}[top];
  };
  const showError = (id, text) => {
    const node = document.getElementById(id + '-error');
    node.hidden = false;
    node.append(document.createTextNode((node.textContent ? ' ' : '') + text));
    const input = document.getElementById(id);
    if (input) input.setAttribute('aria-invalid', 'true');
  };

  form.addEventListener('submit', async e => {
    e.preventDefault();
    for (const n of form.querySelectorAll('.field-error')) { n.hidden = true; setText(n, ''); }
    for (const n of form.querySelectorAll('[aria-invalid]')) n.removeAttribute('aria-invalid');
    setText(message, '');
    const local = {env: [], labels: [], annotations: []};
    const request = {
      service: name.value.trim(),
      image: image.value.trim(),
      namespace: namespace.value.trim() || undefined,
      envProcess: command.value.trim() || undefined,
      envVars: pairs(env.value, '=', 'KEY=value', local.env),
      labels: pairs(labels.value, '=', 'key=value', local.labels),
      annotations: pairs(annotations.value, '=', 'key=value', local.annotations),
    };
    const boxes = [...datacenters.querySelectorAll('input[type=checkbox]')];
    const chosen = boxes.filter(b => b.checked).map(b => b.value);
    if (boxes.length && !chosen.length) local.dcs = ['choose at least one datacenter'];
    // Constraints only when the choice differs from the server's default placement.
    const same = chosen.length === defaultSet.length && chosen.every(d => defaultSet.includes(d));
    if (chosen.length && !same) request.constraints = chosen.map(d => 'datacenter==' + d);
    let bad = false;
    for (const [key, id] of [['env', 'deploy-env'], ['labels', 'deploy-labels'], ['annotations', 'deploy-annotations'], ['dcs', 'deploy-datacenters']]) {
      for (const p of local[key] || []) { showError(id, p); bad = true; }
    }
    if (bad) { setText(message, 'Fix the fields marked above.'); return; }
    const r = await api('POST', '/system/functions', request);
    if (r.ok) {
      location.hash = functionHash(request.service, request.namespace || (await overview()).defaultNamespace);
      return;
    }
    let placed = 0;
    for (const err of r.errors) {
      const id = inputFor(err.field);
      if (id) { showError(id, `${err.field}: ${err.message}`); placed++; }
    }
    setText(message, placed && placed === r.errors.length ? 'The server refused the deployment: see the fields marked above.' : r.message);
    const first = form.querySelector('[aria-invalid]');
    if (first) first.focus();
  });
  return () => {};
}

// ---- overview page --------------------------------------------------------------------

function overviewPage(main) {
  const dcBody = el('tbody');
  const loops = el('ul', {id: 'loops'});
  const sources = el('ul', {id: 'sources'});
  const paused = el('ul', {id: 'paused'});
  const triggers = el('ul', {id: 'triggers'});
  const recent = el('ol', {class: 'timeline', id: 'recent'});
  const count = el('p', {id: 'function-count'});
  main.append(el('h1', {}, 'Overview'), count,
    el('section', {'aria-labelledby': 'h-dcs'}, el('h2', {id: 'h-dcs'}, 'Datacenters'),
      el('table', {id: 'datacenters'}, el('thead', {}, el('tr', {},
        el('th', {scope: 'col'}, 'Name'), el('th', {scope: 'col'}, 'Platform'), el('th', {scope: 'col'}, 'Health'))), dcBody)),
    el('section', {'aria-labelledby': 'h-loops'}, el('h2', {id: 'h-loops'}, 'Autoscaler'),
      el('h3', {}, 'Loops (last evaluation)'), loops, el('h3', {}, 'Query sources'), sources,
      el('h3', {}, 'Pauses'), paused, el('h3', {}, 'Message triggers'), triggers),
    el('section', {'aria-labelledby': 'h-recent'}, el('h2', {id: 'h-recent'}, 'Recent decisions'), recent));

  async function poll() {
    const [o, ev] = await Promise.all([api('GET', '/system/overview'), api('GET', '/system/scale-events?limit=20')]);
    if (o.ok) {
      const d = o.data;
      setText(count, `${d.functions} functions deployed · faastastic ${d.version}`);
      clear(dcBody);
      for (const dc of d.datacenters) {
        const health = dc.up === null ? 'not checked yet' : dc.up ? 'up' : 'down';
        dcBody.append(el('tr', {'data-dc': dc.name}, el('th', {scope: 'row'}, dc.name + (dc.home && dc.name !== 'home' ? ' (home)' : '')),
          el('td', {}, dc.platform), el('td', {class: 'health ' + health.replace(/ /g, '-')}, health)));
      }
      clear(loops);
      for (const l of d.loops) loops.append(el('li', {}, el('code', {}, l.name), ` ${fmtTime(l.lastEvaluation)} (${l.secondsAgo.toFixed(1)} s ago)`));
      if (!d.loops.length) loops.append(el('li', {class: 'muted'}, 'No pass finished yet.'));
      clear(sources);
      for (const s of d.sources) sources.append(el('li', {}, el('code', {}, s.policy), s.up ? ' reading' : ' failing'));
      if (!d.sources.length) sources.append(el('li', {class: 'muted'}, 'No query policy has read its source yet.'));
      clear(triggers);
      for (const t of d.triggers || []) triggers.append(el('li', {}, el('code', {}, t.name), t.up ? ' connected' : ' unreachable'));
      if (!(d.triggers || []).length) triggers.append(el('li', {class: 'muted'}, 'None configured.'));
      clear(paused);
      for (const p of d.paused) paused.append(el('li', {}, el('code', {}, p.scope), ' ' + (p.reason || '')));
      if (!d.paused.length) paused.append(el('li', {class: 'muted'}, 'Nothing is paused.'));
    }
    if (ev.ok && Array.isArray(ev.data)) {
      clear(recent);
      for (const e of ev.data) {
        recent.append(el('li', {},
          el('time', {datetime: e.time}, fmtTime(e.time)), ' ',
          el('a', {href: functionHash(e.function, e.namespace)}, e.function), ' ',
          el('strong', {}, `${e.datacenter}: ${e.from} → ${e.to}`), ' ',
          el('span', {class: 'badge'}, e.outcome), ' ', el('span', {class: 'reason'}, e.reason || '')));
      }
      if (!ev.data.length) recent.append(el('li', {class: 'muted'}, 'No decisions yet.'));
    }
  }
  return every(2 * POLL_MS, poll);
}
