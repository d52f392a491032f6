// Profiler web UI: wires the service list, time range, timeline, flame graph
// (flame/icicle/diff), label filters, top table, sandwich view and exports.
// The whole view state lives in the URL hash, so a link restores the view.
// The home page, the fleet overview, lives in overview.js; the "Deep profiles"
// page (schedules and runs) in deep.js, with the alert rules in alerts.js.

import { getJson, resolveTime, fmtTime, fmtValue, fmtNs, pct, el, escapeRegExp, OFF_REASONS } from './util.js';
import { FlameGraph, flatten, sandwich } from './flame.js';
import { Timeline, kindOrder } from './timeline.js';
import { DeepProfiles } from './deep.js';
import { AlertRules } from './alerts.js';
import { Overview } from './overview.js';
import { ChangesView } from './changes.js';
import { WaitsPanel } from './waits.js';
import { RequestsPanel } from './requests.js';

const $ = (id) => document.getElementById(id);

const DEFAULTS = {
  service: '', from: 'now-15m', until: 'now', view: 'flame', kf: 'both', idle: '1', icicle: '0',
  nodes: '5000', filter: '', q: '', zoom: '', bfrom: '', buntil: '', norm: '1', thr: '0.5',
  tab: 'top', req: '', fn: '', wfn: '', cp99: '0', sort: 'self', minshare: '', page: 'overview', osort: 'cpu', odir: 'desc', oq: '', sig: '1',
};
const MIN = 60_000;
const PRESETS = [['15m', 'now-15m'], ['1h', 'now-1h'], ['6h', 'now-6h'], ['24h', 'now-24h'], ['7d', 'now-7d']];

const state = { ...DEFAULTS };
const ui = {
  state,
  perf: { firstRender: null, lastRender: null },
  loads: 0,
  errors: [],
  flame: null,
  timeline: null,
};
window.__ui = ui;

