// Alert rules on the "Deep profiles" page: /api/v1/alerts lists the rules of the
// server's config file (read-only) and those made here; each compares every period of
// a service with its baseline, and regressions become events (timeline markers,
// /api/v1/events, /metrics, the webhook). Writes send the page's API token.

import { getJson, sendJson, el, storedToken } from './util.js';

const $ = (id) => document.getElementById(id);

const BASELINES = { previous: 'the period before', day: 'a day earlier', week: 'a week earlier' };

function fmtPeriod(s) {
  if (s % 86400 === 0) return `${s / 86400} d`;
  if (s % 3600 === 0) return `${s / 3600} h`;
  if (s % 60 === 0) return `${s / 60} min`;
  return `${s} s`;
}

export class AlertRules {
  constructor() {
    this.rules = [];
    $('alert-form').onsubmit = (e) => { e.preventDefault(); this.submit(); };
    $('alert-form').addEventListener('input', (e) => e.target.classList?.remove('invalid'));
  }

  async load() {
    const box = $('alerts-error');
    try {
      this.rules = await getJson('/api/v1/alerts');
      box.hidden = true;
      this.render();
    } catch (e) {
      box.hidden = false;
      box.textContent = e.message;
    }
  }

  render() {
    const tbody = $('alerts-table').tBodies[0];
    tbody.textContent = '';
    for (const r of this.rules) {
      const fromConfig = r.source === 'config';
      tbody.append(el('tr', { 'data-name': r.name },
        el('td', { text: r.name }),
        el('td', { class: 'mono', text: r.service === '*' ? '* (every service)' : r.service }),
        el('td', { class: 'num', text: fmtPeriod(r.every_secs) }),
        el('td', { text: BASELINES[r.baseline] || r.baseline }),
        el('td', { class: 'num', text: r.min_regressions }),
        el('td', { class: 'muted', text: fromConfig ? 'config file' : 'this page / API' }),
        el('td', {}, fromConfig
          ? el('span', { class: 'muted small', title: 'rules of the server\'s config file are changed there', text: 'read-only' })
          : el('button', { class: 'mini', text: 'Delete', title: 'delete this rule', onclick: () => this.remove(r) })),
      ));
    }
    if (!this.rules.length) tbody.append(el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'No alert rules yet: create one below.' })));
    $('alerts-info').textContent = this.rules.length ? `${this.rules.length} rule${this.rules.length > 1 ? 's' : ''}` : '';
  }

  error(msg, field) {
    const box = $('alert-error');
    box.hidden = !msg;
    box.textContent = msg || '';
    const f = $('alert-form');
    for (const i of f.querySelectorAll('.invalid')) i.classList.remove('invalid');
    if (msg && field && f.elements[field]) f.elements[field].classList.add('invalid');
    if (msg) $('alert-msg').textContent = '';
  }

  authHint(err) {
    if (err.code !== 401 && err.code !== 403) return '';
    return storedToken() ? ' (check the API token at the top of this page)' : ' (enter the API token at the top of this page)';
  }

  async submit() {
    const f = $('alert-form').elements;
    const name = f.name.value.trim();
    if (!name) return this.error('name must not be empty', 'name');
    const service = f.service.value.trim();
    if (!service) return this.error('enter a service, or * for every service', 'service');
    const minutes = Number(f.minutes.value), min = Number(f.min_regressions.value);
    if (!Number.isFinite(minutes) || minutes <= 0) return this.error('the period must be a number of minutes > 0', 'minutes');
    if (!Number.isInteger(min) || min < 1) return this.error('regressions must be a whole number ≥ 1', 'min_regressions');
    const rule = { service, every_secs: Math.round(minutes * 60), baseline: f.baseline.value, min_regressions: min };
    const btn = $('alert-submit');
    btn.disabled = true;
    try {
      await sendJson('PUT', `/api/v1/alerts/${encodeURIComponent(name)}`, rule, storedToken());
      this.error(null);
      $('alert-form').reset();
      await this.load();
      const msg = $('alert-msg');
      msg.className = 'msg-ok';
      msg.textContent = `Saved alert rule "${name}": ${service} every ${fmtPeriod(rule.every_secs)}`;
    } catch (e) {
      const r = String(e.reason || '');
      const field = /service/.test(r) ? 'service' : /every_secs/.test(r) ? 'minutes' : /min_regressions/.test(r) ? 'min_regressions' : /name|config file/.test(r) ? 'name' : null;
      this.error(e.message + this.authHint(e), e.code === 400 || e.code === 409 ? field : null);
    } finally {
      btn.disabled = false;
    }
  }

  async remove(r) {
    if (!confirm(`Delete alert rule "${r.name}"? Events it made stay listed.`)) return;
    const box = $('alerts-error');
    try {
      await sendJson('DELETE', `/api/v1/alerts/${encodeURIComponent(r.name)}`, undefined, storedToken());
      box.hidden = true;
      await this.load();
      const msg = $('alert-msg');
      msg.className = 'msg-ok';
      msg.textContent = `Deleted alert rule "${r.name}"`;
    } catch (e) {
      box.hidden = false;
      box.textContent = e.message + this.authHint(e);
    }
  }
}
