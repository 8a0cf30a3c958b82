#!/usr/bin/env python3
"""The side-by-side benchmark of issue 5, driven by benches/compare.sh.

Measures one HTTP/1.1 keep-alive workload on 127.0.0.1 against: the upstream directly
(the ceiling), nginx, HAProxy, Envoy and lameduck (serving, draining, and --threads 2).

Pinning, the same for every target: the proxy alone on core 1; the load generator, the
bench upstream and this driver on core 0 (taskset / sched_setaffinity).

Everything it starts runs in its own process group and is killed on exit (normal, error,
SIGINT or SIGTERM). Every figure written comes from the run that writes it.

Only the standard library: it runs on the machine's own python3.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024

LOADGEN_CORE = 0
PROXY_CORE = 1

# --- process bookkeeping -------------------------------------------------------------------

STARTED = []  # Popen objects, each the leader of its own process group


def spawn(argv, core, log, **kw):
    """Starts argv pinned to `core` in a new process group; it is killed at exit."""
    p = subprocess.Popen(
        ["taskset", "-c", str(core)] + argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        **kw,
    )
    STARTED.append(p)
    return p


def stop(p, grace=3.0):
    """Ends one process group we started: SIGTERM, then SIGKILL after `grace`."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    else:
        # The leader is gone; make sure no child of it (nginx worker) is left.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    for p in list(STARTED):
        stop(p, grace=1.0)


def on_signal(signum, _frame):
    stop_all()
    sys.exit(128 + signum)


# --- /proc readings ------------------------------------------------------------------------


def tree(pid):
    """pid and its descendants (nginx: master and worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            pass
    return out


def cpu_ticks(pids):
    """(utime, stime) of whole processes (all threads), in clock ticks."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime is field 14, stime 15.
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def status_kib(pids, key):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


# --- small HTTP helpers (raw sockets, no proxies, loopback only) ---------------------------


