#!/usr/bin/env python3
"""A soak of the release binary: HTTP/1.1 keep-alive + h2c at a fixed rate, RSS sampled.

    python3 benches/soak.py [--binary target/release/lameduck] [--minutes 30]
                            [--h1-rate 500] [--h2-rate 500] [--every 10] [--out CSV]

Starts the fixed app (target/release/examples/bench_upstream, on 127.0.0.1:0), `lameduck
proxy` in front of it (127.0.0.1:0, default flags otherwise), and
benches/h2clients/soak_client.js (Node: HTTP/1 keep-alive agent + one h2c session, each at
its rate). Every --every seconds it writes one CSV row: elapsed seconds, the proxy's VmRSS and
VmHWM (kB, /proc/PID/status), lameduck_requests_total and lameduck_connections_active from
/metrics, and the client's cumulative counts. At the end it prints a summary (first, last, min,
max RSS; growth per 5 minutes) and writes it beside the CSV as .md. Every process it starts
is killed at the end, whatever happens; the whole run is bounded by --minutes + 1 minute.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def metrics(admin):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        out[base] = out.get(base, 0.0) + float(value)
    return out


def start_upstream(binary):
    # It says `bench_upstream listening on ADDR` on stderr, then nothing more.
    p = subprocess.Popen([binary, "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline().strip()
    addr = line.split()[-1]
    return p, addr


def start_proxy(binary, upstream, extra=()):
    cmd = [binary, "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
           "--upstream", upstream, "--log-format", "json", *extra]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    ready = threading.Event()
    addrs = {}

    def read():
        for line in p.stderr:
            if "lameduck proxy serving" in line and not ready.is_set():
                v = json.loads(line)
                addrs["listen"], addrs["admin"] = v["listen"], v["admin"]
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(15):
        p.kill()
        raise RuntimeError("proxy did not start")
    return p, addrs["listen"], addrs["admin"]


def summarise(rows, every):
    rss = [r["vmrss_kb"] for r in rows]
    lines = []
    if not rss:
        return "no samples\n"
    t_last = rows[-1]["elapsed_s"]
    lines.append(f"samples: {len(rows)} over {t_last:.0f} s (every {every} s)")
    lines.append(f"VmRSS first {rss[0]} kB, last {rss[-1]} kB, min {min(rss)} kB, "
                 f"max {max(rss)} kB; VmHWM last {rows[-1]['vmhwm_kb']} kB")
    last = rows[-1]
    lines.append(f"requests (proxy) {int(last['requests_total'])}; client h1 ok "
                 f"{last['h1_ok']} failed {last['h1_failed']}, h2 ok {last['h2_ok']} failed "
                 f"{last['h2_failed']}, h2 sessions {last['h2_sessions']}")
    if t_last > 0:
        lines.append(f"mean rate {last['requests_total'] / t_last:.0f} req/s")
    lines.append("")
    lines.append("| minutes | VmRSS at end (kB) | growth in these 5 min (kB) | requests in them |")
    lines.append("|---|---|---|---|")
    prev = rows[0]
    edge = 300
    for r in rows[1:]:
        if r["elapsed_s"] >= edge - every / 2 or r is rows[-1]:
            a, b = prev["elapsed_s"] / 60, r["elapsed_s"] / 60
            lines.append(f"| {a:.1f}–{b:.1f} | {r['vmrss_kb']} | {r['vmrss_kb'] - prev['vmrss_kb']:+d} "
                         f"| {int(r['requests_total'] - prev['requests_total'])} |")
            prev = r
            while edge <= r["elapsed_s"] + every / 2:
                edge += 300
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/lameduck"))
    ap.add_argument("--upstream-binary",
                    default=os.path.join(ROOT, "target/release/examples/bench_upstream"))
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--h1-rate", type=float, default=500)
    ap.add_argument("--h2-rate", type=float, default=500)
    ap.add_argument("--every", type=float, default=10)
    ap.add_argument("--out", default=os.path.join(
        HERE, "results", time.strftime("soak-%Y%m%d-%H%M.csv", time.gmtime())))
    a = ap.parse_args()

    procs = []
    fields = ["elapsed_s", "utc", "vmrss_kb", "vmhwm_kb", "requests_total",
              "connections_active", "h1_ok", "h1_failed", "h2_ok", "h2_failed", "h2_sessions"]
    rows = []
    try:
        up, up_addr = start_upstream(a.upstream_binary)
        procs.append(up)
        proxy, listen, admin = start_proxy(a.binary, up_addr)
        procs.append(proxy)
        client = subprocess.Popen(
            ["node", os.path.join(HERE, "h2clients", "soak_client.js"), f"http://{listen}",
             str(a.h1_rate), str(a.h2_rate), str(int(a.minutes * 60))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(client)
        latest = {}

        def read():
            for line in client.stdout:
                try:
                    latest.update(json.loads(line))
                except ValueError:
                    pass

        threading.Thread(target=read, daemon=True).start()
        print(f"soak: proxy pid {proxy.pid} on {listen}, app {up_addr}, {a.minutes} min, "
              f"csv {a.out}", flush=True)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        t0 = time.monotonic()
        end = t0 + a.minutes * 60
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            n = 0
            while True:
                now = time.monotonic()
                m = metrics(admin)
                row = {
                    "elapsed_s": round(now - t0, 1),
                    "utc": time.strftime("%H:%M:%S", time.gmtime()),
                    "vmrss_kb": status_kb(proxy.pid, "VmRSS"),
                    "vmhwm_kb": status_kb(proxy.pid, "VmHWM"),
                    "requests_total": m.get("lameduck_requests_total", 0),
                    "connections_active": m.get("lameduck_connections_active", 0),
                    **{k: latest.get(k, 0) for k in fields[6:]},
                }
                rows.append(row)
                w.writerow(row)
                f.flush()
                if proxy.poll() is not None:
                    print("soak: the proxy exited", proxy.returncode, flush=True)
                    break
                if now >= end:
                    break
                n += 1
                time.sleep(max(0.0, min(t0 + n * a.every, end) - time.monotonic()))
        client.wait(timeout=20)
        time.sleep(0.5)
        print(json.dumps(latest), flush=True)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
    summary = summarise(rows, a.every)
    print(summary)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(f"# soak {os.path.basename(a.out)}\n\n{' '.join(sys.argv)}\n\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
