#!/usr/bin/env python3
"""The attack battery of issue 10, against the release binary, on 127.0.0.1 only.

    python3 benches/battery.py --bin target/release/lameduck [--soak S] [--only CASE ...]

(benches/battery.sh builds the binary and runs this.) Python 3 standard library only.

Every case starts from a proxy on ephemeral ports in front of a small app (this file's
`App`: `/` answers 200, `/stall` never answers, `/sink` reads its body) and prints one row:
case, what was sent, expected, observed, pass/fail. The table is printed in Markdown and
written to benches/results/battery-<date>.md. Each case is bounded in connections, frames
and seconds; the default run takes about two minutes. Exit status 1 when a case fails.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = "127.0.0.1"
# The short timeouts every case runs with, so each finishes in seconds.
HEADER_TIMEOUT = 2.0
RESPONSE_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
FLAGS = [
    f"--header-read-timeout={HEADER_TIMEOUT:g}s",
    f"--upstream-response-timeout={RESPONSE_TIMEOUT:g}s",
    f"--request-body-timeout={BODY_TIMEOUT:g}s",
]
# RSS growth a flood or the soak may cause and still count as flat.
RSS_SLACK_KB = 10 * 1024


# === the app ===


class App:
    """The app behind the proxy. Records every request it sees (method, path, Host)."""

    def __init__(self):
        self.seen = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _body(self):
                te = self.headers.get("Transfer-Encoding", "")
                if "chunked" in te.lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _answer(self):
                with app.lock:
                    app.seen.append((self.command, self.path, self.headers.get_all("Host")))
                body = self._body()
                if self.path.startswith("/stall"):
                    # Never answers (bounded: gives up when the battery ends, or after 30 s).
                    app.stop.wait(30)
                    self.close_connection = True
                    return
                out = b"ok %d\n" % len(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024

            def handle_error(self, request, client_address):
                pass  # the proxy closing on a timeout is what the cases do

        self.server = Server((HOST, 0), Handler)
        self.addr = self.server.server_address
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self):
        with self.lock:
            return [p for _, p, _ in self.seen]

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


# === the proxy ===


class Proxy:
    """`lameduck proxy` on ephemeral ports, its JSON logs collected from stderr."""

    def __init__(self, binary, upstream, extra=(), nofile=None):
        cmd = [binary, "proxy", "--listen", f"{HOST}:0", "--admin", f"{HOST}:0",
               "--upstream", f"{upstream[0]}:{upstream[1]}", "--log-format", "json", *extra]
        if nofile:
            # prlimit execs the command: the pid is the proxy's.
            cmd = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *cmd]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.logs = []
        ready = threading.Event()
        self.listen = self.admin = None

        def read():
            for line in self.proc.stderr:
                self.logs.append(line.rstrip("\n"))
                if "lameduck proxy serving" in line and not ready.is_set():
                    v = json.loads(line)
                    self.listen = parse_addr(v["listen"])
                    self.admin = parse_addr(v["admin"])
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(15):
            self.close()
            raise RuntimeError(f"proxy did not start: {self.logs[-5:]}")

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def alive(self):
        return self.proc.poll() is None

    def panicked(self):
        return any("panicked" in line for line in self.logs)

    def metric(self, name):
        status, body = http_get(self.admin, "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def parse_addr(s):
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


# === clients ===


def http_get(addr, path, timeout=5):
    c = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def raw(addr, data, timeout=5.0):
    """Sends `data` and returns everything read until the proxy closes (or `timeout`)."""
    s = socket.create_connection(addr, timeout=timeout)
    out = b""
    try:
        s.sendall(data)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s.settimeout(max(0.05, end - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def statuses(resp):
    """The status codes of every response in `resp`, in order (the app's bodies never
    contain a status line)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3})", resp)]


def is_closed(s):
    """Whether the peer closed (EOF or RST); data it sent first is read and dropped."""
    try:
        r, _, _ = select.select([s], [], [], 0)
        if not r:
            return False
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
            r, _, _ = select.select([s], [], [], 0)
            if not r:
                return False
    except (ConnectionResetError, BrokenPipeError, OSError):
        return True


