-- Prints wrk's summary as one JSON line for compare.py (latencies in µs). Defining only
-- done() keeps wrk on its fast path: no Lua runs per request.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "JSON {\"requests\":%d,\"duration_us\":%d,\"errors\":%d,\"timeouts\":%d,\"non2xx\":%d," ..
    "\"p50\":%d,\"p99\":%d,\"p999\":%d,\"mean\":%f,\"max\":%d}\n",
    summary.requests, summary.duration, e.connect + e.read + e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.mean,
    latency.max))
end
