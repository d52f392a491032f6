// Canvas flame graph: the tree is flattened once into pre-order typed arrays
// (subtree end indices let the renderer skip whole sub-pixel or off-screen
// subtrees), so 50k+ node graphs draw in a few milliseconds.

import { frameColor, kindColor, fmtValue, pct, el } from './util.js';

const ROW = 18;
const FONT = '11px ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace';
const MIN_W = 0.35; // px: narrower frames (and their subtrees) are skipped

/** Pre-order flattening of a {name,value,self,kind?,base?,base_self?,children} tree. */
export function flatten(root, { diff = false, defaultKind = null } = {}) {
  // Count first so the typed arrays are allocated once.
  let n = 0;
  const stack = [root];
  while (stack.length) {
    const t = stack.pop();
    n++;
    for (let i = 0; i < t.children.length; i++) stack.push(t.children[i]);
  }
  const f = {
    n,
    diff,
    name: new Array(n),
    kind: new Array(n),
    depth: new Uint16Array(n),
    parent: new Int32Array(n),
    end: new Int32Array(n),
    x: new Float64Array(n),
    w: new Float64Array(n),
    total: new Float64Array(n),
    self: new Float64Array(n),
    base: new Float64Array(n),
    baseSelf: new Float64Array(n),
    maxDepth: 0,
  };
  // Iterative DFS: [node, depth, parent, x, kind]
  let i = 0;
  const st = [[root, 0, -1, 0, root.kind || defaultKind]];
  const open = []; // indices whose end is pending, by depth
  while (st.length) {
    const [t, d, p, x, kind] = st.pop();
    while (open.length > d) f.end[open.pop()] = i;
    const k = t.kind || kind;
    f.name[i] = t.name;
    f.kind[i] = k;
    f.depth[i] = d;
    f.parent[i] = p;
    f.x[i] = x;
    f.total[i] = t.value;
    f.self[i] = t.self;
    if (diff) {
      f.base[i] = t.base || 0;
      f.baseSelf[i] = t.base_self || 0;
    }
    f.w[i] = diff ? Math.abs(t.value) + Math.abs(t.base || 0) : t.value;
    if (d > f.maxDepth) f.maxDepth = d;
    open.push(i);
    // Children left to right: push in reverse so the first pops first.
    let cx = x;
    const kids = [];
    for (const c of t.children) {
      kids.push([c, d + 1, i, cx, k]);
      cx += diff ? Math.abs(c.value) + Math.abs(c.base || 0) : c.value;
    }
    for (let j = kids.length - 1; j >= 0; j--) st.push(kids[j]);
    i++;
  }
  while (open.length) f.end[open.pop()] = i;
  return f;
}

export class FlameGraph {
  /**
   * @param {HTMLElement} host container (gets a canvas)
   * @param {object} opts {onZoom(path), onSelect(i, event), breadcrumb: HTMLElement, tooltip: HTMLElement}
   */
  constructor(host, opts = {}) {
    this.host = host;
    this.opts = opts;
    this.canvas = el('canvas', { class: 'flame-canvas' });
    host.append(this.canvas);
    this.ctx = this.canvas.getContext('2d', { alpha: false });
    this.f = null;
    this.zoom = 0;
    this.view = [0, 1];
    this.icicle = false;
    this.match = null;
    this.diffThreshold = 0.001;
    this.hover = -1;
    this.colors = null;
    this.drawn = 0;
    this.perf = { draws: [], zoomFrames: [] };
    this.anim = null;
    this.canvas.addEventListener('mousemove', (e) => this.onMove(e));
    this.canvas.addEventListener('mouseleave', () => this.setHover(-1, null));
    this.canvas.addEventListener('click', (e) => {
      const i = this.hit(e);
      if (i < 0) return;
      if (e.shiftKey || e.altKey) this.opts.onSelect?.(i, e);
      else this.zoomTo(i);
    });
    this.ro = new ResizeObserver(() => requestAnimationFrame(() => this.draw()));
    this.ro.observe(host);
  }

  /** Zoom out one level (Escape / Backspace in the app). */
  zoomOut() {
    if (this.f && this.zoom > 0) this.zoomTo(this.f.parent[this.zoom]);
  }

  setData(f) {
    this.f = f;
    this.colors = new Array(f.n);
    this.match = null;
    this.zoom = 0;
    this.view = [0, f.w[0] || 1];
    this.hover = -1;
    this.draw();
    this.updateBreadcrumb();
  }

  setIcicle(on) {
    this.icicle = on;
    this.draw();
  }

  setDiffThreshold(t) {
    this.diffThreshold = t;
    this.colors = this.f ? new Array(this.f.n) : null;
    this.draw();
  }

