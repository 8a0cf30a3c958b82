#!/usr/bin/env python3
"""HTTP/2 clients across a drain: how many requests each real client loses.

    python3 benches/h2_clients.py --binary new=target/release/lameduck \\
        [--binary old=/tmp/old-target/release/lameduck] [--clients node,h2load,curl,go,grpc] \\
        [--triggers sigterm,drain] [--runs 3] [--duration 6] [--drain-at 1] \\
        [--proxy-flags "--drain-min 0s --quiet 2s --drain-max 30s"] [--extra "..."] \\
        [--label NAME] [--out benches/results/h2-clients-....jsonl]

For each binary x trigger x client x run: the app (target/release/examples/bench_upstream for
the HTTP clients; tests/support/grpc/app.py for grpcio, the proxy then with
`--upstream-protocol h2c`), a fresh `lameduck proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0`,
and the client at full speed for --duration seconds; --drain-at seconds in, the drain starts
(SIGTERM to the proxy, or POST /drain?wait=false on the admin port). Recorded per run: the
client's requests ok and failed (failures by kind), its sessions (connections) and GOAWAY
frames where the client can tell, and the proxy's own lameduck_connections_total and
lameduck_requests_total read right after the client stops. One JSON line per run goes to
--out, and a markdown table (sums over the runs) to stdout and beside it as .md.

The clients (benches/h2clients/):
- node: tests/support/node/h2client.js (the test's own client), Node's `http2`, 2 workers sharing one session, a new session on GOAWAY.
- h2load: h2load_loop.py, `h2load -c 1 -m 2 -n 30000` run again as each run's connection
  ends (h2load itself never reconnects); lost = started and not succeeded; no GOAWAY count.
- curl: curl_client.py, libcurl 8 (pycurl's wheel) as `curl --parallel --parallel-max 2
  --http2-prior-knowledge` drives it: one multi handle multiplexing 2 transfers over one
  connection; failures by curl's error. (Debian 12's curl 7.88.1 cannot reuse an h2c
  connection at all, drain or not: every reused transfer fails with error 16.)
- go: go/ (net/http + golang.org/x/net/http2 h2c Transport), 2 goroutines sharing one
  client; connections counted at dial, GOAWAY frames read off the wire.
- grpc: grpc_client.py in /opt/lameduck-grpc's python: one channel, 2 threads of unary calls;
  sessions = the channel's READY transitions.

Every process started is killed at the end of its run; every wait is bounded.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLIENTS = os.path.join(HERE, "h2clients")
GRPC_PYTHON = os.environ.get("LAMEDUCK_GRPC_PYTHON", "/opt/lameduck-grpc/bin/python")
# pycurl's wheel (bundling a current libcurl): python3 -m venv /opt/lameduck-bench-curl &&
# /opt/lameduck-bench-curl/bin/pip install --only-binary :all: pycurl==7.49.0
CURL_PYTHON = os.environ.get("LAMEDUCK_CURL_PYTHON", "/opt/lameduck-bench-curl/bin/python")
# Requests each client keeps going at once (workers, threads, streams); --workers sets it.
WORKERS = "2"
GO_BIN = os.path.join(tempfile.gettempdir(), "lameduck-bench-go-h2client")


def metrics(admin):
    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        out[base] = out.get(base, 0.0) + float(value)
    return out


class Proxy:
    def __init__(self, binary, upstream, flags):
        cmd = [binary, "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
               "--upstream", upstream, "--log-format", "json", *flags]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.logs = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.logs.append(line.rstrip("\n"))
                if "lameduck proxy serving" in line and not ready.is_set():
                    v = json.loads(line)
                    self.listen, self.admin = v["listen"], v["admin"]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(15):
            self.kill()
            raise RuntimeError(f"proxy did not start: {self.logs[-5:]}")

    def drain(self, trigger):
        if trigger == "sigterm":
            self.proc.send_signal(signal.SIGTERM)
        else:
            req = urllib.request.Request(f"http://{self.admin}/drain?wait=false", method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


# === the clients: each returns (argv, parse(stdout) -> dict) ===


def node_client(url, duration):
    argv = ["node", os.path.join(HERE, "..", "tests", "support", "node", "h2client.js"), url, WORKERS, str(int(duration * 1000))]

    def parse(out):
        v = json.loads(out.strip().splitlines()[-1])
        v["errors"].update({f"status {k}": n for k, n in v.pop("statuses", {}).items()})
        return v
    return argv, parse


def go_client(url, duration):
    argv = [GO_BIN, url, WORKERS, str(int(duration * 1000))]

    def parse(out):
        v = json.loads(out.strip().splitlines()[-1])
        v["errors"].update({f"status {k}": n for k, n in v.pop("statuses", {}).items()})
        return v
    return argv, parse


def grpc_client(addr, duration):
    argv = [GRPC_PYTHON, os.path.join(CLIENTS, "grpc_client.py"), addr, WORKERS,
            str(int(duration * 1000))]
    return argv, lambda out: json.loads(out.strip().splitlines()[-1])


def h2load_client(url, duration):
    argv = [sys.executable, os.path.join(CLIENTS, "h2load_loop.py"), url, WORKERS,
            str(int(duration * 1000))]
    return argv, lambda out: json.loads(out.strip().splitlines()[-1])


def curl_client(url, duration):
    argv = [CURL_PYTHON, os.path.join(CLIENTS, "curl_client.py"), url, WORKERS,
            str(int(duration * 1000))]
    return argv, lambda out: json.loads(out.strip().splitlines()[-1])


CLIENT_FNS = {"node": node_client, "h2load": h2load_client, "curl": curl_client,
              "go": go_client, "grpc": grpc_client}


def run_one(binary, trigger, client, app_http, app_grpc, a):
    flags = a.proxy_flags.split() + a.extra.split()
    if client == "grpc":
        flags += ["--upstream-protocol", "h2c"]
    proxy = Proxy(binary, app_grpc if client == "grpc" else app_http, flags)
    try:
        target = proxy.listen if client == "grpc" else f"http://{proxy.listen}/"
        argv, parse = CLIENT_FNS[client](target, a.duration)
        t0 = time.monotonic()
        c = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(a.drain_at)
        proxy.drain(trigger)
        try:
            out, err = c.communicate(timeout=a.duration + 40)
        except subprocess.TimeoutExpired:
            c.kill()
            out, err = c.communicate(timeout=10)
        elapsed = time.monotonic() - t0
        m = metrics(proxy.admin)
        try:
            r = parse(out)
        except Exception as e:  # noqa: BLE001 - recorded, not fatal to the batch
            r = {"ok": None, "failed": None, "sessions": None, "goaways": None,
                 "errors": {"unparsed": 1}, "parse_error": repr(e), "stdout": out[-2000:],
                 "stderr": err[-2000:]}
        r["proxy_connections"] = int(m["lameduck_connections_total"]) if m else None
        r["proxy_requests"] = int(m.get("lameduck_requests_total", 0)) if m else None
        r["client_seconds"] = round(elapsed, 2)
        # SIGTERM: the proxy exits by itself once the drain is released (quiet after the
        # client stopped); wait for that, bounded, to record its exit code.
        if trigger == "sigterm":
            try:
                r["proxy_exit"] = proxy.proc.wait(timeout=a.quiet_wait)
            except subprocess.TimeoutExpired:
                r["proxy_exit"] = None
        # The drain's own account: the log lines that give its reason (quiet or max).
        r["drain_log"] = [json.loads(x).get("message", "") + " " + str(json.loads(x).get("reason", ""))
                          for x in proxy.logs if '"reason"' in x][-3:]
        return r
    finally:
        proxy.kill()


def start_http_app(binary):
    p = subprocess.Popen([binary, "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    return p, p.stderr.readline().split()[-1]


def start_grpc_app():
    p = subprocess.Popen([GRPC_PYTHON, os.path.join(ROOT, "tests/support/grpc/app.py")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline().split()
    return p, f"127.0.0.1:{line[1]}"


def fmt(errors):
    return "; ".join(f"{k} ×{n}" for k, n in sorted(errors.items(), key=lambda kv: -kv[1])) or ""


def table(results):
    groups = {}
    for r in results:
        key = (r["client"], r["trigger"], r["binary"], r.get("label", ""), r.get("workers", 2))
        groups.setdefault(key, []).append(r)
    lines = ["| client | trigger | binary | flags | workers | runs | ok | failed (per run) "
             "| client sessions | GOAWAYs | proxy conns | failures |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def tot(rs, k):
        vs = [r.get(k) for r in rs]
        if any(v is None for v in vs):
            return "—"
        return str(sum(vs))

    for (client, trigger, binary, label, workers), rs in groups.items():
        errors = {}
        for r in rs:
            for k, n in (r.get("errors") or {}).items():
                errors[k] = errors.get(k, 0) + n
        per_run = "/".join(str(r.get("failed")) for r in rs)
        lines.append(f"| {client} | {trigger} | {binary} | {label} | {workers} | {len(rs)} | "
                     f"{tot(rs, 'ok')} | "
                     f"{tot(rs, 'failed')} ({per_run}) | {tot(rs, 'sessions')} | "
                     f"{tot(rs, 'goaways')} | {tot(rs, 'proxy_connections')} | {fmt(errors)} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", action="append", default=[], help="NAME=PATH")
    ap.add_argument("--clients", default="node,h2load,curl,go,grpc")
    ap.add_argument("--triggers", default="sigterm,drain")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6)
    ap.add_argument("--drain-at", type=float, default=1)
    ap.add_argument("--proxy-flags", default="--drain-min 0s --quiet 2s --drain-max 30s")
    ap.add_argument("--extra", default="", help="more proxy flags")
    ap.add_argument("--quiet-wait", type=float, default=40,
                    help="how long to wait for the proxy's own exit after a SIGTERM run")
    ap.add_argument("--app-binary",
                    default=os.path.join(ROOT, "target/release/examples/bench_upstream"))
    ap.add_argument("--workers", type=int, default=2,
                    help="requests each client keeps going at once (2 unless said)")
    ap.add_argument("--report", nargs="+", metavar="JSONL",
                    help="print the table of these result files (no runs)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=os.path.join(
        HERE, "results", time.strftime("h2-clients-%Y%m%d-%H%M%S.jsonl", time.gmtime())))
    a = ap.parse_args()
    global WORKERS
    WORKERS = str(a.workers)
    if a.report:
        rows = [json.loads(line) for p in a.report for line in open(p) if line.strip()]
        print(table(rows))
        return 0
    binaries = [b.split("=", 1) for b in a.binary]
    clients = a.clients.split(",")
    if "go" in clients:
        subprocess.run(["go", "build", "-o", GO_BIN, "."], cwd=os.path.join(CLIENTS, "go"),
                       check=True, timeout=300)
    apps = []
    results = []
    try:
        app_http = app_grpc = None
        if any(c != "grpc" for c in clients):
            p, app_http = start_http_app(a.app_binary)
            apps.append(p)
        if "grpc" in clients:
            p, app_grpc = start_grpc_app()
            apps.append(p)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "a") as f:
            for client in clients:
                for trigger in a.triggers.split(","):
                    for name, binary in binaries:
                        for i in range(a.runs):
                            r = run_one(binary, trigger, client, app_http, app_grpc, a)
                            r.update(client=client, trigger=trigger, binary=name, run=i + 1,
                                     workers=a.workers,
                                     label=a.label, flags=a.proxy_flags + " " + a.extra,
                                     utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                            results.append(r)
                            f.write(json.dumps(r) + "\n")
                            f.flush()
                            print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        for p in apps:
            if p.poll() is None:
                p.kill()
            p.wait(10)
    t = table(results)
    print(t)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(f"# {os.path.basename(a.out)}\n\n`{' '.join(sys.argv)}`\n\n{t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
