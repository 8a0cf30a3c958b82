// The soak's load: HTTP/1.1 keep-alive and h2c (prior knowledge) against one address, each at
// a fixed rate, for a fixed time. HTTP/1: an http.Agent with keep-alive and at most SOCKETS
// sockets; h2c: one session (replaced if it closes). Requests are started on a 10 ms tick
// (as many as the time since the last tick calls for, the remainder carried), and at most MAX_IN_FLIGHT of each kind
// are outstanding (a slow proxy lowers the rate rather than piling up requests).
// Prints one JSON line of cumulative counts every second, and a last one at the end.
//
// usage: node soak_client.js URL H1_RATE H2_RATE DURATION_S
'use strict';
const http = require('node:http');
const http2 = require('node:http2');

const [url, h1Arg, h2Arg, durArg] = process.argv.slice(2);
const h1Rate = Number(h1Arg), h2Rate = Number(h2Arg);
const start = Date.now();
const deadline = start + Number(durArg) * 1000;
const SOCKETS = 8, MAX_IN_FLIGHT = 64;
const agent = new http.Agent({ keepAlive: true, maxSockets: SOCKETS });
const u = new URL(url);
const c = { h1_ok: 0, h1_failed: 0, h2_ok: 0, h2_failed: 0, h2_sessions: 0, errors: {} };
let h1In = 0, h2In = 0;

function fail(kind, e) {
  c[kind + '_failed']++;
  const k = kind + ':' + (e && (e.code || e.message) || String(e));
  c.errors[k] = (c.errors[k] || 0) + 1;
}

function h1() {
  h1In++;
  const req = http.get({ host: u.hostname, port: u.port, path: '/', agent }, (res) => {
    res.on('data', () => {});
    res.on('end', () => { h1In--; res.statusCode < 500 ? c.h1_ok++ : fail('h1', res.statusCode); });
  });
  req.setTimeout(10000, () => req.destroy(new Error('timeout')));
  req.on('error', (e) => { h1In--; fail('h1', e); });
}

let sess = null;
function session() {
  if (sess && !sess.closed && !sess.destroyed) return sess;
  const s = http2.connect(url);
  c.h2_sessions++;
  s.on('goaway', () => { if (sess === s) sess = null; });
  s.on('close', () => { if (sess === s) sess = null; });
  s.on('error', () => {});
  sess = s;
  return s;
}

function h2() {
  h2In++;
  let req;
  try { req = session().request({ ':path': '/' }); } catch (e) { h2In--; return fail('h2', e); }
  let status = 0;
  req.setTimeout(10000, () => req.close(http2.constants.NGHTTP2_CANCEL));
  req.on('response', (h) => { status = h[':status']; });
  req.on('data', () => {});
  req.on('end', () => { h2In--; status && status < 500 ? c.h2_ok++ : fail('h2', status); });
  req.on('error', (e) => { h2In--; fail('h2', e); });
  req.end();
}

let carry1 = 0, carry2 = 0, last = Date.now();
const tick = setInterval(() => {
  const now = Date.now();
  if (now >= deadline) return;
  // By the time elapsed, not the tick count: timers fire late under load.
  const dt = Math.min(now - last, 1000) / 1000;
  last = now;
  carry1 += h1Rate * dt; carry2 += h2Rate * dt;
  while (carry1 >= 1) { carry1--; if (h1In < MAX_IN_FLIGHT) h1(); }
  while (carry2 >= 1) { carry2--; if (h2In < MAX_IN_FLIGHT) h2(); }
}, 10);

function report() {
  process.stdout.write(JSON.stringify({ t: (Date.now() - start) / 1000, ...c }) + '\n');
}
const rep = setInterval(report, 1000);

setTimeout(() => {
  clearInterval(tick);
  // Let what is in flight finish (bounded), then the last report.
  const until = Date.now() + 5000;
  const wait = setInterval(() => {
    if ((h1In === 0 && h2In === 0) || Date.now() > until) {
      clearInterval(wait); clearInterval(rep);
      report();
      agent.destroy();
      if (sess) sess.close();
      process.exit(0);
    }
  }, 50);
}, deadline - start);
