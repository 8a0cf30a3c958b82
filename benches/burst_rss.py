#!/usr/bin/env python3
"""Memory after a burst: RSS of the release proxy idle, with N connections open (each has
carried one request), and 4 s after they all closed.

    cargo build --release --bin lameduck --example bench_upstream
    python3 benches/burst_rss.py target/release/lameduck 3000

Loopback only, ephemeral ports; the proxy and the bench upstream are killed at the end.
"""
import json, os, re, socket, subprocess, sys, time
binary, N = sys.argv[1], int(sys.argv[2])
up = subprocess.Popen([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "examples", "bench_upstream"), "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
# find its port
line = up.stdout.readline()

m = re.search(r"127\.0\.0\.1:(\d+)", line)
uport = int(m.group(1)) if m else None
if uport is None:
    print("upstream said", line); sys.exit(1)
log = open("/tmp/burst-proxy.log", "w")
p = subprocess.Popen([binary, "proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--upstream", f"127.0.0.1:{uport}", "--log-format", "json"], stderr=log)
for _ in range(100):
    time.sleep(0.05)
    for l in open("/tmp/burst-proxy.log"):
        if "lameduck proxy serving" in l:
            v = json.loads(l); break
    else:
        continue
    break
port = int(v["listen"].rsplit(":",1)[1])
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])/1024
print(f"idle {rss():.1f} MiB")
conns = []
for i in range(N):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"); conns.append(s)
for s in conns:
    s.recv(65536)
print(f"{N} open after a request each {rss():.1f} MiB")
for s in conns: s.close()
time.sleep(4)
print(f"4 s after closing them {rss():.1f} MiB")
p.kill(); up.kill()
