//! TLS on the traffic port (`--tls-cert/--tls-key`, `--tls self-signed`): an ALB HTTPS
//! target group with protocol version HTTP1 or HTTP2 (ALPN), certificate rotation, a
//! handshake that never completes, and a drain that ends every connection cleanly.
//!
//! The clients are real TLS clients (rustls) on 127.0.0.1; the app is the test upstream.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use support::*;

/// A certificate for 127.0.0.1 and localhost: (certificate PEM, key PEM, certificate DER).
fn pair() -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".into()])
        .unwrap();
    (
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

/// Writes a certificate pair into `dir` as `tls.crt` and `tls.key`; their paths.
fn write_pair(dir: &TempDir, cert: &str, key: &str) -> (String, String) {
    let (c, k) = (dir.path("tls.crt"), dir.path("tls.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (s(&c), s(&k))
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// Accepts any certificate, as an ALB does with its targets'.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client trusting `root` (PEM), or any certificate; offering `alpn`.
fn client(root: Option<&str>, alpn: &[&[u8]]) -> TlsConnector {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap();
    let mut config = match root {
        Some(pem) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

async fn connect(tls: &TlsConnector, addr: std::net::SocketAddr) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(PATIENCE, tls.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake")
}

/// The certificate the server presented.
fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn alpn(s: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    s.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

/// One HTTP/1.1 request over `s`; the response's status line and the response.
async fn h1(s: TlsStream<TcpStream>, path: &str) -> (Resp, H1Over) {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let r = tx.send_request(req("GET", path)).await.unwrap();
    let (parts, body) = r.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        },
        H1Over { tx, _task: task },
    )
}

struct H1Over {
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    _task: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl H1Over {
    async fn get(&mut self, path: &str) -> Resp {
        self.tx.ready().await.unwrap();
        let r = self.tx.send_request(req("GET", path)).await.unwrap();
        let (parts, body) = r.into_parts();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

/// An ALB HTTPS target group with protocol version HTTP1 (ALPN http/1.1) and HTTP2 (ALPN
/// h2): both are served through to the app, and HTTPS health checks are answered like
/// HTTP ones. Before: the traffic port spoke only cleartext.
#[tokio::test]
async fn https_with_http1_and_h2_by_alpn() {
    let up = upstream(UpOpts::default()).await;
    let dir = TempDir::new("tls-alpn");
    let (cert, key, der) = pair();
    let (c, k) = write_pair(&dir, &cert, &key);
    let p = Proxy::start(
        up.addr,
        &["--tls-cert", &c, "--tls-key", &k, "--health-path", "/hc"],
    );
    let verified = |alpn: &[&[u8]]| client(Some(&cert), alpn);

    // HTTP1 target group: the ALB offers http/1.1 (or nothing).
    for offer in [&[b"http/1.1".as_slice()][..], &[]] {
        let s = connect(&verified(offer), p.traffic).await;
        assert_eq!(peer_cert(&s), der);
        assert_eq!(
            alpn(&s),
            (!offer.is_empty()).then(|| b"http/1.1".to_vec()),
            "offered {offer:?}"
        );
        let (r, mut conn) = h1(s, "/headers").await;
        assert_eq!(r.status, 200);
        assert!(r.text().starts_with("GET /headers"), "{}", r.text());
        // Keep-alive over TLS, and the health check answered as on HTTP.
        let hc = conn.get("/hc").await;
        assert_eq!(hc.status, 200, "{}", hc.text());
    }

    // HTTP2 target group: ALPN h2.
    let s = connect(&verified(&[b"h2", b"http/1.1"]), p.traffic).await;
    assert_eq!(alpn(&s).as_deref(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let r = tx
            .send_request(
                http::Request::get("https://127.0.0.1/headers")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), http::Version::HTTP_2);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"GET "), "{body:?}");
    }
    assert_eq!(
        p.metric("lameduck_requests_total{code=\"200\",phase=\"serving\"}")
            .await,
        7.0
    );
}

/// `--tls self-signed`: a certificate is generated at start (an ALB does not verify it),
/// the same for every connection; cleartext HTTP to the TLS port gets no HTTP answer and
/// is counted.
#[tokio::test]
async fn self_signed_is_generated_and_cleartext_is_refused() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &["--tls", "self-signed"]);
    let any = client(None, &[b"http/1.1"]);
    let first = connect(&any, p.traffic).await;
    let cert = peer_cert(&first);
    assert!(
        cert.windows(b"localhost".len()).any(|w| w == b"localhost"),
        "the self-signed certificate names localhost"
    );
    let (r, _) = h1(first, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(peer_cert(&connect(&any, p.traffic).await), cert);

    let plain = raw(
        p.traffic,
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(!plain.contains("HTTP/1.1"), "{plain:?}");
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_client_errors_total{kind=\"tls_handshake\"}")
                .await
                >= 1.0
        })
        .await
    );
}

/// Handshakes run in the connection's task: clients that never finish theirs (silent, or
/// a ClientHello cut short) do not hold up anyone else's, and each is closed at the header
/// read timeout.
#[tokio::test]
async fn stalled_handshakes_are_closed_at_the_header_timeout_and_block_no_one() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(
        up.addr,
        &["--tls", "self-signed", "--header-read-timeout", "1s"],
    );
    let started = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut s = TcpStream::connect(p.traffic).await.unwrap();
        if i % 2 == 1 {
            // A TLS record header announcing a 200-byte ClientHello, then nothing.
            s.write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01])
                .await
                .unwrap();
        }
        stalled.push(s);
    }
    // Served while the stalled handshakes are open.
    let (r, _) = h1(connect(&client(None, &[]), p.traffic).await, "/").await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "waited for the stalled ones"
    );

    for mut s in stalled {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(PATIENCE, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    // An alert, if any, before the close.
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "a stalled handshake was never closed");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed too early: {waited:?}"
    );
    assert_eq!(
        p.metric("lameduck_client_errors_total{kind=\"tls_handshake_timeout\"}")
            .await,
        20.0
    );
}

