// End-to-end tests of the web UI: a real profiler-server binary with known
// ingested data, driven through Debian's chromium with playwright-core.
//
//   PROFILER_SERVER_BIN=target/debug/profiler-server node --test ui.test.mjs
//
// Screenshots go to ./artifacts/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, existsSync, rmSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
const ART = join(HERE, 'artifacts');
// The workspace's test build, whose server is optimized (`cargo xtask test` builds it
// and sets the variable).
const BIN = process.env.PROFILER_SERVER_BIN || join(HERE, '../../target/debug/profiler-server');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const S = 1_000_000_000; // ns

let server, base, dataDir, profileDir, browser;
const NOW = Date.now();
const TARGET_AT = NOW - 20 * 60_000; // inside now-30m
const BASE_AT = NOW - 50 * 60_000; // inside the previous 30 minutes

async function startServer() {
  const s = await spawnServer();
  dataDir = s.dir;
  server = s.proc;
  return s.url;
}

/** Starts a profiler-server on port 0 with a fresh data dir (extra args e.g. --token). */
async function spawnServer(extra = [], bin = BIN) {
  if (!existsSync(bin)) throw new Error(`profiler-server binary not found at ${bin} (build it, or set PROFILER_SERVER_BIN)`);
  const dir = mkdtempSync(join(tmpdir(), 'ui-test-data-'));
  const env = { ...process.env, RUST_LOG: 'warn' };
  delete env.PROFILER_TOKENS;
  const p = spawn(bin, ['--data-dir', dir, '--listen', '127.0.0.1:0', ...extra], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let stderr = '';
  p.stderr.on('data', (d) => (stderr += d));
  const addr = await new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('server did not print `listening on` within 30 s; stderr:\n' + stderr)), 30_000);
    p.on('exit', (c) => { clearTimeout(t); reject(new Error(`server exited with ${c}; stderr:\n${stderr}`)); });
    createInterface({ input: p.stdout }).on('line', (l) => {
      const m = /^listening on (\S+)/.exec(l);
      if (m) { clearTimeout(t); resolve(m[1]); }
    });
  });
  return { proc: p, url: `http://${addr}`, dir };
}

async function stopServer(s) {
  if (!s) return;
  s.proc.kill('SIGTERM');
  await new Promise((r) => { s.proc.on('exit', r); setTimeout(r, 10_000); });
  rmSync(s.dir, { recursive: true, force: true });
}

/** Ingests folded text (into `server`, by default the shared one); parameters other than the route's own become `label=name:value`. */
async function ingest(params, folded, server = base) {
  const q = new URLSearchParams({ format: 'folded' });
  for (const [k, v] of Object.entries(params)) {
    if (['service', 'kind', 'from', 'until'].includes(k)) q.append(k, v);
    else q.append('label', `${k}:${v}`);
  }
  const r = await fetch(`${server}/api/v1/ingest?${q}`, { method: 'POST', body: folded });
  const text = await r.text();
  assert.equal(r.status, 200, `ingest ${q}: ${text}`);
  return JSON.parse(text);
}

const lines = (rows) => rows.map(([stack, v]) => `${stack} ${v}`).join('\n') + '\n';

async function ingestFixtures() {
  const t = String(TARGET_AT), b = String(BASE_AT);
  await ingest({ service: 'cart', kind: 'on-cpu', from: t, host: 'web-1' }, lines([['main;checkout', 1 * S]]));
  await ingest({ service: 'shop', kind: 'on-cpu', from: t, host: 'web-1', container: 'api' }, lines([
    ['main;server;handle;parse_json', 3 * S],
    ['main;server;handle;render', 1 * S],
    ['main;gc', 1 * S],
  ]));
  await ingest({ service: 'shop', kind: 'on-cpu', from: t, host: 'web-2', container: 'batch' }, lines([
    ['main;server;handle;parse_json', 1 * S],
    ['main;batch;compress', 2 * S],
  ]));
  await ingest({ service: 'shop', kind: 'off-cpu:blocked-io', from: t, host: 'web-1', container: 'api' }, lines([['main;server;handle;read_file', 2 * S]]));
  await ingest({ service: 'shop', kind: 'off-cpu:blocked-lock', from: t, host: 'web-2', container: 'batch' }, lines([['main;server;handle;mutex_lock', S / 2]]));
  await ingest({ service: 'shop', kind: 'off-cpu:idle-poll', from: t, host: 'web-1', container: 'api' }, lines([['main;event_loop;epoll_wait', 10 * S]]));
  // Base period for the diff: parse_json grew, gc shrank, render unchanged.
  await ingest({ service: 'shop', kind: 'on-cpu', from: b, host: 'web-1', container: 'api' }, lines([
    ['main;server;handle;parse_json', 1 * S],
    ['main;server;handle;render', 1 * S],
    ['main;gc', 3 * S],
  ]));
}

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`chromium not found at ${CHROMIUM}: install it with \`apt-get install -y chromium\` (or set CHROMIUM_BIN)`);
  }
  mkdirSync(ART, { recursive: true });
  base = await startServer();
  await ingestFixtures();
  profileDir = mkdtempSync(join(tmpdir(), 'ui-test-chromium-'));
  // A fresh --user-data-dir: playwright passes profileDir as chromium's --user-data-dir.
  browser = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 1000 },
    acceptDownloads: true,
  });
});

after(async () => {
  await browser?.close().catch(() => {});
  if (server) {
    server.kill('SIGTERM');
    await new Promise((r) => { server.on('exit', r); setTimeout(r, 10_000); });
  }
  for (const d of [dataDir, profileDir]) if (d) rmSync(d, { recursive: true, force: true });
});

async function newPage() {
  const page = await browser.newPage();
  page.consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') page.consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => page.consoleErrors.push(String(e)));
  return page;
}

/** Waits until the UI finished the load after `prev` loads (or any, when prev is undefined). */
async function settled(page, prev) {
  await page.waitForFunction((p) => window.__ui && window.__ui.loads > (p ?? 0) && document.body.dataset.status !== 'loading', prev, { timeout: 30_000 });
}
const loads = (page) => page.evaluate(() => window.__ui.loads);
const rects = (page, name, g = 'flame') => page.evaluate(([n, g]) => (g === 'flame' ? window.__ui.flame : window.__ui.sandwich[g]).rects(n), [name, g]);
const oneRect = async (page, name, g, kind) => {
  const r = (await rects(page, name, g)).filter((x) => !kind || x.kind === kind);
  assert.equal(r.length, 1, `exactly one visible frame ${name}, got ${JSON.stringify(r)}`);
  return r[0];
};
/** Waits for the zoom animation started by the last click/key to end. */
const zoomDone = (page) => page.waitForFunction(() => !window.__ui.flame.anim, null, { timeout: 10_000 });
const near = (a, b, tol, msg) => assert.ok(Math.abs(a - b) <= tol, `${msg}: ${a} vs ${b} (±${tol})`);

async function clickFrame(page, name, opts = {}) {
  const r = await oneRect(page, name, opts.graph, opts.kind);
  const box = await page.locator(opts.graph ? `#sandwich-${opts.graph} canvas` : '#flame canvas').boundingBox();
  await page.mouse.click(box.x + r.x + r.w / 2, box.y + r.y + 9, { modifiers: opts.modifiers });
}