function readHash() {
  const p = new URLSearchParams(location.hash.replace(/^#/, ''));
  for (const k of Object.keys(DEFAULTS)) state[k] = p.has(k) ? p.get(k) : DEFAULTS[k];
  // Links from before the overview name a service and mean its flame graph.
  if (p.has('service') && !p.has('page')) state.page = 'flame';
}

function writeHash() {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(state)) if (v !== DEFAULTS[k] || (k === 'page' && state.service)) p.set(k, v);
  const h = '#' + p.toString();
  if (location.hash !== h) history.replaceState(null, '', h === '#' ? location.pathname : h);
}

// ---------------------------------------------------------------- errors

function showError(err, where) {
  const msg = err instanceof Error ? err.message : String(err);
  console.error(msg);
  ui.errors.push(msg);
  const box = $('errors');
  box.hidden = false;
  box.append(el('div', { class: 'error' }, el('span', { text: msg }),
    el('button', { text: '✕', title: 'dismiss', onclick: (e) => { e.target.parentElement.remove(); if (!box.children.length) box.hidden = true; } })));
  if (where) {
    where.className = 'status error';
    where.textContent = msg;
  }
  document.body.dataset.status = 'error';
}

function clearErrors() {
  $('errors').textContent = '';
  $('errors').hidden = true;
  ui.errors = [];
}

window.addEventListener('error', (e) => {
  if (/ResizeObserver loop/.test(e.message)) return; // benign
  showError(e.error || e.message);
});
window.addEventListener('unhandledrejection', (e) => showError(e.reason));

// ---------------------------------------------------------------- selection

function range() {
  const now = Date.now();
  return { from: resolveTime(state.from, now), until: resolveTime(state.until, now) };
}

function baseRange() {
  if (state.bfrom && state.buntil) return { from: resolveTime(state.bfrom), until: resolveTime(state.buntil) };
  const { from, until } = range();
  return { from: from - (until - from), until: from };
}

/** Kinds for the graph, from those the timeline saw; null = all. */
function selectedKinds(available) {
  const hideIdle = state.idle === '1';
  if (state.kf === 'both' && !hideIdle) return null;
  let ks = available.length ? available : ['on-cpu', ...OFF_REASONS.map((r) => 'off-cpu:' + r)];
  ks = ks.filter((k) => {
    const off = k.startsWith('off-cpu');
    if (hideIdle && k === 'off-cpu:idle-poll') return false;
    if (state.kf === 'on') return !off;
    if (state.kf === 'off') return off;
    return true;
  });
  return ks;
}

function selParams(kinds, { from, until } = {}) {
  const p = { service: state.service, from: from ?? state.from, until: until ?? state.until };
  if (state.filter) p.filter = state.filter;
  if (kinds) p.kinds = kinds.join(',');
  // The profile of some requests only (`slowest:1`); the diff's base is the rest.
  if (state.req) p.requests = state.req;
  return p;
}

// ---------------------------------------------------------------- widgets

let flame, timeline, callersG, calleesG, deep, overview, changesView, waitsPanel, requestsPanel;
let lastKinds = null;
/** Set while a reload restores the zoom from the URL: not a user's selection. */
let restoringZoom = false;
let reloadSeq = 0;
let topRows = [];
let topTotal = 0;
/** Function name -> p99 of its waits (ns), from the last top-table load. */
let waitsP99 = new Map();

function setupWidgets() {
  flame = new FlameGraph($('flame'), {
    breadcrumb: $('breadcrumb'),
    tooltip: $('tooltip'),
    onZoom: (path) => {
      state.zoom = path.join(';');
      writeHash();
      applySearch();
      // An off-CPU frame (not its kind's root) shows how long its waits lasted.
      const i = flame.zoom, f = flame.f;
      if (!restoringZoom && f && i > 0 && f.kind[i]?.startsWith('off-cpu') && !f.name[i].startsWith('[')) openWaits(f.name[i]);
    },
    onSelect: (i) => openSandwich(flame.f.name[i]),
  });
  ui.flame = flame;
  waitsPanel = new WaitsPanel($('waits-stats'), $('waits-hist'));
  ui.waits = waitsPanel;
  $('waits-fn').onchange = (e) => openWaits(e.target.value.trim());
  requestsPanel = new RequestsPanel($('requests-stats'), document.querySelector('#requests-table tbody'), {
    onDiff: (percent) => { state.req = `slowest:${percent}`; state.view = 'diff'; state.zoom = ''; changed(true); },
  });
  ui.requests = requestsPanel;
  timeline = new Timeline($('timeline'), $('legend'), {
    tooltip: $('tooltip'),
    onMarker: openDeploy,
    onSelect: (a, b) => {
      const dragBase = compares() && document.querySelector('input[name=drag]:checked')?.value === 'base';
      if (dragBase) { state.bfrom = String(a); state.buntil = String(b); }
      else { state.from = String(a); state.until = String(b); state.zoom = ''; }
      changed(true);
    },
  });
  ui.timeline = timeline;
  callersG = new FlameGraph($('sandwich-callers'), { tooltip: $('tooltip'), onSelect: (i) => openSandwich(callersG.f.name[i]) });
  calleesG = new FlameGraph($('sandwich-callees'), { tooltip: $('tooltip'), onSelect: (i) => openSandwich(calleesG.f.name[i]) });
  calleesG.setIcicle(true);
  ui.sandwich = { callers: callersG, callees: calleesG };
  const alerts = new AlertRules();
  deep = new DeepProfiles({ showError, currentService: () => state.service, onLoad: () => alerts.load() });
  ui.deep = deep;
  overview = new Overview({ state, onOpen: openService, onSortOrSearch: writeHash });
  ui.overview = overview;
  changesView = new ChangesView({ state, onOpen: openChange, onToggle: writeHash });
  ui.changes = changesView;
  for (const b of document.querySelectorAll('#page-nav button')) {
    b.onclick = () => {
      if (state.page === b.dataset.page) return;
      state.page = b.dataset.page;
      if (state.page === 'flame' && !state.service && services.length) state.service = services[0];
      changed(state.page !== 'deep');
    };
  }

  for (const [label, v] of PRESETS) {
    $('presets').append(el('button', { text: label, 'data-range': v, onclick: () => { state.from = v; state.until = 'now'; state.zoom = ''; changed(true); } }));
  }
  $('custom-apply').onclick = () => {
    const a = Date.parse($('custom-from').value), b = Date.parse($('custom-until').value);
    if (!isFinite(a) || !isFinite(b) || a >= b) return showError('custom range: "from" must be a valid time before "to"');
    state.from = String(a); state.until = String(b); state.zoom = '';
    changed(true);
  };
  $('service-search').oninput = renderServices;
  for (const b of document.querySelectorAll('#view-mode button')) {
    b.onclick = () => { state.view = b.dataset.view; state.zoom = ''; changed(true); };
  }
  $('kind-filter').onchange = (e) => { state.kf = e.target.value; state.zoom = ''; changed(true); };
  $('hide-idle').onchange = (e) => { state.idle = e.target.checked ? '1' : '0'; state.zoom = ''; changed(true); };
  $('icicle').onchange = (e) => { state.icicle = e.target.checked ? '1' : '0'; flame.setIcicle(state.icicle === '1'); writeHash(); };
  $('color-p99').onchange = (e) => { state.cp99 = e.target.checked ? '1' : '0'; colorByP99(); writeHash(); };
  $('max-nodes').onchange = (e) => { state.nodes = e.target.value; changed(true); };
  $('normalize').onchange = (e) => { state.norm = e.target.checked ? '1' : '0'; changed(true); };
  $('threshold').onchange = (e) => { state.thr = e.target.value; flame.setDiffThreshold(Number(state.thr) / 100); writeHash(); };
  $('base-prev').onclick = () => { state.bfrom = ''; state.buntil = ''; changed(true); };
  $('label-name').onchange = loadLabelValues;
  $('label-add').onclick = () => {
    const k = $('label-name').value, v = $('label-value').value, op = $('label-op').value;
    if (!k || !v) return;
    const fs = state.filter ? state.filter.split(',') : [];
    fs.push(`${k}${op}${v}`);
    state.filter = [...new Set(fs)].join(',');
    state.zoom = '';
    changed(true);
  };
  let searchTimer;
  $('search').oninput = (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { state.q = e.target.value; writeHash(); applySearch(); }, 120);
  };
  for (const b of document.querySelectorAll('.tabs button')) {
    b.onclick = () => { state.tab = b.dataset.tab; writeHash(); renderTabs(); };
  }
  for (const th of document.querySelectorAll('#top-table th[data-sort]')) {
    th.onclick = () => {
      const s = th.dataset.sort;
      if (s === state.sort) return;
      state.sort = s;
      writeHash();
      // Names and p99 waits are in the rows already; self and total rank the server's cut.
      if (s === 'name' || s === 'p99') renderTop(); else loadTop(lastKinds);
    };
  }
  $('sandwich-fn').onchange = (e) => openSandwich(e.target.value);
  $('share').onclick = async () => {
    writeHash();
    try { await navigator.clipboard.writeText(location.href); $('share').textContent = '✓ copied'; }
    catch { prompt('Link to this view:', location.href); }
    setTimeout(() => ($('share').textContent = 'share link'), 1500);
  };
  document.addEventListener('keydown', (e) => {
    if (/^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement?.tagName)) return;
    if (e.key === 'Escape') flame.zoomOut();
    else if (e.key === '/') { e.preventDefault(); $('search').focus(); }
  });
  window.addEventListener('hashchange', () => {
    const before = JSON.stringify(state);
    readHash();
    if (JSON.stringify(state) !== before) { syncControls(); reload(); }
  });
}

