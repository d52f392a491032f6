// Wait-duration panel: how long the individual off-CPU waits under a function
// lasted (`/api/v1/waits`), as percentiles and a histogram of log-spaced buckets.

import { getJson, fmtNs, el, escapeRegExp } from './util.js';

const SVG = 'http://www.w3.org/2000/svg';

export class WaitsPanel {
  /** @param {HTMLElement} stats text line, @param {HTMLElement} chart histogram container */
  constructor(stats, chart) {
    this.stats = stats;
    this.chart = chart;
    this.last = null;
  }

  /** Loads the waits of the stacks through `fn` (every off-CPU wait when empty). */
  async load(params, fn) {
    const q = { ...params };
    if (fn) q.frame = '^' + escapeRegExp(fn) + '$';
    const r = await getJson('/api/v1/waits', q);
    this.last = r;
    this.render(r, fn);
    return r;
  }

  clear(text = '') {
    this.last = null;
    this.stats.textContent = text;
    this.chart.textContent = '';
  }

  render(r, fn) {
    const who = fn ? `under ${fn}` : 'all off-CPU waits';
    if (!r.count) {
      this.clear(`No recorded waits ${who} in this range (on-CPU frames have none).`);
      return;
    }
    const n = r.count >= 100 ? Math.round(r.count).toLocaleString('en-US') : r.count.toFixed(1);
    this.stats.textContent = `${n} waits ${who} · p50 ${fmtNs(r.p50_ns)} · p95 ${fmtNs(r.p95_ns)} · p99 ${fmtNs(r.p99_ns)} · max ≤ ${fmtNs(r.max_ns)}`;
    this.chart.textContent = '';
    const buckets = r.buckets;
    const W = Math.max(this.chart.clientWidth || 0, 600), H = 160, pad = 18;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', W);
    svg.setAttribute('height', H + pad);
    // x: log of the duration over the range with waits; y: count, square-root scaled so a
    // 1% tail stays visible next to the bulk.
    const lo = Math.log(buckets[0].le_ns / 1.1), hi = Math.log(buckets[buckets.length - 1].le_ns);
    const x = (ns) => ((Math.log(ns) - lo) / Math.max(hi - lo, 1e-9)) * (W - 20) + 10;
    const top = Math.sqrt(Math.max(...buckets.map((b) => b.count)));
    for (const b of buckets) {
      const x0 = x(b.le_ns / 1.1), x1 = x(b.le_ns);
      const h = Math.max((Math.sqrt(b.count) / top) * H, 1);
      const rect = document.createElementNS(SVG, 'rect');
      rect.setAttribute('x', x0);
      rect.setAttribute('y', H - h);
      rect.setAttribute('width', Math.max(x1 - x0 - 1, 2));
      rect.setAttribute('height', h);
      rect.setAttribute('class', 'wait-bar');
      rect.dataset.le = b.le_ns;
      const title = document.createElementNS(SVG, 'title');
      title.textContent = `${fmtNs(b.le_ns / 1.1)} – ${fmtNs(b.le_ns)}: ${b.count} waits`;
      rect.append(title);
      svg.append(rect);
    }
    for (const [name, ns] of [['p50', r.p50_ns], ['p99', r.p99_ns]]) {
      const line = document.createElementNS(SVG, 'line');
      line.setAttribute('x1', x(ns)); line.setAttribute('x2', x(ns));
      line.setAttribute('y1', 0); line.setAttribute('y2', H);
      line.setAttribute('class', `wait-mark wait-${name}`);
      const label = document.createElementNS(SVG, 'text');
      const right = x(ns) > W / 2;
      label.setAttribute('x', x(ns) + (right ? -3 : 3)); label.setAttribute('y', H + 13);
      if (right) label.setAttribute('text-anchor', 'end');
      label.textContent = `${name} ${fmtNs(ns)}`;
      svg.append(line, label);
    }
    this.chart.append(svg, el('div', { class: 'muted small', text: 'bar height: √count; buckets 10% wide (values within 4.8%)' }));
  }
}
