#!/usr/bin/env python3
"""Where lameduck's time and memory go, next to the peers. Driven by benches/profile.sh.

Sections of the report it writes (benches/results/profile-<date>.md):

1. Syscalls and TCP segments per request (perf stat on syscall tracepoints, nstat), per
   target, for a fixed number of closed-loop requests (oha -n, 64 connections).
2. Instructions and malloc calls per request (valgrind --tool=callgrind, counters zeroed
   after a warm-up, dumped after a fixed number of requests): repeatable whatever else the
   machine is doing. Top functions of lameduck, inclusive and self.
3. perf record (cpu-clock, DWARF call graphs) of lameduck under scenarios (a) and (b): the
   split kernel / lameduck / libc, the hottest symbols, and the self time grouped by crate.

Pinning as in compare.py: proxy on core 1, load generator + upstream on core 0.
"""

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from compare import LOADGEN_CORE, PROXY_CORE, HERE  # noqa: E402

MALLOC_FNS = {"malloc", "calloc", "realloc", "__libc_malloc", "__libc_calloc", "__libc_realloc"}
FREE_FNS = {"free", "cfree", "__libc_free"}


def oha_n(tools, port, n, conns=64, path="/"):
    """n requests, closed loop over `conns` connections; returns completed 2xx count."""
    out = subprocess.run(
        ["taskset", "-c", str(LOADGEN_CORE), tools["oha"], "-n", str(n), "-c", str(conns),
         "--no-tui", "--output-format", "json", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=600,
    )
    r = json.loads(out.stdout)
    codes = r.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    return ok, r["summary"]["requestsPerSec"]


def nstat_segs():
    out = subprocess.run(["nstat", "-az", "TcpOutSegs"], capture_output=True, text=True).stdout
    m = re.search(r"TcpOutSegs\s+(\d+)", out)
    return int(m.group(1)) if m else 0


SYSCALLS = ["read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "accept4", "connect", "close",
            "setsockopt", "getsockopt", "splice", "sched_yield", "ioctl"]


def syscall_profile(tgt, tools, n, conns=64):
    pids = ",".join(str(p) for p in tgt.pids())
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS]
    oha_n(tools, tgt.port, 2000)  # warm-up: pools filled
    out_file = tempfile.mktemp(suffix=".csv")
    perf = subprocess.Popen(
        ["taskset", "-c", str(LOADGEN_CORE), "perf", "stat", "-x", ",", "-o", out_file,
         "-e", ",".join(events), "-p", pids],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    compare.STARTED.append(perf)
    time.sleep(0.5)
    segs0 = nstat_segs()
    ok, _ = oha_n(tools, tgt.port, n, conns)
    segs1 = nstat_segs()
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
    per = {k: v / ok for k, v in counts.items() if v}
    per["tcp_segments_all_hops"] = (segs1 - segs0) / ok
    return per


# --- callgrind ---------------------------------------------------------------------------


def parse_callgrind(path):
    """Totals and call counts to each callee, from a callgrind output file."""
    names = {}
    calls = collections.Counter()
    total = None
    cur_cfn = None

    def name_of(spec):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", spec)
        if not m:
            return spec
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), spec)

    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                name_of(line[3:].strip())
            elif line.startswith("cfn="):
                cur_cfn = name_of(line[4:].strip())
            elif line.startswith("calls="):
                calls[cur_cfn] += int(line[6:].split()[0])
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    return total, calls


