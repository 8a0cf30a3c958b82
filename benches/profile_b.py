#!/usr/bin/env python3
"""Scenario (b), counted rather than timed: what one request costs lameduck at a fixed rate.

    python3 benches/profile_b.py [--binary target/release/lameduck] [--only syscalls,callgrind,memory]
                                 [--draining]

Wall-clock CPU per request moves by 30 % on a shared machine; these counts barely move:

- syscalls/request: `perf stat` on the syscall tracepoints of the proxy while oha sends
  25,000 requests at 5,000 req/s over 32 keep-alive connections (scenario (b) itself).
- instructions and malloc/free calls per request: valgrind's callgrind on the proxy, counters
  zeroed after a warm-up, while oha sends 10,000 requests at 500 req/s over 32 connections
  (scenario (b)'s shape: every request arrives on an idle connection of an idle proxy; the
  rate is lower because callgrind runs the proxy ~50x slower). Self cost grouped by crate
  (from the inline info of a build with line tables: `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only`).
- memory: RSS idle; with 1,000 idle connections (each carried one request); peak (VmHWM)
  after 20,000 requests over 64 connections with 3-byte and then 64 KiB answers (compare.py's
  peak); then with 3,000 connections open that each carried one request, and 4 s after they
  closed (benches/burst_rss.py's burst).

Pinning as in compare.py: proxy on core 1, load generator and upstream on core 0. Loopback
only; everything it starts is killed at exit. Prints one JSON object and a summary.
"""

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from compare import LOADGEN_CORE, PROXY_CORE, ROOT  # noqa: E402

SYSCALLS = ["recvfrom", "writev", "write", "sendto", "read", "epoll_wait", "epoll_ctl",
            "futex", "connect", "shutdown", "close", "accept4", "clock_gettime",
            "madvise", "munmap", "mmap", "brk"]
MALLOC_FNS = {"malloc", "calloc", "realloc", "__libc_malloc", "__libc_calloc",
              "__libc_realloc", "posix_memalign", "aligned_alloc"}
FREE_FNS = {"free", "cfree", "__libc_free"}


def oha(tools, port, n, rate, conns=32, path="/"):
    argv = ["taskset", "-c", str(LOADGEN_CORE), tools["oha"], "-n", str(n), "-c", str(conns),
            "--no-tui", "--output-format", "json"]
    if rate:
        argv += ["-q", str(rate)]
    out = subprocess.run(argv + [f"http://127.0.0.1:{port}{path}"], capture_output=True,
                         text=True, timeout=900)
    r = json.loads(out.stdout)
    codes = r.get("statusCodeDistribution", {})
    return sum(v for k, v in codes.items() if k.startswith("2"))


# --draining: the proxy measured while Draining, as compare.py's lameduck-draining-ka target.
DRAINING = ["--drain-min", "1s", "--quiet", "3600s", "--drain-max", "3600s",
            "--keep-alive-while-draining"]


def start_proxy(binary, up_port, wrapper=(), log=None, extra=(), draining=False):
    port, admin = compare.free_port(), compare.free_port()
    if draining:
        extra = list(extra) + DRAINING
    argv = list(wrapper) + [binary, "proxy", "--listen", f"127.0.0.1:{port}", "--upstream",
                            f"127.0.0.1:{up_port}", "--admin", f"127.0.0.1:{admin}",
                            "--log-level", "warn"] + list(extra)
    p = compare.spawn(argv, PROXY_CORE, log or subprocess.DEVNULL)
    compare.wait_http(port, "/", timeout=120)
    compare.wait_http(admin, "/readyz", timeout=120)
    if draining:
        status, body = compare.http_get(admin, "/drain?wait=false", method="POST")
        assert status in (200, 202), (status, body)
        state = json.loads(compare.http_get(admin, "/status")[1])["state"]
        assert state == "draining", state
    return p, port


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[k] = int(v.split()[0])
    return out


# --- syscalls ----------------------------------------------------------------------------