function syncPage() {
  const isDeep = state.page === 'deep';
  for (const b of document.querySelectorAll('#page-nav button')) b.classList.toggle('active', b.dataset.page === state.page);
  for (const e of document.querySelectorAll('.flame-page')) e.hidden = state.page !== 'flame';
  $('page-overview').hidden = state.page !== 'overview';
  $('page-deep').hidden = !isDeep;
  $('range').hidden = isDeep;
  document.title = pageTitle();
  if (isDeep && !deep.visible) deep.show();
  else if (!isDeep && deep.visible) deep.hide();
}

/** What the page shows, for the tab title and history. */
function pageTitle() {
  if (state.page === 'deep') return 'Deep profiles · Profiler';
  const preset = PRESETS.find(([, v]) => v === state.from && state.until === 'now');
  const { from, until } = range();
  const span = preset ? `last ${preset[0]}` : isFinite(from) && isFinite(until) ? `${fmtTime(from)} → ${fmtTime(until)}` : `${state.from} → ${state.until}`;
  if (state.page === 'overview') return `Overview · ${span} · Profiler`;
  const what = { diff: 'diff', changes: 'changes' }[state.view] || 'flame graph';
  return `${state.service || 'no service'} · ${what} · ${span} · Profiler`;
}

function syncControls() {
  syncPage();
  $('service-title').textContent = state.service || '(no service)';
  for (const b of document.querySelectorAll('#presets button')) b.classList.toggle('active', b.dataset.range === state.from && state.until === 'now');
  for (const b of document.querySelectorAll('#view-mode button')) b.classList.toggle('active', b.dataset.view === state.view);
  for (const e of document.querySelectorAll('.diff-only')) e.hidden = !compares();
  $('changes-panel').hidden = state.view !== 'changes';
  for (const e of document.querySelectorAll('.not-changes')) e.hidden = state.view === 'changes';
  $('kind-filter').value = state.kf;
  $('hide-idle').checked = state.idle === '1';
  $('icicle').checked = state.icicle === '1';
  $('color-p99').checked = state.cp99 === '1';
  flame.setIcicle(state.icicle === '1');
  if (![...$('max-nodes').options].some((o) => o.value === state.nodes)) $('max-nodes').append(el('option', { value: state.nodes, text: state.nodes }));
  $('max-nodes').value = state.nodes;
  $('normalize').checked = state.norm === '1';
  $('threshold').value = state.thr;
  flame.diffThreshold = Number(state.thr) / 100;
  if ($('search').value !== state.q) $('search').value = state.q;
  const { from, until } = range();
  const local = (ms) => (isFinite(ms) ? new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 19) : '');
  $('custom-from').value = local(from);
  $('custom-until').value = local(until);
  $('range-text').textContent = isFinite(from) && isFinite(until) ? `${fmtTime(from)} → ${fmtTime(until)}` : `${state.from} → ${state.until}`;
  const b = baseRange();
  $('base-text').textContent = state.req
    ? 'the other requests of the same range'
    : `${fmtTime(b.from)} → ${fmtTime(b.until)}${state.bfrom ? '' : ' (previous period)'}`;
  $('filters').textContent = '';
  for (const f of state.filter ? state.filter.split(',') : []) {
    $('filters').append(el('span', { class: 'chip' }, f, el('button', {
      text: '✕', title: 'remove filter ' + f,
      onclick: () => { state.filter = state.filter.split(',').filter((x) => x !== f).join(','); changed(true); },
    })));
  }
  const chip = $('requests-chip');
  chip.hidden = !state.req;
  chip.textContent = '';
  if (state.req) {
    const [which, percent] = state.req.split(':');
    const text = which === 'slowest' ? `slowest ${percent}% of requests` + (state.view === 'diff' ? ' against the rest' : '') : `requests but the slowest ${percent}%`;
    chip.append(el('span', { class: 'chip' }, text, el('button', {
      text: '✕', title: 'all requests',
      onclick: () => { state.req = ''; changed(true); },
    })));
  }
  renderServices();
  renderTabs();
  updateExports();
}