  /** by(i) -> a colour for frame i, or null for its usual one; null to clear. */
  setColorBy(by) {
    this.colorBy = by;
    this.colors = this.f ? new Array(this.f.n) : null;
    this.draw();
  }

  /** pred(name) -> bool, or null to clear. Returns {count, value, share, shareOfZoom}. */
  setSearch(pred) {
    const f = this.f;
    if (!f) return null;
    if (!pred) {
      this.match = null;
      this.draw();
      return null;
    }
    const m = new Uint8Array(f.n);
    let count = 0, value = 0, coveredUntil = 0, zoomValue = 0;
    const z = this.zoom, zEnd = f.end[z];
    for (let i = 0; i < f.n; i++) {
      if (!pred(f.name[i])) continue;
      m[i] = 1;
      count++;
      if (i >= coveredUntil) {
        // Outermost match: count its total once (nested matches are inside it).
        value += f.total[i];
        if (i >= z && i < zEnd) zoomValue += f.total[i];
        coveredUntil = f.end[i];
      }
    }
    // Ancestors of matches stay visible too.
    this.match = m;
    this.draw();
    const root = f.total[0] || 1;
    return { count, value, share: value / root, shareOfZoom: zoomValue / (f.total[z] || 1) };
  }

  path(i) {
    const p = [];
    for (let j = i; j > 0; j = this.f.parent[j]) p.push(this.f.name[j]);
    return p.reverse();
  }

  /** Node index for a root-first list of names (as far as it resolves). */
  find(path) {
    const f = this.f;
    let at = 0;
    for (const name of path) {
      let c = at + 1, found = -1;
      while (c < f.end[at]) {
        if (f.name[c] === name) { found = c; break; }
        c = f.end[c];
      }
      if (found < 0) break;
      at = found;
    }
    return at;
  }

  zoomTo(i, animate = true) {
    const f = this.f;
    if (!f) return;
    this.zoom = i;
    const target = [f.x[i], f.x[i] + Math.max(f.w[i], 1e-9)];
    this.updateBreadcrumb();
    this.opts.onZoom?.(this.path(i));
    if (!animate) {
      this.view = target;
      this.draw();
      return;
    }
    const from = this.view.slice();
    const t0 = performance.now();
    const dur = 260;
    this.perf.zoomFrames = [];
    if (this.anim) cancelAnimationFrame(this.anim);
    let last = t0;
    const step = (now) => {
      const t = Math.min(1, (now - t0) / dur);
      const e = t < 0.5 ? 2 * t * t : 1 - Math.pow(-2 * t + 2, 2) / 2;
      this.view = [from[0] + (target[0] - from[0]) * e, from[1] + (target[1] - from[1]) * e];
      const s = performance.now();
      this.draw();
      this.perf.zoomFrames.push({ draw: performance.now() - s, interval: now - last });
      last = now;
      if (t < 1) this.anim = requestAnimationFrame(step);
      else this.anim = null;
    };
    this.anim = requestAnimationFrame(step);
  }

  updateBreadcrumb() {
    const bc = this.opts.breadcrumb;
    if (!bc || !this.f) return;
    bc.textContent = '';
    const chain = [];
    for (let j = this.zoom; j >= 0; j = this.f.parent[j]) {
      chain.push(j);
      if (j === 0) break;
    }
    chain.reverse();
    chain.forEach((j, k) => {
      if (k) bc.append(el('span', { class: 'sep', text: '›' }));
      bc.append(el('button', {
        class: 'crumb' + (j === this.zoom ? ' current' : ''),
        text: j === 0 ? 'all' : this.f.name[j],
        title: 'zoom to ' + this.f.name[j],
        onclick: () => this.zoomTo(j),
      }));
    });
  }

  color(i) {
    const f = this.f;
    let c = this.colors[i];
    if (c) return c;
    const name = f.name[i];
    if (i === 0 && name === 'root') c = '#c9c9c9';
    else if (name === '[pruned]') c = '#d8d8d8';
    else if (f.diff) c = this.diffColor(i);
    else if (name.startsWith('[') && f.kind[i] && name === `[${f.kind[i]}]`) c = kindColor(f.kind[i]);
    else c = this.colorBy?.(i) || frameColor(f.kind[i], name);
    this.colors[i] = c;
    return c;
  }

