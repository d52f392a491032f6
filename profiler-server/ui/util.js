// Small helpers shared by the UI modules: formatting, colours, fetching.

export const OFF_REASONS = ['runnable', 'blocked-io', 'blocked-lock', 'blocked-net', 'sleep', 'idle-poll', 'other'];

/** Nanoseconds -> short human text. */
export function fmtNs(ns) {
  const a = Math.abs(ns);
  const sign = ns < 0 ? '-' : '';
  if (a < 1e3) return sign + a.toFixed(0) + ' ns';
  if (a < 1e6) return sign + (a / 1e3).toFixed(a < 1e4 ? 2 : 1) + ' µs';
  if (a < 1e9) return sign + (a / 1e6).toFixed(a < 1e7 ? 2 : 1) + ' ms';
  if (a < 60e9) return sign + (a / 1e9).toFixed(2) + ' s';
  if (a < 3600e9) return sign + (a / 60e9).toFixed(1) + ' min';
  return sign + (a / 3600e9).toFixed(1) + ' h';
}

/** Value in the unit of `kind`: nanoseconds for time kinds, else the raw number. */
export function isTimeKind(kind) {
  return !kind || kind === 'on-cpu' || kind.startsWith('off-cpu') || ['cpu', 'wall', 'itimer'].includes(kind) || kind.endsWith('_duration');
}

export function fmtValue(v, kind) {
  if (isTimeKind(kind)) return fmtNs(v);
  if (kind && kind.endsWith('_space')) {
    const a = Math.abs(v);
    if (a < 1024) return v + ' B';
    if (a < 1048576) return (v / 1024).toFixed(1) + ' KiB';
    if (a < 1073741824) return (v / 1048576).toFixed(1) + ' MiB';
    return (v / 1073741824).toFixed(2) + ' GiB';
  }
  return String(v);
}

export function pct(x) {
  if (!isFinite(x)) return '–';
  const p = x * 100;
  if (Math.abs(p) >= 10) return p.toFixed(1) + '%';
  if (Math.abs(p) >= 0.1) return p.toFixed(2) + '%';
  return p.toFixed(3) + '%';
}

export function hash(s) {
  let h = 2166136261;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 16777619);
  }
  return (h >>> 0) / 4294967296;
}

// Base hue/saturation per off-CPU reason: all cool colours.
const OFF_HUES = {
  'runnable': [185, 70],
  'blocked-io': [212, 75],
  'blocked-lock': [268, 55],
  'blocked-net': [238, 60],
  'sleep': [160, 50],
  'idle-poll': [205, 12],
  'other': [225, 30],
};

export function kindReason(kind) {
  return kind && kind.startsWith('off-cpu:') ? kind.slice(8) : null;
}

/** Fill colour for a frame of `kind` named `name` (on-CPU warm, off-CPU cool). */
export function frameColor(kind, name) {
  const r = kindReason(kind);
  const v = hash(name);
  if (r !== null || (kind && kind.startsWith('off-cpu'))) {
    const [h, s] = OFF_HUES[r] || OFF_HUES.other;
    return `hsl(${h + (v - 0.5) * 16},${s}%,${58 + v * 18}%)`;
  }
  // Classic flame graph "hot" palette.
  const v2 = hash(name + '#');
  return `rgb(${Math.round(205 + 50 * v)},${Math.round(230 * v2)},${Math.round(55 * v)})`;
}

/** Solid colour of a kind (timeline, legend, [kind] frames). */
export function kindColor(kind) {
  const r = kindReason(kind);
  if (r !== null) {
    const [h, s] = OFF_HUES[r] || OFF_HUES.other;
    return `hsl(${h},${s}%,50%)`;
  }
  return kind === 'on-cpu' || kind === 'cpu' ? 'hsl(22,90%,55%)' : `hsl(${40 + hash(kind) * 30},80%,50%)`;
}

export class HttpError extends Error {
  constructor(what, status, message) {
    super(`${what} failed: HTTP ${status}${message ? ': ' + message : ''}`);
    this.status = status;
    this.what = what;
  }
}

/** Where the API token entered on the page lives: for this tab only, never the URL. */
export const TOKEN_KEY = 'profiler.apiToken';

export function storedToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
}

/**
 * GET a JSON API route, with the stored API token if there is one (servers with read
 * tokens need it); failures carry the status and the server's {"error"} text.
 */
export async function getJson(path, params) {
  const url = path + (params ? '?' + new URLSearchParams(params).toString() : '');
  const token = storedToken();
  let resp;
  try {
    resp = await fetch(url, token ? { headers: { Authorization: 'Bearer ' + token } } : undefined);
  } catch (e) {
    throw new HttpError(`GET ${path}`, 'network error', String(e.message || e));
  }
  const text = await resp.text();
  if (!resp.ok) {
    let msg = text;
    try { msg = JSON.parse(text).error ?? text; } catch { /* not JSON */ }
    throw new HttpError(`GET ${path}`, `${resp.status} ${resp.statusText}`.trim(), msg);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new HttpError(`GET ${path}`, resp.status, 'reply is not JSON: ' + e.message);
  }
}

/**
 * Send a JSON write (POST/PUT/DELETE) with an optional bearer token. Resolves to the
 * reply's JSON (null for 204); failures carry the status and the server's {"error"} text
 * (`err.reason` alone, for showing next to a form field).
 */
export async function sendJson(method, path, body, token) {
  const what = `${method} ${path}`;
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers.Authorization = 'Bearer ' + token;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    const err = new HttpError(what, 'network error', String(e.message || e));
    err.reason = String(e.message || e);
    throw err;
  }
  const text = await resp.text();
  if (!resp.ok) {
    let msg = text;
    try { msg = JSON.parse(text).error ?? text; } catch { /* not JSON */ }
    const err = new HttpError(what, `${resp.status} ${resp.statusText}`.trim(), msg);
    err.reason = msg;
    err.code = resp.status;
    throw err;
  }
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new HttpError(what, resp.status, 'reply is not JSON: ' + e.message);
  }
}

/** `now`, `now-15m`, unix ms -> unix ms (the server's syntax). */
export function resolveTime(v, now = Date.now()) {
  if (v === undefined || v === null || v === '') return now;
  if (/^-?\d+$/.test(String(v))) return Number(v);
  const m = /^now(?:-(\d+)([smhd]))?$/.exec(v);
  if (!m) return NaN;
  if (!m[1]) return now;
  const mult = { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3 }[m[2]];
  return now - Number(m[1]) * mult;
}

export function fmtTime(ms) {
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