/** Whether the view compares a base range with the target: diff and changes. */
function compares() {
  return state.view === 'diff' || state.view === 'changes';
}

/** From an event marker to its changes: the compared time against its baseline. */
function openDeploy(marker) {
  const c = marker.event.comparison;
  if (!c) return;
  Object.assign(state, { view: 'changes', from: String(c.from), until: String(c.until), bfrom: String(c.base_from), buntil: String(c.base_until), zoom: '' });
  changed(true);
}

/** Deploys and alerts of the service as timeline markers: red when they found regressions. */
async function loadMarkers(seq) {
  let events = [];
  try {
    events = await getJson('/api/v1/events', { service: state.service });
  } catch {
    // Markers are extra: the timeline and graph show their own errors.
  }
  if (seq !== reloadSeq) return;
  timeline.setMarkers(events.map((e) => {
    const c = e.comparison;
    const outcome = !c ? 'not compared yet' : c.error ? c.error : `${c.regressions} significant regression${c.regressions === 1 ? '' : 's'}${c.top[0] ? `, first: ${c.top[0].function} (${c.top[0].kind})` : ''}`;
    const deploy = e.kind === 'deploy';
    return {
      at: e.at_ms, label: deploy ? `v${e.version}` : `alert ${e.alert}`, event: e,
      color: c && c.regressions > 0 ? 'hsl(0,75%,45%)' : '#555',
      title: deploy ? `deploy ${e.previous} → ${e.version} at ${fmtTime(e.at_ms)}: ${outcome}` : `alert ${e.alert}, period from ${fmtTime(e.at_ms)}: ${outcome}`,
    };
  }));
}