def syscalls(args, tools, up_port):
    p, port = start_proxy(args.binary, up_port, draining=args.draining)
    try:
        oha(tools, port, 5000, 5000)  # warm-up: pools filled
        events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS]
        out_file = tempfile.mktemp(suffix=".csv")
        perf = compare.spawn(["perf", "stat", "-x", ",", "-o", out_file, "-e", ",".join(events),
                              "-p", str(p.pid)], LOADGEN_CORE, subprocess.DEVNULL)
        time.sleep(0.5)
        ok = oha(tools, port, args.requests, 5000)
        perf.send_signal(2)
        perf.wait(10)
        compare.STARTED.remove(perf)
        counts = {}
        with open(out_file) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[2].startswith(("raw_syscalls", "syscalls")):
                    try:
                        counts[parts[2].split(":")[1].replace("sys_enter_", "")] = int(parts[0])
                    except ValueError:
                        pass
        os.unlink(out_file)
    finally:
        compare.stop(p)
    per = {k: round(v / ok, 3) for k, v in counts.items() if v}
    per["requests"] = ok
    return per


# --- callgrind ---------------------------------------------------------------------------


def crate_group(fn, file, obj):
    """A function group for a callgrind cost line: crate (from the inlined source file) or
    libc family."""
    if obj and ("libc.so" in obj or "ld-linux" in obj):
        if re.search(r"malloc|free|realloc|calloc|tcache|_int_|unlink_chunk|consolidate|arena",
                     fn):
            return "libc malloc/free"
        if re.search(r"mem(cpy|move|set|cmp)|str", fn):
            return "libc memcpy/memmove/memset"
        return "libc other (syscall wrappers, clock_gettime)"
    if obj and "vdso" in obj:
        return "vdso (clock_gettime)"
    m = re.search(r"registry/src/[^/]+/([A-Za-z0-9_\-]+?)-\d+\.\d+[^/]*/", file or "")
    if m:
        return m.group(1)
    m = re.search(r"/library/(core|alloc|std)/", file or "")
    if m:
        return f"Rust {m.group(1)}"
    m = re.search(r"(?:^|/)src/([a-z_]+)\.rs$", file or "")
    if m and "registry" not in (file or ""):
        return f"lameduck::{m.group(1)}"
    return "other"


def parse_callgrind(path):
    """Self cost per (fn, file, obj), call counts per callee, and the total."""
    names = {"fl": {}, "fn": {}, "ob": {}}
    cur = {"fl": None, "fn": None, "ob": None, "fi": None}
    self_cost = collections.Counter()
    calls = collections.Counter()
    total = 0
    cfn = None
    expect_call_line = False

    def resolve(kind, spec):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", spec)
        if not m:
            return spec
        if m.group(2) is not None:
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), spec)

    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                if expect_call_line:
                    expect_call_line = False  # inclusive cost of the call: not self
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    ir = int(parts[1])
                    total += ir
                    self_cost[(cur["fn"], cur["fi"] or cur["fl"], cur["ob"])] += ir
                continue
            key, _, val = line.partition("=")
            if key in ("fl", "fi", "fe"):
                v = resolve("fl", val)
                if key == "fl":
                    cur["fl"], cur["fi"] = v, None
                else:
                    cur["fi"] = v
            elif key == "fn":
                cur["fn"] = resolve("fn", val)
                cur["fi"] = None
            elif key == "ob":
                cur["ob"] = resolve("ob", val)
            elif key in ("cfn",):
                cfn = resolve("fn", val)
            elif key in ("cfi", "cfl"):
                resolve("fl", val)
            elif key == "cob":
                resolve("ob", val)
            elif key == "calls":
                calls[cfn] += int(val.split()[0])
                expect_call_line = True
    return total, self_cost, calls


