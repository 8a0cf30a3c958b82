"""A grpcio client as applications write one: one channel, N threads each making unary calls
(/test.Echo/Unary of tests/support/grpc/app.py) back to back until the deadline, with grpcio's
defaults (its own retry policy for transparent retries; no service config). Every call is
recorded, failures by status code. Prints one JSON line at the end.

    python grpc_client.py HOST:PORT THREADS DURATION_MS
"""

import json
import sys
import threading
import time

import grpc


def main():
    target, threads, ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    channel = grpc.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.enable_http_proxy", 0),
    ])
    call = channel.unary_unary("/test.Echo/Unary")
    states = []
    channel.subscribe(lambda s: states.append(s.name), try_to_connect=True)
    grpc.channel_ready_future(channel).result(timeout=10)
    deadline = time.monotonic() + ms / 1000
    lock = threading.Lock()
    stats = {"ok": 0, "failed": 0, "errors": {}}

    def worker():
        while time.monotonic() < deadline:
            try:
                r = call(b"ping", timeout=10)
                good = r == b"ping"
                err = None if good else "WRONG_BODY"
            except grpc.RpcError as e:
                err = f"{e.code().name}: {e.details()}"
            with lock:
                if err is None:
                    stats["ok"] += 1
                else:
                    stats["failed"] += 1
                    stats["errors"][err] = stats["errors"].get(err, 0) + 1

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(ms / 1000 + 30)
    channel.close()
    # READY -> IDLE/CONNECTING transitions: each new READY after the first is a reconnect.
    stats["sessions"] = states.count("READY")
    stats["goaways"] = None
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