/** From a row of the changes table to the diff flame graph, the function highlighted. */
function openChange(c) {
  state.view = 'diff';
  state.q = '^' + escapeRegExp(c.function) + '$';
  state.kf = c.kind === 'on-cpu' ? 'on' : 'off';
  if (c.kind === 'off-cpu:idle-poll') state.idle = '0';
  state.zoom = '';
  changed(true);
}

function changed(reloadData) {
  writeHash();
  syncControls();
  if (reloadData) reload();
}

// ---------------------------------------------------------------- services & labels

let services = [];

async function loadServices() {
  try {
    services = await getJson('/api/v1/services');
  } catch (e) {
    showError(e);
    services = [];
  }
  renderServices();
}

/** Opens the flame graph of `service`, over the current range. */
function openService(service) {
  if (service === state.service && state.page === 'flame') return;
  if (service !== state.service) {
    Object.assign(state, { service, zoom: '', q: '', fn: '', filter: '', bfrom: '', buntil: '' });
    labelsFor = null;
  }
  state.page = 'flame';
  changed(true);
}

function renderServices() {
  const q = $('service-search').value.toLowerCase();
  const ul = $('service-list');
  ul.textContent = '';
  const shown = services.filter((s) => s.toLowerCase().includes(q));
  for (const s of shown) {
    ul.append(el('li', { class: s === state.service ? 'active' : '', text: s, title: s, onclick: () => openService(s) }));
  }
  if (!shown.length) ul.append(el('li', { class: 'muted', text: services.length ? 'no match' : 'no services yet' }));
}

let labelsFor = null;

async function loadLabels() {
  if (labelsFor === state.service) return;
  labelsFor = state.service;
  const sel = $('label-name');
  sel.textContent = '';
  sel.append(el('option', { value: '', text: 'label…' }));
  $('label-value').textContent = '';
  $('label-value').append(el('option', { value: '', text: 'value…' }));
  try {
    const names = await getJson('/api/v1/labels', { service: state.service });
    for (const n of names) sel.append(el('option', { value: n, text: n }));
  } catch (e) {
    labelsFor = null;
    showError(e);
  }
}