  diffColor(i) {
    const f = this.f;
    const t = f.total[i], b = f.base[i];
    const scale = Math.max(Math.abs(f.total[0]), Math.abs(f.base[0])) || 1;
    const delta = t - b;
    if (Math.abs(delta) / scale < this.diffThreshold) return '#dcdcdc';
    const rel = Math.min(1, Math.abs(delta) / Math.max(Math.abs(t), Math.abs(b), 1));
    const light = 88 - 40 * Math.sqrt(rel);
    return delta > 0 ? `hsl(0,85%,${light}%)` : `hsl(215,85%,${light}%)`;
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, this.host.clientWidth);
    const h = this.f ? (this.f.maxDepth + 1) * ROW : ROW;
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(h * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
      this.canvas.style.width = w + 'px';
      this.canvas.style.height = h + 'px';
    }
    return { w, h, dpr };
  }

  y(d) {
    return this.icicle ? d * ROW : (this.f.maxDepth - d) * ROW;
  }

  draw() {
    const f = this.f;
    if (!f) return;
    const t0 = performance.now();
    const { w: W, h: H, dpr } = this.resize();
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = '#ffffff';
    ctx.fillRect(0, 0, W, H);
    ctx.font = FONT;
    ctx.textBaseline = 'middle';
    if (!this.charW) this.charW = ctx.measureText('mmmmmmmmmm').width / 10;
    const cw = this.charW;
    const [v0, v1] = this.view;
    const scale = W / (v1 - v0 || 1);
    const m = this.match;
    const zDepth = f.depth[this.zoom];
    let drawn = 0;
    const labels = [];
    let i = 0;
    while (i < f.n) {
      let px = (f.x[i] - v0) * scale;
      let pw = f.w[i] * scale;
      if (pw < MIN_W || px + pw < 0 || px > W) {
        i = f.end[i];
        continue;
      }
      if (px < 0) { pw += px; px = 0; }
      if (px + pw > W) pw = W - px;
      const y = this.y(f.depth[i]);
      let c;
      if (m && !m[i]) c = '#eeeeee';
      else if (m) c = '#e040fb';
      else c = this.color(i);
      ctx.fillStyle = f.depth[i] < zDepth && !m ? fade(c) : c;
      ctx.fillRect(px, y, Math.max(pw - (pw > 3 ? 0.5 : 0), 0.35), ROW - 1);
      drawn++;
      if (pw > cw * 3 + 6) labels.push(i, px, pw);
      i++;
    }
    ctx.fillStyle = '#000000';
    for (let k = 0; k < labels.length; k += 3) {
      const j = labels[k], px = labels[k + 1], pw = labels[k + 2];
      const max = Math.floor((pw - 6) / cw);
      let s = f.name[j];
      if (s.length > max) s = s.slice(0, Math.max(1, max - 1)) + '…';
      ctx.fillStyle = m && !m[j] ? '#999999' : '#000000';
      ctx.fillText(s, px + 3, this.y(f.depth[j]) + ROW / 2);
    }
    if (this.hover >= 0 && this.hover < f.n) {
      const px = Math.max(0, (f.x[this.hover] - v0) * scale);
      const pw = Math.min(W, (f.x[this.hover] + f.w[this.hover] - v0) * scale) - px;
      if (pw > 0) {
        ctx.strokeStyle = '#000';
        ctx.lineWidth = 1;
        ctx.strokeRect(px + 0.5, this.y(f.depth[this.hover]) + 0.5, Math.max(pw - 1, 1), ROW - 2);
      }
    }
    this.drawn = drawn;
    const dt = performance.now() - t0;
    this.perf.draws.push(dt);
    if (this.perf.draws.length > 200) this.perf.draws.shift();
    this.perf.lastDraw = dt;
  }

  /** Node under the mouse, or -1. */
  hit(e) {
    const f = this.f;
    if (!f) return -1;
    const r = this.canvas.getBoundingClientRect();
    const mx = e.clientX - r.left, my = e.clientY - r.top;
    const W = r.width;
    const d = this.icicle ? Math.floor(my / ROW) : f.maxDepth - Math.floor(my / ROW);
    if (d < 0 || d > f.maxDepth) return -1;
    const [v0, v1] = this.view;
    const X = v0 + (mx / W) * (v1 - v0);
    let at = 0;
    if (!(X >= f.x[0] && X < f.x[0] + f.w[0])) return -1;
    while (f.depth[at] < d) {
      let c = at + 1, found = -1;
      while (c < f.end[at]) {
        if (X >= f.x[c] && X < f.x[c] + f.w[c]) { found = c; break; }
        c = f.end[c];
      }
      if (found < 0) return -1;
      at = found;
    }
    return at;
  }

  onMove(e) {
    this.setHover(this.hit(e), e);
  }

  setHover(i, e) {
    const tip = this.opts.tooltip;
    if (i !== this.hover) {
      this.hover = i;
      this.draw();
    }
    if (!tip) return;
    if (i < 0 || !e) {
      tip.hidden = true;
      return;
    }
    tip.hidden = false;
    tip.textContent = '';
    for (const line of this.describe(i)) tip.append(el('div', { class: line[0] }, line[1]));
    const pad = 14;
    let x = e.clientX + pad, y = e.clientY + pad;
    const tw = tip.offsetWidth, th = tip.offsetHeight;
    if (x + tw > window.innerWidth) x = e.clientX - tw - pad;
    if (y + th > window.innerHeight) y = e.clientY - th - pad;
    tip.style.left = x + 'px';
    tip.style.top = y + 'px';
  }

  /** Tooltip lines [class, text]. */
  describe(i) {
    const f = this.f;
    const k = f.kind[i];
    const root = f.total[0] || 1;
    const zoomTotal = f.total[this.zoom] || 1;
    const out = [['tt-name', f.name[i]]];
    if (k) out.push(['tt-kind', k]);
    if (f.diff) {
      const t = f.total[i], b = f.base[i];
      out.push(['', `target: ${fmtValue(t, k)} (${pct(t / (f.total[0] || 1))})`]);
      out.push(['', `base: ${fmtValue(b, k)} (${pct(b / (f.base[0] || 1))})`]);
      const d = t - b;
      out.push([d > 0 ? 'tt-up' : d < 0 ? 'tt-down' : '', `change: ${d > 0 ? '+' : ''}${fmtValue(d, k)}${b ? ` (${d > 0 ? '+' : ''}${pct(d / b)})` : ' (new)'}`]);
      out.push(['', `self: ${fmtValue(f.self[i], k)} vs ${fmtValue(f.baseSelf[i], k)}`]);
    } else {
      out.push(['', `total: ${fmtValue(f.total[i], k)} (${pct(f.total[i] / root)} of all${this.zoom ? `, ${pct(f.total[i] / zoomTotal)} of zoom` : ''})`]);
      out.push(['', `self: ${fmtValue(f.self[i], k)} (${pct(f.self[i] / root)})`]);
    }
    out.push(['tt-hint', 'click: zoom · shift+click: sandwich']);
    return out;
  }

  /** Drawn geometry of every visible frame named `name` (tests, debugging). */
  rects(name) {
    const f = this.f;
    const W = this.host.clientWidth;
    const [v0, v1] = this.view;
    const scale = W / (v1 - v0 || 1);
    const out = [];
    for (let i = 0; i < f.n; i++) {
      if (name !== undefined && f.name[i] !== name) continue;
      const x0 = Math.max(0, (f.x[i] - v0) * scale);
      const x1 = Math.min(W, (f.x[i] + f.w[i] - v0) * scale);
      if (x1 - x0 < MIN_W) continue;
      out.push({ i, name: f.name[i], depth: f.depth[i], x: x0, w: x1 - x0, y: this.y(f.depth[i]), kind: f.kind[i], color: this.match ? (this.match[i] ? 'match' : 'dim') : this.color(i) });
    }
    return out;
  }
}

