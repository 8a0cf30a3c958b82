// A Go net/http client over golang.org/x/net/http2 (h2c, prior knowledge), as applications
// write one: N goroutines sharing one http.Client (one http2.Transport, whose pool keeps one
// connection and opens another when a GOAWAY makes it unusable), each sending GETs back to
// back until the deadline. Every request is recorded; connections are counted at dial, and
// GOAWAY frames by reading the frame headers of what the server sends (a passive parse of
// the bytes the transport reads, which it never changes). Prints one JSON line at the end.
//
// usage: h2client URL WORKERS DURATION_MS
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

var goaways, sessions atomic.Int64

// countingConn parses the HTTP/2 frame headers of everything read from the server (the
// server's side has no preface other than its SETTINGS frame) and counts GOAWAY (type 7).
type countingConn struct {
	net.Conn
	hdr  [9]byte
	have int   // bytes of the current header read so far
	skip int64 // payload bytes of the current frame still to pass
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	b := p[:n]
	for len(b) > 0 {
		if c.skip > 0 {
			k := int64(len(b))
			if k > c.skip {
				k = c.skip
			}
			c.skip -= k
			b = b[k:]
			continue
		}
		k := copy(c.hdr[c.have:], b)
		c.have += k
		b = b[k:]
		if c.have == 9 {
			c.have = 0
			length := int64(c.hdr[0])<<16 | int64(c.hdr[1])<<8 | int64(c.hdr[2])
			if c.hdr[3] == 7 {
				goaways.Add(1)
			}
			c.skip = length
		}
	}
	return n, err
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: h2client URL WORKERS DURATION_MS")
		os.Exit(2)
	}
	url := os.Args[1]
	workers, _ := strconv.Atoi(os.Args[2])
	ms, _ := strconv.Atoi(os.Args[3])
	deadline := time.Now().Add(time.Duration(ms) * time.Millisecond)

	tr := &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			sessions.Add(1)
			return &countingConn{Conn: c}, nil
		},
	}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}

	var mu sync.Mutex
	ok, failed := 0, 0
	errs := map[string]int{}
	statuses := map[string]int{}
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				resp, err := client.Get(url)
				var status int
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					status = resp.StatusCode
				}
				mu.Lock()
				switch {
				case err != nil:
					failed++
					msg := err.Error()
					if i := strings.LastIndex(msg, ": "); i >= 0 && strings.Contains(msg, "http2") {
						msg = msg[i+2:]
					}
					errs[msg]++
				case status >= 500:
					failed++
					statuses[strconv.Itoa(status)]++
				default:
					ok++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	tr.CloseIdleConnections()
	out, _ := json.Marshal(map[string]any{
		"ok": ok, "failed": failed, "sessions": sessions.Load(), "goaways": goaways.Load(),
		"errors": errs, "statuses": statuses,
	})
	fmt.Println(string(out))
}
