"""nghttp2's h2load as a client that comes back: h2load keeps one connection per client and
never opens another (after a GOAWAY it stops: with -D it idles to the end, with -n the
requests it had not started count as failed). So this runs `h2load -c 1 -m M -n N` again and
again until the deadline, each run one connection, the next started when one ends (the last
one started before the deadline runs to its own end). Per run: h2load's `started` and
`succeeded`; a request started and not succeeded is lost (h2load counts streams refused on a
GOAWAY as errored), one never started is not (h2load had not sent it).
Prints one JSON line at the end.

    python3 h2load_loop.py URL STREAMS DURATION_MS [N]
"""

import json
import re
import subprocess
import sys
import time


def main():
    url, streams, ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
    n = sys.argv[4] if len(sys.argv) > 4 else "30000"
    deadline = time.monotonic() + ms / 1000
    stats = {"ok": 0, "failed": 0, "sessions": 0, "goaways": None, "errors": {},
             "not_started": 0}
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["h2load", "-c", "1", "-m", streams, "-n", n, url],
                                 capture_output=True, text=True, timeout=30).stdout
        except subprocess.TimeoutExpired:
            stats["errors"]["h2load run timed out"] = stats["errors"].get("h2load run timed out", 0) + 1
            continue
        stats["sessions"] += 1
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
        if not m:
            stats["errors"]["h2load output unparsed"] = stats["errors"].get("h2load output unparsed", 0) + 1
            continue
        total, started, done, ok, failed, errored, timeout = map(int, m.groups())
        stats["ok"] += ok
        lost = started - ok
        stats["failed"] += lost
        stats["not_started"] += total - started
        if lost:
            codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
            k5 = int(codes.group(4)) if codes else 0
            if k5:
                stats["errors"]["5xx"] = stats["errors"].get("5xx", 0) + k5
            if lost - k5:
                k = "started, closed without a response (refused on GOAWAY)"
                stats["errors"][k] = stats["errors"].get(k, 0) + lost - k5
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
