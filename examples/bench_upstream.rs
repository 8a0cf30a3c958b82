//! The fixed app behind every target of `benches/compare.sh`: a minimal hyper 1 HTTP/1.1
//! server on a current-thread runtime, so the ceiling ("direct") and every proxy talk to
//! exactly the same thing.
//!
//! | path      | answer                                   |
//! |-----------|------------------------------------------|
//! | `/64k`    | 200, 65,536-byte body (large-body runs)   |
//! | any other | 200, `ok\n` (3 bytes)                    |
//!
//! Bodies are `Bytes` from static memory: no per-request allocation or copy in the app, so
//! what differs between targets is the proxy. Keep-alive is on and never times out.
//!
//! ```text
//! cargo run --release --example bench_upstream -- 127.0.0.1:3000
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

static LARGE: [u8; 64 * 1024] = [b'x'; 64 * 1024];

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if req.uri().path() == "/64k" {
        Bytes::from_static(&LARGE)
    } else {
        Bytes::from_static(b"ok\n")
    };
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(resp)
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()
        .expect("usage: bench_upstream [ADDR]");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    rt.block_on(async move {
        let listener = TcpListener::bind(addr)
            .await
            .expect("bind the upstream address");
        eprintln!(
            "bench_upstream listening on {}",
            listener.local_addr().unwrap()
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .await;
            });
        }
    });
}