def http_get(port, path="/", method="GET", timeout=2.0, tls=False):
    """One request on a fresh connection (TLS, unverified, with `tls`); returns
    (status, body) or raises OSError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        s = raw
        if tls:
            import ssl
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def wait_http(port, path="/", want=200, timeout=20.0, tls=False):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(port, path, timeout=1.0, tls=tls)
            if status == want:
                return
            last = f"status {status}"
        except (OSError, ValueError, IndexError) as e:
            last = repr(e)
        time.sleep(0.02)
    raise RuntimeError(f"127.0.0.1:{port}{path} not answering {want} after {timeout}s ({last})")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- targets -------------------------------------------------------------------------------


def fill(template, out, **subs):
    with open(os.path.join(HERE, "conf", template)) as f:
        text = f.read()
    for k, v in subs.items():
        text = text.replace(f"@{k}@", str(v))
    with open(out, "w") as f:
        f.write(text)
    return out


def tls_pair(workdir):
    """The one certificate every TLS target presents (ECDSA P-256, self-signed, as an ALB
    target would use): (cert, key, cert+key in one file for HAProxy)."""
    d = os.path.join(workdir, "tls")
    cert, key, pem = (os.path.join(d, f) for f in ("cert.pem", "key.pem", "both.pem"))
    if not os.path.exists(pem):
        os.makedirs(d, exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "30", "-subj", "/CN=localhost", "-addext",
             "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
            check=True, capture_output=True)
        with open(pem, "w") as f:
            f.write(open(cert).read() + open(key).read())
    return cert, key, pem


class Target:
    """One thing the load is sent to. `proc` is None for the direct (no proxy) target."""

    def __init__(self, name, label, tools, workdir, upstream_port):
        self.name, self.label, self.tools = name, label, tools
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.upstream_port = upstream_port
        self.port = upstream_port
        # `<peer>-tls`: the same proxy terminating TLS (the TLS rows).
        self.tls = name.endswith("-tls")
        self.scheme = "https" if self.tls else "http"
        self.proc = None
        self.admin = None
        self.log = open(os.path.join(self.dir, "log.txt"), "w")

    def start(self):
        t, up, d = self.tools, f"127.0.0.1:{self.upstream_port}", self.dir
        if self.name == "direct":
            return
        self.port = free_port()
        listen = f"127.0.0.1:{self.port}"
        base = self.name[:-len("-tls")] if self.tls else self.name
        tls = "-tls" if self.tls else ""
        cert, key, pem = tls_pair(os.path.dirname(d)) if self.tls else (None, None, None)
        if base == "nginx":
            for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                os.makedirs(os.path.join(d, sub), exist_ok=True)
            conf = fill(f"nginx{tls}.conf", f"{d}/nginx.conf", DIR=d, LISTEN=listen, UPSTREAM=up,
                        CERT=cert, KEY=key)
            argv = [t["nginx"], "-p", d, "-c", conf, "-e", "stderr"]
        elif base == "haproxy":
            conf = fill(f"haproxy{tls}.cfg", f"{d}/haproxy.cfg", LISTEN=listen, UPSTREAM=up,
                        PEM=pem)
            argv = [t["haproxy"], "-db", "-f", conf]
        elif base == "envoy":
            conf = fill(
                f"envoy{tls}.yaml",
                f"{d}/envoy.yaml",
                LISTEN_HOST="127.0.0.1",
                LISTEN_PORT=self.port,
                UP_HOST="127.0.0.1",
                UP_PORT=self.upstream_port,
                CERT=cert,
                KEY=key,
            )
            argv = [
                t["envoy"], "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                "-l", "error", "--base-id", str(self.port),
            ]
        elif base.startswith("lameduck"):
            self.admin = free_port()
            # lameduck-base: another build (BENCH_BASE_BIN), to compare before/after a change
            # in the same run.
            binary = os.environ["BENCH_BASE_BIN"] if self.name == "lameduck-base" else t["lameduck"]
            argv = [
                binary, "proxy", "--listen", listen, "--upstream", up,
                "--admin", f"127.0.0.1:{self.admin}", "--log-level", "warn",
            ]
            if self.tls:
                argv += ["--tls-cert", cert, "--tls-key", key]
            if self.name == "lameduck-t2":
                argv += ["--threads", "2"]
            if self.name.startswith("lameduck-draining"):
                # Long enough that it stays Draining for the whole bench.
                argv += ["--drain-min", "1s", "--quiet", "3600s", "--drain-max", "3600s"]
            if self.name == "lameduck-draining-ka":
                # The drain's own cost, without asking clients to reconnect (issue 12's
                # default: every response while draining says `Connection: close`).
                argv += ["--keep-alive-while-draining"]
        else:
            raise ValueError(self.name)
        self.proc = spawn(argv, PROXY_CORE, self.log)
        wait_http(self.port, "/", tls=self.tls)
        if self.admin:
            wait_http(self.admin, "/readyz")
        if self.name.startswith("lameduck-draining"):
            status, body = http_get(self.admin, "/drain?wait=false", method="POST")
            assert status in (200, 202), (status, body)
            self.require_state("draining")

    def require_state(self, want):
        _, body = http_get(self.admin, "/status")
        state = json.loads(body)["state"]
        if state != want:
            raise RuntimeError(f"{self.label}: state is {state}, expected {want}")

    def pids(self):
        return tree(self.proc.pid) if self.proc else []

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None


# --- load generators -----------------------------------------------------------------------

WRK_LUA = os.path.join(HERE, "wrk-report.lua")


def run_wrk(tools, url, conns, duration):
    argv = [
        "taskset", "-c", str(LOADGEN_CORE), tools["wrk"], "-t1", f"-c{conns}",
        f"-d{duration}s", "--latency", "-s", WRK_LUA, url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    line = next((l for l in out.splitlines() if l.startswith("JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    r = json.loads(line[5:])
    return {
        "requests": r["requests"],
        "seconds": r["duration_us"] / 1e6,
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50": r["p50"], "p99": r["p99"], "p999": r["p999"],
        "errors": r["errors"] + r["non2xx"],
        "timeouts": r["timeouts"],  # wrk: no answer within 2 s (counted in requests too)
    }


def run_oha(tools, url, conns, rate, duration):
    argv = [
        "taskset", "-c", str(LOADGEN_CORE), tools["oha"], "-z", f"{duration}s",
        "-c", str(conns), "-q", str(rate), "--latency-correction", "--no-tui",
        "--output-format", "json", url,
    ]
    if url.startswith("https:"):
        argv.insert(-1, "--insecure")  # the targets' self-signed certificate
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    try:
        r = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"oha printed no JSON:\n{out.stdout}\n{out.stderr}")
    codes = r.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    bad = sum(v for k, v in codes.items() if not k.startswith("2"))
    # Requests cut off by the end of the run are not failures of the target.
    bad += sum(v for k, v in r.get("errorDistribution", {}).items() if "deadline" not in k)
    s = r["summary"]
    pct = r["latencyPercentiles"]
    return {
        "requests": ok + bad,
        "seconds": s["total"],
        "rps": s["requestsPerSec"],
        "p50": pct["p50"] * 1e6, "p99": pct["p99"] * 1e6, "p999": pct["p99.9"] * 1e6,
        "errors": bad,
        "timeouts": 0,
    }


SCENARIOS = {
    # name: (description, path, runner)
    "a": ("64 conns, closed loop (wrk)", "/", lambda t, u, d: run_wrk(t, u, 64, d)),
    "b": ("5000 req/s, 32 conns, open loop, latency-corrected (oha)", "/",
          lambda t, u, d: run_oha(t, u, 32, 5000, d)),
    "c": ("1 conn, sequential (wrk)", "/", lambda t, u, d: run_wrk(t, u, 1, d)),
    # (d): as (c), but the proxy is moved onto the load generator's and upstream's core for
    # the measurement (`taskset -a -p`, see `measure`): no cross-core wake-up hides the
    # proxy's own cost, so +p50 is what one hop adds on a busy node.
    "d": ("1 conn, sequential, proxy on the load generator's core (wrk; taskset -a -p)", "/",
          lambda t, u, d: run_wrk(t, u, 1, d)),
    "a64k": ("(a) with 64 KiB responses", "/64k", lambda t, u, d: run_wrk(t, u, 64, d)),
    "b64k": ("(b) with 64 KiB responses", "/64k", lambda t, u, d: run_oha(t, u, 32, 5000, d)),
    "c64k": ("(c) with 64 KiB responses", "/64k", lambda t, u, d: run_wrk(t, u, 1, d)),
}


def core_busy():
    """Busy clock ticks of each core since boot (everything but idle and iowait)."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if m:
                v = [int(x) for x in m.group(2).split()]
                busy[int(m.group(1))] = sum(v[:8]) - v[3] - v[4]
    return busy


