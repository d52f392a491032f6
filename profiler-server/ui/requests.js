// Slowest requests panel: requests named by the application's custom labels
// (`request_id`, `trace_id`, ...), ranked by total time (`/api/v1/requests`), with a
// button that turns the flame graph into the diff of the slowest share against the rest.

import { getJson, fmtNs, fmtTime, el } from './util.js';

export class RequestsPanel {
  /**
   * @param {HTMLElement} stats text line, @param {HTMLElement} table its tbody,
   * @param {object} opts {onDiff(percent)}: show the slowest `percent` against the rest
   */
  constructor(stats, tbody, opts = {}) {
    this.stats = stats;
    this.tbody = tbody;
    this.opts = opts;
    this.last = null;
  }

  async load(params) {
    const r = await getJson('/api/v1/requests', { ...params, limit: 50 });
    this.last = r;
    this.render(r);
    return r;
  }

  clear(text = '') {
    this.last = null;
    this.stats.textContent = text;
    this.tbody.textContent = '';
  }

  render(r) {
    this.tbody.textContent = '';
    if (!r.count) {
      this.stats.textContent = 'No requests in this range: the application labels none (custom labels request_id, trace_id or span_id).';
      return;
    }
    const t = r.total_ns;
    const diff = el('button', { id: 'requests-diff', text: 'Diff: slowest 1% against the rest' });
    diff.onclick = () => this.opts.onDiff?.(1);
    this.stats.textContent = `${r.count.toLocaleString('en-US')} requests · total time p50 ${fmtNs(t.p50)} · p90 ${fmtNs(t.p90)} · p99 ${fmtNs(t.p99)} · max ${fmtNs(t.max)} `;
    this.stats.append(diff);
    for (const q of r.requests) {
      const off = Object.entries(q.off_cpu_ns).sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${fmtNs(v)}`).join(', ');
      const labels = Object.entries(q.labels).filter(([k]) => !['host', 'kernel', 'cpus', 'build_id'].includes(k)).map(([k, v]) => `${k}=${v}`).join(' ');
      this.tbody.append(el('tr', {},
        el('td', { text: `${q.key}=${q.value}` }),
        el('td', { class: 'num', text: fmtNs(q.total_ns) }),
        el('td', { class: 'num', text: fmtNs(q.on_cpu_ns) }),
        el('td', { text: off || '—' }),
        el('td', { text: labels }),
        el('td', { text: fmtTime(q.first_ms) }),
      ));
    }
  }
}