/// cert-manager rotates the Secret: new handshakes get the new pair once both files have
/// changed; a connection made before keeps working; a broken pair keeps the last good one.
#[tokio::test]
async fn certificate_files_are_reloaded_when_they_change() {
    let up = upstream(UpOpts::default()).await;
    let dir = TempDir::new("tls-reload");
    let (cert_a, key_a, der_a) = pair();
    let (c, k) = write_pair(&dir, &cert_a, &key_a);
    let p = Proxy::start(
        up.addr,
        &[
            "--tls-cert",
            &c,
            "--tls-key",
            &k,
            "--tls-reload-interval",
            "100ms",
        ],
    );
    let any = client(None, &[]);
    let before = connect(&any, p.traffic).await;
    assert_eq!(peer_cert(&before), der_a);
    let (_, mut old) = h1(before, "/").await;

    let (cert_b, key_b, der_b) = pair();
    write_pair(&dir, &cert_b, &key_b);
    // Polled by hand: each try is a new handshake.
    let deadline = Instant::now() + PATIENCE;
    let mut tries = 0;
    loop {
        tries += 1;
        if peer_cert(&connect(&any, p.traffic).await) == der_b {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still the old certificate after {tries} handshakes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(old.get("/").await.status, 200);
    assert!(p
        .logs()
        .iter()
        .any(|l| l.contains("TLS certificate reloaded")));

    std::fs::write(dir.path("tls.crt"), "garbage").unwrap();
    assert!(
        eventually(PATIENCE, || async {
            p.logs()
                .iter()
                .any(|l| l.contains("TLS certificate not reloaded"))
        })
        .await
    );
    assert_eq!(peer_cert(&connect(&any, p.traffic).await), der_b);
}

/// A drain over HTTPS: a request in flight at SIGTERM gets its whole answer, health checks
/// fail while draining, and the connection ends with TLS close_notify, not a cut (a client
/// reading to the end sees a clean EOF rather than "unexpected EOF").
#[tokio::test]
async fn an_https_drain_answers_in_flight_and_ends_with_close_notify() {
    let up = upstream(UpOpts::default()).await;
    let mut p = Proxy::start(
        up.addr,
        &[
            "--tls",
            "self-signed",
            "--health-path",
            "/hc",
            "--drain-min",
            "0s",
            "--quiet",
            "1s",
            "--drain-max",
            "20s",
        ],
    );
    let any = client(None, &[b"http/1.1"]);
    let mut slow = connect(&any, p.traffic).await;
    slow.write_all(b"GET /sleep/1500 HTTP/1.1\r\nhost: app.test\r\n\r\n")
        .await
        .unwrap();
    let up_requests = up.requests.clone();
    assert!(
        eventually(PATIENCE, || {
            let n = up_requests.clone();
            async move { n.load(std::sync::atomic::Ordering::SeqCst) >= 1 }
        })
        .await
    );
    p.signal("TERM");
    let (hc, _) = h1(connect(&any, p.traffic).await, "/hc").await;
    assert_eq!(
        hc.status, 503,
        "a draining target fails its HTTPS health check"
    );

    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, slow.read_to_end(&mut out))
        .await
        .expect("the response never ended");
    let text = String::from_utf8_lossy(&out);
    assert!(
        read.is_ok(),
        "not a clean TLS close: {read:?} after {text:?}"
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let status = p.wait_exit(PATIENCE).expect("the proxy did not exit");
    assert!(status.success(), "{status:?}");
}

/// An upgrade (WebSocket) over HTTPS is a tunnel like one over HTTP: 101, then bytes both
/// ways through TLS, counted as a tunnel while open.
#[tokio::test]
async fn upgrades_tunnel_through_tls() {
    let up = upstream(UpOpts::default()).await;
    let p = Proxy::start(up.addr, &["--tls", "self-signed"]);
    let mut s = connect(&client(None, &[b"http/1.1"]), p.traffic).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: app.test\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .expect("no 101")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(p.metric("lameduck_tunnels_active").await, 1.0);
    for msg in [&b"hello"[..], b"through tls"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
            .await
            .expect("no echo")
            .unwrap();
        assert_eq!(back, msg);
    }
    drop(s);
    assert!(
        eventually(PATIENCE, || async {
            p.metric("lameduck_tunnels_active").await == 0.0
        })
        .await
    );
}
