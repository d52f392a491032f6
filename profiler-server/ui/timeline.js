// Timeline: stacked per-kind time (as average busy threads per step) on a
// canvas; drag to select a range; events (deploys) as markers to click.

import { kindColor, fmtTime, fmtNs, el } from './util.js';


const H = 120, PAD_L = 46, PAD_B = 18, PAD_T = 6;

export function kindOrder(a, b) {
  const rank = (k) => (k === 'on-cpu' ? 0 : k.startsWith('off-cpu:idle') ? 2 : k.startsWith('off-cpu') ? 1 : 3);
  return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
}

export class Timeline {
  constructor(host, legend, { onSelect, onMarker, tooltip } = {}) {
    this.tooltip = tooltip;
    this.onMarker = onMarker;
    this.markers = []; // [{at, label, title, color}]
    this.host = host;
    this.legend = legend;
    this.onSelect = onSelect;
    this.canvas = el('canvas', { class: 'timeline-canvas' });
    host.append(this.canvas);
    this.ctx = this.canvas.getContext('2d');
    this.data = null;
    this.active = null; // Set of kinds included in the graph
    this.overlays = []; // [{from, until, color, label}]
    this.drag = null;
    this.canvas.addEventListener('mousedown', (e) => {
      if (!this.data) return;
      this.drag = { x0: this.mx(e), x1: this.mx(e) };
      this.draw();
    });
    this.canvas.addEventListener('mousemove', (e) => this.hoverTip(e));
    this.canvas.addEventListener('mouseleave', () => { if (this.tooltip) this.tooltip.hidden = true; });
    window.addEventListener('mousemove', (e) => {
      if (!this.drag) return;
      this.drag.x1 = this.mx(e);
      this.draw();
    });
    window.addEventListener('mouseup', () => {
      if (!this.drag) return;
      const { x0, x1 } = this.drag;
      this.drag = null;
      this.draw();
      if (Math.abs(x1 - x0) < 3) {
        const m = this.markerAt(x0);
        if (m) this.onMarker?.(m);
        return;
      }
      const a = this.t(Math.min(x0, x1)), b = this.t(Math.max(x0, x1));
      this.onSelect?.(Math.round(a), Math.round(b));
    });
    this.ro = new ResizeObserver(() => requestAnimationFrame(() => this.draw()));
    this.ro.observe(host);
  }

  mx(e) {
    const r = this.canvas.getBoundingClientRect();
    return Math.max(PAD_L, Math.min(r.width, e.clientX - r.left));
  }

  t(x) {
    const W = this.host.clientWidth;
    const { from, until } = this.data;
    return from + ((x - PAD_L) / (W - PAD_L)) * (until - from);
  }

  px(t) {
    const W = this.host.clientWidth;
    const { from, until } = this.data;
    return PAD_L + ((t - from) / (until - from)) * (W - PAD_L);
  }

  /** The marker drawn within a few pixels of x, if any. */
  markerAt(x) {
    if (!this.data) return null;
    return this.markers.find((m) => Math.abs(this.px(m.at) - x) <= 4) || null;
  }

  setMarkers(m) {
    this.markers = m;
    this.draw();
  }

  /** Tooltip: the marker under the mouse, or the step under it, per kind. */
  hoverTip(e) {
    const tip = this.tooltip;
    if (!tip || !this.data || this.drag) return;
    const marker = this.markerAt(this.mx(e));
    if (marker) {
      tip.textContent = '';
      tip.append(el('div', { class: 'tt-name', text: marker.label }), el('div', { text: marker.title }));
      if (this.onMarker) tip.append(el('div', { class: 'tt-hint', text: 'click for its changes' }));
      tip.hidden = false;
      tip.style.left = e.clientX + 14 + 'px';
      tip.style.top = e.clientY + 14 + 'px';
      return;
    }
    const { from, step, series } = this.data;
    const i = Math.floor((this.t(this.mx(e)) - from) / step);
    const rows = this.kinds.filter((k) => series[k][i]);
    tip.textContent = '';
    tip.append(el('div', { class: 'tt-name', text: `${fmtTime(from + i * step)} (+${fmtNs(step * 1e6)})` }));
    for (const k of rows) tip.append(el('div', {}, el('span', { style: `color:${kindColor(k)}`, text: '■ ' }), `${k}: ${fmtNs(series[k][i])}`));
    if (!rows.length) tip.append(el('div', { class: 'tt-hint', text: 'no samples' }));
    tip.append(el('div', { class: 'tt-hint', text: 'drag to select a range' }));
    tip.hidden = false;
    const x = e.clientX + 14 + tip.offsetWidth > window.innerWidth ? e.clientX - tip.offsetWidth - 14 : e.clientX + 14;
    tip.style.left = x + 'px';
    tip.style.top = e.clientY + 14 + 'px';
  }

  setData(data, active) {
    this.data = data;
    this.active = active;
    this.kinds = Object.keys(data.series).sort(kindOrder);
    this.draw();
    this.renderLegend();
  }

