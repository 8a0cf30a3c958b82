// A Node `http2` client as applications write one: one session shared by N workers, each
// sending requests back to back; a session that got GOAWAY (or closed) is replaced by a new
// one for the next request. Every request is recorded; errors by code (ERR_HTTP2_GOAWAY_SESSION:
// a queued stream refused locally on GOAWAY; ERR_HTTP2_STREAM_ERROR: RST_STREAM, e.g.
// REFUSED_STREAM). Prints one JSON line at the end. Used by tests/robustness.rs and by
// benches/h2_clients.py.
//
// usage: node h2client.js URL WORKERS DURATION_MS [PATH]
'use strict';
const http2 = require('node:http2');

const [url, workersArg, durationArg, path = '/'] = process.argv.slice(2);
const workers = Number(workersArg);
const deadline = Date.now() + Number(durationArg);
const stats = { ok: 0, failed: 0, sessions: 0, goaways: 0, errors: {}, statuses: {} };

let current = null;
function session() {
  if (current && !current.closed && !current.destroyed) return current;
  const s = http2.connect(url);
  stats.sessions++;
  s.on('goaway', () => {
    stats.goaways++;
    if (current === s) current = null;
  });
  s.on('close', () => {
    if (current === s) current = null;
  });
  s.on('error', () => {});
  current = s;
  return s;
}

function once() {
  return new Promise((resolve) => {
    let req;
    try {
      req = session().request({ ':path': path });
    } catch (e) {
      return resolve({ error: e.code || String(e) });
    }
    let status = 0;
    req.on('response', (h) => { status = h[':status']; });
    req.on('data', () => {});
    req.on('end', () => resolve({ status }));
    // A stream error names its code in the message (e.g. NGHTTP2_REFUSED_STREAM: a stream
    // nghttp2 had queued and refused itself on GOAWAY, or one the server refused).
    req.on('error', (e) => {
      const m = /error code (\S+)/.exec(e.message || '');
      resolve({ error: (e.code || String(e)) + (m ? ' ' + m[1] : '') });
    });
    req.end();
  });
}

async function worker() {
  while (Date.now() < deadline) {
    const r = await once();
    if (r.error) {
      stats.failed++;
      stats.errors[r.error] = (stats.errors[r.error] || 0) + 1;
    } else if (r.status >= 500 || r.status === 0) {
      stats.failed++;
      stats.statuses[r.status] = (stats.statuses[r.status] || 0) + 1;
    } else {
      stats.ok++;
    }
  }
}

Promise.all(Array.from({ length: workers }, worker)).then(() => {
  if (current) current.close();
  process.stdout.write(JSON.stringify(stats) + '\n');
  process.exit(0);
});
