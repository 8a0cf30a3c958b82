"""libcurl as the curl tool's --parallel uses it, through pycurl (whose wheel bundles a current
libcurl with nghttp2; Debian 12's curl 7.88.1 cannot reuse an h2c prior-knowledge connection
at all: every transfer after the first fails with "Error in the HTTP2 framing layer", against
any h2c server). One multi handle, multiplexing on (CURLPIPE_MULTIPLEX, PIPEWAIT: a transfer
waits for the connection rather than opening another, as `curl --parallel` does), N transfers
in flight over it, each GET with --http2-prior-knowledge, a new one started as one ends, until
the deadline. Every transfer is recorded: ok (status < 500), or failed by curl's error code and
message; connections are libcurl's NUM_CONNECTS summed. Prints one JSON line at the end.

    python curl_client.py URL PARALLEL DURATION_MS
"""

import json
import sys
import time

import pycurl


def main():
    url, parallel, ms = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    deadline = time.monotonic() + ms / 1000
    m = pycurl.CurlMulti()
    m.setopt(pycurl.M_PIPELINING, pycurl.PIPE_MULTIPLEX)
    stats = {"ok": 0, "failed": 0, "sessions": 0, "goaways": None, "errors": {}}

    def start(e=None):
        e = e or pycurl.Curl()
        e.setopt(pycurl.URL, url)
        e.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE)
        e.setopt(pycurl.PIPEWAIT, 1)
        e.setopt(pycurl.WRITEFUNCTION, lambda b: None)
        e.setopt(pycurl.TIMEOUT, 10)
        m.add_handle(e)

    def fail(key):
        stats["failed"] += 1
        stats["errors"][key] = stats["errors"].get(key, 0) + 1

    for _ in range(parallel):
        start()
    active = parallel
    while active:
        while m.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        _, ok_list, err_list = m.info_read()
        for e in ok_list:
            stats["sessions"] += e.getinfo(pycurl.NUM_CONNECTS)
            code = e.getinfo(pycurl.RESPONSE_CODE)
            m.remove_handle(e)
            if 0 < code < 500:
                stats["ok"] += 1
            else:
                fail(f"status {code}")
        for e, errno, msg in err_list:
            stats["sessions"] += e.getinfo(pycurl.NUM_CONNECTS)
            m.remove_handle(e)
            # The message names the stream; keep the kind only.
            fail(f"curl {errno}: " + " ".join(w for w in msg.split() if not w.isdigit()))
        for e in ok_list + [x[0] for x in err_list]:
            if time.monotonic() < deadline:
                start(e)
            else:
                e.close()
                active -= 1
        m.select(0.1)
    m.close()
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