def own_ticks(pids):
    """CPU ticks of everything this bench runs: the given pids, this driver, and its
    waited-for children (the load generators)."""
    import resource
    t = sum(cpu_ticks(pids)) if pids else 0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        t += (ru.ru_utime + ru.ru_stime) * CLK_TCK
    return t


def wait_idle(max_wait, others, threshold=0.10):
    """Waits (up to max_wait s) until processes that are not ours use under `threshold`
    of both cores for a 1 s sample. Returns the foreign share last seen."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, o0 = core_busy(), own_ticks(others)
        time.sleep(1.0)
        b1, o1 = core_busy(), own_ticks(others)
        used = sum(b1.values()) - sum(b0.values()) - (o1 - o0)
        share = max(0.0, used / (len(b1) * CLK_TCK))
        if share < threshold or time.monotonic() >= deadline:
            return share
        time.sleep(4.0)


BACKGROUND = []  # pids of our own long-running helpers (the upstream)


def repin(pids, core):
    """Moves every thread of the given processes onto `core` (`taskset -a -p`)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True,
                       capture_output=True)


def measure(target, scenario, duration):
    _, path, runner = SCENARIOS[scenario]
    pids = target.pids()
    if scenario == "d" and pids:
        # Scenario (d): the proxy shares core 0 with the load generator and the upstream for
        # this measurement only, then goes back to its own core.
        repin(pids, LOADGEN_CORE)
        try:
            return _measure(target, pids, path, runner, duration)
        finally:
            repin(pids, PROXY_CORE)
    return _measure(target, pids, path, runner, duration)


def _measure(target, pids, path, runner, duration):
    ours = pids + BACKGROUND
    busy0, own0 = core_busy(), own_ticks(ours)
    t0 = time.monotonic()
    before = cpu_ticks(pids) if pids else (0, 0)
    r = runner(target.tools, f"{target.scheme}://127.0.0.1:{target.port}{path}", duration)
    after = cpu_ticks(pids) if pids else (0, 0)
    busy1, own1 = core_busy(), own_ticks(ours)
    window = (time.monotonic() - t0) * CLK_TCK * len(busy1)
    foreign = sum(busy1.values()) - sum(busy0.values()) - (own1 - own0)
    # Share of the two cores used by processes that are not part of the bench.
    r["foreign"] = max(0.0, foreign / window) if window else 0.0
    usr, sys_ = ((a - b) / CLK_TCK for a, b in zip(after, before))
    r["cpu_s"] = usr + sys_
    per = (lambda s: s * 1e6 / r["requests"]) if pids and r["requests"] else (lambda s: None)
    r["cpu_us_per_req"] = per(usr + sys_)
    r["usr_us_per_req"] = per(usr)
    r["sys_us_per_req"] = per(sys_)
    return r


# --- idle connections ----------------------------------------------------------------------


async def _hold(port, n, hold_s, on_held, tls=False):
    """Opens n keep-alive connections one after another, one request each, keeps them open
    (over TLS, unverified, with `tls`)."""
    conns = []
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    ctx = None
    if tls:
        import ssl
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        for _ in range(n):
            r, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                        server_hostname="localhost" if tls else None), 5)
            w.write(req)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if not head.startswith(b"HTTP/1.1 200") or not m:
                raise RuntimeError(f"unexpected response head: {head[:200]!r}")
            await asyncio.wait_for(r.readexactly(int(m.group(1))), 5)
            conns.append(w)
        await asyncio.sleep(hold_s)
        return on_held()
    finally:
        for w in conns:
            w.close()