async function loadLabelValues() {
  const name = $('label-name').value;
  const sel = $('label-value');
  sel.textContent = '';
  sel.append(el('option', { value: '', text: 'value…' }));
  if (!name) return;
  try {
    const values = await getJson('/api/v1/label_values', { service: state.service, name });
    for (const v of values) sel.append(el('option', { value: v, text: v }));
    if (values.length === 1) sel.value = values[0];
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------- data

async function reload() {
  const seq = ++reloadSeq;
  clearErrors();
  if (state.page === 'overview') return reloadOverview(seq);
  if (state.page !== 'flame') return;
  updateExports();
  if (!state.service) {
    document.body.dataset.status = 'ready';
    $('flame-status').className = 'status';
    $('flame-status').textContent = services.length ? 'Pick a service on the left.' : 'No services yet: ingest profiles with POST /api/v1/ingest.';
    return;
  }
  document.body.dataset.status = 'loading';
  loadLabels();
  const status = $('flame-status');
  status.className = 'status';
  status.textContent = 'Loading…';
  const { from, until } = range();
  const diff = state.view === 'diff';
  const base = baseRange();
  // Timeline over the target range (and the base one when comparing), all kinds.
  let tl = null;
  try {
    const tFrom = compares() ? Math.min(from, base.from) : state.from;
    const tUntil = compares() ? Math.max(until, base.until) : state.until;
    tl = await getJson('/api/v1/timeline', selParams(null, { from: tFrom, until: tUntil }));
  } catch (e) {
    if (seq !== reloadSeq) return;
    showError(e);
    timeline.setData({ from, until, step: 1, series: {} }, null);
    $('legend').textContent = 'timeline unavailable (see the error above)';
  }
  if (seq !== reloadSeq) return;
  loadMarkers(seq);
  const available = tl ? Object.keys(tl.series).filter((k) => tl.series[k].some((v) => v)).sort(kindOrder) : [];
  const kinds = selectedKinds(available);
  lastKinds = kinds;
  if (tl) {
    timeline.setData(tl, kinds ? new Set(kinds) : null);
    timeline.setOverlays(compares() ? [
      { from: base.from, until: base.until, color: 'rgba(60,110,230,0.13)', label: 'base' },
      { from, until, color: 'rgba(230,90,40,0.10)', label: 'target' },
    ] : []);
  }
  updateExports();
  if (kinds && !kinds.length) {
    flame.setData(flatten({ name: 'root', value: 0, self: 0, children: [] }));
    status.textContent = 'No data for the selected kinds in this range.';
    renderTopRows([], 0);
    finishLoad(seq);
    return;
  }
  if (state.view === 'changes') return loadChanges(seq, kinds, base);
  const defaultKind = kinds && kinds.length === 1 ? kinds[0]
    : (kinds ? available.filter((k) => kinds.includes(k)) : available).length === 1 ? (kinds ? available.filter((k) => kinds.includes(k)) : available)[0] : null;
  const t0 = performance.now();
  const treeP = diff
    ? getJson('/api/v1/diff', { ...selParams(kinds), ...(state.req
      ? { base_requests: state.req.replace(/^slowest:/, 'rest:'), base_from: from, base_until: until }
      : { base_from: base.from, base_until: base.until }), normalize: state.norm === '1', max_nodes: state.nodes, ...(state.minshare ? { min_share: state.minshare } : {}) })
    : getJson('/api/v1/flamegraph', { ...selParams(kinds), max_nodes: state.nodes, ...(state.minshare ? { min_share: state.minshare } : {}) });
  // The top table waits for the tree so both don't compete for the server's cores.
  const topP = treeP.then(() => loadTop(kinds, seq), () => loadTop(kinds, seq));
  try {
    const tree = await treeP;
    if (seq !== reloadSeq) return;
    const t1 = performance.now();
    const f = flatten(tree, { diff, defaultKind });
    const t2 = performance.now();
    flame.setData(f);
    restoringZoom = true;
    if (state.zoom) flame.zoomTo(flame.find(state.zoom.split(';')), false);
    restoringZoom = false;
    // Measure until the frame is actually on screen.
    await new Promise((r) => requestAnimationFrame(() => r()));
    const t3 = performance.now();
    const rec = { nodes: f.n, fetchMs: +(t1 - t0).toFixed(1), flattenMs: +(t2 - t1).toFixed(1), drawMs: +flame.perf.lastDraw.toFixed(1), toScreenMs: +(t3 - t0).toFixed(1), sinceNavigationMs: +t3.toFixed(1) };
    ui.perf.lastRender = rec;
    if (!ui.perf.firstRender) ui.perf.firstRender = rec;
    status.textContent = tree.value === 0 && !(tree.base > 0) ? 'No samples in this range' + (state.filter ? ' with these label filters.' : '.') : '';
    applySearch();
    renderSandwich();
    if (state.tab === 'waits') loadWaits();
    if (state.tab === 'requests') loadRequests();
  } catch (e) {
    if (seq !== reloadSeq) return;
    flame.setData(flatten({ name: 'root', value: 0, self: 0, children: [] }));
    showError(e, status);
  }
  await topP;
  finishLoad(seq);
}

async function reloadOverview(seq) {
  document.body.dataset.status = 'loading';
  const status = $('overview-status');
  status.className = 'status';
  status.textContent = overview.data ? '' : 'Loading…';
  const { from, until } = range();
  try {
    const t0 = performance.now();
    await overview.load(from, until);
    if (seq !== reloadSeq) return;
    status.textContent = '';
    ui.perf.overview = { services: overview.data.services.length, toScreenMs: +(performance.now() - t0).toFixed(1) };
  } catch (e) {
    if (seq !== reloadSeq) return;
    overview.clear('');
    showError(e, status);
  }
  finishLoad(seq);
}

/**
 * With no range in the link: the last 15 minutes if the service (or, on the overview,
 * any service) sent data in them, else the 15 minutes up to its latest data of the
 * last 7 days, so a page never opens on an empty range when there is data to show.
 */
async function defaultRange() {
  const mine = (o) => (state.page === 'flame' && state.service ? o.services.filter((s) => s.service === state.service) : o.services);
  try {
    const recent = await getJson('/api/v1/overview', { from: 'now-15m', until: 'now', step: 15 * MIN });
    if (mine(recent).length) return;
    const week = await getJson('/api/v1/overview', { from: 'now-7d', until: 'now', step: 24 * 60 * MIN });
    const last = Math.max(...mine(week).map((s) => s.last_seen));
    if (!isFinite(last)) return;
    // A minute past the latest window covers it whatever the server's window is.
    state.until = String(last + MIN);
    state.from = String(last + MIN - 15 * MIN);
  } catch {
    // The page's own queries show what is wrong with the server.
  }
}

async function loadChanges(seq, kinds, base) {
  const status = $('changes-status');
  status.className = 'status';
  status.textContent = 'Comparing…';
  try {
    await changesView.load({ ...selParams(kinds), base_from: base.from, base_until: base.until });
    if (seq !== reloadSeq) return;
    status.textContent = '';
  } catch (e) {
    if (seq !== reloadSeq) return;
    changesView.clear();
    showError(e, status);
  }
  finishLoad(seq);
}

function finishLoad(seq) {
  if (seq !== reloadSeq) return;
  ui.loads++;
  if (document.body.dataset.status !== 'error') document.body.dataset.status = 'ready';
}

async function loadTop(kinds, seq = reloadSeq) {
  const by = state.sort === 'total' ? 'total' : 'self';
  try {
    const [r, w] = await Promise.all([
      getJson('/api/v1/top', { ...selParams(kinds), by, limit: 200 }),
      // p99 of the waits per function; a server without histograms has none.
      getJson('/api/v1/waits', { ...selParams(kinds), by: 'function', limit: 2000 }).catch(() => ({ functions: [] })),
    ]);
    if (seq !== reloadSeq) return;
    waitsP99 = new Map(w.functions.map((f) => [f.name, f.p99_ns]));
    for (const f of r.functions) f.p99 = waitsP99.get(f.name) || 0;
    renderTopRows(r.functions, r.total);
    colorByP99();
  } catch (e) {
    if (seq !== reloadSeq) return;
    renderTopRows([], 0);
    showError(e);
  }
}

function renderTopRows(rows, total) {
  topRows = rows;
  topTotal = total;
  const dl = $('sandwich-names');
  dl.textContent = '';
  for (const r of rows.slice(0, 200)) dl.append(el('option', { value: r.name }));
  renderTop();
}

function renderTop() {
  const tbody = document.querySelector('#top-table tbody');
  tbody.textContent = '';
  const rows = topRows.slice();
  if (state.sort === 'name') rows.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  else rows.sort((a, b) => b[state.sort] - a[state.sort] || (a.name < b.name ? -1 : 1));
  for (const th of document.querySelectorAll('#top-table th[data-sort]')) th.classList.toggle('sorted', th.dataset.sort === state.sort);
  const sel = exactName(state.q);
  const t = topTotal || 1;
  for (const r of rows) {
    tbody.append(el('tr', { class: r.name === sel ? 'selected' : '', 'data-fn': r.name },
      el('td', { class: 'fn', text: r.name, title: 'highlight in the flame graph', onclick: () => highlight(r.name) }),
      el('td', { class: 'num', text: fmtValue(r.self) }),
      el('td', { class: 'num' }, el('span', { class: 'bar', style: `width:${Math.round((r.self / t) * 60)}px` }), pct(r.self / t)),
      el('td', { class: 'num', text: fmtValue(r.total) }),
      el('td', { class: 'num', text: pct(r.total / t) }),
      el('td', { class: 'num', text: r.p99 ? fmtNs(r.p99) : '', title: r.p99 ? 'show its waits' : '', onclick: r.p99 ? () => openWaits(r.name) : null }),
      el('td', {}, el('button', { class: 'mini', text: 'sandwich', title: 'sandwich view: callers and callees', onclick: () => openSandwich(r.name) })),
    ));
  }
  if (!rows.length) tbody.append(el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'no functions' })));
  $('tab-info').textContent = rows.length ? `${rows.length} functions, total ${fmtValue(topTotal)}` : '';
}

