// Changes view: the functions that changed between the base and the target range
// (/api/v1/changes: one test per function and kind over the observations of each side,
// false-discovery rate held over all of them), regressions first. Each row has a
// sparkline of the tested measure over the base (grey) and the target (coloured); a
// click opens the diff flame graph with that function highlighted.

import { getJson, el, kindColor, pct } from './util.js';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';

/** Cores or threads: time per second of wall time. */
function fmtRate(x) {
  const a = Math.abs(x);
  if (!a) return '0';
  if (a < 0.001) return (x < 0 ? '-' : '') + '<0.001';
  return x.toPrecision(a >= 1 ? 3 : 2);
}

/** The tested measure of a change, as the table shows it. */
function fmtMeasure(c, side) {
  return c.metric === 'share' ? pct(c[`${side}_share`]) : fmtRate(c[`${side}_rate`]);
}

function fmtDelta(c) {
  if (c.metric === 'share') {
    const d = (c.target_share - c.base_share) * 100;
    return `${d >= 0 ? '+' : ''}${d.toFixed(2)} pt`;
  }
  return `${c.delta_rate >= 0 ? '+' : ''}${fmtRate(c.delta_rate)}`;
}

/** Base observations in grey, then the target's in the kind's colour, one scale. */
function sparkline(c) {
  const w = 140, h = 22;
  const all = [...c.base_series, ...c.target_series];
  const max = Math.max(1e-12, ...all);
  const n = Math.max(1, all.length - 1);
  const point = (v, i) => `${((i / n) * w).toFixed(1)},${(h - 1 - (v / max) * (h - 2)).toFixed(1)}`;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('width', w);
  svg.setAttribute('height', h);
  svg.setAttribute('class', 'spark');
  const line = (values, offset, color) => {
    const l = document.createElementNS(SVG, 'polyline');
    l.setAttribute('points', values.map((v, i) => point(v, i + offset)).join(' '));
    l.setAttribute('fill', 'none');
    l.setAttribute('stroke', color);
    l.setAttribute('stroke-width', '1.3');
    return l;
  };
  const split = document.createElementNS(SVG, 'line');
  const x = ((c.base_series.length - 0.5) / n) * w;
  for (const [k, v] of [['x1', x], ['x2', x], ['y1', 0], ['y2', h]]) split.setAttribute(k, v);
  split.setAttribute('stroke', '#ccc');
  svg.append(split, line(c.base_series, 0, '#999'), line(c.target_series, c.base_series.length, kindColor(c.kind)));
  return svg;
}

export class ChangesView {
  /** `state.sig` ('1': significant only) lives in the URL; `onOpen(change)` opens its diff. */
  constructor({ state, onOpen, onToggle }) {
    this.state = state;
    this.onOpen = onOpen;
    this.data = null;
    $('changes-significant').onchange = (e) => { state.sig = e.target.checked ? '1' : '0'; onToggle(); this.render(); };
  }

  async load(params) {
    this.data = await getJson('/api/v1/changes', params);
    this.render();
    return this.data;
  }

  clear() {
    this.data = null;
    $('changes-table').querySelector('tbody').textContent = '';
    $('changes-info').textContent = '';
  }

  render() {
    $('changes-significant').checked = this.state.sig === '1';
    if (!this.data) return;
    const all = this.data.changes;
    const significant = all.filter((c) => c.significant);
    const rows = this.state.sig === '1' ? significant : all;
    const tbody = $('changes-table').querySelector('tbody');
    tbody.textContent = '';
    for (const c of rows) {
      const up = c.direction === 'regression';
      tbody.append(el('tr', { class: c.significant ? (up ? 'grew' : 'shrank') : 'noise', 'data-fn': c.function, 'data-kind': c.kind, onclick: () => this.onOpen(c), title: 'open the diff flame graph with this function highlighted' },
        el('td', { class: 'dir', text: c.significant ? (up ? '▲' : '▼') : '·' }),
        el('td', {}, el('i', { class: 'kind-dot', style: `background:${kindColor(c.kind)}` }), c.kind),
        el('td', { class: 'fn', text: c.function }),
        el('td', { text: c.measure }),
        el('td', { class: 'num', text: fmtMeasure(c, 'base') }),
        el('td', { class: 'num', text: fmtMeasure(c, 'target') }),
        el('td', { class: 'num delta', text: fmtDelta(c) }),
        el('td', { class: 'num', text: c.q < 0.001 ? '<0.001' : c.q.toFixed(3) }),
        el('td', {}, sparkline(c)),
      ));
    }
    if (!rows.length) {
      tbody.append(el('tr', {}, el('td', { colspan: 9, class: 'muted', text: all.length ? 'no significant change: the differences are within the noise between windows' : 'nothing to compare in these ranges' })));
    }
    const [nb, nt] = this.data.observations;
    $('changes-info').textContent = `${significant.length} significant of ${this.data.tested} tested · ${nb} base and ${nt} target observations`;
  }
}