def callgrind_target(tgt_name, tools, workdir, up_port, n, binary=None):
    """Runs one target under callgrind; returns (Ir per request, mallocs per request, file)."""
    out = os.path.join(workdir, f"callgrind.{tgt_name}")
    tgt = compare.Target(tgt_name, tgt_name, tools, workdir, up_port)
    port = compare.free_port()
    listen = f"127.0.0.1:{port}"
    up = f"127.0.0.1:{up_port}"
    d = tgt.dir
    if tgt_name == "lameduck":
        argv = [binary or tools["lameduck"], "proxy", "--listen", listen, "--upstream", up,
                "--admin", f"127.0.0.1:{compare.free_port()}", "--log-level", "warn"]
    elif tgt_name == "nginx":
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        conf = compare.fill("nginx.conf", f"{d}/nginx.conf", DIR=d, LISTEN=listen, UPSTREAM=up)
        with open(conf) as f:
            text = f.read().replace("master_process on;", "master_process off;")
        with open(conf, "w") as f:
            f.write(text)
        argv = [tools["nginx"], "-p", d, "-c", conf, "-e", "stderr"]
    elif tgt_name == "haproxy":
        conf = compare.fill("haproxy.cfg", f"{d}/haproxy.cfg", LISTEN=listen, UPSTREAM=up)
        argv = [tools["haproxy"], "-db", "-f", conf]
    elif tgt_name == "envoy":
        conf = compare.fill("envoy.yaml", f"{d}/envoy.yaml", LISTEN_HOST="127.0.0.1",
                            LISTEN_PORT=port, UP_HOST="127.0.0.1", UP_PORT=up_port)
        argv = [tools["envoy"], "-c", conf, "--concurrency", "1", "--disable-hot-restart",
                "-l", "error", "--base-id", str(port)]
    else:
        raise ValueError(tgt_name)
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
          "--read-inline-info=yes", "--trace-children=no"]
    log = open(os.path.join(d, "callgrind.log"), "w")
    p = compare.spawn(vg + argv, PROXY_CORE, log)
    try:
        compare.wait_http(port, "/", timeout=120)
        oha_n(tools, port, 2000)  # warm-up
        subprocess.run(["callgrind_control", "-z", str(p.pid)], check=True,
                       capture_output=True, timeout=60)
        ok, rps = oha_n(tools, port, n)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], check=True,
                       capture_output=True, timeout=120)
    finally:
        compare.stop(p, grace=30)
    dumps = sorted(f for f in os.listdir(workdir) if f.startswith(f"callgrind.{tgt_name}."))
    dump = os.path.join(workdir, dumps[0])
    total, calls = parse_callgrind(dump)
    mallocs = sum(v for k, v in calls.items() if k in MALLOC_FNS)
    frees = sum(v for k, v in calls.items() if k in FREE_FNS)
    return {"ir_per_req": total / ok, "mallocs_per_req": mallocs / ok,
            "frees_per_req": frees / ok, "requests": ok, "dump": dump}


def annotate(dump, inclusive, limit=25):
    out = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100",
         dump], capture_output=True, text=True).stdout
    rows, seen = [], set()
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        pct = float(m.group(2))
        # "path:function [object]" -> "function"; callgrind repeats a function once per
        # source file its inlined code came from: keep the first (largest) line of each.
        fn = re.sub(r"\s+\[[^\]]*\]$", "", m.group(3).strip())
        fn = re.sub(r"^[^:]*:(?!:)", "", fn, count=1)
        if pct >= 99.5 or "below main" in fn or fn.startswith("0x") or fn in seen:
            continue
        seen.add(fn)
        rows.append((pct, fn))
    return rows[:limit]


# --- perf record -------------------------------------------------------------------------


def crate_of(sym):
    s = sym.lstrip("<&*").replace("dyn ", "").replace("mut ", "")
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", s)
    return m.group(1) if m else s.split("@")[0]