def slowloris(addr, n, first, trickle, tick=1.0, limit=12.0, wait=0.0):
    """`n` connections send `first` (`wait` seconds after connecting), then one byte of
    `trickle` per `tick` (repeating its last byte). Returns (closed count, seconds from the
    first byte until the last close, still open)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(addr, timeout=5)
        s.setblocking(False)
        socks.append(s)
    time.sleep(wait)
    t0 = time.monotonic()
    for s in socks:
        s.send(first)
    open_ = {id(s): s for s in socks}
    last_close = 0.0
    i = 0
    next_tick = t0 + tick
    while open_ and time.monotonic() - t0 < limit:
        for k, s in list(open_.items()):
            if is_closed(s):
                del open_[k]
                last_close = time.monotonic() - t0
        if time.monotonic() >= next_tick:
            byte = trickle[min(i, len(trickle) - 1):][:1]
            for k, s in list(open_.items()):
                try:
                    s.send(byte)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError, OSError):
                    del open_[k]
                    last_close = time.monotonic() - t0
            i += 1
            next_tick += tick
        time.sleep(0.05)
    still = len(open_)
    for s in socks:
        s.close()
    return n - still, last_close, still


# === HTTP/2 frames (RFC 9113), enough for the floods ===

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
# :method GET, :path /, :scheme http (static table), :authority a (literal, not indexed).
GET_BLOCK = b"\x82\x84\x86\x01\x01a"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream & 0x7FFFFFFF) + payload


class H2:
    """A raw h2c (prior knowledge) connection that reads and drops what the server sends,
    noting GOAWAY and the close."""

    def __init__(self, addr):
        self.s = socket.create_connection(addr, timeout=5)
        self.s.setblocking(False)
        self.buf = b""
        self.goaway = None
        self.closed = False
        self.blocked = False
        self.frames_in = 0
        self.send(PREFACE + frame(SETTINGS, 0, 0))

    def poll(self):
        while not self.closed:
            try:
                chunk = self.s.recv(1 << 20)
            except BlockingIOError:
                break
            except (ConnectionResetError, OSError):
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self.buf += chunk
            while len(self.buf) >= 9:
                n = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + n:
                    break
                kind, payload = self.buf[3], self.buf[9:9 + n]
                self.buf = self.buf[9 + n:]
                self.frames_in += 1
                if kind == GOAWAY and self.goaway is None:
                    self.goaway = int.from_bytes(payload[4:8], "big")

    def send(self, data, patience=2.0, read=True):
        """Sends all of `data`, reading meanwhile unless `read` is false; False once the
        server stops reading (`patience` seconds without progress) or closes."""
        view = memoryview(data)
        stuck_since = None
        while view and not self.closed:
            if read:
                self.poll()
            try:
                n = self.s.send(view)
                view = view[n:]
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since > patience:
                    self.blocked = True
                    return False
                select.select([self.s], [self.s], [], 0.05)
            except (BrokenPipeError, ConnectionResetError, OSError):
                self.closed = True
        return not self.closed

    def settle(self, seconds=1.0):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.closed:
            self.poll()
            time.sleep(0.05)

    def outcome(self):
        parts = []
        if self.goaway is not None:
            parts.append(f"GOAWAY code {self.goaway:#x}")
        if self.closed:
            parts.append("closed")
        if self.blocked:
            parts.append("server stopped reading (backpressure)")
        return ", ".join(parts) or "still open"

    def close(self):
        self.s.close()


# === the cases ===


class Row:
    def __init__(self, case, sent, expected):
        self.case, self.sent, self.expected = case, sent, expected
        self.observed, self.ok = "not run", None

    def result(self, ok, observed):
        self.ok, self.observed = bool(ok), observed
        return self

    def verdict(self):
        return "not run" if self.ok is None else ("pass" if self.ok else "**FAIL**")


def case_slowloris(ctx):
    row = Row("slowloris", "300 conns: `GET / HTTP/1.1\\r\\n`, then 1 header byte/s",
              f"all closed by --header-read-timeout ({HEADER_TIMEOUT:g}s)")
    closed, last, still = slowloris(ctx.proxy.listen, 300, b"GET / HTTP/1.1\r\n", b"X-a: b")
    return row.result(still == 0 and last < HEADER_TIMEOUT + 2.5,
                      f"{closed}/300 closed, last at {last:.1f}s; {still} open")


def case_p_slowloris(ctx):
    row = Row("`P`-prefix slowloris", "300 conns: `P` alone, then `OST / HTTP/1.1…` at 1 byte/s",
              f"all closed at the header timeout ({HEADER_TIMEOUT:g}s)")
    closed, last, still = slowloris(ctx.proxy.listen, 300, b"P", b"OST / HTTP/1.1\r\nX-a: b")
    return row.result(still == 0 and last < HEADER_TIMEOUT + 2.5,
                      f"{closed}/300 closed, last at {last:.1f}s; {still} open")


def case_late_slowloris(ctx):
    row = Row("late-start slowloris",
              f"50 conns: idle {HEADER_TIMEOUT + 1:g}s, then `GET / HTTP/1.1\\r\\n` + 1 byte/s",
              f"all closed {HEADER_TIMEOUT:g}s after their first byte")
    closed, last, still = slowloris(ctx.proxy.listen, 50, b"GET / HTTP/1.1\r\n", b"X-a: b",
                                    wait=HEADER_TIMEOUT + 1, limit=8)
    return row.result(still == 0 and last < HEADER_TIMEOUT + 2.5,
                      f"{closed}/50 closed within 8s of the first byte; {still} open"
                      + (" (timed by --idle-timeout only)" if still else ""))


def case_fd_exhaustion(ctx):
    row = Row("fd exhaustion", "proxy under `prlimit --nofile=256:256`; 400 idle conns",
              "keep-alive client 200, /livez /readyz 200, refused_total > 0")
    p = Proxy(ctx.binary, ctx.app.addr, FLAGS, nofile=256)
    socks = []
    try:
        c = http.client.HTTPConnection(*p.listen, timeout=5)
        c.request("GET", "/")
        r = c.getresponse()
        before = r.status
        r.read()
        for _ in range(400):
            try:
                socks.append(socket.create_connection(p.listen, timeout=2))
            except OSError:
                break
        time.sleep(1.0)
        c.request("GET", "/")
        r = c.getresponse()
        after = r.status
        r.read()
        live = http_get(p.admin, "/livez")[0]
        ready = http_get(p.admin, "/readyz")[0]
        refused = p.metric("lameduck_connections_refused_total")
        ok = before == after == live == ready == 200 and (refused or 0) > 0 and p.alive()
        return row.result(ok, f"{len(socks)} opened; client {before}→{after}, /livez {live}, "
                              f"/readyz {ready}, refused_total {refused:g}")
    except Exception as e:  # a dead admin port is the failure this case looks for
        return row.result(False, f"error: {e!r}")
    finally:
        for s in socks:
            s.close()
        p.close()


def case_stalled_app(ctx):
    row = Row("stalled app", "`GET /stall` (the app never answers)",
              f"504 at --upstream-response-timeout ({RESPONSE_TIMEOUT:g}s)")
    t0 = time.monotonic()
    resp = raw(ctx.proxy.listen, b"GET /stall HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
               timeout=RESPONSE_TIMEOUT + 5)
    took = time.monotonic() - t0
    st = statuses(resp)
    names = b"upstream-response-timeout" in resp
    return row.result(st[:1] == [504] and took < RESPONSE_TIMEOUT + 1.5,
                      f"{st[:1] or 'nothing'} after {took:.1f}s"
                      + (", names the flag" if names else ""))


def case_slow_body(ctx):
    row = Row("slow request body", "`POST /sink`, Content-Length 100, body at 1 byte/s",
              f"408 at --request-body-timeout ({BODY_TIMEOUT:g}s)")
    s = socket.create_connection(ctx.proxy.listen, timeout=5)
    s.sendall(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
    s.setblocking(False)
    t0 = time.monotonic()
    out = b""
    while time.monotonic() - t0 < BODY_TIMEOUT + 6:
        try:
            s.send(b"x")
        except OSError:
            break
        r, _, _ = select.select([s], [], [], 1.0)
        if r:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                break
    took = time.monotonic() - t0
    s.close()
    st = statuses(out)
    return row.result(st[:1] == [408] and took < BODY_TIMEOUT + 2,
                      f"{st[:1] or 'nothing'} after {took:.1f}s")


def case_steady_upload(ctx):
    row = Row("steady slow upload",
              f"`POST /sink`, 16 KiB at 2 KiB/s (8s; above the 1 KiB per {BODY_TIMEOUT:g}s minimum)",
              "200 once the body is in (the app answers after reading it)")
    n = 16 * 1024
    s = socket.create_connection(ctx.proxy.listen, timeout=5)
    s.sendall(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
              b"Connection: close\r\n\r\n" % n)
    s.setblocking(False)
    t0 = time.monotonic()
    sent, out = 0, b""
    while sent < n and time.monotonic() - t0 < 12:
        try:
            s.send(b"x" * 1024)
            sent += 1024
        except OSError:
            break
        r, _, _ = select.select([s], [], [], 0.5)
        if r:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    s.setblocking(True)
    s.settimeout(5)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    s.close()
    took = time.monotonic() - t0
    st = statuses(out)
    why = ""
    if b"did not start its response" in out:
        why = " (--upstream-response-timeout ran while the body was still arriving)"
    return row.result(st[:1] == [200] and sent == n,
                      f"{st[:1] or 'nothing'} after {took:.1f}s, {sent // 1024} KiB sent{why}")


SMUGGLING = [
    # (case, bytes, expected statuses, what the app must see, description)
    # Framed by the transfer coding, Content-Length dropped, connection closed after the
    # answer (RFC 9112 §6.3): what follows the chunked body is never read as a request.
    ("CL+TE", b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled-1 HTTP/1.1\r\nHost: a\r\n\r\n",
     [200], ["/sink"], "Content-Length and chunked together, a GET after the chunked body"),
    ("CL+TE pipelined", b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
     b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled-2 HTTP/1.1\r\nHost: a\r\n\r\n",
     [200, 200], ["/first", "/sink"], "the same behind a GET, then a GET in the body"),
    ("two Host", b"GET /two-host HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
     [400], [], "`Host: a` and `Host: b`"),
    ("TE gzip, chunked", b"POST /te-gzip HTTP/1.1\r\nHost: a\r\n"
     b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     [501], [], "`Transfer-Encoding: gzip, chunked`"),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
     [405], [], "`CONNECT example.com:443`"),
    ("absolute-form", b"GET http://real.example/abs HTTP/1.1\r\nHost: other.example\r\n"
     b"Connection: close\r\n\r\n",
     [200], [("/abs", "real.example")], "`GET http://real.example/abs`, `Host: other.example`"),
    ("Connection: host", b"GET /conn-host HTTP/1.1\r\nHost: app.local\r\n"
     b"Connection: host, close\r\n\r\n",
     [200], [("/conn-host", "app.local")], "`Connection: host, close`"),
]


def case_smuggling(ctx):
    rows = []
    for name, data, want, app_sees, desc in SMUGGLING:
        row = Row(f"smuggling: {name}", desc, f"{'/'.join(map(str, want))}; app sees "
                  + (", ".join(a if isinstance(a, str) else f"{a[0]} with Host {a[1]}"
                               for a in app_sees) or "nothing"))
        with ctx.app.lock:
            ctx.app.seen.clear()
        resp = raw(ctx.proxy.listen, data, timeout=3)
        time.sleep(0.2)
        with ctx.app.lock:
            seen = list(ctx.app.seen)
        st = statuses(resp)
        paths = [p for _, p, _ in seen]
        smuggled = [p for p in paths if "smuggled" in p]
        ok = st == want and not smuggled
        if name.startswith("CL+TE"):
            ok = ok and b"connection: close" in resp.lower()
        for a in app_sees:
            if isinstance(a, str):
                ok = ok and a in paths
            else:
                ok = ok and any(p == a[0] and hosts == [a[1]] for _, p, hosts in seen)
        if not app_sees:
            ok = ok and not seen
        shown = ", ".join(f"{p} (Host {','.join(h or [])})" for _, p, h in seen) or "nothing"
        rows.append(row.result(ok, f"{st or 'no response'}; app saw {shown}"))
    return rows


def h2_flood(ctx, name, sent, build, count, batch, read=True):
    expected = ("GOAWAY/closed; RSS flat; no panic" if read else
                "GOAWAY/closed, or the server stops reading (nothing queued); RSS flat")
    row = Row(f"h2 {name}", sent, expected)
    p = ctx.proxy
    rss0 = p.rss_kb()
    h = H2(p.listen)
    t0 = time.monotonic()
    sent_n = 0
    i = 0
    while sent_n < count and time.monotonic() - t0 < 15:
        chunk = b"".join(build(i + k) for k in range(batch))
        i += batch
        if not h.send(chunk, read=read):
            break
        sent_n += batch
    h.settle(1.0)
    took = time.monotonic() - t0
    h.close()
    time.sleep(0.5)
    rss1 = p.rss_kb()
    stopped = h.goaway is not None or h.closed or (h.blocked and not read)
    ok = stopped and p.alive() and not p.panicked() and rss1 - rss0 < RSS_SLACK_KB
    ctx.h2_rows.append((name, h.goaway, h.closed, h.blocked))
    return row.result(ok, f"{h.outcome()} after {sent_n} frames/{took:.1f}s; "
                          f"RSS {rss0 / 1024:.1f}→{rss1 / 1024:.1f} MB"
                          + ("; PANIC in logs" if p.panicked() else ""))


def case_h2(ctx):
    rows = []

    def reset(i):
        sid = 2 * i + 1
        return frame(HEADERS, END_HEADERS | END_STREAM, sid, GET_BLOCK) + \
            frame(RST_STREAM, 0, sid, struct.pack(">I", 0x8))

    rows.append(h2_flood(ctx, "rapid reset", "HEADERS + RST_STREAM(CANCEL), new stream each",
                         reset, 100_000, 200))
    # The floods of CVE-2019-9515/9512: the attacker never reads, so a server that queued
    # an ACK per frame would grow without bound.
    # Frames built once per batch: sending, not Python, must be the bottleneck.
    settings = frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 65535)) * 10_000
    ping = frame(PING, 0, 0, struct.pack(">Q", 7)) * 10_000
    rows.append(h2_flood(ctx, "SETTINGS flood", "SETTINGS frames, never reading the ACKs",
                         lambda i: settings if i % 10_000 == 0 else b"", 3_000_000, 10_000,
                         read=False))
    rows.append(h2_flood(ctx, "PING flood", "PING frames, never reading the ACKs",
                         lambda i: ping if i % 10_000 == 0 else b"", 3_000_000, 10_000,
                         read=False))

    def continuation(i):
        if i == 0:
            return frame(HEADERS, END_STREAM, 1, GET_BLOCK)
        # Literal header `x-N: vvv…` (not indexed, new name), never END_HEADERS.
        name = b"x-%d" % i
        value = b"v" * 1000
        return frame(CONTINUATION, 0, 1, b"\x00" + bytes([len(name)]) + name
                     + b"\x7f" + encode_int(len(value) - 127) + value)

    rows.append(h2_flood(ctx, "CONTINUATION flood",
                         "HEADERS without END_HEADERS, then 1 KB CONTINUATIONs",
                         continuation, 100_000, 50))
    return rows


def encode_int(n):
    """HPACK integer continuation bytes (after a full 7-bit prefix)."""
    out = b""
    while n >= 128:
        out += bytes([(n % 128) + 128])
        n //= 128
    return out + bytes([n])


def case_soak(ctx):
    secs = ctx.soak
    row = Row("soak", f"{secs:g}s of GET / on 4 keep-alive connections",
              "0 errors; RSS flat")
    p = ctx.proxy
    counts = [0] * 4
    errors = []
    stop = time.monotonic() + secs

    def worker(k):
        c = http.client.HTTPConnection(*p.listen, timeout=5)
        while time.monotonic() < stop:
            try:
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
                counts[k] += 1
            except Exception as e:
                errors.append(repr(e))
                c.close()
                c = http.client.HTTPConnection(*p.listen, timeout=5)
        c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    rss0 = None
    for t in threads:
        t.start()
    time.sleep(min(2.0, secs / 4))
    rss0 = p.rss_kb()
    for t in threads:
        t.join(secs + 10)
    rss1 = p.rss_kb()
    n = sum(counts)
    ok = not errors and n > 0 and rss1 - rss0 < RSS_SLACK_KB and p.alive()
    return row.result(ok, f"{n} requests ({n / secs:.0f}/s), {len(errors)} errors"
                          + (f" (first: {errors[0]})" if errors else "")
                          + f"; RSS {rss0 / 1024:.1f}→{rss1 / 1024:.1f} MB")


CASES = {
    "slowloris": case_slowloris,
    "p-slowloris": case_p_slowloris,
    "late-slowloris": case_late_slowloris,
    "fd": case_fd_exhaustion,
    "stall": case_stalled_app,
    "slow-body": case_slow_body,
    "upload": case_steady_upload,
    "smuggling": case_smuggling,
    "h2": case_h2,
    "soak": case_soak,
}


class Ctx:
    pass


def markdown(rows):
    out = ["| case | sent | expected | observed | result |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r.case, r.sent, r.expected, r.observed, r.verdict()]
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/lameduck")
    ap.add_argument("--soak", type=float, default=60.0, help="soak seconds (default 60)")
    ap.add_argument("--only", nargs="*", choices=list(CASES), help="run only these cases")
    ap.add_argument("--out", default="benches/results", help="where the .md goes")
    args = ap.parse_args()

    ctx = Ctx()
    ctx.binary, ctx.soak, ctx.h2_rows = args.bin, args.soak, []
    ctx.app = App()
    ctx.proxy = Proxy(args.bin, ctx.app.addr, FLAGS)
    rows = []
    t0 = time.monotonic()
    try:
        for name, fn in CASES.items():
            if args.only and name not in args.only:
                continue
            print(f"--- {name}", file=sys.stderr, flush=True)
            try:
                got = fn(ctx)
            except Exception as e:
                got = Row(name, "", "").result(False, f"error: {e!r}")
            for r in got if isinstance(got, list) else [got]:
                rows.append(r)
                print(f"{r.verdict():8} {r.case}: {r.observed}", file=sys.stderr, flush=True)
        # Whatever a case did, the shared proxy must still be up and must not have panicked.
        alive = Row("process", "all the cases above, one proxy", "alive, no panic in logs")
        rows.append(alive.result(ctx.proxy.alive() and not ctx.proxy.panicked(),
                                 ("alive" if ctx.proxy.alive() else "DEAD")
                                 + (", panic in logs" if ctx.proxy.panicked() else ", no panic")
                                 + f", {len(ctx.proxy.logs)} log lines"))
    finally:
        ctx.proxy.close()
        ctx.app.close()
    took = time.monotonic() - t0

    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except Exception:
        commit = "?"
    passed = sum(1 for r in rows if r.ok)
    failed = sum(1 for r in rows if r.ok is False)
    header = (f"# Attack battery, {now:%Y-%m-%d %H:%M} UTC\n\n"
              f"`{' '.join(sys.argv)}` at commit {commit}; proxy flags "
              f"`{' '.join(FLAGS)}`; {took:.0f}s in all. 127.0.0.1 only.\n")
    table = markdown(rows)
    summary = f"{passed} passed, {failed} failed"
    print(header)
    print(table)
    print()
    print(summary)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"battery-{now:%Y%m%d-%H%M}.md")
    with open(path, "w") as f:
        f.write(header + "\n" + table + "\n\n" + summary + "\n")
    print(f"written to {path}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