  setOverlays(o) {
    this.overlays = o;
    this.draw();
  }

  renderLegend() {
    if (!this.legend) return;
    this.legend.textContent = '';
    for (const k of this.kinds) {
      const total = this.data.series[k].reduce((a, b) => a + b, 0);
      const on = !this.active || this.active.has(k);
      this.legend.append(el('span', { class: 'legend-item' + (on ? '' : ' off'), title: on ? 'in the graph' : 'not in the graph (kind filter)' },
        el('i', { style: `background:${kindColor(k)}` }), `${k} ${fmtNs(total)}`));
    }
    if (!this.kinds.length) this.legend.append(el('span', { class: 'muted', text: 'no data in this range' }));
  }

  draw() {
    const dpr = window.devicePixelRatio || 1;
    const W = Math.max(100, this.host.clientWidth);
    if (this.canvas.width !== Math.round(W * dpr)) {
      this.canvas.width = Math.round(W * dpr);
      this.canvas.height = Math.round(H * dpr);
      this.canvas.style.width = W + 'px';
      this.canvas.style.height = H + 'px';
    }
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    if (!this.data) return;
    const { from, until, step, series } = this.data;
    const n = Math.max(...this.kinds.map((k) => series[k].length), 0);
    // Average busy threads: ns per step / step.
    const stepNs = step * 1e6;
    const sums = new Float64Array(n);
    for (const k of this.kinds) series[k].forEach((v, i) => (sums[i] += v / stepNs));
    let max = 0;
    for (const s of sums) max = Math.max(max, s);
    max = max > 0 ? niceCeil(max) : 1;
    const plotH = H - PAD_B - PAD_T;
    const yOf = (v) => PAD_T + plotH - (v / max) * plotH;
    // grid + axes
    ctx.strokeStyle = '#e4e4e4';
    ctx.fillStyle = '#666';
    ctx.font = '10px sans-serif';
    ctx.textBaseline = 'middle';
    for (const f of [0, 0.5, 1]) {
      const y = yOf(max * f);
      ctx.beginPath();
      ctx.moveTo(PAD_L, y + 0.5);
      ctx.lineTo(W, y + 0.5);
      ctx.stroke();
      ctx.fillText(fmtThreads(max * f), 2, y);
    }
    ctx.textBaseline = 'top';
    const ticks = Math.max(2, Math.floor((W - PAD_L) / 140));
    for (let i = 0; i <= ticks; i++) {
      const t = from + ((until - from) * i) / ticks;
      const label = fmtTime(t).slice(until - from > 86400e3 ? 5 : 11, 16);
      const x = this.px(t);
      ctx.fillText(label, Math.min(W - 30, Math.max(PAD_L, x - 14)), H - PAD_B + 4);
    }
    // stacked bars
    const acc = new Float64Array(n);
    for (const k of this.kinds) {
      ctx.fillStyle = kindColor(k);
      ctx.globalAlpha = !this.active || this.active.has(k) ? 0.9 : 0.25;
      const s = series[k];
      for (let i = 0; i < s.length; i++) {
        if (!s[i]) continue;
        const v = s[i] / stepNs;
        const x0 = this.px(from + i * step), x1 = this.px(Math.min(until, from + (i + 1) * step));
        const y0 = yOf(acc[i]), y1 = yOf(acc[i] + v);
        ctx.fillRect(x0, y1, Math.max(1, x1 - x0 - 0.3), y0 - y1);
        acc[i] += v;
      }
    }
    ctx.globalAlpha = 1;
    for (const o of this.overlays) {
      if (o.until <= from || o.from >= until) continue;
      const x0 = this.px(Math.max(from, o.from)), x1 = this.px(Math.min(until, o.until));
      ctx.fillStyle = o.color;
      ctx.fillRect(x0, PAD_T, x1 - x0, plotH);
      if (o.label) {
        ctx.fillStyle = '#333';
        ctx.fillText(o.label, x0 + 3, PAD_T + 2);
      }
    }
    ctx.setLineDash([3, 2]);
    for (const m of this.markers) {
      if (m.at < from || m.at >= until) continue;
      const x = Math.round(this.px(m.at)) + 0.5;
      ctx.strokeStyle = m.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.moveTo(x, PAD_T);
      ctx.lineTo(x, PAD_T + plotH);
      ctx.stroke();
      ctx.fillStyle = m.color;
      ctx.fillText(m.label, Math.min(W - 40, x + 3), PAD_T + 12);
    }
    ctx.setLineDash([]);
    ctx.lineWidth = 1;
    if (this.drag) {
      const a = Math.min(this.drag.x0, this.drag.x1), b = Math.max(this.drag.x0, this.drag.x1);
      ctx.fillStyle = 'rgba(60,120,220,0.2)';
      ctx.fillRect(a, PAD_T, b - a, plotH);
      ctx.strokeStyle = 'rgba(60,120,220,0.9)';
      ctx.strokeRect(a + 0.5, PAD_T + 0.5, b - a, plotH);
    }
  }
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmtThreads(v) {
  return (v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)) + ' thr';
}
