"""A real gRPC client for tests/grpc.rs: Python grpcio, no protobuf codegen.

    client.py TARGET [--root-cert PEM_FILE]

TARGET is host:port; with --root-cert the channel is TLS (ALPN h2, grpcio's own check of
the certificate against TARGET's host, here an IP SAN), else plaintext h2c. One channel is
opened at start and kept (a persistent client: lameduck's GOAWAY must move it, not fail its
calls). Prints {"ready": true} once, then answers one command a line from stdin, one JSON
line each on stdout ("code" is the numeric gRPC status, "name" its name):

- `health PATH`: a grpc.health.v1 Check (service "") to PATH on a new channel with its own
  connection, as a load balancer's health check comes: {"code", "name", "details", "status"}
  ("status": the HealthCheckResponse's status name, or null)
- `unary N GAP_MS`: N calls of /test.Echo/Unary on the kept channel, GAP_MS apart:
  {"ok", "wrong" (answered, not the bytes sent), "failed": [{"i", "code", "name", "details"}]}
- `stream_start ID N MS`: starts /test.Echo/Stream (N messages MS apart) on the kept
  channel in the background, answers once its first message has arrived: {"started": ID}
- `stream_wait ID`: waits for that stream's end: {"messages", "in_order", "code", "name",
  "details"}
- `states`: the kept channel's connectivity states so far: {"states": ["READY", ...]}
- `quit`: closes the channel and exits (as does the end of stdin)

Every call has a deadline; every wait is bounded.
"""

import json
import sys
import threading

import grpc
from grpc_health.v1 import health_pb2

DEADLINE = 15  # seconds, for every call
OPTIONS = [
    # A channel of its own, not sharing grpcio's process-wide subchannels (connections)
    # with the other channels to the same target.
    ("grpc.use_local_subchannel_pool", 1),
    # Straight to 127.0.0.1 whatever http_proxy/grpc_proxy the environment has.
    ("grpc.enable_http_proxy", 0),
]


def code_of(e):
    c = e.code()
    return {"code": c.value[0], "name": c.name, "details": e.details()}


class Client:
    def __init__(self, target, root_cert):
        self.target = target
        self.creds = (
            grpc.ssl_channel_credentials(root_certificates=root_cert)
            if root_cert is not None
            else None
        )
        self.channel = self.new_channel()
        self.states = []
        self.states_lock = threading.Lock()
        self.channel.subscribe(self.on_state, try_to_connect=False)
        self.streams = {}

    def new_channel(self):
        if self.creds is None:
            return grpc.insecure_channel(self.target, options=OPTIONS)
        return grpc.secure_channel(self.target, self.creds, options=OPTIONS)

    def on_state(self, state):
        with self.states_lock:
            self.states.append(state.name)

    def health(self, path):
        ch = self.new_channel()
        try:
            check = ch.unary_unary(
                path,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            resp = check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE)
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            return {"code": 0, "name": "OK", "details": None, "status": name}
        except grpc.RpcError as e:
            return {**code_of(e), "status": None}
        finally:
            ch.close()

    def unary(self, n, gap_ms):
        call = self.channel.unary_unary("/test.Echo/Unary")
        ok, wrong, failed = 0, 0, []
        stop = threading.Event()
        for i in range(n):
            if i:
                stop.wait(gap_ms / 1000)
            msg = f"ping {i}".encode()
            try:
                if call(msg, timeout=DEADLINE) == msg:
                    ok += 1
                else:
                    wrong += 1
            except grpc.RpcError as e:
                failed.append({"i": i, **code_of(e)})
        return {"ok": ok, "wrong": wrong, "failed": failed}

    def stream_start(self, sid, n, ms):
        first = threading.Event()
        result = {}

        def run():
            got = []
            call = self.channel.unary_stream("/test.Echo/Stream")
            it = call(f"{n} {ms}".encode(), timeout=DEADLINE)
            try:
                for m in it:
                    got.append(m)
                    first.set()
                result.update(code=0, name="OK", details=None)
            except grpc.RpcError as e:
                result.update(code_of(e))
            result["messages"] = len(got)
            result["in_order"] = got == [str(i).encode() for i in range(len(got))]
            first.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.streams[sid] = (t, result)
        if not first.wait(DEADLINE):
            return {"error": f"no first message within {DEADLINE} s"}
        return {"started": sid, **({"ended_early": result} if result else {})}

    def stream_wait(self, sid):
        t, result = self.streams.pop(sid)
        t.join(DEADLINE + 5)
        if t.is_alive():
            return {"error": "stream still running"}
        return result


def main():
    args = sys.argv[1:]
    target = args[0]
    root_cert = None
    if "--root-cert" in args:
        with open(args[args.index("--root-cert") + 1], "rb") as f:
            root_cert = f.read()
    c = Client(target, root_cert)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "quit":
            break
        try:
            if cmd == "health":
                out = c.health(rest[0])
            elif cmd == "unary":
                out = c.unary(int(rest[0]), int(rest[1]))
            elif cmd == "stream_start":
                out = c.stream_start(rest[0], int(rest[1]), int(rest[2]))
            elif cmd == "stream_wait":
                out = c.stream_wait(rest[0])
            elif cmd == "states":
                with c.states_lock:
                    out = {"states": list(c.states)}
            else:
                out = {"error": f"unknown command {cmd!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out = {"error": repr(e)}
        print(json.dumps(out), flush=True)
    c.channel.close()


if __name__ == "__main__":
    main()