/** With "waits by p99" on, off-CPU frames go from blue (p99 of 1 ms or less) to red
 * (100 ms or more) on a log scale; frames without recorded waits are grey. */
function colorByP99() {
  if (state.cp99 !== '1') return flame.setColorBy(null);
  flame.setColorBy((i) => {
    const f = flame.f;
    if (!f.kind[i]?.startsWith('off-cpu')) return null;
    const p99 = waitsP99.get(f.name[i]);
    if (!p99) return '#cfcfcf';
    const t = Math.min(1, Math.max(0, (Math.log10(p99) - 6) / 2));
    return `hsl(${Math.round(220 - 220 * t)}, 70%, ${Math.round(62 - 8 * t)}%)`;
  });
}

function exactName(q) {
  const m = /^\^(.*)\$$/.exec(q || '');
  return m ? m[1].replace(/\\(.)/g, '$1') : null;
}

function highlight(name) {
  state.q = '^' + escapeRegExp(name) + '$';
  $('search').value = state.q;
  writeHash();
  applySearch();
  renderTop();
}

function applySearch() {
  const info = $('match-info');
  if (!flame.f) return;
  if (!state.q) {
    flame.setSearch(null);
    info.textContent = '';
    ui.match = null;
    return;
  }
  let re;
  try { re = new RegExp(state.q, 'i'); } catch { re = null; }
  const needle = state.q.toLowerCase();
  const r = flame.setSearch(re ? (n) => re.test(n) : (n) => n.toLowerCase().includes(needle));
  ui.match = r;
  info.textContent = r.count
    ? `${r.count} frame${r.count > 1 ? 's' : ''} · ${pct(r.share)} of total${flame.zoom ? ` · ${pct(r.shareOfZoom)} of zoom` : ''}`
    : 'no match';
}

