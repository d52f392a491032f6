// Deep profiles: scheduled and on-demand ("profile now") windows of heavier profiling.
// Lists the schedules and runs of /api/v1/schedules and /api/v1/runs, creates, edits and
// deletes schedules, and starts runs. Writes send the optional API token (kept in
// sessionStorage, never in the URL); the server's 400 reasons show next to the form.

import { getJson, sendJson, fmtTime, el, storedToken, TOKEN_KEY } from './util.js';

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000;

/** Link to the flame-graph view of a run: the UI's URL-hash state (see app.js). */
export function runFlameHash(run) {
  const sel = run.selector || {};
  if (!sel.service) return null;
  const p = new URLSearchParams({ service: sel.service, from: String(run.start_ms), until: String(run.end_ms) });
  const filters = Object.entries(sel.labels || {}).map(([k, v]) => `${k}=${v}`);
  if (sel.host) filters.push(`host=${sel.host}`);
  if (filters.length) p.set('filter', filters.join(','));
  return '#' + p.toString();
}

export function fmtDuration(s) {
  if (!isFinite(s)) return '–';
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${+(s / 60).toFixed(1)} min`;
  return `${+(s / 3600).toFixed(1)} h`;
}

function fmtIn(ms, now = Date.now()) {
  const d = (ms - now) / 1000;
  if (d < 0) return 'now';
  if (d < 60) return `in ${Math.round(d)} s`;
  if (d < 3600) return `in ${Math.round(d / 60)} min`;
  if (d < 86400 * 2) return `in ${(d / 3600).toFixed(1)} h`;
  return `in ${(d / 86400).toFixed(1)} d`;
}

function fmtInZone(ms, tz) {
  try {
    return new Intl.DateTimeFormat('sv-SE', { timeZone: tz, dateStyle: 'short', timeStyle: 'medium' }).format(new Date(ms)) + ' ' + tz;
  } catch {
    return '';
  }
}

export function fmtSelector(sel = {}) {
  const parts = [];
  if (sel.service) parts.push(`service=${sel.service}`);
  if (sel.host) parts.push(`host=${sel.host}`);
  for (const [k, v] of Object.entries(sel.labels || {})) parts.push(`${k}=${v}`);
  return parts.join(', ') || '(everything)';
}

export function fmtSettings(st = {}) {
  const off = st.off_cpu ? `off-CPU${st.off_cpu_sampling !== undefined && st.off_cpu_sampling < 1 ? ` ×${st.off_cpu_sampling}` : ''}` : 'no off-CPU';
  return `${st.frequency_hz} Hz, ${off}`;
}

/** "k=v, k2=v2" -> {k: v, k2: v2}; throws on a malformed pair. */
function parseLabels(text) {
  const out = {};
  for (const part of text.split(',').map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf('=');
    if (i <= 0 || i === part.length - 1) throw new Error(`label "${part}" is not k=v`);
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

function stateBadge(state) {
  return el('span', { class: `badge state-${state || 'unknown'}`, text: state || '?' });
}

export class DeepProfiles {
  /** `onLoad()` reloads what else the page shows (the alert rules) with it. */
  constructor({ showError, currentService, onLoad }) {
    this.showError = showError;
    this.onLoad = onLoad || (() => {});
    this.currentService = currentService || (() => '');
    this.schedules = [];
    this.runs = [];
    this.services = [];
    this.editing = null; // schedule id being edited
    this.loads = 0;
    this.visible = false;
    this.timer = null;
    this.seq = 0;
    this.setup();
  }

  get token() {
    return storedToken();
  }

  setup() {
    const tok = $('deep-token');
    tok.value = this.token;
    tok.oninput = () => {
      try {
        if (tok.value) sessionStorage.setItem(TOKEN_KEY, tok.value);
        else sessionStorage.removeItem(TOKEN_KEY);
      } catch { /* storage disabled: the field still works for this page */ }
    };
    $('deep-refresh').onclick = () => this.load();
    $('schedule-form').onsubmit = (e) => { e.preventDefault(); this.submitSchedule(); };
    $('schedule-cancel').onclick = () => this.resetScheduleForm();
    $('now-form').onsubmit = (e) => { e.preventDefault(); this.submitNow(); };
    const nowForm = $('now-form');
    nowForm.elements.target.onchange = () => {
      const svc = nowForm.elements.target.value === 'service';
      nowForm.elements.value.placeholder = svc ? 'service name' : 'host name';
      $('now-target-label').textContent = svc ? 'Service' : 'Host';
      nowForm.elements.value.value = '';
      if (svc) nowForm.elements.value.setAttribute('list', 'deep-services');
      else nowForm.elements.value.removeAttribute('list');
    };
    // Clear a field's error mark when it is edited.
    for (const f of [$('schedule-form'), nowForm]) f.addEventListener('input', (e) => e.target.classList?.remove('invalid'));
    const zones = $('deep-timezones');
    let names = ['UTC'];
    try { names = names.concat(Intl.supportedValuesOf('timeZone')); } catch { /* old browser */ }
    for (const z of names) zones.append(el('option', { value: z }));
    document.addEventListener('visibilitychange', () => this.schedule());
    let tz = '';
    try { tz = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch { /* unknown */ }
    $('deep-tz').textContent = `· times in ${tz || 'your browser\'s time zone'}`;
  }

  show() {
    this.visible = true;
    // Profile now: start from the service open in the flame-graph view.
    const f = $('now-form').elements;
    if (!f.value.value && f.target.value === 'service') f.value.value = this.currentService() || '';
    this.load();
  }

  hide() {
    this.visible = false;
    clearTimeout(this.timer);
  }

  /** Next automatic refresh (run states change as agents report). */
  schedule() {
    clearTimeout(this.timer);
    if (this.visible && !document.hidden) this.timer = setTimeout(() => this.load(), REFRESH_MS);
  }

  async load() {
    const seq = ++this.seq;
    clearTimeout(this.timer);
    const status = $('deep-status');
    if (!this.loads) { status.className = 'status'; status.textContent = 'Loading…'; }
    const [sch, runs, svcs] = await Promise.allSettled([
      getJson('/api/v1/schedules'), getJson('/api/v1/runs'), getJson('/api/v1/services'), this.onLoad(),
    ]);
    if (seq !== this.seq) return;
    status.textContent = '';
    status.className = 'status';
    const fail = (box, r) => {
      box.hidden = r.status !== 'rejected';
      box.textContent = r.status === 'rejected' ? (r.reason?.message || String(r.reason)) : '';
    };
    fail($('schedules-error'), sch);
    fail($('runs-error'), runs);
    if (sch.status === 'fulfilled') { this.schedules = sch.value; this.renderSchedules(); }
    if (runs.status === 'fulfilled') { this.runs = runs.value; this.renderRuns(); }
    if (svcs.status === 'fulfilled') {
      this.services = svcs.value;
      const dl = $('deep-services');
      dl.textContent = '';
      for (const s of this.services) dl.append(el('option', { value: s }));
    }
    $('deep-updated').textContent = `updated ${fmtTime(Date.now()).slice(11)}`;
    this.loads++;
    this.schedule();
  }

  renderSchedules() {
    const tbody = $('schedules-table').tBodies[0];
    tbody.textContent = '';
    const now = Date.now();
    for (const s of this.schedules) {
      const next = s.next_start_ms;
      tbody.append(el('tr', { 'data-id': s.id, 'data-name': s.name, class: [s.id === this.editing ? 'editing' : '', s.enabled ? '' : 'disabled'].join(' ').trim() },
        el('td', { text: s.name }),
        el('td', { class: 'mono nowrap', text: s.cron }),
        el('td', { text: s.timezone }),
        el('td', { class: 'num', text: fmtDuration(s.duration_s) }),
        el('td', { class: 'mono', text: fmtSelector(s.selector) }),
        el('td', { class: 'nowrap', text: fmtSettings(s.settings) }),
        el('td', { text: s.enabled ? 'yes' : 'no' }),
        el('td', { class: 'nowrap', title: next ? fmtInZone(next, s.timezone) : '', text: !s.enabled ? '(disabled)' : next ? `${fmtTime(next)} (${fmtIn(next, now)})` : 'never' }),
        el('td', { class: 'nowrap' },
          el('button', { class: 'mini', text: 'Edit', title: 'edit this schedule', onclick: () => this.edit(s) }),
          el('button', { class: 'mini', text: 'Delete', title: 'delete this schedule', onclick: () => this.remove(s) })),
      ));
    }
    if (!this.schedules.length) tbody.append(el('tr', {}, el('td', { colspan: 9, class: 'muted', text: 'No schedules yet: create one below.' })));
    $('schedules-info').textContent = this.schedules.length ? `${this.schedules.length} schedule${this.schedules.length > 1 ? 's' : ''}` : '';
  }

  renderRuns() {
    const tbody = $('runs-table').tBodies[0];
    tbody.textContent = '';
    for (const r of this.runs) {
      const hosts = Object.entries(r.hosts || {});
      const hostCell = el('td', {}, hosts.length
        ? el('div', { class: 'hosts' }, ...hosts.map(([h, hr]) => el('span', { class: 'host', title: `${h}: ${hr.state} at ${fmtTime(hr.updated_ms)}${hr.message ? ' — ' + hr.message : ''}` },
          `${h} `, stateBadge(hr.state), hr.message ? el('span', { class: 'msg', text: ' ' + hr.message }) : null)))
        : el('span', { class: 'muted', text: r.state === 'planned' ? 'not started' : 'no agent reported yet' }));
      const href = runFlameHash(r);
      tbody.append(el('tr', { 'data-id': r.id, 'data-state': r.state },
        el('td', {}, stateBadge(r.state)),
        el('td', { title: `run ${r.id}`, text: r.name + (r.schedule_id ? ` (schedule #${r.schedule_id})` : '') }),
        el('td', { class: 'mono', text: fmtSelector(r.selector) }),
        el('td', { class: 'nowrap', text: fmtSettings(r.settings) }),
        el('td', { class: 'nowrap', text: fmtTime(r.start_ms) }),
        el('td', { class: 'nowrap', text: fmtTime(r.end_ms) }),
        hostCell,
        el('td', {}, href
          ? el('a', { class: 'flame-link', href, title: 'open the flame graph of this run\'s window', text: 'flame graph' })
          : el('span', { class: 'muted small', text: 'no service selected' })),
      ));
    }
    if (!this.runs.length) tbody.append(el('tr', {}, el('td', { colspan: 8, class: 'muted', text: 'No runs yet: schedules create them when due, or use "Profile now".' })));
    const counts = {};
    for (const r of this.runs) counts[r.state] = (counts[r.state] || 0) + 1;
    $('runs-info').textContent = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(' · ');
  }

  // ------------------------------------------------------------ schedule form

  edit(s) {
    const f = $('schedule-form').elements;
    this.editing = s.id;
    f.name.value = s.name;
    f.cron.value = s.cron;
    f.timezone.value = s.timezone;
    f.duration_s.value = s.duration_s;
    f.service.value = s.selector.service || '';
    f.host.value = s.selector.host || '';
    f.labels.value = Object.entries(s.selector.labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
    f.frequency_hz.value = s.settings.frequency_hz;
    f.off_cpu.checked = !!s.settings.off_cpu;
    f.off_cpu_sampling.value = s.settings.off_cpu_sampling ?? 1;
    f.enabled.checked = !!s.enabled;
    $('schedule-form-title').textContent = `Edit schedule "${s.name}" (#${s.id})`;
    $('schedule-submit').textContent = 'Save changes';
    $('schedule-cancel').hidden = false;
    this.formError('schedule', null);
    $('schedule-msg').textContent = '';
    this.renderSchedules();
    $('schedule-form').scrollIntoView({ block: 'nearest' });
    f.name.focus();
  }

  resetScheduleForm() {
    this.editing = null;
    const form = $('schedule-form');
    form.reset();
    for (const i of form.querySelectorAll('.invalid')) i.classList.remove('invalid');
    $('schedule-form-title').textContent = 'New schedule';
    $('schedule-submit').textContent = 'Create schedule';
    $('schedule-cancel').hidden = true;
    this.formError('schedule', null);
    this.renderSchedules();
  }

  /** Shows (or clears) a form's error; marks the field the message is about. */
  formError(form, msg, field) {
    const box = $(`${form}-error`);
    box.hidden = !msg;
    box.textContent = msg || '';
    const f = $(`${form}-form`);
    for (const i of f.querySelectorAll('.invalid')) i.classList.remove('invalid');
    if (msg && field && f.elements[field]) f.elements[field].classList.add('invalid');
    if (msg) $(`${form}-msg`).textContent = '';
  }

  /** Field a server reason is about (to mark it). */
  static fieldOf(reason, target) {
    const r = String(reason);
    if (/cron/i.test(r)) return 'cron';
    if (/time zone/i.test(r)) return 'timezone';
    if (/name must/i.test(r)) return 'name';
    if (/duration/i.test(r)) return 'duration_s';
    if (/frequency/i.test(r)) return 'frequency_hz';
    if (/off_cpu_sampling/i.test(r)) return 'off_cpu_sampling';
    if (/unknown service|selector/i.test(r)) return target || 'service';
    return null;
  }

  authHint(err) {
    if (err.code !== 401) return '';
    return this.token ? ' (check the API token at the top of this page)' : ' (enter the API token at the top of this page)';
  }

  readSchedule() {
    const f = $('schedule-form').elements;
    const num = (name, label, { int = true, min = 1 } = {}) => {
      const v = Number(f[name].value);
      if (f[name].value.trim() === '' || !isFinite(v) || (int && !Number.isInteger(v)) || v < min) {
        throw Object.assign(new Error(`${label} must be ${int ? 'a whole number' : 'a number'} ≥ ${min}`), { field: name });
      }
      return v;
    };
    if (!f.name.value.trim()) throw Object.assign(new Error('name must not be empty'), { field: 'name' });
    if (!f.cron.value.trim()) throw Object.assign(new Error('cron must not be empty (e.g. "0 3 * * *": every day at 03:00)'), { field: 'cron' });
    let labels;
    try { labels = parseLabels(f.labels.value); } catch (e) { throw Object.assign(e, { field: 'labels' }); }
    const selector = {};
    if (f.service.value.trim()) selector.service = f.service.value.trim();
    if (f.host.value.trim()) selector.host = f.host.value.trim();
    if (Object.keys(labels).length) selector.labels = labels;
    return {
      name: f.name.value.trim(),
      cron: f.cron.value.trim(),
      timezone: f.timezone.value.trim() || 'UTC',
      duration_s: num('duration_s', 'duration'),
      selector,
      settings: {
        frequency_hz: num('frequency_hz', 'frequency'),
        off_cpu: f.off_cpu.checked,
        off_cpu_sampling: num('off_cpu_sampling', 'off-CPU sampling', { int: false, min: 0 }),
      },
      enabled: f.enabled.checked,
    };
  }

  async submitSchedule() {
    let spec;
    try {
      spec = this.readSchedule();
    } catch (e) {
      return this.formError('schedule', e.message, e.field);
    }
    const btn = $('schedule-submit');
    btn.disabled = true;
    const editing = this.editing;
    try {
      const s = editing === null
        ? await sendJson('POST', '/api/v1/schedules', spec, this.token)
        : await sendJson('PUT', `/api/v1/schedules/${editing}`, spec, this.token);
      this.resetScheduleForm();
      await this.load();
      const msg = $('schedule-msg');
      msg.className = 'msg-ok';
      msg.textContent = `${editing === null ? 'Created' : 'Saved'} schedule "${s.name}"` + (s.next_start_ms ? `; next start ${fmtTime(s.next_start_ms)}` : '');
    } catch (e) {
      this.formError('schedule', e.message + this.authHint(e), e.code === 400 ? DeepProfiles.fieldOf(e.reason) : null);
    } finally {
      btn.disabled = false;
    }
  }

  async remove(s) {
    if (!confirm(`Delete schedule "${s.name}" (${s.cron} ${s.timezone})? Runs it already created stay listed.`)) return;
    const box = $('schedules-error');
    try {
      await sendJson('DELETE', `/api/v1/schedules/${s.id}`, undefined, this.token);
      box.hidden = true;
      if (this.editing === s.id) this.resetScheduleForm();
      await this.load();
      const msg = $('schedule-msg');
      msg.className = 'msg-ok';
      msg.textContent = `Deleted schedule "${s.name}"`;
    } catch (e) {
      box.hidden = false;
      box.textContent = e.message + this.authHint(e);
    }
  }

  // ------------------------------------------------------------ profile now

  async submitNow() {
    const f = $('now-form').elements;
    const target = f.target.value;
    const value = f.value.value.trim();
    if (!value) return this.formError('now', `enter the ${target} to profile`, 'value');
    const dur = Number(f.duration_s.value), hz = Number(f.frequency_hz.value);
    if (!Number.isInteger(dur) || dur < 1) return this.formError('now', 'duration must be a whole number of seconds ≥ 1', 'duration_s');
    if (!Number.isInteger(hz) || hz < 1) return this.formError('now', 'frequency must be a whole number of Hz ≥ 1', 'frequency_hz');
    const body = { selector: { [target]: value }, duration_s: dur, settings: { frequency_hz: hz, off_cpu: f.off_cpu.checked, off_cpu_sampling: 1 } };
    const btn = $('now-submit');
    btn.disabled = true;
    try {
      const run = await sendJson('POST', '/api/v1/runs', body, this.token);
      this.formError('now', null);
      await this.load();
      const msg = $('now-msg');
      msg.className = 'msg-ok';
      msg.textContent = `Started run ${run.id}: ${target} ${value} until ${fmtTime(run.end_ms).slice(11)}`;
    } catch (e) {
      const field = e.code === 400 ? DeepProfiles.fieldOf(e.reason, 'value') : null;
      this.formError('now', e.message + this.authHint(e), field === 'service' ? 'value' : field);
    } finally {
      btn.disabled = false;
    }
  }
}
