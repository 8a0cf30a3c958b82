//! Readiness: can the app be reached? A TCP connect, or `--upstream-health PATH` over the
//! app's protocol, the standard gRPC health service included.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::traffic::upstream::{Protocol, Upstream};

impl Upstream {
    /// Readiness: can the app be reached? With a health path, `GET path` on a fresh
    /// connection must answer 2xx; otherwise a TCP connect must succeed.
    pub async fn probe(&self, health_path: Option<&str>) -> Result<(), String> {
        let Some(path) = health_path else {
            return self
                .connect_tcp()
                .await
                .map(drop)
                .map_err(|e| e.to_string());
        };
        let stream = self.connect_tcp().await.map_err(|e| e.to_string())?;
        // The CLI refuses a gRPC health path without h2c.
        let grpc = path.starts_with(GRPC_HEALTH_SERVICE) && self.config().protocol == Protocol::H2c;
        let mut req = if grpc {
            // grpc.health.v1.Health/Check with an empty HealthCheckRequest (the server's
            // overall health): a gRPC frame of 0 bytes.
            Request::post(path)
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header(http::header::TE, "trailers")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        } else {
            Request::get(path).body(Full::new(Bytes::new()))
        }
        .map_err(|e| e.to_string())?;
        req.headers_mut().insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("lameduck-readiness"),
        );
        let resp = match self.config().protocol {
            Protocol::Http1 => {
                req.headers_mut().insert(
                    http::header::HOST,
                    http::HeaderValue::from_str(&self.config().addr.to_string())
                        .expect("an address is a valid header"),
                );
                let (mut tx, conn) = http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                tx.send_request(req).await
            }
            Protocol::H2c => {
                let (mut tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                *req.uri_mut() = format!("http://{}{path}", self.config().addr)
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| e.to_string())?;
                tx.send_request(req).await
            }
        }
        .map_err(|e| e.to_string())?;
        let method = if grpc { "POST" } else { "GET" };
        if !resp.status().is_success() {
            return Err(format!("{method} {path} answered {}", resp.status()));
        }
        if !grpc {
            return Ok(());
        }
        let trailers_only = resp.headers().get("grpc-status").cloned();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let status =
            trailers_only.or_else(|| body.trailers().and_then(|t| t.get("grpc-status").cloned()));
        grpc_health_verdict(status.as_ref().map(|v| v.as_bytes()), &body.to_bytes())
            .map_err(|e| format!("{path}: {e}"))
    }
}

/// The standard gRPC health service; `--upstream-health` paths under it are probed as gRPC.
pub const GRPC_HEALTH_SERVICE: &str = "/grpc.health.v1.Health/";

/// A gRPC health check's answer: `grpc-status` 0 and a HealthCheckResponse whose `status`
/// (field 1) is SERVING (1). Pure, for the tests.
pub fn grpc_health_verdict(grpc_status: Option<&[u8]>, body: &[u8]) -> Result<(), String> {
    match grpc_status {
        Some(b"0") => {}
        Some(s) => return Err(format!("grpc-status {}", String::from_utf8_lossy(s))),
        None => return Err("no grpc-status".into()),
    }
    // One gRPC frame: compressed flag, 4-byte length, the message.
    let msg = match body {
        [0, a, b, c, d, rest @ ..]
            if rest.len() == u32::from_be_bytes([*a, *b, *c, *d]) as usize =>
        {
            rest
        }
        _ => return Err("not one uncompressed gRPC message".into()),
    };
    // HealthCheckResponse { ServingStatus status = 1; }: tag 0x08, then a varint.
    match msg {
        [0x08, 1] => Ok(()),
        [0x08, n, ..] => Err(format!("status {} (1 is SERVING)", n)),
        // An empty message is status 0, UNKNOWN.
        _ => Err("status UNKNOWN (1 is SERVING)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_answers() {
        assert_eq!(
            grpc_health_verdict(Some(b"0"), &[0, 0, 0, 0, 2, 8, 1]),
            Ok(())
        );
        assert!(grpc_health_verdict(Some(b"0"), &[0, 0, 0, 0, 2, 8, 2])
            .unwrap_err()
            .contains("status 2"));
        assert!(grpc_health_verdict(Some(b"0"), &[0, 0, 0, 0, 0]).is_err());
        assert!(grpc_health_verdict(Some(b"12"), &[])
            .unwrap_err()
            .contains("12"));
        assert!(grpc_health_verdict(None, &[0, 0, 0, 0, 2, 8, 1]).is_err());
        assert!(grpc_health_verdict(Some(b"0"), &[0, 0, 0, 0, 9, 8, 1]).is_err());
    }
}