test('browse: service list, flame graph widths and colours, zoom, search, top table, sandwich', async () => {
  const page = await newPage();
  await page.goto(`${base}/#page=flame&from=now-30m`);
  await settled(page);
  // Services are listed; the first one is opened by default.
  const services = await page.locator('#service-list li').allTextContents();
  assert.deepEqual(services, ['cart', 'shop']);
  assert.equal(await page.locator('#service-title').textContent(), 'cart');
  // Search the list, open shop.
  await page.fill('#service-search', 'sh');
  assert.deepEqual(await page.locator('#service-list li').allTextContents(), ['shop']);
  let n = await loads(page);
  await page.click('#service-list li:text("shop")');
  await settled(page, n);
  assert.match(page.url(), /service=shop/);
  assert.deepEqual(await page.evaluate(() => window.__ui.errors), []);

  // Default view hides idle-poll: on-cpu 8 s, blocked-io 2 s, blocked-lock 0.5 s.
  const W = (await oneRect(page, 'root')).w;
  const onCpu = await oneRect(page, '[on-cpu]');
  near(onCpu.w / W, 8 / 10.5, 0.01, '[on-cpu] share');
  near((await oneRect(page, '[off-cpu:blocked-io]')).w / W, 2 / 10.5, 0.01, 'blocked-io share');
  assert.equal((await rects(page, 'epoll_wait')).length, 0, 'idle-poll hidden by default');
  const parse = await oneRect(page, 'parse_json');
  const render = await oneRect(page, 'render');
  near(parse.w / render.w, 4, 0.1, 'parse_json : render width');
  near(parse.w / W, 4 / 10.5, 0.01, 'parse_json share');
  // Warm on-CPU, cool off-CPU colours; flame orientation: deeper frames higher up.
  assert.match(parse.color, /^rgb\(/);
  assert.match((await oneRect(page, 'read_file')).color, /^hsl\(2[01]\d/);
  assert.match((await oneRect(page, 'mutex_lock')).color, /^hsl\(2[67]\d/);
  assert.ok(parse.y < onCpu.y, 'flame graph grows upwards');
  await page.screenshot({ path: join(ART, '01-flamegraph.png'), fullPage: true });

  // Tooltip on hover.
  const box = await page.locator('#flame canvas').boundingBox();
  await page.mouse.move(box.x + parse.x + parse.w / 2, box.y + parse.y + 9);
  const tip = await page.locator('#tooltip').textContent();
  assert.match(tip, /parse_json/);
  assert.match(tip, /total: 4\.00 s \(38\.1% of all\)/);
  assert.match(tip, /self: 4\.00 s/);
  await page.screenshot({ path: join(ART, '02-tooltip.png') });

  // Zoom into handle (under on-cpu): parse_json 4 s of handle's 5 s on-CPU.
  await clickFrame(page, 'handle', { kind: 'on-cpu' });
  await zoomDone(page);
  const z = await rects(page, 'parse_json');
  near(z[0].w / W, 4 / 5, 0.01, 'parse_json share of zoomed handle');
  assert.match(await page.locator('#breadcrumb').textContent(), /all.*\[on-cpu\].*main.*server.*handle/);
  assert.match(decodeURIComponent(page.url()), /zoom=\[on-cpu\];main;server;handle/);
  await page.screenshot({ path: join(ART, '03-zoomed.png') });
  // Zoom state survives a reload (shareable URL).
  const zoomedUrl = page.url();
  const p2 = await newPage();
  await p2.goto(zoomedUrl);
  await settled(p2);
  near((await rects(p2, 'parse_json'))[0].w / W, 4 / 5, 0.01, 'restored zoom');
  await p2.close();
  // Escape zooms out one level (to server).
  await page.keyboard.press('Escape');
  await zoomDone(page);
  assert.match(decodeURIComponent(page.url()), /zoom=\[on-cpu\];main;server(&|$)/);
  // Breadcrumb back to all.
  await page.click('#breadcrumb button:text("all")');
  await zoomDone(page);
  near((await oneRect(page, 'parse_json')).w / W, 4 / 10.5, 0.01, 'zoomed out');

  // Search: highlighted matches and matched share.
  await page.fill('#search', 'parse|render');
  await page.waitForFunction(() => /of total/.test(document.getElementById('match-info').textContent));
  assert.match(await page.locator('#match-info').textContent(), /2 frames · 47\.6% of total/);
  assert.equal((await oneRect(page, 'parse_json')).color, 'match');
  assert.equal((await oneRect(page, 'gc')).color, 'dim');
  assert.match(decodeURIComponent(page.url()), /q=parse\|render/);
  await page.screenshot({ path: join(ART, '04-search.png'), fullPage: true });

  // Top table: parse_json first by self; click highlights it in the graph.
  const first = await page.locator('#top-table tbody tr').first().locator('td').allTextContents();
  assert.equal(first[0], 'parse_json');
  assert.equal(first[1], '4.00 s');
  await page.click('#top-table td.fn:text("render")');
  await page.waitForFunction(() => /1 frame/.test(document.getElementById('match-info').textContent));
  assert.equal((await oneRect(page, 'render')).color, 'match');
  assert.equal((await oneRect(page, 'parse_json')).color, 'dim');
  assert.equal(await page.locator('#top-table tr.selected td.fn').textContent(), 'render');
  // Sort by total: main (10.5 s) first.
  n = await loads(page);
  await page.click('#top-table th[data-sort=total]');
  await page.waitForFunction(() => document.querySelector('#top-table tbody td.fn')?.textContent === 'main');
  assert.match(page.url(), /sort=total/);

  // Sandwich for handle: callers server <- main <- [kind]; callees parse_json, render, read_file, mutex_lock.
  await page.click('#top-table tr[data-fn=handle] button');
  await page.waitForFunction(() => !document.getElementById('tab-sandwich').hidden);
  const callers = await page.evaluate(() => window.__ui.sandwich.callers.rects().map((r) => r.name));
  assert.deepEqual(callers.slice(0, 2), ['handle', 'server']);
  const callees = await page.evaluate(() => window.__ui.sandwich.callees.rects().map((r) => r.name));
  for (const c of ['parse_json', 'render', 'read_file', 'mutex_lock']) assert.ok(callees.includes(c), `callee ${c} in ${callees}`);
  const hw = (await oneRect(page, 'handle', 'callees')).w;
  assert.notEqual((await oneRect(page, 'handle', 'callees')).color, '#c9c9c9', 'sandwich root coloured like a frame');
  near((await oneRect(page, 'parse_json', 'callees')).w / hw, 4 / 7.5, 0.01, 'sandwich callee share');
  await page.locator('#tab-sandwich').screenshot({ path: join(ART, '05-sandwich.png') });

  // Kind filter and idle toggle.
  n = await loads(page);
  await page.selectOption('#kind-filter', 'off');
  await settled(page, n);
  assert.equal((await rects(page, 'parse_json')).length, 0);
  assert.equal((await rects(page, 'read_file')).length, 1);
  assert.equal((await rects(page, 'epoll_wait')).length, 0);
  n = await loads(page);
  await page.uncheck('#hide-idle');
  await settled(page, n);
  const W2 = (await oneRect(page, 'root')).w;
  near((await oneRect(page, 'epoll_wait')).w / W2, 10 / 12.5, 0.01, 'idle-poll share when shown');
  n = await loads(page);
  await page.check('#icicle');
  const ic = await oneRect(page, 'epoll_wait');
  assert.ok(ic.y > (await oneRect(page, 'root')).y, 'icicle grows downwards');
  await page.screenshot({ path: join(ART, '06-offcpu-icicle.png'), fullPage: true });
  assert.deepEqual(page.consoleErrors, []);
  await page.close();
});

test('label filter, diff view and exports', async () => {
  const page = await newPage();
  await page.goto(`${base}/#service=shop&from=now-30m&idle=0`);
  await settled(page);
  // Label filter host=web-2 via the label pickers.
  await page.selectOption('#label-name', 'host');
  await page.waitForFunction(() => [...document.querySelectorAll('#label-value option')].some((o) => o.value === 'web-2'));
  const values = await page.locator('#label-value option').allTextContents();
  assert.deepEqual(values.slice(1), ['web-1', 'web-2']);
  await page.selectOption('#label-value', 'web-2');
  let n = await loads(page);
  await page.click('#label-add');
  await settled(page, n);
  assert.match(decodeURIComponent(page.url()), /filter=host=web-2/);
  assert.match(await page.locator('#filters').textContent(), /host=web-2/);
  assert.equal((await rects(page, 'gc')).length, 0, 'gc only runs on web-1');
  assert.equal((await rects(page, 'compress')).length, 1);
  const W = (await oneRect(page, 'root')).w;
  near((await oneRect(page, 'compress')).w / W, 2 / 3.5, 0.01, 'compress share on web-2');
  await page.screenshot({ path: join(ART, '07-label-filter.png'), fullPage: true });

  // Export SVG of the filtered view: a download with an inferno SVG.
  const [dl] = await Promise.all([page.waitForEvent('download'), page.click('#export-svg')]);
  const svgPath = join(ART, 'export.svg');
  await dl.saveAs(svgPath);
  const svg = readFileSync(svgPath, 'utf8');
  assert.match(svg, /<svg/);
  assert.match(svg, /compress/);
  assert.doesNotMatch(svg, /gc/);
  // Folded and pprof links answer 200 with the right content.
  for (const [id, check] of [['export-folded', (b) => assert.match(b.toString(), /main;batch;compress 2000000000/)], ['export-pprof', (b) => assert.deepEqual([...b.subarray(0, 2)], [0x1f, 0x8b])]]) {
    const href = await page.getAttribute(`#${id}`, 'href');
    const r = await fetch(new URL(href, base));
    assert.equal(r.status, 200, id);
    check(Buffer.from(await r.arrayBuffer()));
  }
  // Remove the filter chip.
  n = await loads(page);
  await page.click('#filters .chip button');
  await settled(page, n);
  assert.equal((await rects(page, 'gc')).length, 1);

  // Diff: web-1 on-CPU, target now-30m..now vs the previous 30 minutes (the default base).
  n = await loads(page);
  await page.selectOption('#kind-filter', 'on');
  await settled(page, n);
  await page.selectOption('#label-name', 'host');
  await page.waitForFunction(() => [...document.querySelectorAll('#label-value option')].some((o) => o.value === 'web-1'));
  await page.selectOption('#label-value', 'web-1');
  n = await loads(page);
  await page.click('#label-add');
  await settled(page, n);
  n = await loads(page);
  await page.click('#view-mode button[data-view=diff]');
  await settled(page, n);
  assert.match(page.url(), /view=diff/);
  const grew = await oneRect(page, 'parse_json');
  const shrank = await oneRect(page, 'gc');
  const same = await oneRect(page, 'render');
  assert.match(grew.color, /^hsl\(0,/, 'parse_json grew: red');
  assert.match(shrank.color, /^hsl\(215,/, 'gc shrank: blue');
  assert.equal(same.color, '#dcdcdc', 'render unchanged: not coloured');
  const box = await page.locator('#flame canvas').boundingBox();
  await page.mouse.move(box.x + grew.x + grew.w / 2, box.y + grew.y + 9);
  assert.match(await page.locator('#tooltip').textContent(), /change: \+2\.00 s \(\+200\.0%\)/);
  await page.screenshot({ path: join(ART, '08-diff.png'), fullPage: true });
  // A high significance threshold uncolours small changes.
  await page.fill('#threshold', '50');
  await page.dispatchEvent('#threshold', 'change');
  assert.equal((await oneRect(page, 'parse_json')).color, '#dcdcdc');
  // The diff view restores from its URL in a new page.
  const url = page.url();
  const p2 = await newPage();
  await p2.goto(url);
  await settled(p2);
  assert.equal(await p2.locator('#view-mode button.active').textContent(), 'Diff');
  assert.equal(await p2.inputValue('#kind-filter'), 'on');
  assert.equal((await oneRect(p2, 'parse_json')).color, '#dcdcdc');
  assert.deepEqual(page.consoleErrors.filter((e) => !/favicon/.test(e)), []);
  await p2.close();
  await page.close();
});

test('timeline: per-kind series and drag to select a range', async () => {
  const page = await newPage();
  await page.goto(`${base}/#service=shop&from=now-1h&idle=0`);
  await settled(page);
  const legend = await page.locator('#legend').textContent();
  for (const k of ['on-cpu', 'off-cpu:blocked-io', 'off-cpu:blocked-lock', 'off-cpu:idle-poll']) assert.ok(legend.includes(k), `legend has ${k}: ${legend}`);
  // on-CPU over the hour: 8 s (target) + 5 s (base).
  assert.match(legend, /on-cpu 13\.00 s/);
  // Hover the target window's step: tooltip per kind.
  const tx = await page.evaluate((t) => {
    const tl = window.__ui.timeline;
    const { from, step } = tl.data;
    return tl.px(from + (Math.floor((t - from) / step) + 0.5) * step);
  }, TARGET_AT - (TARGET_AT % 10_000)); // ingest aligns timestamps down to the 10 s window
  const tbox = await page.locator('#timeline canvas').boundingBox();
  await page.mouse.move(tbox.x + tx, tbox.y + 60);
  const ttip = await page.locator('#tooltip').textContent();
  assert.match(ttip, /on-cpu: 8\.00 s/);
  assert.match(ttip, /off-cpu:idle-poll: 10\.00 s/);
  await page.screenshot({ path: join(ART, '09a-timeline-tooltip.png') });
  // Drag over the right half (the target window at now-20m, not the base at now-50m).
  const box = await page.locator('#timeline canvas').boundingBox();
  const n = await loads(page);
  await page.mouse.move(box.x + 46 + (box.width - 46) * 0.55, box.y + 50);
  await page.mouse.down();
  await page.mouse.move(box.x + 46 + (box.width - 46) * 0.8, box.y + 50, { steps: 5 });
  await page.mouse.up();
  await settled(page, n);
  const st = await page.evaluate(() => window.__ui.state);
  assert.match(st.from, /^\d+$/);
  assert.ok(Number(st.from) < TARGET_AT && Number(st.until) > TARGET_AT, 'selection covers the target window');
  assert.match(await page.locator('#legend').textContent(), /on-cpu 8\.00 s/);
  await page.screenshot({ path: join(ART, '09-timeline-drag.png'), fullPage: true });
  // Custom range (local time inputs): only the base window at now-50m.
  const local = (ms) => new Date(ms - new Date(ms).getTimezoneOffset() * 60000).toISOString().slice(0, 19);
  await page.fill('#custom-from', local(BASE_AT - 5 * 60_000));
  await page.fill('#custom-until', local(BASE_AT + 5 * 60_000));
  const n2 = await loads(page);
  await page.click('#custom-apply');
  await settled(page, n2);
  assert.match(await page.locator('#legend').textContent(), /on-cpu 5\.00 s/);
  const W = (await oneRect(page, 'root')).w;
  near((await oneRect(page, 'gc')).w / W, 3 / 5, 0.01, 'gc share in the base window');
  await page.close();
});

/** Our agent's bundle3 (see `profiler_pprof::stacks`): parts of (service, kind, labels,
 *  stacks) whose time is also attributed to requests. parts: [{service, kind, labels,
 *  stacks: [[frames, value]], requests: [[key, value, [[entry index, value]]]]}] */
function bundle3(parts) {
  const out = [];
  const varint = (v) => { v = BigInt(v); do { let b = Number(v & 0x7fn); v >>= 7n; if (v) b |= 0x80; out.push(b); } while (v); };
  const bytes = (b) => { varint(b.length); out.push(...b); };
  const text = (t) => bytes([...Buffer.from(t, 'utf8')]);
  const section = (fill) => { const start = out.length; fill(); return out.splice(start); };
  out.push(...Buffer.from('PSB1'));
  for (const p of parts) {
    out.push(3);
    text(p.service); text(p.kind); varint(Object.keys(p.labels).length);
    for (const [k, v] of Object.entries(p.labels)) { text(k); text(v); }
    const win = section(() => {
      out.push(...Buffer.from('PST1'));
      for (const [frames, value] of p.stacks) { out.push(1); varint(BigInt(value) * 2n); varint(frames.length); frames.forEach(text); }
      out.push(0); varint(p.stacks.length);
    });
    bytes(win);
    bytes([]);
    const reqs = section(() => {
      varint(p.requests.length);
      for (const [key, value, entries] of p.requests) {
        text(key); text(value); varint(entries.length);
        let next = 0;
        for (const [i, v] of entries) { varint(i - next + 1); next = i + 1; varint(v); }
      }
    });
    bytes(reqs);
  }
  out.push(0); varint(parts.length);
  return Buffer.from(out);
}

test('slowest requests: the table ranks them and its diff shows the slow ones\' extra wait', async () => {
  const srv = await spawnServer();
  try {
    // 200 requests of 20 ms in base_wait; two of them 40 ms more in slow_dependency.
    const ms = 1_000_000;
    const slow = (j) => j % 100 === 99;
    const requests = [...Array(200).keys()].map((j) => ['request_id', `req-${j}`, [[0, 20 * ms], ...(slow(j) ? [[1, 40 * ms]] : [])]]);
    const body = bundle3([{
      service: 'reqsvc', kind: 'off-cpu:sleep', labels: { endpoint: 'checkout' },
      stacks: [[['main', 'handle', 'base_wait'], 200 * 20 * ms], [['main', 'handle', 'slow_dependency'], 2 * 40 * ms]],
      requests,
    }]);
    const r = await fetch(`${srv.url}/api/v1/ingest?format=bundle3&from=${TARGET_AT}&batch_id=r1&label=host:h1`, { method: 'POST', body });
    assert.equal(r.status, 200, await r.text());

    const page = await newPage();
    await page.goto(`${srv.url}/#page=flame&service=reqsvc&from=now-30m&tab=requests`);
    await settled(page);
    await page.waitForSelector('#requests-table tbody tr');
    const stats = await page.locator('#requests-stats').textContent();
    assert.match(stats, /200 requests/);
    assert.match(stats, /p99 20(\.0+)? ms · max 60(\.0+)? ms/);
    const first = await page.locator('#requests-table tbody tr').first().locator('td').allTextContents();
    assert.match(first[0], /^request_id=req-(99|199)$/);
    assert.match(first[4], /endpoint=checkout/);
    await page.screenshot({ path: join(ART, '20-slowest-requests.png'), fullPage: true });

    const n = await loads(page);
    await page.click('#requests-diff');
    await settled(page, n);
    assert.match(decodeURIComponent(page.url()), /req=slowest:1/);
    assert.match(decodeURIComponent(page.url()), /view=diff/);
    assert.match(await page.locator('#requests-chip').textContent(), /slowest 1% of requests against the rest/);
    // The slowest 1% (two requests) waited in slow_dependency; the rest never did.
    assert.equal((await rects(page, 'slow_dependency')).length, 1);
    const tree = await page.evaluate(() => { const f = window.__ui.flame.f; const i = f.name.indexOf('slow_dependency'); return { value: f.total[i], base: f.base[i] }; });
    assert.ok(tree.value > 0, JSON.stringify(tree));
    assert.ok(!tree.base, `the rest has no slow_dependency: ${JSON.stringify(tree)}`);
    await page.screenshot({ path: join(ART, '21-slowest-requests-diff.png'), fullPage: true });
    assert.deepEqual(page.consoleErrors, []);
    await page.close();
  } finally {
    await stopServer(srv);
  }
});

test('a failing query shows the error, not a blank page', async () => {
  const page = await newPage();
  await page.goto(`${base}/#service=shop&from=yesterday`);
  await page.waitForFunction(() => window.__ui?.loads > 0 && document.body.dataset.status === 'error');
  const err = await page.locator('#errors').textContent();
  assert.match(err, /GET \/api\/v1\/(timeline|flamegraph|top) failed: HTTP 400 Bad Request: `from`: "yesterday" is neither unix milliseconds/);
  assert.match(await page.locator('#flame-status').textContent(), /HTTP 400/);
  assert.ok(await page.locator('#service-list li').count() >= 2, 'rest of the page still works');
  await page.screenshot({ path: join(ART, '10-error.png'), fullPage: true });
  // Unknown UI file and API route: JSON errors.
  const r = await fetch(`${base}/ui/nope.js`);
  assert.equal(r.status, 404);
  await page.close();
});

test('assets are served with content types and cache validators', async () => {
  const r = await fetch(`${base}/`);
  assert.equal(r.status, 200);
  assert.match(r.headers.get('content-type'), /^text\/html/);
  assert.equal(r.headers.get('cache-control'), 'no-cache');
  const js = await fetch(`${base}/ui/app.js`);
  assert.match(js.headers.get('content-type'), /^text\/javascript/);
  const etag = js.headers.get('etag');
  assert.ok(etag);
  const again = await fetch(`${base}/ui/app.js`, { headers: { 'if-none-match': etag } });
  assert.equal(again.status, 304);
  assert.match((await fetch(`${base}/ui/style.css`)).headers.get('content-type'), /^text\/css/);
});

test('performance: 50k-node flame graph renders and zooms smoothly', async () => {
  // 50 x 20 x 50 tree: 51,050 frames below main (50,000 leaves), one stack per leaf.
  const rows = [];
  let v = 1;
  for (let a = 0; a < 50; a++) for (let b = 0; b < 20; b++) for (let c = 0; c < 50; c++) {
    rows.push([`main;mod${a}::service_fn_${a};mod${a}::handler_${a}_${b};leaf_${a}_${b}_${c}`, 1_000_000 + ((v = (v * 48271) % 2147483647) % 5_000_000)]);
  }
  await ingest({ service: 'zz-big', kind: 'on-cpu', from: String(TARGET_AT), host: 'perf' }, lines(rows));
  const page = await newPage();
  await page.goto(`${base}/#service=zz-big&from=now-30m&nodes=60000`);
  await settled(page);
  const first = await page.evaluate(() => window.__ui.perf.firstRender);
  assert.ok(first.nodes > 51000, `nodes rendered: ${first.nodes}`);
  // Zoom into one service function and measure the animation frames.
  await page.evaluate(() => { window.__ui.flame.perf.zoomFrames = []; });
  await clickFrame(page, 'mod7::service_fn_7', {});
  await zoomDone(page);
  const frames = await page.evaluate(() => window.__ui.flame.perf.zoomFrames);
  assert.ok(frames.length >= 3, `zoom animated over ${frames.length} frames`);
  const draws = frames.map((f) => f.draw);
  const intervals = frames.slice(1).map((f) => f.interval);
  const avg = (a) => a.reduce((x, y) => x + y, 0) / a.length;
  const fullDraw = await page.evaluate(() => {
    const f = window.__ui.flame;
    f.zoomTo(0, false);
    const t = [];
    for (let i = 0; i < 10; i++) { const s = performance.now(); f.draw(); t.push(performance.now() - s); }
    return t.reduce((a, b) => a + b) / t.length;
  });
  await page.screenshot({ path: join(ART, '11-50k-nodes.png') });
  console.log(`PERF 50k-node flame graph: ${first.nodes} nodes; first render ${first.toScreenMs} ms after the query started ` +
    `(fetch+JSON ${first.fetchMs} ms, flatten ${first.flattenMs} ms, draw ${first.drawMs} ms), ${first.sinceNavigationMs} ms after navigation; ` +
    `zoom animation ${frames.length} frames, draw avg ${avg(draws).toFixed(2)} ms / max ${Math.max(...draws).toFixed(2)} ms, ` +
    `frame interval avg ${avg(intervals).toFixed(1)} ms / max ${Math.max(...intervals).toFixed(1)} ms; full unzoomed redraw avg ${fullDraw.toFixed(2)} ms`);
  assert.ok(first.drawMs < 500, `first draw ${first.drawMs} ms`);
  assert.ok(Math.max(...draws) < 100, `zoom frame draw max ${Math.max(...draws)} ms`);
  await page.close();
});

test('performance: a real-shaped flame graph (29k stacks of a cargo build) is on screen within 300 ms of the click', async () => {
  // The test build's server is optimized (opt-level 1): an unoptimized one's query alone
  // takes longer than the goal.
  const srv = await spawnServer();
  try {
    // Every fourth stack of the agent's recording of a release build of this workspace.
    const data = join(HERE, '../benches/data/cargo-build.folded.zst');
    const text = execFileSync('zstd', ['-dc', '--long=27', data], { maxBuffer: 1 << 30 }).toString();
    const byKind = new Map();
    text.split('\n').filter((l, i) => l && i % 4 === 0).forEach((l) => {
      const cut = l.indexOf(';');
      const kind = l.slice(1, cut - 1);
      if (!byKind.has(kind)) byKind.set(kind, []);
      byKind.get(kind).push(l.slice(cut + 1));
    });
    let stacks = 0;
    for (const [kind, ls] of byKind) {
      for (let i = 0; i < ls.length; i += 3000) {
        const q = new URLSearchParams({ format: 'folded', service: 'cargo-build', kind, from: String(TARGET_AT), label: 'host:builder' });
        const r = await fetch(`${srv.url}/api/v1/ingest?${q}`, { method: 'POST', body: ls.slice(i, i + 3000).join('\n') + '\n' });
        assert.equal(r.status, 200, await r.text());
      }
      stacks += ls.length;
    }
    const q = new URLSearchParams({ format: 'folded', service: 'a-small', kind: 'on-cpu', from: String(TARGET_AT) });
    assert.equal((await fetch(`${srv.url}/api/v1/ingest?${q}`, { method: 'POST', body: 'main;work 1000\n' })).status, 200);
    const page = await newPage();
    await page.goto(`${srv.url}/#service=a-small&from=now-30m`);
    await settled(page);
    const timings = [];
    for (let round = 0; round < 5; round++) {
      // Alternate services so every click runs the whole query; the first click is the cold
      // one (it interns the stacks' frame names).
      for (const service of ['cargo-build', 'a-small']) {
        const before = await loads(page);
        await page.evaluate(() => document.addEventListener('click', () => { window.__clickAt = performance.now(); }, { capture: true, once: true }));
        await page.click(`#service-list li[title="${service}"]`);
        await settled(page, before);
        if (service !== 'cargo-build') continue;
        const r = await page.evaluate(() => ({ ...window.__ui.perf.lastRender, clickAt: window.__clickAt }));
        timings.push({ ...r, fromClickMs: +(r.sinceNavigationMs - r.clickAt).toFixed(1) });
      }
    }
    await page.screenshot({ path: join(ART, '12-real-shaped.png') });
    const last = timings[timings.length - 1];
    console.log(`PERF real-shaped flame graph: ${stacks} stacks ingested, ${last.nodes} nodes drawn; from the click to the screen ` +
      `${timings.map((x) => x.fromClickMs).join(' / ')} ms (query+JSON ${timings.map((x) => x.fetchMs).join(' / ')} ms, ` +
      `flatten ${last.flattenMs} ms, draw ${last.drawMs} ms)`);
    assert.ok(stacks > 20000, `stacks ingested: ${stacks}`);
    assert.ok(last.nodes > 1000, `nodes drawn: ${last.nodes}`);
    // The median click is the typical one: the cold click and any click that stalls on the
    // neighbours of a shared 2-CPU machine are outliers (CI measured a cold click at 315 ms
    // once). A click far past the goal still fails.
    const fromClick = timings.map((x) => x.fromClickMs).sort((a, b) => a - b);
    assert.ok(fromClick[2] < 300, `median from the click to the screen: ${fromClick[2]} ms (${fromClick.join(' / ')})`);
    assert.ok(fromClick[4] < 1000, `slowest click to the screen: ${fromClick[4]} ms`);
    assert.deepEqual(page.consoleErrors.filter((e) => !/favicon/.test(e)), []);
    await page.close();
  } finally {
    await stopServer(srv);
  }
});

// ---------------------------------------------------------------- fleet overview

test('overview: the home page lists 1,000 services by CPU over the range where data is; search, sort and click-through', async () => {
  const srv = await spawnServer();
  try {
    // svc-0000 .. svc-0999: service i uses (i + 1) x 10 ms of CPU on host-(i % 3), every
    // tenth also waits 2 s on I/O; all of it 20 minutes ago, so not in the last 15.
    const name = (i) => `svc-${String(i).padStart(4, '0')}`;
    for (let i = 0; i < 1000; i += 50) {
      await Promise.all(Array.from({ length: 50 }, (_, j) => i + j).flatMap((k) => [
        ingest({ service: name(k), kind: 'on-cpu', from: TARGET_AT, host: `host-${k % 3}` }, `main;work_${k} ${(k + 1) * 10_000_000}\n`, srv.url),
        ...(k % 10 === 0 ? [ingest({ service: name(k), kind: 'off-cpu:blocked-io', from: TARGET_AT, host: 'host-9' }, `main;read ${2 * S}\n`, srv.url)] : []),
      ]));
    }
    const page = await newPage();
    await page.goto(`${srv.url}/`);
    await settled(page);
    // The overview is home; the range moved to where the data is, and the URL says so.
    assert.equal(await page.isVisible('#overview-table'), true);
    const hash = new URLSearchParams(new URL(page.url()).hash.slice(1));
    const from = Number(hash.get('from')), until = Number(hash.get('until'));
    assert.ok(from <= TARGET_AT && TARGET_AT < until && until - from === 15 * 60_000, `default range ${from}..${until} around ${TARGET_AT}`);
    assert.match(await page.title(), /^Overview · \d{4}-\d\d-\d\d .* · Profiler$/);
    const perf = await page.evaluate(() => window.__ui.perf.overview);
    console.log(`PERF overview of ${perf.services} services: ${perf.toScreenMs} ms from the request to the table (test build's server)`);
    const names = () => page.$$eval('#overview-table tbody tr', (rs) => rs.map((r) => r.dataset.service));
    let shown = await names();
    assert.equal(shown.length, 1000);
    assert.deepEqual(shown.slice(0, 3), ['svc-0999', 'svc-0998', 'svc-0997'], 'heaviest on-CPU first');
    // Cores over the 15 minutes: 10 s of CPU / 900 s.
    const top = await page.$$eval('#overview-table tbody tr:first-child td', (ts) => ts.map((t) => t.textContent));
    assert.equal(top[1].trim(), '0.0111');
    assert.equal(top[3], '1', 'hosts');
    const waiting = await page.$eval('#overview-table tr[data-service="svc-0990"] td:nth-child(3)', (t) => t.textContent);
    assert.match(waiting, /0\.00222\s*blocked-io/);
    assert.ok(await page.$('#overview-table tr[data-service="svc-0990"] svg.spark polygon'));
    await page.screenshot({ path: join(ART, '13-overview.png') });

    // Search.
    await page.fill('#overview-search', 'svc-001');
    await page.waitForFunction(() => document.querySelectorAll('#overview-table tbody tr').length === 10);
    assert.match(await page.textContent('#overview-info'), /^10 of 1000 services/);
    // Sort by name, then reversed; hosts sort by count.
    await page.click('#overview-table th[data-col="service"]');
    shown = await names();
    assert.deepEqual([shown[0], shown[9]], ['svc-0010', 'svc-0019']);
    await page.click('#overview-table th[data-col="service"]');
    shown = await names();
    assert.deepEqual([shown[0], shown[9]], ['svc-0019', 'svc-0010']);
    const h1 = new URLSearchParams(new URL(page.url()).hash.slice(1));
    // Descending is the default, so the URL leaves it out.
    assert.deepEqual([h1.get('osort'), h1.get('odir'), h1.get('oq')], ['service', null, 'svc-001']);
    // Search and sort survive a reload from the URL.
    const p2 = await newPage();
    await p2.goto(page.url());
    await settled(p2);
    assert.deepEqual(await p2.$$eval('#overview-table tbody tr', (rs) => rs.map((r) => r.dataset.service)), shown);
    assert.equal(await p2.inputValue('#overview-search'), 'svc-001');
    await p2.close();
    await page.fill('#overview-search', '');
    await page.waitForFunction(() => document.querySelectorAll('#overview-table tbody tr').length === 1000);
    await page.click('#overview-table th[data-col="off"]');
    shown = await names();
    assert.deepEqual(shown.slice(0, 2), ['svc-0000', 'svc-0010'], 'most threads waiting first, ties by name');
    assert.ok(shown.slice(0, 100).every((x) => x.endsWith('0')), 'the 100 waiting services lead');
    // Click-through: the flame graph of that service over the same range.
    const n = await loads(page);
    await page.click('#overview-table tr[data-service="svc-0015"]');
    await settled(page, n);
    assert.equal(await page.textContent('#service-title'), 'svc-0015');
    assert.equal(await page.isVisible('#overview-table'), false);
    const h2 = new URLSearchParams(new URL(page.url()).hash.slice(1));
    assert.deepEqual([h2.get('service'), h2.get('page'), h2.get('from'), h2.get('until')], ['svc-0015', 'flame', String(from), String(until)]);
    assert.match(await page.title(), /^svc-0015 · flame graph · /);
    assert.equal((await rects(page, 'work_15')).length, 1);
    // And back.
    await page.click('#page-nav button[data-page="overview"]');
    await page.waitForFunction(() => document.querySelectorAll('#overview-table tbody tr').length === 1000);
    assert.deepEqual(page.consoleErrors.filter((e) => !/favicon/.test(e)), []);
    await page.close();
  } finally {
    await stopServer(srv);
  }
});

// ---------------------------------------------------------------- changes

test('changes: significant regressions first, noise hidden, a click opens the diff on the function; deploys are timeline markers', async () => {
  // Deploys are compared 5 minutes after, against the 5 minutes before.
  const confDir = mkdtempSync(join(tmpdir(), 'ui-test-conf-'));
  const conf = join(confDir, 'server.toml');
  writeFileSync(conf, '[deploys]\ncompare_secs = 300\ncheck_secs = 1\n');
  const srv = await spawnServer(['--config', conf]);
  try {
    // 30 windows of version 1 and 30 of version 2: parse takes 10 points of CPU from
    // render; blocked-io in read and the rest only jitter. The deploy is 6 minutes old.
    const T = Math.floor((NOW - 60_000) / 10_000) * 10_000;
    let seed = 7;
    const jitter = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return 1 + (seed / 2147483648 - 0.5) * 0.1; };
    const post = (kind, at, body) => ingest({ service: 'api', kind, from: at, host: 'h1', version: at < T - 300_000 ? '1' : '2' }, body, srv.url);
    for (let i = 0; i < 60; i++) {
      const at = T - 600_000 + i * 10_000;
      const moved = i >= 30 ? 0.1 : 0;
      const ms = (share) => Math.round(share * jitter() * 2e10);
      await post('on-cpu', at, lines([
        ['main;serve;parse', ms(0.3 + moved)], ['main;serve;render', ms(0.5 - moved)], ['main;gc', ms(0.2)],
      ]));
      await post('off-cpu:blocked-io', at, lines([['main;serve;read', ms(0.4)]]));
    }
    const page = await newPage();
    await page.goto(`${srv.url}/#service=api&view=changes&from=${T - 300_000}&until=${T}&bfrom=${T - 600_000}&buntil=${T - 300_000}`);
    await settled(page);
    assert.equal(await page.isVisible('#changes-table'), true);
    assert.equal(await page.isVisible('#flame'), false, 'the flame graph gives way to the table');
    const rows = () => page.$$eval('#changes-table tbody tr', (rs) => rs.map((r) => ({ fn: r.dataset.fn, kind: r.dataset.kind, cls: r.className, cells: [...r.cells].map((c) => c.textContent) })));
    let shown = await rows();
    // Regressions first, where the time went (self) before the callers that hold it.
    assert.deepEqual(shown.slice(0, 2).map((r) => [r.fn, r.cells[3], r.cls]), [['parse', 'self', 'grew'], ['parse', 'total', 'grew']]);
    assert.equal(shown[0].cells[0], '▲');
    // 10 points moved, give or take the jitter.
    const moved = Number(/^\+(\d+\.\d\d) pt$/.exec(shown[0].cells[6])?.[1]);
    assert.ok(moved > 9 && moved < 11, shown[0].cells[6]);
    assert.ok(shown.some((r) => r.fn === 'render' && r.cls === 'shrank' && r.cells[0] === '▼'), JSON.stringify(shown));
    assert.ok(shown.every((r) => r.fn !== 'read' && r.fn !== 'gc'), 'unchanged functions are not significant');
    assert.ok(await page.$('#changes-table tbody tr[data-fn="parse"] svg.spark polyline'));
    assert.match(await page.textContent('#changes-info'), /significant of \d+ tested · 30 base and 30 target observations/);
    assert.match(await page.title(), /^api · changes · /);
    await page.screenshot({ path: join(ART, '14-changes.png') });
    // The deploy of version 2 is a red marker on the timeline once compared.
    let events = [];
    for (let i = 0; i < 50 && !events[0]?.comparison; i++) {
      events = await (await fetch(`${srv.url}/api/v1/events?service=api`)).json();
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(events[0]?.comparison?.top[0]?.function, 'parse', JSON.stringify(events));
    assert.equal(events[0].at_ms, T - 300_000);
    await page.reload();
    await settled(page);
    await page.waitForFunction(() => window.__ui.timeline.markers.length === 1);
    const marker = await page.evaluate(() => { const m = window.__ui.timeline.markers[0]; return { label: m.label, color: m.color, title: m.title, x: window.__ui.timeline.px(m.at) }; });
    assert.equal(marker.label, 'v2');
    assert.match(marker.title, /deploy 1 → 2 .* significant regression.*first: parse/);
    assert.match(marker.color, /^hsl\(0,/);
    await page.screenshot({ path: join(ART, '15-deploy-marker.png') });
    // Everything tested, noise included.
    await page.uncheck('#changes-significant');
    shown = await rows();
    assert.ok(shown.some((r) => r.fn === 'read' && r.kind === 'off-cpu:blocked-io' && r.cls === 'noise'), JSON.stringify(shown));
    assert.match(page.url(), /sig=0/);
    await page.check('#changes-significant');
    // A click: the diff flame graph, on-CPU, parse highlighted.
    let n = await loads(page);
    await page.click('#changes-table tbody tr[data-fn="parse"]');
    await settled(page, n);
    const h = new URLSearchParams(new URL(page.url()).hash.slice(1));
    assert.deepEqual([h.get('view'), h.get('q'), h.get('kf')], ['diff', '^parse$', 'on']);
    assert.equal(await page.isVisible('#flame'), true);
    const m = await page.evaluate(() => window.__ui.match);
    assert.ok(m && m.count === 1, JSON.stringify(m));
    // A click on the deploy marker: its changes, the time after against the time before.
    n = await loads(page);
    const box = await page.locator('#timeline canvas').boundingBox();
    await page.mouse.click(box.x + marker.x, box.y + 40);
    await settled(page, n);
    const c = events[0].comparison;
    const h2 = new URLSearchParams(new URL(page.url()).hash.slice(1));
    assert.deepEqual([h2.get('view'), h2.get('from'), h2.get('until'), h2.get('bfrom'), h2.get('buntil')],
      ['changes', String(c.from), String(c.until), String(c.base_from), String(c.base_until)]);
    assert.equal((await rows())[0].fn, 'parse');
    assert.deepEqual(page.consoleErrors.filter((e) => !/favicon/.test(e)), []);
    await page.close();
  } finally {
    await stopServer(srv);
    rmSync(confDir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------- deep profiles

/** Opens the Deep profiles page and waits for its first load. */
async function openDeep(url) {
  const page = await newPage();
  await page.goto(url);
  await page.waitForFunction(() => window.__ui?.deep?.loads > 0, null, { timeout: 30_000 });
  return page;
}
const deepLoads = (page) => page.evaluate(() => window.__ui.deep.loads);
const api = async (path, opts, server = base) => {
  const r = await fetch(`${server}${path}`, opts);
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
};

test('deep profiles: create, list, reject a bad cron, edit and delete a schedule through the form', async () => {
  const page = await openDeep(`${base}/#page=deep`);
  assert.equal(await page.locator('#page-deep').isVisible(), true);
  assert.equal(await page.locator('#page-flame').isVisible(), false, 'flame page hidden');
  assert.equal(await page.locator('#page-nav button.active').textContent(), 'Deep profiles');
  assert.match(await page.locator('#schedules-table tbody').textContent(), /No schedules yet/);
  // Known services are offered in the selector's datalist.
  const offered = await page.$$eval('#deep-services option', (os) => os.map((o) => o.value));
  assert.ok(offered.includes('shop') && offered.includes('cart'), `services offered: ${offered}`);

  // Create, at an hour 12 h away in Paris: a schedule active right now would start a
  // run, which the next test does not expect.
  const parisHour = Number(new Intl.DateTimeFormat('en-GB', { timeZone: 'Europe/Paris', hour: '2-digit', hourCycle: 'h23' }).format(new Date()));
  const hour = (parisHour + 12) % 24;
  const cron = `0 ${hour} * * *`;
  const form = '#schedule-form';
  await page.fill(`${form} [name=name]`, 'nightly shop');
  await page.fill(`${form} [name=cron]`, cron);
  await page.fill(`${form} [name=timezone]`, 'Europe/Paris');
  await page.fill(`${form} [name=duration_s]`, '600');
  await page.fill(`${form} [name=service]`, 'shop');
  await page.fill(`${form} [name=labels]`, 'container=api');
  await page.fill(`${form} [name=frequency_hz]`, '499');
  await page.click('#schedule-submit');
  const row = page.locator('#schedules-table tr[data-name="nightly shop"]');
  await row.waitFor();
  const cells = await row.locator('td').allTextContents();
  assert.equal(cells[0], 'nightly shop');
  assert.equal(cells[1], cron);
  assert.equal(cells[2], 'Europe/Paris');
  assert.equal(cells[3], '10 min');
  assert.equal(cells[4], 'service=shop, container=api');
  assert.equal(cells[5], '499 Hz, off-CPU');
  assert.equal(cells[6], 'yes');
  assert.match(cells[7], /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(in [\d.]+ (h|min|d)\)$/);
  assert.match(await page.locator('#schedule-msg').textContent(), /Created schedule "nightly shop"; next start/);
  assert.equal(await page.inputValue(`${form} [name=name]`), '', 'form reset after create');
  let list = (await api('/api/v1/schedules')).body;
  assert.equal(list.length, 1);
  assert.deepEqual({ ...list[0], id: 0, next_start_ms: 0 }, {
    id: 0, name: 'nightly shop', cron, timezone: 'Europe/Paris', duration_s: 600,
    selector: { service: 'shop', labels: { container: 'api' } }, settings: { frequency_hz: 499, off_cpu: true, off_cpu_sampling: 1 },
    enabled: true, next_start_ms: 0,
  });
  // The next start is at that hour in Paris.
  const paris = new Intl.DateTimeFormat('en-GB', { timeZone: 'Europe/Paris', hour: '2-digit', minute: '2-digit' }).format(new Date(list[0].next_start_ms));
  assert.equal(paris, `${String(hour).padStart(2, '0')}:00`);
  await page.screenshot({ path: join(ART, '12-deep-schedules.png'), fullPage: true });

  // A bad cron: the server's reason shows inline, the field is marked, nothing is created.
  await page.fill(`${form} [name=name]`, 'broken');
  await page.fill(`${form} [name=cron]`, '61 3 * * *');
  await page.fill(`${form} [name=service]`, 'shop');
  await page.click('#schedule-submit');
  const err = page.locator('#schedule-error');
  await err.waitFor({ state: 'visible' });
  assert.match(await err.textContent(), /^POST \/api\/v1\/schedules failed: HTTP 400 Bad Request: bad cron expression "61 3 \* \* \*"/);
  assert.equal(await page.getAttribute(`${form} [name=cron]`, 'class'), 'invalid');
  await page.locator('#schedule-form').screenshot({ path: join(ART, '13-deep-bad-cron.png') });
  assert.equal((await api('/api/v1/schedules')).body.length, 1);
  // Other server reasons show the same way: unknown service, unknown time zone.
  await page.fill(`${form} [name=cron]`, cron);
  assert.equal(await page.getAttribute(`${form} [name=cron]`, 'class'), '', 'editing clears the mark');
  await page.fill(`${form} [name=service]`, 'ghost');
  await page.click('#schedule-submit');
  await page.waitForFunction(() => /unknown service "ghost"/.test(document.getElementById('schedule-error').textContent));
  await page.fill(`${form} [name=service]`, 'shop');
  await page.fill(`${form} [name=timezone]`, 'Mars/Olympus');
  await page.click('#schedule-submit');
  await page.waitForFunction(() => /unknown time zone "Mars\/Olympus"/.test(document.getElementById('schedule-error').textContent));
  // Client-side check for a malformed number/label before any request.
  await page.fill(`${form} [name=timezone]`, 'UTC');
  await page.fill(`${form} [name=labels]`, 'oops');
  await page.click('#schedule-submit');
  await page.waitForFunction(() => /label "oops" is not k=v/.test(document.getElementById('schedule-error').textContent));
  assert.equal((await api('/api/v1/schedules')).body.length, 1);

  // Edit: the form fills with the schedule; save with a shorter duration, disabled.
  await row.locator('button:text("Edit")').click();
  assert.match(await page.locator('#schedule-form-title').textContent(), /Edit schedule "nightly shop"/);
  assert.equal(await page.inputValue(`${form} [name=cron]`), cron);
  assert.equal(await page.inputValue(`${form} [name=timezone]`), 'Europe/Paris');
  assert.equal(await page.inputValue(`${form} [name=labels]`), 'container=api');
  assert.equal(await page.isHidden('#schedule-error'), true, 'old error cleared');
  await page.fill(`${form} [name=duration_s]`, '120');
  await page.fill(`${form} [name=cron]`, '*/30 9-17 * * 1-5');
  await page.uncheck(`${form} [name=enabled]`);
  await page.click('#schedule-submit');
  await page.waitForFunction(() => /Saved schedule/.test(document.getElementById('schedule-msg').textContent));
  await page.waitForFunction(() => document.querySelector('#schedules-table tr[data-name="nightly shop"] td.mono')?.textContent === '*/30 9-17 * * 1-5');
  const edited = await row.locator('td').allTextContents();
  assert.equal(edited[1], '*/30 9-17 * * 1-5');
  assert.equal(edited[3], '2 min');
  assert.equal(edited[6], 'no');
  assert.equal(edited[7], '(disabled)');
  list = (await api('/api/v1/schedules')).body;
  assert.equal(list.length, 1);
  assert.equal(list[0].enabled, false);
  assert.equal(list[0].duration_s, 120);
  assert.equal(await page.locator('#schedule-submit').textContent(), 'Create schedule', 'back to create mode');

  // Delete (after confirming).
  let asked = '';
  page.once('dialog', (d) => { asked = d.message(); d.accept(); });
  await row.locator('button:text("Delete")').click();
  await row.waitFor({ state: 'detached' });
  assert.match(asked, /Delete schedule "nightly shop"/);
  assert.match(await page.locator('#schedules-table tbody').textContent(), /No schedules yet/);
  assert.deepEqual((await api('/api/v1/schedules')).body, []);
  assert.deepEqual(page.consoleErrors.filter((e) => !/status of 400/.test(e)), []);
  await page.close();
});

test('deep profiles: profile now for a known service, runs table with per-host states, link to the flame graph', async () => {
  const page = await openDeep(`${base}/#page=deep`);
  const form = '#now-form';
  // Unknown service: the server's reason inline.
  await page.fill(`${form} [name=value]`, 'ghost');
  await page.click('#now-submit');
  await page.waitForFunction(() => !document.getElementById('now-error').hidden);
  assert.match(await page.locator('#now-error').textContent(), /POST \/api\/v1\/runs failed: HTTP 400 Bad Request: unknown service "ghost"/);
  // Too long: limit from the server.
  await page.fill(`${form} [name=value]`, 'shop');
  await page.fill(`${form} [name=duration_s]`, '99999');
  await page.click('#now-submit');
  await page.waitForFunction(() => /exceeds the limit/.test(document.getElementById('now-error').textContent));
  // shop has ingested data: the run starts.
  await page.fill(`${form} [name=duration_s]`, '45');
  await page.fill(`${form} [name=frequency_hz]`, '199');
  await page.uncheck(`${form} [name=off_cpu]`);
  const before = Date.now();
  await page.click('#now-submit');
  await page.waitForFunction(() => /Started run/.test(document.getElementById('now-msg').textContent));
  assert.equal(await page.isHidden('#now-error'), true);
  const runs = (await api('/api/v1/runs')).body;
  assert.equal(runs.length, 1);
  const run = runs[0];
  assert.deepEqual(run.selector, { service: 'shop' });
  assert.deepEqual(run.settings, { frequency_hz: 199, off_cpu: false, off_cpu_sampling: 1 });
  assert.ok(run.start_ms >= before - 1000 && run.end_ms === run.start_ms + 45_000);
  const row = page.locator(`#runs-table tr[data-id="${run.id}"]`);
  await row.waitFor();
  let cells = await row.locator('td').allTextContents();
  assert.equal(cells[0], 'running');
  assert.equal(cells[1], 'profile now');
  assert.equal(cells[2], 'service=shop');
  assert.equal(cells[3], '199 Hz, no off-CPU');
  assert.match(cells[6], /no agent reported yet/);
  const color = (sel) => row.locator(sel).first().evaluate((e) => getComputedStyle(e).backgroundColor);
  assert.equal(await color('td:first-child .badge'), 'rgb(47, 111, 214)', 'running: blue');
  // The flame-graph link uses the UI's hash state: service and the run's window.
  const href = await row.locator('a.flame-link').getAttribute('href');
  assert.equal(href, `#service=shop&from=${run.start_ms}&until=${run.end_ms}`);

  // Agents report per host; one fails -> the run is failed (red), with the host's message.
  const report = (host, state, message = '') => api(`/api/v1/agent/runs/${run.id}?` + new URLSearchParams({ host, state, message }), { method: 'POST' });
  assert.equal((await report('web-1', 'running')).status, 204);
  assert.equal((await report('web-2', 'failed', 'perf_event_open: permission denied')).status, 204);
  let n = await deepLoads(page);
  await page.click('#deep-refresh');
  await page.waitForFunction((p) => window.__ui.deep.loads > p, n);
  cells = await row.locator('td').allTextContents();
  assert.equal(cells[0], 'failed');
  assert.match(cells[6], /web-1 running/);
  assert.match(cells[6], /web-2 failed perf_event_open: permission denied/);
  assert.equal(await color('td:first-child .badge'), 'rgb(198, 40, 40)', 'failed: red');
  assert.equal(await row.locator('.hosts .host:has-text("web-1") .badge').evaluate((e) => getComputedStyle(e).backgroundColor), 'rgb(47, 111, 214)');
  assert.match(await page.locator('#runs-info').textContent(), /1 failed/);
  await page.screenshot({ path: join(ART, '14-deep-runs.png'), fullPage: true });

  // A host-only run has no service to link to; says so instead.
  await page.selectOption(`${form} [name=target]`, 'host');
  await page.fill(`${form} [name=value]`, 'web-1');
  await page.click('#now-submit');
  await page.waitForFunction(() => document.querySelectorAll('#runs-table tbody tr').length === 2);
  assert.match(await page.locator('#runs-table tbody tr', { hasText: 'host=web-1' }).textContent(), /no service selected/);

  // Runs refresh by themselves while the page is open.
  n = await deepLoads(page);
  await page.waitForFunction((p) => window.__ui.deep.loads > p, n, { timeout: 15_000 });

  // Following the link opens the flame-graph page on the run's window.
  n = await loads(page);
  await row.locator('a.flame-link').click();
  await settled(page, n);
  const st = await page.evaluate(() => window.__ui.state);
  assert.equal(st.page, 'flame');
  assert.equal(st.service, 'shop');
  assert.equal(st.from, String(run.start_ms));
  assert.equal(st.until, String(run.end_ms));
  assert.equal(await page.locator('#page-flame').isVisible(), true);
  assert.equal(await page.locator('#page-deep').isVisible(), false);
  assert.equal(await page.locator('#service-title').textContent(), 'shop');
  assert.deepEqual(await page.evaluate(() => window.__ui.errors), []);
  await page.screenshot({ path: join(ART, '16-deep-run-flamegraph.png'), fullPage: true });
  // And the nav goes back.
  await page.click('#page-nav button[data-page=deep]');
  await page.locator('#runs-table').waitFor();
  assert.match(page.url(), /page=deep/);
  assert.deepEqual(page.consoleErrors.filter((e) => !/status of 400/.test(e)), []);
  await page.close();
});

test('deep profiles: writes send the API token from the panel (sessionStorage, never the URL)', async () => {
  const s = await spawnServer(['--token', 'agent-tok', '--admin-token', 'sekret']);
  try {
    const r = await fetch(`${s.url}/api/v1/ingest?` + new URLSearchParams({ format: 'folded', service: 'api', kind: 'on-cpu', label: 'host:h1' }), {
      method: 'POST', body: 'main;serve 1000000\n', headers: { Authorization: 'Bearer agent-tok' },
    });
    assert.equal(r.status, 200, await r.text());
    const page = await newPage();
    await page.goto(`${s.url}/#page=deep`);
    await page.waitForFunction(() => window.__ui?.deep?.loads > 0);
    await page.fill('#now-form [name=value]', 'api');
    await page.click('#now-submit');
    await page.waitForFunction(() => !document.getElementById('now-error').hidden);
    assert.match(await page.locator('#now-error').textContent(),
      /POST \/api\/v1\/runs failed: HTTP 401 Unauthorized: missing `Authorization: Bearer <token>` header \(enter the API token at the top of this page\)/);
    await page.fill('#deep-token', 'wrong');
    await page.click('#now-submit');
    await page.waitForFunction(() => /invalid bearer token \(check the API token/.test(document.getElementById('now-error').textContent));
    // The agents' ingest token cannot start runs.
    await page.fill('#deep-token', 'agent-tok');
    await page.click('#now-submit');
    await page.waitForFunction(() => /HTTP 403 Forbidden: changing schedules, runs and alert rules needs an admin token/.test(document.getElementById('now-error').textContent));
    await page.fill('#deep-token', 'sekret');
    await page.click('#now-submit');
    await page.waitForFunction(() => /Started run/.test(document.getElementById('now-msg').textContent));
    await page.locator('#runs-table tbody tr[data-state]').waitFor();
    // Schedules too.
    await page.fill('#schedule-form [name=name]', 'hourly');
    await page.fill('#schedule-form [name=cron]', '0 * * * *');
    await page.fill('#schedule-form [name=service]', 'api');
    await page.click('#schedule-submit');
    await page.locator('#schedules-table tr[data-name=hourly]').waitFor();
    assert.doesNotMatch(page.url(), /sekret/);
    assert.equal(await page.evaluate(() => sessionStorage.getItem('profiler.apiToken')), 'sekret');
    assert.equal(await page.evaluate(() => localStorage.length), 0);
    // Kept for the tab: a reload still has it.
    await page.reload();
    await page.waitForFunction(() => window.__ui?.deep?.loads > 0);
    assert.equal(await page.inputValue('#deep-token'), 'sekret');
    await page.screenshot({ path: join(ART, '15-deep-token.png'), fullPage: true });
    await page.close();
  } finally {
    await stopServer(s);
  }
});

test('alert rules: the config file\'s listed read-only; create, refuse a bad one, replace and delete through the form', async () => {
  const confDir = mkdtempSync(join(tmpdir(), 'ui-test-conf-'));
  const conf = join(confDir, 'server.toml');
  writeFileSync(conf, '[[alerts]]\nname = "fleet daily"\nservice = "*"\nevery_secs = 86400\nbaseline = "week"\n');
  const srv = await spawnServer(['--config', conf]);
  try {
    await ingest({ service: 'api', kind: 'on-cpu', from: NOW - 60_000, host: 'h1' }, 'main;serve 1000000\n', srv.url);
    const page = await newPage();
    await page.goto(`${srv.url}/#page=deep`);
    await page.waitForFunction(() => window.__ui?.deep?.loads > 0);
    const rows = () => page.$$eval('#alerts-table tbody tr', (rs) => rs.map((r) => [...r.cells].map((c) => c.textContent)));
    await page.locator('#alerts-table tr[data-name="fleet daily"]').waitFor();
    assert.deepEqual(await rows(), [['fleet daily', '* (every service)', '1 d', 'a week earlier', '1', 'config file', 'read-only']]);

    const form = '#alert-form';
    await page.fill(`${form} [name=name]`, 'api hourly');
    await page.fill(`${form} [name=service]`, 'apj');
    await page.click('#alert-submit');
    await page.waitForFunction(() => /unknown service "apj"/.test(document.getElementById('alert-error').textContent));
    assert.equal(await page.locator(`${form} [name=service]`).getAttribute('class'), 'invalid', 'the field is marked');
    await page.fill(`${form} [name=service]`, 'api');
    await page.fill(`${form} [name=minutes]`, '0.01');
    await page.click('#alert-submit');
    await page.waitForFunction(() => /every_secs must be in 20\.\.=604800, got 1/.test(document.getElementById('alert-error').textContent));
    assert.equal(await page.locator(`${form} [name=minutes]`).getAttribute('class'), 'invalid');
    // A config rule's name is taken.
    await page.fill(`${form} [name=name]`, 'fleet daily');
    await page.fill(`${form} [name=minutes]`, '60');
    await page.click('#alert-submit');
    await page.waitForFunction(() => /HTTP 409 Conflict: alert "fleet daily" is defined in the server's config file/.test(document.getElementById('alert-error').textContent));
    assert.equal((await api('/api/v1/alerts', {}, srv.url)).body.length, 1);

    await page.fill(`${form} [name=name]`, 'api hourly');
    await page.fill(`${form} [name=service]`, 'api');
    await page.fill(`${form} [name=minutes]`, '60');
    await page.selectOption(`${form} [name=baseline]`, 'day');
    await page.click('#alert-submit');
    await page.waitForFunction(() => /Saved alert rule "api hourly": api every 1 h/.test(document.getElementById('alert-msg').textContent));
    assert.equal(await page.isHidden('#alert-error'), true);
    assert.deepEqual((await rows())[1], ['api hourly', 'api', '1 h', 'a day earlier', '1', 'this page / API', 'Delete']);
    // The same name replaces the rule.
    await page.fill(`${form} [name=name]`, 'api hourly');
    await page.fill(`${form} [name=service]`, 'api');
    await page.fill(`${form} [name=minutes]`, '30');
    await page.fill(`${form} [name=min_regressions]`, '3');
    await page.click('#alert-submit');
    await page.waitForFunction(() => /every 30 min/.test(document.getElementById('alert-msg').textContent));
    const listed = (await api('/api/v1/alerts', {}, srv.url)).body;
    assert.deepEqual(listed.map((r) => [r.name, r.service, r.every_secs, r.baseline, r.min_regressions, r.source]),
      [['fleet daily', '*', 86400, 'week', 1, 'config'], ['api hourly', 'api', 1800, 'previous', 3, 'api']]);
    await page.screenshot({ path: join(ART, '18-alert-rules.png'), fullPage: true });

    let asked = '';
    page.once('dialog', (d) => { asked = d.message(); d.accept(); });
    await page.locator('#alerts-table tr[data-name="api hourly"] button:text("Delete")').click();
    await page.locator('#alerts-table tr[data-name="api hourly"]').waitFor({ state: 'detached' });
    assert.match(asked, /Delete alert rule "api hourly"/);
    assert.equal((await api('/api/v1/alerts', {}, srv.url)).body.length, 1);
    assert.deepEqual(page.consoleErrors.filter((e) => !/status of (400|409)/.test(e)), []);
    await page.close();
  } finally {
    await stopServer(srv);
    rmSync(confDir, { recursive: true, force: true });
  }
});

test('deep profiles: a failing API shows what failed, the rest of the page works', async () => {
  const page = await newPage();
  await page.route('**/api/v1/runs', (route) => (route.request().method() === 'GET'
    ? route.fulfill({ status: 503, contentType: 'application/json', body: JSON.stringify({ error: 'schedule store unavailable' }) })
    : route.continue()));
  // Opened from the flame view of shop: "profile now" starts from that service.
  await page.goto(`${base}/#service=shop&page=deep`);
  await page.waitForFunction(() => window.__ui?.deep?.loads > 0);
  assert.equal(await page.inputValue('#now-form [name=value]'), 'shop');
  await page.locator('#runs-error').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#runs-error').textContent(), 'GET /api/v1/runs failed: HTTP 503 Service Unavailable: schedule store unavailable');
  assert.equal(await page.isHidden('#schedules-error'), true);
  assert.match(await page.locator('#schedules-table tbody').textContent(), /No schedules yet|hourly|nightly/);
  // The host target relabels the field.
  await page.selectOption('#now-form [name=target]', 'host');
  assert.equal(await page.locator('#now-target-label').textContent(), 'Host');
  assert.equal(await page.inputValue('#now-form [name=value]'), '', 'the service name is not kept as a host name');
  await page.screenshot({ path: join(ART, '17-deep-error.png'), fullPage: true });
  // Once the server answers again, the next refresh clears the error.
  await page.unroute('**/api/v1/runs');
  const n = await deepLoads(page);
  await page.click('#deep-refresh');
  await page.waitForFunction((p) => window.__ui.deep.loads > p, n);
  assert.equal(await page.isHidden('#runs-error'), true);
  assert.ok(await page.locator('#runs-table tbody tr[data-state]').count() >= 1, 'runs listed again');
  await page.close();
});

// ---------------------------------------------------------------- wait histograms

/** Our agent's `bundle2` body (see profiler_pprof::stacks): one part per
 * {service, kind, stacks: [[frames, ns, waitsNs[]]]}, each wait weighted 1. */
function bundle2(parts) {
  const out = [...new TextEncoder().encode('PSB1')];
  const varint = (o, v) => { v = BigInt(v); while (v >= 0x80n) { o.push(Number(v & 0x7fn) | 0x80); v >>= 7n; } o.push(Number(v)); };
  const bytes = (o, b) => { varint(o, b.length); o.push(...b); };
  const text = (o, s) => bytes(o, [...new TextEncoder().encode(s)]);
  // The DDSketch mapping of profiler_pprof::waits: bucket i holds (1.1^(i-1), 1.1^i] ns.
  const bucket = (ns) => Math.ceil(Math.log(ns) / Math.log(1.1));
  for (const p of parts) {
    const w = [...new TextEncoder().encode('PST1')];
    const waits = [];
    let histograms = 0, next = 0;
    p.stacks.forEach(([frames, ns, durations], index) => {
      w.push(1); varint(w, BigInt(ns) * 2n); varint(w, frames.length);
      for (const f of frames) text(w, f);
      if (!durations.length) return;
      const counts = new Map();
      for (const d of durations) counts.set(bucket(d), (counts.get(bucket(d)) || 0) + 65536);
      histograms++;
      varint(waits, index - next + 1); next = index + 1;
      const sorted = [...counts].sort((a, b) => a[0] - b[0]);
      varint(waits, sorted.length);
      let prev = 0;
      for (const [b, c] of sorted) { varint(waits, b - prev + 1); prev = b + 1; varint(waits, c); }
    });
    w.push(0); varint(w, p.stacks.length);
    const section = [];
    varint(section, histograms);
    section.push(...waits);
    out.push(2); text(out, p.service); text(out, p.kind); varint(out, 0);
    bytes(out, w); bytes(out, section);
  }
  out.push(0); varint(out, parts.length);
  return new Uint8Array(out);
}

test('waits: clicking an off-CPU frame shows its wait histogram and percentiles; the top table sorts by p99 wait', async () => {
  const srv = await spawnServer();
  try {
    const at = String(Math.floor(TARGET_AT / 10_000) * 10_000);
    // query_db waits 2 ms in 97 calls of 100 and 60 ms in 3; the poll loop waits 10 ms.
    const queries = Array.from({ length: 1000 }, (_, i) => (i % 100 < 3 ? 60e6 : 2e6));
    const polls = Array.from({ length: 300 }, () => 10e6);
    const body = bundle2([
      { service: 'db', kind: 'off-cpu:sleep', stacks: [
        [['db', 'main', 'handle', 'query_db', 'do_nanosleep_[k]'], queries.reduce((a, b) => a + b, 0), queries],
        [['db', 'main', 'poll_loop', 'do_nanosleep_[k]'], 3e9, polls],
      ] },
    ]);
    const r = await fetch(`${srv.url}/api/v1/ingest?format=bundle2&from=${at}`, { method: 'POST', body });
    assert.equal(r.status, 200, await r.text());
    await ingest({ service: 'db', kind: 'on-cpu', from: at }, lines([['db;main;handle;parse', S]]), srv.url);

    const page = await newPage();
    await page.goto(`${srv.url}/#service=db&page=flame&from=now-30m`);
    await settled(page);
    // The top table's p99 wait column, and sorting by it.
    const p99Cell = (fn) => page.locator(`#top-table tr[data-fn="${fn}"] td:nth-child(6)`).textContent();
    assert.match(await p99Cell('query_db'), /^5[78]\.\d ms$/);
    assert.match(await p99Cell('poll_loop'), /^(9\.\d\d|10\.\d) ms$/);
    assert.equal(await p99Cell('parse'), '', 'on-CPU functions have no waits');
    await page.click('#top-table th[data-sort="p99"]');
    const order = await page.$$eval('#top-table tbody tr', (rs) => rs.map((r) => r.dataset.fn));
    assert.ok(order.indexOf('query_db') < order.indexOf('poll_loop') && order.indexOf('poll_loop') < order.indexOf('parse'), order.join(','));

    // Selecting the off-CPU frame opens its histogram.
    await clickFrame(page, 'query_db');
    await page.waitForFunction(() => !document.getElementById('tab-waits').hidden && window.__ui.waits.last);
    await page.waitForFunction(() => /p99/.test(document.getElementById('waits-stats').textContent));
    const stats = await page.locator('#waits-stats').textContent();
    assert.match(stats, /^1,000 waits under query_db · p50 (1\.9\d|2\.\d\d) ms · p95 2\.\d\d ms · p99 5\d\.\d ms/);
    const bars = await page.$$eval('#waits-hist rect.wait-bar', (rs) => rs.map((r) => Number(r.dataset.le)));
    assert.equal(bars.length, 2, 'two buckets: 2 ms and 60 ms');
    assert.ok(bars[0] >= 2e6 && bars[0] < 2.2e6 && bars[1] >= 60e6 && bars[1] < 66e6, bars.join(','));
    assert.match(page.url(), /tab=waits/);
    assert.match(page.url(), /wfn=query_db/);
    await page.locator('#tab-waits').screenshot({ path: join(ART, '18-waits.png') });
    // An empty name: every off-CPU wait.
    await page.fill('#waits-fn', '');
    await page.dispatchEvent('#waits-fn', 'change');
    await page.waitForFunction(() => /^1,300 waits/.test(document.getElementById('waits-stats').textContent));
    // Off-CPU frames coloured by their p99: query_db's 60 ms tail red, the poll loop's 10 ms between.
    await page.click('#breadcrumb button:text("all")');
    await zoomDone(page);
    await page.check('#color-p99');
    assert.match(page.url(), /cp99=1/);
    const hue = async (name) => Number(/^hsl\((\d+)/.exec((await oneRect(page, name)).color)?.[1]);
    assert.ok((await hue('query_db')) < 40, `query_db ${(await oneRect(page, 'query_db')).color}`);
    const poll = await hue('poll_loop');
    assert.ok(poll > 90 && poll < 130, `poll_loop hue ${poll}`);
    assert.match((await oneRect(page, 'parse')).color, /^rgb\(/, 'on-CPU frames keep their colours');
    await page.screenshot({ path: join(ART, '19-waits-by-p99.png'), fullPage: true });
    assert.deepEqual(page.consoleErrors, []);
    await page.close();
  } finally {
    await stopServer(srv);
  }
});
