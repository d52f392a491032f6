// Fleet overview, the home page: one row per service over the selected range (from
// /api/v1/overview) with on-CPU cores, off-CPU threads waiting per reason, hosts, last
// seen and a sparkline. Search and sort live in the URL (app.js keeps them in its
// state); a click on a row opens that service's flame graph.

import { getJson, fmtTime, el, kindColor } from './util.js';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

/** Column -> how rows compare; numbers sort heaviest first unless reversed. */
const COLUMNS = {
  service: { key: (s) => s.service, numeric: false },
  cpu: { key: (s) => s.on_cpu_cores, numeric: true },
  off: { key: (s) => s.off_cpu_threads, numeric: true },
  hosts: { key: (s) => s.hosts, numeric: true },
  last: { key: (s) => s.last_seen, numeric: true },
};

/** Cores or threads with about three significant digits. */
export function fmtRate(x) {
  if (!x) return '0';
  if (x < 0.001) return '<0.001';
  if (x >= 100) return x.toFixed(0);
  if (x >= 10) return x.toFixed(1);
  if (x >= 1) return x.toFixed(2);
  return x.toPrecision(3);
}

function fmtAgo(ms, now = Date.now()) {
  const s = Math.max(0, (now - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400 * 2) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

/** On-CPU as a warm area, off-CPU as a cool line, on one scale per row. */
function sparkline(on, off) {
  const w = 120, h = 22;
  const max = Math.max(1e-12, ...on, ...off);
  const pts = (v) => v.map((x, i) => `${((i / Math.max(1, v.length - 1)) * w).toFixed(1)},${(h - 1 - (x / max) * (h - 2)).toFixed(1)}`).join(' ');
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('width', w);
  svg.setAttribute('height', h);
  svg.setAttribute('class', 'spark');
  const area = document.createElementNS(SVG, 'polygon');
  area.setAttribute('points', `0,${h - 1} ${pts(on)} ${w},${h - 1}`);
  area.setAttribute('fill', kindColor('on-cpu'));
  area.setAttribute('fill-opacity', '0.55');
  const line = document.createElementNS(SVG, 'polyline');
  line.setAttribute('points', pts(off));
  line.setAttribute('fill', 'none');
  line.setAttribute('stroke', kindColor('off-cpu:blocked-io'));
  line.setAttribute('stroke-width', '1.2');
  svg.append(area, line);
  return svg;
}

/** Total threads waiting, with a bar split by reason. */
function offCpuCell(s) {
  const reasons = Object.entries(s.off_cpu).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]);
  const title = reasons.map(([r, v]) => `${r}: ${fmtRate(v)} threads waiting on average`).join('\n');
  const bar = el('span', { class: 'split' });
  for (const [r, v] of reasons) {
    bar.append(el('i', { style: `width:${Math.max(1, Math.round((v / s.off_cpu_threads) * 40))}px;background:${kindColor('off-cpu:' + r)}` }));
  }
  const top = reasons[0] ? el('span', { class: 'muted small', text: ` ${reasons[0][0]}` }) : null;
  return el('td', { class: 'num', title: title || 'no off-CPU data' }, bar, fmtRate(s.off_cpu_threads), top);
}

export class Overview {
  /**
   * `state` holds `osort` (column), `odir` ('asc' | 'desc') and `oq` (search); `onOpen`
   * opens a service; `onSortOrSearch` persists the state.
   */
  constructor({ state, onOpen, onSortOrSearch }) {
    this.state = state;
    this.onOpen = onOpen;
    this.onSortOrSearch = onSortOrSearch;
    this.data = null;
    this.shown = [];
    let timer;
    $('overview-search').oninput = (e) => {
      clearTimeout(timer);
      timer = setTimeout(() => { this.state.oq = e.target.value; this.onSortOrSearch(); this.render(); }, 100);
    };
    for (const th of document.querySelectorAll('#overview-table th[data-col]')) {
      th.onclick = () => {
        const col = th.dataset.col;
        if (this.state.osort === col) this.state.odir = this.state.odir === 'asc' ? 'desc' : 'asc';
        else { this.state.osort = col; this.state.odir = COLUMNS[col].numeric ? 'desc' : 'asc'; }
        this.onSortOrSearch();
        this.render();
      };
    }
  }

