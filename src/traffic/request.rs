//! The request the app gets: what lameduck answers itself instead of forwarding (each with
//! the status RFC 9110/9112 gives it, as a [`Refusal`]), hop-by-hop headers removed both ways,
//! and the URI, version and Host fitted to the app's protocol. Pure functions of the request.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri, Version};

use crate::traffic::upstream::Protocol;

/// Headers a load balancer adds to every request it proxies for a client, and never to its
/// own health checks. AWS ALB: `X-Forwarded-For` (unless the load balancer attribute
/// `routing.http.xff_header_processing.mode` is `remove`), `X-Forwarded-Proto` and
/// `X-Forwarded-Port` (always), `X-Amzn-Trace-Id` (always); the ALB's health checks carry
/// none of them (AWS, "HTTP headers and Application Load Balancers"; "Request tracing for
/// your Application Load Balancer"). Other proxies add `Forwarded` (RFC 7239) or `Via`.
pub(crate) const PROXIED: [HeaderName; 6] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-amzn-trace-id"),
    header::FORWARDED,
    header::VIA,
];

/// A request lameduck answers itself: the status, a one-line text, and (405) `Allow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub text: &'static str,
    pub allow: Option<&'static str>,
}

impl Refusal {
    fn new(status: StatusCode, text: &'static str) -> Refusal {
        Refusal {
            status,
            text,
            allow: None,
        }
    }
}

/// Requests the proxy answers itself rather than forward, each with the status RFC 9110/9112
/// gives it.
pub(crate) fn refuse<B>(req: &Request<B>) -> Result<(), Refusal> {
    if req.method() == http::Method::CONNECT {
        // A reverse proxy in front of one app is no tunnel to anywhere.
        return Err(Refusal {
            allow: Some("GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE"),
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "lameduck: CONNECT is not supported\n",
            )
        });
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if first.is_none() && req.version() == Version::HTTP_11 {
        // RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400 (HTTP/1.0 may omit it;
        // h2 has `:authority`).
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "lameduck: bad request: HTTP/1.1 request without a Host header\n",
        ));
    }
    if first.is_some() && hosts.next().is_some() {
        // RFC 9112 §3.2: more than one Host is a 400, never a choice between them.
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "lameduck: bad request: more than one Host header\n",
        ));
    }
    let codings = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim);
    if codings
        .filter(|c| !c.is_empty())
        .any(|c| !c.eq_ignore_ascii_case("chunked"))
    {
        // hyper decodes `chunked` only; forwarding `gzip, chunked` would hand the app
        // gzip bytes with nothing saying so (RFC 9112 §6.1: 501 for a coding not understood).
        return Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "lameduck: request transfer coding not supported (only chunked)\n",
        ));
    }
    Ok(())
}

/// HTTP/1 `Connection: upgrade` with an `Upgrade` header.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

/// The comma-separated tokens of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Turns the downstream request into the upstream one: hop-by-hop headers removed, Host
/// kept (or made from an h2 `:authority`), URI and version fitted to the upstream protocol.
pub(crate) fn prepare_request<B>(
    req: &mut Request<B>,
    upgrade: bool,
    protocol: Protocol,
) -> Result<(), Refusal> {
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // hyper answers `Expect: 100-continue` itself when the body is first read.
    req.headers_mut().remove(header::EXPECT);
    if let Some(auth) = req.uri().authority() {
        // Absolute-form (or h2 `:authority`): the target's authority wins over any Host
        // the client also sent (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
        let v = HeaderValue::from_str(auth.as_str()).expect("an authority is a valid header");
        req.headers_mut().insert(header::HOST, v);
    } else if !req.headers().contains_key(header::HOST) && protocol == Protocol::Http1 {
        // HTTP/1.0 without Host, forwarded as HTTP/1.1, which requires one: empty when the
        // target has no authority (RFC 9112 §3.2).
        req.headers_mut()
            .insert(header::HOST, HeaderValue::from_static(""));
    }
    match protocol {
        Protocol::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if req.uri().scheme().is_some() || req.uri().authority().is_some() {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_owned();
                *req.uri_mut() = Uri::try_from(pq).expect("a path-and-query is a valid URI");
            }
        }
        Protocol::H2c => {
            *req.version_mut() = Version::HTTP_2;
            let authority = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok());
            let Some(authority) = authority else {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "lameduck: request has no valid Host header\n",
                ));
            };
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(authority);
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path are set");
        }
    }
    Ok(())
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names,
/// `Proxy-Connection`, `Keep-Alive`, `TE` (except `TE: trailers`, which gRPC needs),
/// `Transfer-Encoding` and `Upgrade`. With `keep_upgrade`, `Upgrade` and
/// `Connection: upgrade` stay, for a WebSocket handshake.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    // Hot path: most messages carry none of them. One pass over the names (standard names
    // compare as enum values) instead of a hash lookup per hop-by-hop name.
    let any = headers.keys().any(|n| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::TE
            || n == header::UPGRADE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    });
    if !any {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        // Rare on the hot path (ALBs don't send it); collect the names, then remove them.
        // A `Connection` header may not remove what the message needs end to end (Host, its
        // length) or what says where it came from.
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .filter(|n| n != header::HOST && n != header::CONTENT_LENGTH && !PROXIED.contains(n))
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&PROXY_CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(header::TRANSFER_ENCODING);
    if let Some(te) = headers.get(header::TE) {
        if te != "trailers" {
            headers.remove(header::TE);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}
