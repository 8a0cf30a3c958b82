#!/usr/bin/env python3
"""Which pages of the lameduck binary an idle proxy has mapped, and whose code is on them.

    python3 benches/pagemap.py [--binary B] [--symbols UNSTRIPPED]

Starts the bench upstream and `lameduck proxy` (as profile_b.py does), sends one request,
waits 1 s, then reads /proc/PID/pagemap over the binary's mappings: the file-backed part of
idle RSS. Prints the mapped KiB per ELF section and, with symbols (`nm` on an unstripped
build with the same layout, e.g. target/<host>/release/lameduck before `strip`), per crate
and per 64 KiB window of `.text` (the kernel maps file pages around each fault in windows
of `fault_around_bytes`, 64 KiB by default, so a window is mostly all or nothing).
Root needed (pagemap's present bits). Loopback only; what it starts is killed at exit.
"""

import argparse
import collections
import os
import re
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from compare import LOADGEN_CORE, PROXY_CORE, ROOT  # noqa: E402

PAGE = 4096
WINDOW = 64 * 1024


def present_pages(pid, binary):
    """File page numbers (offset // PAGE) of `binary` mapped in `pid`."""
    name = os.path.realpath(binary)
    pages = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pm:
        for line in maps:
            f = line.split()
            if len(f) < 6 or os.path.realpath(f[5]) != name:
                continue
            start, end = (int(x, 16) for x in f[0].split("-"))
            offset = int(f[2], 16)
            n = (end - start) // PAGE
            pm.seek(start // PAGE * 8)
            data = pm.read(n * 8)
            for i in range(n):
                if struct.unpack_from("<Q", data, i * 8)[0] >> 63:
                    pages.add(offset // PAGE + i)
    return pages


def sections(binary):
    """(name, file offset, size) of every section with bytes in the file."""
    out = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True,
                         check=True).stdout
    secs = []
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)",
                     line)
        if m and m.group(2) != "NOBITS" and int(m.group(5), 16):
            secs.append((m.group(1), int(m.group(3), 16), int(m.group(4), 16),
                         int(m.group(5), 16)))
    return secs


def crate_of(name):
    n = re.sub(r"^[<_&\s]+", "", name)
    n = re.sub(r"^(mut |dyn )", "", n)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)::", n)
    return m.group(1) if m else "C (glibc, ring's C and assembly)"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/lameduck"))
    ap.add_argument("--symbols", help="an unstripped build with the same layout")
    ap.add_argument("--upstream",
                    default=os.path.join(ROOT, "target/release/examples/bench_upstream"))
    args = ap.parse_args()
    os.sched_setaffinity(0, {LOADGEN_CORE})
    try:
        up = compare.free_port()
        compare.spawn([args.upstream, f"127.0.0.1:{up}"], LOADGEN_CORE, subprocess.DEVNULL)
        compare.wait_http(up, "/")
        port, admin = compare.free_port(), compare.free_port()
        p = compare.spawn([args.binary, "proxy", "--listen", f"127.0.0.1:{port}",
                           "--upstream", f"127.0.0.1:{up}", "--admin", f"127.0.0.1:{admin}",
                           "--log-level", "warn"], PROXY_CORE, subprocess.DEVNULL)
        compare.wait_http(admin, "/readyz")
        compare.wait_http(port, "/")
        time.sleep(1)
        with open(f"/proc/{p.pid}/status") as f:
            status = {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
        present = present_pages(p.pid, args.binary)
    finally:
        compare.stop_all()
    print(f"VmRSS {status['VmRSS']}, RssAnon {status['RssAnon']}, "
          f"RssFile {status['RssFile']}; pages of {args.binary} mapped: {len(present)} "
          f"({len(present) * PAGE // 1024} KiB)")
    secs = sections(args.symbols or args.binary)
    print("\nsection                      size KiB  mapped KiB")
    small = 0
    for name, _addr, off, size in secs:
        if name in (".symtab", ".strtab", ".shstrtab", ".comment") or name.startswith(".debug"):
            continue  # not loaded
        pages = range(off // PAGE, (off + size + PAGE - 1) // PAGE)
        mapped = sum(1 for x in pages if x in present) * PAGE // 1024
        if size >= 16 * 1024:
            print(f"{name:28s} {size // 1024:8d}  {mapped:10d}")
        else:
            small += mapped
    print(f"{'(smaller sections)':28s} {'':8s}  {small:10d}  (pages shared with their neighbours)")
    if not args.symbols:
        return
    text = next(s for s in secs if s[0] == ".text")
    shift = text[1] - text[2]  # virtual address - file offset
    nm = subprocess.run(["nm", "-S", "-C", "--defined-only", args.symbols],
                        capture_output=True, text=True, check=True).stdout
    total, mapped = collections.Counter(), collections.Counter()
    windows = collections.defaultdict(collections.Counter)
    for line in nm.splitlines():
        f = line.split(None, 3)
        if len(f) != 4 or f[2] not in "tTwW":
            continue
        off, size, crate = int(f[0], 16) - shift, int(f[1], 16), crate_of(f[3])
        total[crate] += size
        if off // PAGE in present:
            mapped[crate] += size
        windows[off // WINDOW][crate] += size
    print("\ncode by crate (bytes of functions on mapped pages)\n"
          "crate                                   total KiB  mapped KiB")
    for crate, size in total.most_common(25):
        print(f"{crate:40s} {size // 1024:9d}  {mapped[crate] // 1024:10d}")
    first, last = text[2] // WINDOW, (text[2] + text[3]) // WINDOW
    full = sum(1 for w in range(first, last + 1)
               if sum(1 for x in range(w * 16, w * 16 + 16) if x in present) == 16)
    print(f"\n.text: {last - first + 1} windows of 64 KiB, {full} fully mapped\n"
          "window   mapped pages  largest crates in it (KiB)")
    for w in range(first, last + 1):
        n = sum(1 for x in range(w * 16, w * 16 + 16) if x in present)
        top = ", ".join(f"{c}:{v // 1024}" for c, v in windows[w].most_common(3))
        print(f"{w * 64:6d}K  {n:2d}/16         {top}")


if __name__ == "__main__":
    main()
