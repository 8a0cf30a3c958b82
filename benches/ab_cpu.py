#!/usr/bin/env python3
"""A/B: CPU per request of two lameduck builds at a fixed rate, in one run.

    python3 benches/ab_cpu.py BUILD_A BUILD_B ROUNDS [BENCH_UPSTREAM]

Scenario (b)'s shape: 32 keep-alive HTTP/1.1 connections from h2load (`--h1`, Debian's
nghttp2-client) at 4,000 req/s in all, 40,000 requests per round, in front of
examples/bench_upstream (default target/release/examples/bench_upstream). CPU is the
proxy's user+system ticks from /proc/PID/stat per request answered. The two builds
alternate (A B, then B A, ...) so a noisy machine weighs on both alike; prints each build's
median and rounds. Loopback only; everything it starts is killed."""
import os, re, subprocess, sys, time, json, statistics
A, B, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
UPSTREAM = sys.argv[4] if len(sys.argv) > 4 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', 'target/release/examples/bench_upstream')
TICK = os.sysconf('SC_CLK_TCK')
def cpu(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK
up = subprocess.Popen([UPSTREAM, '127.0.0.1:0'], stderr=subprocess.PIPE, text=True)
addr = re.search(r'127\.0\.0\.1:\d+', up.stderr.readline()).group(0)
res = {A: [], B: []}
try:
    for r in range(rounds):
        for binary in (A, B) if r % 2 == 0 else (B, A):
            p = subprocess.Popen([binary, 'proxy', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0',
                                  '--upstream', addr, '--log-format', 'json'],
                                 stderr=subprocess.PIPE, text=True)
            line = p.stderr.readline()
            listen = json.loads(line)['listen']
            n = 40000
            c0 = cpu(p.pid)
            out = subprocess.run(['h2load', '--h1', '-c', '32', '-n', str(n), '--rps', '125',
                                  f'http://{listen}/'], capture_output=True, text=True, timeout=120).stdout
            c1 = cpu(p.pid)
            ok = int(re.search(r'(\d+) succeeded', out).group(1))
            res[binary].append((c1 - c0) / ok * 1e6)
            p.kill(); p.wait()
finally:
    up.kill()
for b in (A, B):
    v = res[b]
    print(f'{b}: median {statistics.median(v):.1f} us/req, rounds {", ".join(f"{x:.1f}" for x in v)}')