def idle_conns_rss(target, n=1000, hold_s=2.0):
    """Proxy RSS (KiB) while n idle keep-alive connections are open."""
    pids = target.pids()
    return asyncio.run(_hold(target.port, n, hold_s, lambda: status_kib(pids, "VmRSS"),
                             tls=target.tls))


# --- lameduck-only figures -----------------------------------------------------------------


def lameduck_startup(tools, upstream_port, runs=5):
    """Milliseconds from exec to the first 200 from /readyz (which needs the upstream)."""
    times = []
    for _ in range(runs):
        port, admin = free_port(), free_port()
        t0 = time.monotonic()
        p = spawn(
            [tools["lameduck"], "proxy", "--listen", f"127.0.0.1:{port}",
             "--upstream", f"127.0.0.1:{upstream_port}", "--admin", f"127.0.0.1:{admin}",
             "--log-level", "warn"],
            PROXY_CORE, subprocess.DEVNULL,
        )
        try:
            deadline = t0 + 10
            while True:
                try:
                    if http_get(admin, "/readyz", timeout=1.0)[0] == 200:
                        times.append((time.monotonic() - t0) * 1000)
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("lameduck never became ready")
                time.sleep(0.0005)
        finally:
            stop(p)
    return times


def stripped_size(binary, workdir):
    copy = os.path.join(workdir, "lameduck.stripped")
    shutil.copy(binary, copy)
    subprocess.run(["strip", copy], check=True)
    return os.path.getsize(binary), os.path.getsize(copy)


# --- machine and versions ------------------------------------------------------------------