def perf_profile(tgt, tools, workdir, scenario, duration):
    data = os.path.join(workdir, f"perf.{scenario}.data")
    compare.run_wrk(tools, f"http://127.0.0.1:{tgt.port}/", 64, 1)
    perf = subprocess.Popen(
        ["taskset", "-c", str(LOADGEN_CORE), "perf", "record", "-q", "-e", "cpu-clock",
         "-F", "1999", "--call-graph", "dwarf,16384", "-p", str(tgt.proc.pid), "-o", data],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    compare.STARTED.append(perf)
    time.sleep(0.5)
    r = compare.measure(tgt, scenario, duration)
    perf.send_signal(2)
    perf.wait(60)
    compare.STARTED.remove(perf)
    out = analyze_perf(data)
    out["result"] = r
    out["data"] = data
    return out


def analyze_perf(data):
    """Self and inclusive shares from a perf.data with DWARF call graphs."""

    def report(*extra):
        return subprocess.run(["perf", "report", "-i", data, "--stdio", "-g", "none"]
                              + list(extra), capture_output=True, text=True).stdout

    def clean(line):
        # perf pads lines and may append empty "-" columns.
        return re.sub(r"(\s+-)+\s*$", "", line).rstrip()

    syms = []  # (self %, dso, symbol)
    for line in report("--no-children", "--sort", "dso,symbol").splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*?)\s*$", clean(line))
        if m:
            syms.append((float(m.group(1)), m.group(2), m.group(3)))
    dsos = collections.Counter()
    groups = collections.Counter()
    for pct, dso, sym in syms:
        dsos[dso] += pct
        if dso.startswith("[kernel"):
            groups["kernel (TCP/IP, syscalls, wake-ups)"] += pct
        elif dso.startswith("libc"):
            if re.search(r"malloc|free|unlink_chunk|consolidate|tcache", sym):
                groups["libc malloc/free"] += pct
            elif "mem" in sym:
                groups["libc memcpy/memmove/memset"] += pct
            else:
                groups["libc other (syscall wrappers)"] += pct
        elif dso == "[vdso]":
            groups["vdso (clock_gettime)"] += pct
        else:
            groups[crate_of(sym)] += pct
    # Inclusive shares of the paths that matter, from the DWARF call graphs.
    paths = {
        "socket writes (writev: includes the loopback receive processing it triggers)":
            r"TcpStream as tokio::io::async_write::AsyncWrite>::poll_write_vectored$",
        "socket reads (recv)": r"TcpStream as tokio::io::async_read::AsyncRead>::poll_read$",
        "epoll_wait": r"\[k\] do_epoll_wait$",
        "loopback softirq (net_rx_action)": r"\[k\] net_rx_action$",
        "downstream connection task (hyper server)": r"lameduck::listener::serve_connection::\{\{closure\}\}$",
        "upstream connection tasks (hyper client)": r"lameduck::upstream::Upstream::connect_h1::\{\{closure\}\}::\{\{closure\}\}$",
        "lameduck::proxy Forward::call": r"lameduck::proxy::Forward as tower_service::Service<.*>>::call::\{\{closure\}\}$",
        "lameduck::proxy::strip_hop_by_hop": r"lameduck::proxy::strip_hop_by_hop$",
        "Metrics::record_request": r"lameduck::metrics::Metrics::record_request$",
        "malloc + free": r"\] (malloc|cfree@GLIBC_2.2.5|free)$",
    }
    kernel_syscalls = []
    children = [clean(l) for l in report("--children", "--sort", "symbol").splitlines()]
    for label, pat in paths.items():
        best = 0.0
        for line in children:
            m = re.match(r"\s*([\d.]+)%\s+[\d.]+%\s+(.*?)\s*$", line)
            if m and re.search(pat, m.group(2)):
                best = max(best, float(m.group(1)))
        kernel_syscalls.append((best, label))
    user = [(p, s) for p, d, s in syms if not d.startswith("[kernel")]
    return {"dsos": sorted(((v, k) for k, v in dsos.items()), reverse=True),
            "crates": groups.most_common(20), "syscalls_children": kernel_syscalls[:10],
            "user": user[:30]}