  /** Fetches the range; throws what the server said. */
  async load(from, until) {
    this.data = await getJson('/api/v1/overview', { from, until });
    this.render();
  }

  clear(message) {
    this.data = null;
    this.shown = [];
    $('overview-table').querySelector('tbody').textContent = '';
    $('overview-info').textContent = message;
  }

  render() {
    if ($('overview-search').value !== this.state.oq) $('overview-search').value = this.state.oq;
    for (const th of document.querySelectorAll('#overview-table th[data-col]')) {
      th.classList.toggle('sorted', th.dataset.col === this.state.osort);
      th.classList.toggle('asc', th.dataset.col === this.state.osort && this.state.odir === 'asc');
    }
    if (!this.data) return;
    const q = this.state.oq.toLowerCase();
    const col = COLUMNS[this.state.osort] || COLUMNS.cpu;
    const sign = this.state.odir === 'asc' ? 1 : -1;
    const rows = this.data.services.filter((s) => s.service.toLowerCase().includes(q));
    rows.sort((a, b) => {
      const x = col.key(a), y = col.key(b);
      const c = col.numeric ? x - y : x < y ? -1 : x > y ? 1 : 0;
      return sign * c || (a.service < b.service ? -1 : 1);
    });
    this.shown = rows;
    const now = Date.now();
    const tbody = $('overview-table').querySelector('tbody');
    const frag = document.createDocumentFragment();
    for (const s of rows) {
      const open = () => this.onOpen(s.service);
      frag.append(el('tr', { 'data-service': s.service, onclick: open, title: `open the flame graph of ${s.service}` },
        el('td', { class: 'svc' }, el('a', { href: this.flameHash(s.service), text: s.service, onclick: (e) => e.preventDefault() })),
        el('td', { class: 'num', title: `${s.on_cpu_cores} cores busy on average` }, el('span', { class: 'bar', style: `width:${Math.round(Math.min(1, s.on_cpu_cores / this.maxCores()) * 60)}px` }), fmtRate(s.on_cpu_cores)),
        offCpuCell(s),
        el('td', { class: 'num', title: s.host_names.join('\n') + (s.hosts > s.host_names.length ? `\n… ${s.hosts - s.host_names.length} more` : ''), text: String(s.hosts) }),
        el('td', { class: 'nowrap', title: fmtTime(s.last_seen), text: fmtAgo(s.last_seen, now) }),
        el('td', {}, sparkline(s.on_cpu_series, s.off_cpu_series)),
      ));
    }
    tbody.textContent = '';
    tbody.append(frag);
    if (!rows.length) {
      tbody.append(el('tr', {}, el('td', { colspan: 6, class: 'muted', text: this.data.services.length ? 'no service matches the search' : 'no service sent profiles in this range' })));
    }
    const total = this.data.services.length;
    const cores = this.data.services.reduce((a, s) => a + s.on_cpu_cores, 0);
    $('overview-info').textContent = `${rows.length === total ? total : `${rows.length} of ${total}`} services · ${fmtRate(cores)} cores on-CPU in all`;
  }

  /** A link for a new tab: the service's flame graph over the same range. */
  flameHash(service) {
    return '#' + new URLSearchParams({ service, page: 'flame', from: this.state.from, until: this.state.until }).toString();
  }

  maxCores() {
    if (this._maxFor !== this.data) {
      this._maxFor = this.data;
      this._max = Math.max(1e-12, ...this.data.services.map((s) => s.on_cpu_cores));
    }
    return this._max;
  }
}