def callgrind(args, tools, up_port):
    workdir = tempfile.mkdtemp(prefix="lameduck-cg-")
    out = os.path.join(workdir, "callgrind.out")
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
          "--read-inline-info=yes", "--trace-children=no"]
    log = open(os.path.join(workdir, "valgrind.log"), "w")
    p, port = start_proxy(args.binary, up_port, wrapper=vg, log=log,
                          draining=args.draining)
    try:
        oha(tools, port, 2000, args.cg_rate)  # warm-up
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True,
                       capture_output=True, timeout=60)
        ok = oha(tools, port, args.cg_requests, args.cg_rate)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True,
                       capture_output=True, timeout=120)
    finally:
        compare.stop(p, grace=30)
    dumps = sorted(f for f in os.listdir(workdir) if f.startswith("callgrind.out."))
    dump = os.path.join(workdir, dumps[0])
    total, self_cost, calls = parse_callgrind(dump)
    groups = collections.Counter()
    fns = collections.Counter()
    for (fn, file, obj), ir in self_cost.items():
        groups[crate_group(fn or "", file, obj)] += ir
        fns[fn] += ir
    return {
        "requests": ok,
        "rate": args.cg_rate,
        "ir_per_req": round(total / ok),
        "mallocs_per_req": round(sum(v for k, v in calls.items() if k in MALLOC_FNS) / ok, 2),
        "frees_per_req": round(sum(v for k, v in calls.items() if k in FREE_FNS) / ok, 2),
        "groups_per_req": {g: round(v / ok) for g, v in groups.most_common()},
        "top_self_per_req": [(round(v / ok), f) for f, v in fns.most_common(40)],
        "dump": dump,
    }


# --- memory ------------------------------------------------------------------------------


async def _open_idle(port, n):
    conns = []
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        await r.readexactly(int(m.group(1)))
        conns.append(w)
    return conns


def idle_conns(port, pid, n):
    async def run():
        conns = await _open_idle(port, n)
        await asyncio.sleep(2)
        st = status(pid)
        for w in conns:
            w.close()
        return st
    return asyncio.run(run())


def memory(args, tools, up_port):
    res = {}
    p, port = start_proxy(args.binary, up_port, draining=args.draining)
    try:
        time.sleep(1)
        res["idle"] = status(p.pid)
        res["conns1k"] = idle_conns(port, p.pid, 1000)
    finally:
        compare.stop(p)
    p, port = start_proxy(args.binary, up_port, draining=args.draining)
    try:
        for path in ("/", "/64k"):
            oha(tools, port, 20000, 0, conns=64, path=path)
        # compare.py's peak: VmHWM after 64-connection loads, 3-byte and 64 KiB answers.
        res["after_load"] = status(p.pid)
        socks = []
        for _ in range(3000):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            socks.append(s)
        for s in socks:
            s.recv(65536)
        res["burst_open"] = status(p.pid)
        for s in socks:
            s.close()
        time.sleep(4)
        res["after_burst"] = status(p.pid)
    finally:
        compare.stop(p)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/lameduck"))
    ap.add_argument("--upstream", default=os.path.join(ROOT, "target/release/examples/bench_upstream"))
    ap.add_argument("--only", default="syscalls,callgrind,memory")
    ap.add_argument("--requests", type=int, default=25000, help="for the syscall count")
    ap.add_argument("--cg-requests", type=int, default=10000)
    ap.add_argument("--cg-rate", type=int, default=500)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--draining", action="store_true",
                    help="measure the proxy while Draining (--keep-alive-while-draining, "
                         "--quiet 3600s), as compare.py's lameduck-draining-ka")
    args = ap.parse_args()
    tools = {"oha": os.environ.get("OHA", os.path.expanduser("~/.cargo/bin/oha"))}
    os.sched_setaffinity(0, {LOADGEN_CORE})
    import signal
    signal.signal(signal.SIGTERM, compare.on_signal)
    signal.signal(signal.SIGINT, compare.on_signal)
    result = {"binary": args.binary}
    try:
        up_port = compare.free_port()
        compare.spawn([args.upstream, f"127.0.0.1:{up_port}"], LOADGEN_CORE, subprocess.DEVNULL)
        compare.wait_http(up_port, "/")
        for part in args.only.split(","):
            result[part] = {"syscalls": syscalls, "callgrind": callgrind,
                            "memory": memory}[part](args, tools, up_port)
            print(part, json.dumps(result[part], indent=1), flush=True)
    finally:
        compare.stop_all()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