# --- main --------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tools")
    ap.add_argument("--profiling-binary",
                    help="lameduck built with debug info (same code, same release profile)")
    ap.add_argument("--requests", type=int, default=50000, help="requests for syscall counts")
    ap.add_argument("--callgrind-requests", type=int, default=20000)
    ap.add_argument("--duration", type=int, default=10, help="seconds of perf record")
    ap.add_argument("--peers", default="nginx,haproxy,envoy")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--perf-data", type=json.loads, default={},
                    help='with --report-from: {"a": "perf.a.data", ...} to re-analyse')
    ap.add_argument("--report-from", metavar="PROFILE.json",
                    help="measure nothing: rewrite the report of an earlier run from its JSON")
    args = ap.parse_args()
    if args.report_from:
        with open(args.report_from) as f:
            rep = json.load(f)
        for k in ("requests", "callgrind_requests"):
            setattr(args, k, rep.get("args", {}).get(k, getattr(args, k)))
        for sc, p in rep.get("perf", {}).items():
            # Re-read the perf data when it is still there (same run, newer analysis).
            data = args.perf_data.get(sc) or p.get("data")
            if data and os.path.exists(data):
                p.update(analyze_perf(data))
                p["data"] = data
        with open(args.report_from, "w") as f:
            json.dump(rep, f, indent=1, default=str)
        text = render(rep, args)
        with open(args.report_from[:-5] + ".md", "w") as f:
            f.write(text)
        print(text)
        return
    tools = json.loads(args.tools)
    prof_tools = dict(tools, lameduck=args.profiling_binary)
    peers = [p for p in args.peers.split(",") if p]

    import signal
    signal.signal(signal.SIGTERM, compare.on_signal)
    signal.signal(signal.SIGINT, compare.on_signal)
    os.sched_setaffinity(0, {LOADGEN_CORE})
    workdir = tempfile.mkdtemp(prefix="lameduck-profile-")
    started = datetime.datetime.now(datetime.timezone.utc)
    report = {"load_before": compare.loadavg(),
              "args": {"requests": args.requests, "callgrind_requests": args.callgrind_requests}}
    try:
        up_port = compare.free_port()
        upstream = compare.spawn([tools["upstream"], f"127.0.0.1:{up_port}"], LOADGEN_CORE,
                                 open(os.path.join(workdir, "upstream.log"), "w"))
        compare.wait_http(up_port, "/")

        sysc = {}
        for name in ["direct"] + peers + ["lameduck", "lameduck-t2"]:
            tgt = compare.Target(name, name, tools, workdir, up_port)
            tgt.start()
            try:
                for conns, key, n in ((64, name, args.requests),
                                      (1, f"{name}, 1 conn", args.requests // 10)):
                    if name == "direct":
                        oha_n(tools, tgt.port, 2000)
                        s0 = nstat_segs()
                        ok, _ = oha_n(tools, tgt.port, n, conns)
                        sysc[key] = {"tcp_segments_all_hops": (nstat_segs() - s0) / ok}
                    else:
                        sysc[key] = syscall_profile(tgt, tools, n, conns)
                    print(f"syscalls/req {key}: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in sysc[key].items()), flush=True)
            finally:
                tgt.stop()
        report["syscalls"] = sysc

        cg = {}
        for name in ["lameduck"] + peers:
            try:
                cg[name] = callgrind_target(name, tools, workdir, up_port,
                                            args.callgrind_requests,
                                            binary=args.profiling_binary)
                print(f"callgrind {name}: {cg[name]['ir_per_req']:,.0f} instr/req, "
                      f"{cg[name]['mallocs_per_req']:.2f} mallocs/req", flush=True)
            except Exception as e:  # a peer that cannot run under valgrind is reported, not fatal
                cg[name] = {"error": str(e)[:300]}
                print(f"callgrind {name}: failed: {e}", flush=True)
        report["callgrind"] = {k: {kk: vv for kk, vv in v.items() if kk != "dump"}
                               for k, v in cg.items()}
        if "dump" in cg.get("lameduck", {}):
            report["callgrind_inclusive"] = annotate(cg["lameduck"]["dump"], True, 45)
            report["callgrind_self"] = annotate(cg["lameduck"]["dump"], False, 30)

        perf = {}
        for sc in ("a", "b"):
            tgt = compare.Target("lameduck", "lameduck", prof_tools, workdir, up_port)
            tgt.start()
            try:
                perf[sc] = perf_profile(tgt, prof_tools, workdir, sc, args.duration)
                print(f"perf ({sc}): {perf[sc]['dsos'][:4]}", flush=True)
            finally:
                tgt.stop()
        report["perf"] = perf
        compare.stop(upstream)
    finally:
        compare.stop_all()
    report["load_after"] = compare.loadavg()
    report["versions"] = compare.versions(tools)
    report["machine"] = compare.machine()
    report["date"] = started.strftime("%Y-%m-%d %H:%M UTC")
    text = render(report, args)
    print(text)
    stamp = started.strftime("%Y%m%d-%H%M")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile-{stamp}.md")
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"profile-{stamp}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\nwritten: {path}")


def render(rep, args):
    L = [f"# lameduck profile — {rep['date']}", ""]
    m = rep["machine"]
    L.append(f"Machine: {m['nproc']} cores ({m['cpu']}); load average before "
             f"{rep['load_before']}, after {rep['load_after']}. Proxy on core {PROXY_CORE}, "
             f"load generator + upstream on core {LOADGEN_CORE}. lameduck: the release profile "
             "(lto fat, codegen-units 1) rebuilt with debug info (`CARGO_PROFILE_RELEASE_DEBUG=1`"
             ", target/profiling) for symbols; same code.")
    L.append("")
    L.append("Versions: " + "; ".join(f"{k} {v}" for k, v in rep["versions"].items()))
    L.append("")
    L.append(f"## 1. Syscalls and TCP segments per request ({args.requests:,} requests, "
             f"closed loop, 64 connections, `oha -n`; rows marked 1 conn: "
             f"{args.requests // 10:,} requests on one connection)")
    L.append("")
    L.append("perf stat on syscall tracepoints of the proxy's processes. Segments: `nstat` "
             "TcpOutSegs over the whole machine (client↔proxy and proxy↔upstream, both "
             "directions), so `direct` is the floor for one hop.")
    L.append("")
    sysc = rep["syscalls"]
    # "sys_enter" is the raw_syscalls tracepoint: every syscall.
    cols = ["sys_enter"] + [s for s in SYSCALLS if any(s in v for v in sysc.values())]
    L.append("| target | all syscalls | " + " | ".join(cols[1:])
             + " | other syscalls | TCP segments |")
    L.append("|---|" + "--:|" * (len(cols) + 2))
    for name, v in sysc.items():
        other = (v["sys_enter"] - sum(v.get(c, 0) for c in cols[1:])
                 if "sys_enter" in v else None)
        L.append(f"| {name} | " + " | ".join(
            f"{v[c]:.2f}" if c in v else "—" for c in cols) +
            f" | {'—' if other is None else f'{other:.2f}'}"
            f" | {v.get('tcp_segments_all_hops', 0):.2f} |")
    L.append("")
    L.append(f"## 2. Instructions and allocations per request (callgrind, "
             f"{args.callgrind_requests:,} requests after a 2,000-request warm-up)")
    L.append("")
    L.append("| target | instructions/req | malloc+calloc+realloc calls/req | free calls/req |")
    L.append("|---|--:|--:|--:|")
    for name, v in rep["callgrind"].items():
        if "error" in v:
            L.append(f"| {name} | failed under valgrind: {v['error'][:80]} | | |")
        else:
            L.append(f"| {name} | {v['ir_per_req']:,.0f} | {v['mallocs_per_req']:.2f} "
                     f"| {v['frees_per_req']:.2f} |")
    L.append("")
    if "callgrind_inclusive" in rep:
        L.append("lameduck, inclusive (share of all instructions in the window):")
        L.append("")
        L.append("| % incl | function |")
        L.append("|--:|---|")
        for p, f in rep["callgrind_inclusive"]:
            L.append(f"| {p:.1f} | `{f[:160]}` |")
        L.append("")
        L.append("lameduck, self:")
        L.append("")
        L.append("| % self | function |")
        L.append("|--:|---|")
        for p, f in rep["callgrind_self"]:
            L.append(f"| {p:.1f} | `{f[:160]}` |")
        L.append("")
    for sc, p in rep.get("perf", {}).items():
        r = p["result"]
        L.append(f"## 3{sc}. perf record, lameduck, scenario ({sc}): {r['rps']:,.0f} req/s, "
                 f"{r.get('cpu_us_per_req') or 0:.1f} µs CPU/req")
        L.append("")
        L.append("By binary (self): " + ", ".join(f"{n} {v:.1f}%" for v, n in p["dsos"][:5]))
        L.append("")
        L.append("Inclusive share of the samples (call graphs; overlapping):")
        L.append("")
        L.append("| % incl | path |")
        L.append("|--:|---|")
        for c, s in p["syscalls_children"]:
            L.append(f"| {c:.1f} | {s} |")
        L.append("")
        L.append("Self time grouped by crate / library symbol prefix:")
        L.append("")
        L.append("| % self | crate |")
        L.append("|--:|---|")
        for c, v in p["crates"]:
            L.append(f"| {v:.1f} | {c} |")
        L.append("")
        L.append("Hottest user-space symbols (self):")
        L.append("")
        L.append("| % self | symbol |")
        L.append("|--:|---|")
        for v, s in p["user"]:
            L.append(f"| {v:.2f} | `{s.strip()[:160]}` |")
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