function fade(c) {
  // Ancestors of the zoomed frame: drawn paler.
  return c.startsWith('hsl') ? c.replace(/,(\d+(?:\.\d+)?)%\)$/, (_, l) => `,${Math.min(93, Number(l) + 20)}%)`) : c.replace(/^rgb\((\d+),(\d+),(\d+)\)$/, (_, r, g, b) => `rgb(${mix(r)},${mix(g)},${mix(b)})`);
}
function mix(v) {
  return Math.round(Number(v) + (255 - Number(v)) * 0.5);
}

/** Sandwich trees for `fname`: callers (root = fname, children = callers) and callees. */
export function sandwich(f, fname) {
  const mk = (name, kind) => ({ name, value: 0, self: 0, kind, children: [], _idx: new Map() });
  const child = (p, name, kind) => {
    let c = p._idx.get(name);
    if (!c) {
      c = mk(name, kind);
      p._idx.set(name, c);
      p.children.push(c);
    }
    return c;
  };
  const callers = mk(fname, null);
  const callees = mk(fname, null);
  let coveredUntil = 0;
  for (let i = 0; i < f.n; i++) {
    if (f.name[i] !== fname || i < coveredUntil) continue;
    coveredUntil = f.end[i];
    const v = f.total[i];
    callers.value += v;
    callees.value += v;
    callers.kind = callees.kind = callers.kind || f.kind[i];
    // Callers: walk up.
    let node = callers;
    for (let p = f.parent[i]; p > 0; p = f.parent[p]) {
      node = child(node, f.name[p], f.kind[p]);
      node.value += v;
    }
    node.self += v;
    // Callees: merge the subtree.
    const merge = (src, dst) => {
      dst.self += f.self[src];
      let c = src + 1;
      while (c < f.end[src]) {
        const d = child(dst, f.name[c], f.kind[c]);
        d.value += f.total[c];
        merge(c, d);
        c = f.end[c];
      }
    };
    merge(i, callees);
  }
  const finish = (t) => {
    delete t._idx;
    t.children.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    t.children.forEach(finish);
    return t;
  };
  return { callers: finish(callers), callees: finish(callees) };
}