def cmd_out(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def versions(tools):
    first = lambda s: s.splitlines()[0] if s else s
    wrk = cmd_out([tools["wrk"], "-v"])
    m = re.search(r"wrk (\S+)", wrk)
    return {
        "lameduck": first(cmd_out([tools["lameduck"], "--version"]))
        + " (release build of this tree, commit "
        + cmd_out(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
        + (" + uncommitted changes" if cmd_out(["git", "-C", ROOT, "status", "--porcelain",
                                                "--untracked-files=no"]) else "")
        + ")",
        "nginx": first(cmd_out([tools["nginx"], "-v"])),
        "HAProxy": first(cmd_out([tools["haproxy"], "-v"])),
        "Envoy": first(cmd_out([tools["envoy"], "--version"])).split("version:")[-1].strip(),
        "wrk": m.group(1) if m else first(wrk),
        "oha": first(cmd_out([tools["oha"], "--version"])),
        "rustc": first(cmd_out(["rustc", "--version"])),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "cpu": model,
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_quiet(max_wait, threshold=0.7):
    """Waits (up to max_wait s) for the 1-minute load average to drop below threshold."""
    t0 = time.monotonic()
    while True:
        one = float(loadavg().split()[0])
        if one < threshold:
            return True, time.monotonic() - t0
        if time.monotonic() - t0 >= max_wait:
            return False, time.monotonic() - t0
        print(f"  waiting for a quiet machine: load {loadavg()} (threshold {threshold})",
              flush=True)
        time.sleep(min(30, max(1, max_wait - (time.monotonic() - t0))))


# --- report --------------------------------------------------------------------------------


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


CLEAN = 0.05  # a measurement during which other processes used < 5 % of the CPUs


def aggregate(runs):
    """Median, per figure, over the clean rounds (other processes used < 5 % of the CPUs
    during the measurement); if no round was clean, the least disturbed one alone."""
    clean = [r for r in runs if r["foreign"] < CLEAN]
    use = clean or [min(runs, key=lambda r: r["foreign"])]
    keys = ["rps", "p50", "p99", "p999", "cpu_us_per_req", "usr_us_per_req",
            "sys_us_per_req", "hwm_mib"]
    out = {k: med([r.get(k) for r in use]) for k in keys}
    out["errors"] = sum(r["errors"] for r in use)
    out["timeouts"] = sum(r.get("timeouts", 0) for r in use)
    out["used"] = len(use)
    out["rounds"] = len(runs)
    out["foreign"] = max(r["foreign"] for r in use)
    out["rps_range"] = (min(r["rps"] for r in use), max(r["rps"] for r in use))
    cpu = [r["cpu_us_per_req"] for r in use if r["cpu_us_per_req"] is not None]
    out["cpu_range"] = (min(cpu), max(cpu)) if cpu else None
    return out


def render(meta, results, mem, extras, budget):
    L = []
    L.append(f"# lameduck vs nginx, HAProxy, Envoy — benchmark run {meta['date']}")
    L.append("")
    L.append("Written by `bash benches/compare.sh`; every figure below comes from this run.")
    L.append("")
    L.append("## Machine and run")
    L.append("")
    m = meta["machine"]
    L.append(f"- Machine: {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM, "
             f"Linux {meta['versions']['kernel']}")
    L.append(f"- Load average (1/5/15 min): before {meta['load_before']}, after "
             f"{meta['load_after']}. {meta['quiet_note']}")
    L.append(f"- Pinning (same for every target): the proxy alone on core {PROXY_CORE}; the load "
             f"generator, the bench upstream and the driver on core {LOADGEN_CORE} (`taskset`).")
    L.append(f"- {meta['duration']} s per measurement, {meta['rounds']} round(s), targets "
             "interleaved round by round. Before each measurement the driver waits (up to "
             f"{meta['idle_wait']} s) until processes outside the bench use < 10 % of the CPUs, "
             "and measures again once if they used more than 10 % during it. Each figure is the "
             "median over the *clean* rounds (other processes used < 5 % of the CPUs during "
             "the measurement; how many, and the range of req/s and CPU over them, are in the "
             "last columns). Warm-up of 1 s (scenario a) "
             "per target per round, not counted. errors: connect/read/write errors and non-2xx; "
             "timeouts: wrk got no answer within 2 s.")
    L.append("- Upstream: `examples/bench_upstream.rs` (hyper 1, current-thread, static bodies: "
             "3 bytes on `/`, 65,536 bytes on `/64k`).")
    L.append("- CPU µs/req: proxy's utime+stime (split usr / sys) from /proc/PID/stat (all its processes and "
             "threads) over the load generator's run, divided by the requests it completed. "
             f"Clock tick {1e6 / CLK_TCK:,.0f} µs.")
    L.append("- (d): as (c), with the proxy moved onto core 0 (the load generator's and the "
             "upstream's) for that measurement only (`taskset -a -p -c 0`, every thread), "
             "then back to core 1.")
    L.append("- Latencies in µs. (a),(c),(d): wrk; (b): oha, open loop with latency correction "
             "(from the intended send time). +p50/+p99: minus `direct` in the same scenario.")
    L.append("")
    L.append("Versions: " + "; ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    L.append("")
    L.append("Peer settings: nginx 1 worker, upstream `keepalive 128`, 16k proxy buffers; "
             "HAProxy `nbthread 1`, `http-reuse always`; Envoy `--concurrency 1`, static "
             "cluster, no admin, no access log; lameduck defaults (`--threads 1` unless "
             "named) with `--log-level warn`. Configs: `benches/conf/`.")
    L.append("")
    for sc, rows in results.items():
        L.append(f"### ({sc}) {SCENARIOS[sc][0]}")
        L.append("")
        L.append("| target | req/s | ratio to direct | p50 | p99 | p99.9 | +p50 | +p99 "
                 "| CPU µs/req | usr / sys | errors / timeouts | clean rounds "
                 "| range: req/s; CPU µs/req |")
        L.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        direct = rows.get("direct")
        for name, r in rows.items():
            ratio = r["rps"] / direct["rps"] if direct else None
            ad50 = r["p50"] - direct["p50"] if direct and name != "direct" else None
            ad99 = r["p99"] - direct["p99"] if direct and name != "direct" else None
            L.append(
                f"| {meta['labels'][name]} | {fmt(r['rps'])} | {fmt(ratio, 3)} | {fmt(r['p50'])} "
                f"| {fmt(r['p99'])} | {fmt(r['p999'])} | {fmt(ad50)} | {fmt(ad99)} "
                f"| {fmt(r['cpu_us_per_req'], 1)} "
                f"| {fmt(r['usr_us_per_req'], 1)} / {fmt(r['sys_us_per_req'], 1)} "
                f"| {r['errors']} / {r['timeouts']} | {r['used']} of {r['rounds']} "
                f"| {fmt(r['rps_range'][0])}–{fmt(r['rps_range'][1])}; "
                + (f"{fmt(r['cpu_range'][0], 1)}–{fmt(r['cpu_range'][1], 1)} |"
                   if r["cpu_range"] else "— |")
            )
        L.append("")
    L.append("### Memory")
    L.append("")
    L.append("Sum over the proxy's processes (nginx: master + worker), RSS as the kernel "
             "counts it (file-backed pages of the binary and libc included). Idle: after start "
             "and readiness, before load (median over rounds). Peak: VmHWM after every scenario "
             "above, the highest of all rounds. 1,000 idle: "
             "VmRSS of a fresh process while 1,000 keep-alive connections, each having carried "
             "one request, are held open; per conn = (that − idle) / 1,000.")
    L.append("")
    L.append("| target | idle RSS MiB | peak RSS (VmHWM) MiB | RSS, 1,000 idle conns MiB "
             "| per idle conn KiB |")
    L.append("|---|--:|--:|--:|--:|")
    for name, r in mem.items():
        per = ((r["conns1k"] - r["idle"]) * 1024 / 1000
               if r["conns1k"] is not None and r["idle"] is not None else None)
        L.append(f"| {meta['labels'][name]} | {fmt(r['idle'], 2)} | {fmt(r['peak'], 2)} "
                 f"| {fmt(r['conns1k'], 2)} | {fmt(per, 1)} |")
    L.append("")
    L.append("VmHWM (MiB) after each scenario, in run order (cumulative: it only grows), "
             "to show which workload sets the peak:")
    L.append("")
    scs = list(results)
    L.append("| target | " + " | ".join(f"after ({sc})" for sc in scs) + " |")
    L.append("|---|" + "--:|" * len(scs))
    for name in mem:
        L.append(f"| {meta['labels'][name]} | "
                 + " | ".join(fmt(results[sc][name]["hwm_mib"], 2) for sc in scs) + " |")
    L.append("")
    L.append("### lameduck only")
    L.append("")
    for k, v in extras.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("### Budget (issue 14)")
    L.append("")
    L.append("| item | lameduck | bound | verdict |")
    L.append("|---|--:|--:|---|")
    for item, mine, bound, ok in budget:
        L.append(f"| {item} | {mine} | {bound} | {'pass' if ok else ('FAIL' if ok is not None else 'n/a')} |")
    L.append("")
    return "\n".join(L)


def evaluate_budget(results, mem):
    """Issue 14's budget: lameduck against the best peer of the same run."""
    b = []

    def get(sc, t, k):
        return results.get(sc, {}).get(t, {}).get(k)

    peers = [p for p in ("nginx", "haproxy", "envoy") if p in results.get("a", results.get("b", {}))]

    def best(sc, key, pick):
        vals = [(get(sc, p, key), p) for p in peers if get(sc, p, key) is not None]
        return pick(vals) if vals else (None, None)

    for sc in ("a", "b"):
        ld = get(sc, "lameduck", "cpu_us_per_req")
        bp, who = best(sc, "cpu_us_per_req", min)
        b.append((f"CPU µs/req in ({sc}) < best peer's ({who or '—'})", fmt(ld, 1), fmt(bp, 1),
                  None if ld is None or bp is None else ld < bp))
    d = get("a", "direct", "rps")
    ld = get("a", "lameduck", "rps")
    bp, who = best("a", "rps", max)
    if d and ld and bp:
        b.append((f"(a) throughput ratio to direct ≥ best peer's ({who})", fmt(ld / d, 3),
                  fmt(bp / d, 3), ld / d >= bp / d))
    for sc in ("c", "d"):
        d50, ld50 = get(sc, "direct", "p50"), get(sc, "lameduck", "p50")
        bp, who = best(sc, "p50", min)
        if d50 is not None and ld50 is not None and bp is not None:
            b.append((f"added p50 at 1 conn ({sc}) ≤ best peer's ({who}, µs)", fmt(ld50 - d50),
                      fmt(bp - d50), ld50 - d50 <= bp - d50))
    # TLS rows: lameduck terminating TLS against the peers terminating it the same way.
    tls_peers = [p + "-tls" for p in ("nginx", "haproxy", "envoy")]
    for sc in ("a", "b"):
        ld = get(sc, "lameduck-tls", "cpu_us_per_req")
        vals = [(get(sc, p, "cpu_us_per_req"), p) for p in tls_peers
                if get(sc, p, "cpu_us_per_req") is not None]
        if ld is not None and vals:
            bp, who = min(vals)
            b.append((f"TLS: CPU µs/req in ({sc}) < best TLS peer's ({who})", fmt(ld, 1),
                      fmt(bp, 1), ld < bp))
    m = mem.get("lameduck")
    if m:
        for key, label, bound in (("idle", "idle RSS (MiB)", 4), ("peak", "peak RSS (MiB)", 10),
                                  ("conns1k", "RSS with 1,000 idle conns (MiB)", 20)):
            v = m.get(key)
            b.append((label, fmt(v, 2), f"≤ {bound}", None if v is None else v <= bound))
    # Draining: within noise of serving, per scenario. Noise = the spread of serving's
    # own rounds, or 5 % when there is one round.
    # The drain's own cost: with --keep-alive-while-draining when measured (by default every
    # response while draining carries `Connection: close`, so the load generators reconnect
    # per request: that is the price of moving clients, docs/design.md, not of draining).
    draining = "lameduck-draining-ka" if any(
        "lameduck-draining-ka" in rows for rows in results.values()) else "lameduck-draining"
    for sc, rows in results.items():
        if sc not in ("a", "b"):
            continue
        s, dr = rows.get("lameduck"), rows.get(draining)
        if not s or not dr:
            continue
        # One-sided: draining may not be slower or costlier than serving by more than
        # 10 % (the run-to-run noise seen here on a quiet machine is 5-10 %).
        tol = 0.10 * s["rps"]
        ok_rps = dr["rps"] >= s["rps"] - tol
        cs, cd = s["cpu_us_per_req"], dr["cpu_us_per_req"]
        ctol = None if cs is None else 0.10 * cs
        cpu_ok = cs is None or cd is None or cd <= cs + ctol
        b.append((f"{'draining (keep-alive kept)' if draining.endswith('-ka') else 'draining'} "
                  f"costs nothing in ({sc}): req/s, CPU µs/req",
                  f"{fmt(dr['rps'])}, {fmt(cd, 1)}",
                  f"≥ {fmt(s['rps'] - tol)}, ≤ {fmt(None if cs is None else cs + ctol, 1)}",
                  ok_rps and cpu_ok))
    return b


# --- main ----------------------------------------------------------------------------------

LABELS = {
    "direct": "direct (ceiling)",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "envoy": "Envoy",
    "lameduck": "lameduck",
    "lameduck-draining": "lameduck, draining",
    "lameduck-draining-ka": "lameduck, draining, --keep-alive-while-draining",
    "lameduck-t2": "lameduck --threads 2",
    "lameduck-base": "lameduck, base build (BENCH_BASE_BIN)",
    "nginx-tls": "nginx, TLS",
    "haproxy-tls": "HAProxy, TLS",
    "envoy-tls": "Envoy, TLS",
    "lameduck-tls": "lameduck, TLS",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", 10)),
                    help="seconds per measurement (default 10; env BENCH_DURATION)")
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)),
                    help="rounds over all targets; figures are medians (default 3)")
    ap.add_argument("--targets", default=os.environ.get(
        "BENCH_TARGETS", "direct,nginx,haproxy,envoy,lameduck,lameduck-draining,lameduck-t2"))
    ap.add_argument("--scenarios", default=os.environ.get("BENCH_SCENARIOS", "a,b,c,d,a64k,b64k"))
    ap.add_argument("--wait-quiet", type=int, default=int(os.environ.get("BENCH_WAIT_QUIET", 0)),
                    help="wait up to this many seconds for 1-min load < 0.7 first (default 0)")
    ap.add_argument("--idle-wait", type=int, default=int(os.environ.get("BENCH_IDLE_WAIT", 120)),
                    help="before each measurement, wait up to this many seconds until other "
                         "processes use < 10%% of the CPUs (default 120)")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", os.path.join(HERE, "results")))
    ap.add_argument("--tools", help="JSON: paths of lameduck, upstream, nginx, ... (compare.sh)")
    ap.add_argument("--report-from", metavar="RUN.json",
                    help="measure nothing: rewrite the report of an earlier run from its JSON")
    args = ap.parse_args()
    if args.report_from:
        with open(args.report_from) as f:
            raw = json.load(f)
        raw["meta"].setdefault("stamp", os.path.basename(args.report_from)[4:-5])
        raw["meta"].setdefault("idle_wait", args.idle_wait)
        write_report(raw, os.path.dirname(os.path.abspath(args.report_from)))
        return
    tools = json.loads(args.tools)
    targets = args.targets.split(",")
    scenarios = args.scenarios.split(",")
    for t in targets:
        assert t in LABELS, f"unknown target {t}"
    for s in scenarios:
        assert s in SCENARIOS, f"unknown scenario {s}"
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores to pin the proxy apart from the load generator")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    os.sched_setaffinity(0, {LOADGEN_CORE})
    workdir = tempfile.mkdtemp(prefix="lameduck-bench-")
    os.makedirs(args.out, exist_ok=True)

    quiet_note = "No wait for a quiet machine was asked for."
    if args.wait_quiet:
        ok, waited = wait_quiet(args.wait_quiet)
        quiet_note = (f"Waited {waited:.0f} s for 1-min load < 0.7: "
                      + ("reached." if ok else "NOT reached; ran anyway (figures are noisier)."))
    load_before = loadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"pinning: proxy alone on core {PROXY_CORE}; load generator + upstream + driver on "
          f"core {LOADGEN_CORE}", flush=True)
    print(f"load average before: {load_before}", flush=True)

    try:
        up_port = free_port()
        up_log = open(os.path.join(workdir, "upstream.log"), "w")
        upstream = spawn([tools["upstream"], f"127.0.0.1:{up_port}"], LOADGEN_CORE, up_log)
        BACKGROUND.append(upstream.pid)
        wait_http(up_port, "/")

        runs = {sc: {t: [] for t in targets} for sc in scenarios}
        mem_runs = {t: {"idle": [], "peak": [], "conns1k": []} for t in targets if t != "direct"}
        for rnd in range(1, args.rounds + 1):
            for name in targets:
                tgt = Target(name, LABELS[name], tools, workdir, up_port)
                tgt.start()
                try:
                    pids = tgt.pids()
                    if pids:
                        mem_runs[name]["idle"].append(status_kib(pids, "VmRSS") / 1024)
                    run_wrk(tools, f"{tgt.scheme}://127.0.0.1:{tgt.port}/", 64, 1)  # warm-up
                    for sc in scenarios:
                        ours = pids + BACKGROUND
                        wait_idle(args.idle_wait, ours)
                        r = measure(tgt, sc, args.duration)
                        if r["foreign"] > 0.10:
                            # Someone else used the machine meanwhile: measure once more
                            # when it is idle again, keep the cleaner of the two.
                            print(f"  ({name} {sc}: {r['foreign']:.0%} of the CPUs used by "
                                  "other processes; measuring again)", flush=True)
                            wait_idle(args.idle_wait, ours)
                            again = measure(tgt, sc, args.duration)
                            if again["foreign"] < r["foreign"]:
                                r = again
                        if pids:
                            r["hwm_mib"] = status_kib(pids, "VmHWM") / 1024
                        runs[sc][name].append(r)
                        print(f"[round {rnd}] {name:18} ({sc:4}) {r['rps']:>9,.0f} req/s  "
                              f"p50 {r['p50']:>7,.0f}  p99 {r['p99']:>8,.0f}  "
                              f"p99.9 {r['p999']:>8,.0f} µs  cpu/req "
                              f"{fmt(r['cpu_us_per_req'], 1):>6} µs  errors {r['errors']}"
                              f"  timeouts {r['timeouts']}  foreign CPU {r['foreign']:.0%}",
                              flush=True)
                    if pids:
                        mem_runs[name]["peak"].append(status_kib(pids, "VmHWM") / 1024)
                    if name == "lameduck-draining":
                        tgt.require_state("draining")  # still draining at the end
                finally:
                    tgt.stop()
                if name != "direct" and rnd == 1:
                    # On a fresh process, so the figure does not depend on what the heap
                    # kept from the load scenarios.
                    tgt = Target(name, LABELS[name], tools, workdir, up_port)
                    tgt.start()
                    try:
                        kib = idle_conns_rss(tgt)
                        mem_runs[name]["conns1k"].append(kib / 1024)
                        print(f"[round {rnd}] {name:18} RSS with 1,000 idle conns "
                              f"{kib / 1024:.2f} MiB", flush=True)
                    finally:
                        tgt.stop()

        extras = {}
        if "lameduck" in targets:
            st = lameduck_startup(tools, up_port)
            extras["startup to first ready /readyz (5 runs, ms)"] = (
                f"median {statistics.median(st):.1f}, min {min(st):.1f}, max {max(st):.1f}")
            full, stripped = stripped_size(tools["lameduck"], workdir)
            extras["binary size, release"] = (
                f"{full / MiB:.2f} MiB as built, {stripped / MiB:.2f} MiB stripped "
                f"({stripped:,} bytes)")
        stop(upstream)
    finally:
        stop_all()

    meta = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "stamp": started.strftime("%Y%m%d-%H%M"),
        "machine": machine(),
        "versions": versions(tools),
        "load_before": load_before,
        "load_after": loadavg(),
        "quiet_note": quiet_note,
        "duration": args.duration,
        "rounds": args.rounds,
        "idle_wait": args.idle_wait,
        "labels": LABELS,
    }
    raw = {"meta": meta, "runs": runs, "mem": mem_runs, "extras": extras}
    with open(os.path.join(args.out, f"run-{meta['stamp']}.json"), "w") as f:
        json.dump(raw, f, indent=1)
    write_report(raw, args.out)
    shutil.rmtree(workdir, ignore_errors=True)


def write_report(raw, out_dir):
    """Aggregates the raw measurements of one run and writes run-<stamp>.md."""
    meta, runs, mem_runs, extras = raw["meta"], raw["runs"], raw["mem"], raw["extras"]
    results = {sc: {t: aggregate(rs) for t, rs in per.items()} for sc, per in runs.items()}
    # Idle: median over rounds; peak: the highest of any round (the whole bench).
    mem = {t: {"idle": med(m["idle"]), "peak": max(m["peak"], default=None),
               "conns1k": med(m["conns1k"])} for t, m in mem_runs.items()}
    budget = evaluate_budget(results, mem)
    text = render(meta, results, mem, extras, budget)
    print()
    print(text)
    path = os.path.join(out_dir, f"run-{meta['stamp']}.md")
    with open(path, "w") as f:
        f.write(text)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
