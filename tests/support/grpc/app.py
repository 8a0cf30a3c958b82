"""A real gRPC app for tests/grpc.rs: Python grpcio, no protobuf codegen.

Serves on 127.0.0.1, an ephemeral port, plaintext HTTP/2 (what lameduck's
--upstream-protocol h2c speaks):

- /test.Echo/Unary: answers the request's bytes unchanged
- /test.Echo/Stream: the request is b"N MS"; answers N messages b"0", b"1", ... , MS
  milliseconds apart (the first one MS after the call starts), then status OK
- grpc.health.v1.Health (grpcio-health-checking's HealthServicer): the overall status
  (service "") is SERVING, or NOT_SERVING with --not-serving
- anything else (/AWS.ALB/healthcheck...): grpcio's own UNIMPLEMENTED

Prints `port N` as its first line on stdout, then answers one command a line from stdin,
one JSON line each on stdout:

- `serving` / `not_serving`: sets the overall health status; {"status": "..."}
- `counts`: calls received so far per method path, unknown methods included; {"/path": n}

Exits when stdin closes.
"""

import json
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class Counter(grpc.ServerInterceptor):
    """Counts every call by method path, before it is routed (so unknown methods too)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def intercept_service(self, continuation, handler_call_details):
        with self.lock:
            m = handler_call_details.method
            self.counts[m] = self.counts.get(m, 0) + 1
        return continuation(handler_call_details)

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


def unary(request, context):
    return request


def stream(request, context):
    n, ms = (int(x) for x in request.decode().split())
    for i in range(n):
        time.sleep(ms / 1000)
        if not context.is_active():
            return
        yield str(i).encode()


def main():
    counter = Counter()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        interceptors=[counter],
        maximum_concurrent_rpcs=None,
    )
    identity = {"request_deserializer": None, "response_serializer": None}
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary, **identity),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream, **identity),
                },
            )
        ]
    )
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    status = health_pb2.HealthCheckResponse
    servicer.set(
        "", status.NOT_SERVING if "--not-serving" in sys.argv[1:] else status.SERVING
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "serving":
            servicer.set("", status.SERVING)
            out = {"status": "SERVING"}
        elif cmd == "not_serving":
            servicer.set("", status.NOT_SERVING)
            out = {"status": "NOT_SERVING"}
        elif cmd == "counts":
            out = counter.snapshot()
        else:
            out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)
    server.stop(grace=None)


if __name__ == "__main__":
    main()