function openSandwich(name) {
  if (!name) return;
  state.fn = name;
  state.tab = 'sandwich';
  writeHash();
  renderTabs();
  $('tab-sandwich').scrollIntoView({ block: 'nearest' });
}

function renderTabs() {
  for (const b of document.querySelectorAll('.tabs button')) b.classList.toggle('active', b.dataset.tab === state.tab);
  $('tab-top').hidden = state.tab !== 'top';
  $('tab-sandwich').hidden = state.tab !== 'sandwich';
  $('tab-waits').hidden = state.tab !== 'waits';
  $('tab-requests').hidden = state.tab !== 'requests';
  if (state.tab === 'sandwich') renderSandwich();
  if (state.tab === 'waits') loadWaits();
  if (state.tab === 'requests') loadRequests();
}

async function loadRequests() {
  $('tab-info').textContent = '';
  if (!state.service) return requestsPanel.clear();
  const seq = reloadSeq;
  const { requests, ...params } = selParams(null);
  try {
    await requestsPanel.load(params);
  } catch (e) {
    if (seq !== reloadSeq) return;
    requestsPanel.clear();
    showError(e, $('requests-stats'));
  }
}

function openWaits(name) {
  state.wfn = name;
  state.tab = 'waits';
  writeHash();
  renderTabs();
}

async function loadWaits() {
  $('waits-fn').value = state.wfn;
  $('tab-info').textContent = '';
  if (!state.service) return waitsPanel.clear();
  const seq = reloadSeq;
  try {
    await waitsPanel.load(selParams(lastKinds), state.wfn);
  } catch (e) {
    if (seq !== reloadSeq) return;
    waitsPanel.clear();
    showError(e, $('waits-stats'));
  }
}

function renderSandwich() {
  if (state.tab !== 'sandwich' || !flame.f) return;
  $('sandwich-fn').value = state.fn;
  if (!state.fn) return;
  const s = sandwich(flame.f, state.fn);
  ui.sandwichTrees = s;
  callersG.setData(flatten(s.callers));
  calleesG.setData(flatten(s.callees));
  $('tab-info').textContent = s.callers.value ? `${state.fn}: ${fmtValue(s.callers.value, s.callers.kind)} (${pct(s.callers.value / (flame.f.total[0] || 1))} of total)` : `${state.fn}: not in the graph`;
}

function updateExports() {
  const kinds = lastKinds;
  const p = (extra) => new URLSearchParams({ ...selParams(kinds), ...extra }).toString();
  $('export-svg').href = '/api/v1/svg?' + p({ title: `${state.service} ${state.from}..${state.until}` });
  $('export-folded').href = '/api/v1/folded?' + p({});
  $('export-pprof').href = '/api/v1/pprof?' + p({});
  const safe = (state.service || 'profile').replace(/[^\w.-]+/g, '_');
  $('export-svg').setAttribute('download', `${safe}.svg`);
  $('export-folded').setAttribute('download', `${safe}.folded.txt`);
  $('export-pprof').setAttribute('download', `${safe}.pb.gz`);
}

// ---------------------------------------------------------------- start

async function main() {
  readHash();
  setupWidgets();
  syncControls();
  const hasRange = new URLSearchParams(location.hash.replace(/^#/, '')).has('from');
  await Promise.all([loadServices(), hasRange || state.page === 'deep' ? null : defaultRange()]);
  if (state.page === 'flame' && !state.service && services.length) state.service = services[0];
  writeHash();
  syncControls();
  await reload();
}

main().catch((e) => showError(e, $('flame-status')));
