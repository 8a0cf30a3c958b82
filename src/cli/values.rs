//! The values flags and annotations take: durations, `auto`/`fail`/`keep`, addresses, paths,
//! drain tokens, and the limits they must respect. Pure parsers, shared by the proxy's flags
//! and injection's annotations.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::lifecycle::drain::ReadinessWhileDraining;

/// `--quiet`: learned, or fixed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuietArg {
    Auto,
    Fixed(Duration),
}

impl QuietArg {
    /// The fixed window, if one was given.
    pub fn fixed(self) -> Option<Duration> {
        match self {
            QuietArg::Fixed(d) => Some(d),
            QuietArg::Auto => None,
        }
    }
}

/// The shortest quiet window accepted (`--quiet`, `--quiet-fallback`): 1 s. Shorter, a drain
/// under steady traffic is declared quiet in the gap between two requests (15 ms was seen
/// with `0s`), and no load balancer health-checks more often than every 5 s (the ALB's
/// minimum interval), so no window that means "the load balancer stopped" is shorter.
pub const MIN_QUIET: Duration = Duration::from_secs(1);

/// Whether a connection to `upstream` would reach a socket listening on `own`: the same port,
/// and the same address, or `own` listening on every address (`0.0.0.0`, `[::]`) while
/// `upstream` is a local address this check can know without asking the kernel (loopback
/// or unspecified). An unspecified upstream connects to loopback.
pub fn reaches(upstream: SocketAddr, own: SocketAddr) -> bool {
    if upstream.port() != own.port() || own.port() == 0 {
        return false;
    }
    let up = upstream.ip().to_canonical();
    let own = own.ip().to_canonical();
    let local = |ip: std::net::IpAddr| ip.is_loopback() || ip.is_unspecified();
    up == own || (own.is_unspecified() && local(up)) || (up.is_unspecified() && local(own))
}

/// The header that carries the drain token to `/drain`: checked by the admin server, sent
/// by `lameduck drain` and by the preStop hook injection wires. (Header names are
/// case-insensitive; this is the spelling written into pod specs.)
pub const TOKEN_HEADER: &str = "X-Lameduck-Token";

/// A drain token: 16 to 256 characters of `A-Z a-z 0-9 . _ ~ + / = -` (base64, hex or a
/// random string; the same rule as injection's). Shorter is guessable, and an empty one
/// would let an empty header through.
pub fn check_drain_token(token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if !(16..=256).contains(&n) {
        return Err(format!(
            "the token is {n} characters; it must be 16 to 256 (e.g. `openssl rand -hex 16`)"
        ));
    }
    if let Some(c) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._~+/=-".contains(*c)))
    {
        return Err(format!(
            "the token has {c:?}; it may have only A-Z a-z 0-9 and . _ ~ + / = -"
        ));
    }
    Ok(())
}

/// Parses `fail`, `keep` or a duration.
pub fn parse_readiness(s: &str) -> Result<ReadinessWhileDraining, String> {
    match s.trim() {
        "fail" => Ok(ReadinessWhileDraining::Fail),
        "keep" => Ok(ReadinessWhileDraining::Keep),
        other => parse_duration(other)
            .map(ReadinessWhileDraining::For)
            .map_err(|e| format!("{e}; or fail, or keep")),
    }
}

/// Parses `auto` or a duration.
pub fn parse_quiet(s: &str) -> Result<QuietArg, String> {
    if s.trim() == "auto" {
        return Ok(QuietArg::Auto);
    }
    parse_duration(s)
        .map(QuietArg::Fixed)
        .map_err(|e| format!("{e}; or auto"))
}

/// Parses `500ms`, `10s`, `2m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!(
            "{s} is negative; expected a duration like 500ms, 10s or 2m"
        ));
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{e}; expected a duration like 500ms, 10s or 2m"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "{s} is longer than {}, the longest duration lameduck accepts (a pod's grace \
             period bounds every drain anyway)",
            fmt_dur(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// Where a pod's ServiceAccount credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The longest duration any flag or annotation accepts: far beyond any real drain or
/// timeout, and far from the clock arithmetic's overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

pub(crate) fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `host:port`, resolved now, so a typo fails at start rather than on the first request.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{e}; expected host:port such as 127.0.0.1:3000"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s} resolved to no address"))
}

/// `--drain-record`'s file, as given: checked by [`super::ProxyArgs::validate`], so that a
/// bad one is refused in one line naming the flag (an empty value included).
pub fn parse_record_path(s: &str) -> Result<std::path::PathBuf, std::convert::Infallible> {
    Ok(s.into())
}

/// An absolute request path.
pub fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.contains(char::is_whitespace) {
        Ok(s.to_owned())
    } else {
        Err("expected an absolute path such as /healthz".into())
    }
}
