//! PROXY protocol version 2 headers (haproxy's `proxy-protocol.txt`, section 2.2), as an AWS
//! Network Load Balancer sends them when its target group has `proxy_protocol_v2.enabled`.
//!
//! [`parse`] is pure and incremental: give it the bytes read so far and it says the header is
//! complete (with its length, so the caller can strip or pass exactly it), how many more
//! bytes it needs, or why the bytes cannot be one. It never reads past the length the header
//! announces, never panics, and rejects garbage at the first byte that cannot belong to a
//! header (a client that sends `GET /` is refused after one byte, not after sixteen).
//!
//! Layout: a 12-byte signature; version and command (`0x21` PROXY, `0x20` LOCAL); address
//! family and transport; a big-endian `u16` length of what follows; the addresses (12 bytes
//! for IPv4, 36 for IPv6, 216 for UNIX); TLVs (type, `u16` length, value) to the end, checked
//! for framing and otherwise skipped (AWS sends `0xEA` with the VPC endpoint id).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version/command, family, length.
pub const FIXED_LEN: usize = 16;

/// The longest header the format allows.
pub const MAX_LEN: usize = FIXED_LEN + u16::MAX as usize;

/// `--proxy-protocol`: what the TCP listener expects in front of each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyProtocol {
    /// No header: the first byte is the client's.
    Off,
    /// Parse the header and forward only what follows it.
    Strip,
    /// Parse the header and forward it to the app unchanged, then the payload.
    Pass,
}

/// The header's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// The load balancer's own connection (health checks may use it): no client addresses.
    Local,
    /// A relayed client connection.
    Proxy,
}

/// A complete, valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header occupies at the start of the stream.
    pub len: usize,
    pub command: Command,
    /// The client's address (PROXY over IPv4 or IPv6); `None` for LOCAL, UNSPEC or UNIX.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// What the bytes so far amount to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Complete(Header),
    /// At least this many bytes in all are needed before the header can be judged.
    Incomplete {
        need: usize,
    },
}

/// Why the bytes are not a PROXY protocol v2 header. [`Error::kind`] is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("PROXY protocol v1 (text) header; only v2 is supported")]
    V1,
    #[error("no PROXY protocol v2 signature")]
    Signature,
    #[error("PROXY protocol version {0}, expected 2")]
    Version(u8),
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    #[error("unknown address family/transport byte {0:#04x}")]
    Family(u8),
    #[error("header length {len} is shorter than the {need} bytes of its addresses")]
    AddressLength { len: usize, need: usize },
    #[error("malformed TLV at offset {0}")]
    Tlv(usize),
}

impl Error {
    /// Short, fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::V1 => "v1",
            Error::Signature => "signature",
            Error::Version(_) => "version",
            Error::Command(_) => "command",
            Error::Family(_) => "family",
            Error::AddressLength { .. } => "length",
            Error::Tlv(_) => "tlv",
        }
    }

    /// Every label [`Error::kind`] can return (the metrics registry creates each series up
    /// front, so the list lives there).
    pub const KINDS: [&'static str; 7] = crate::metrics::PROXY_PROTOCOL_ERROR_KINDS;
}

/// Parses the start of a stream as a v2 header. Pure; see the module doc.
pub fn parse(buf: &[u8]) -> Result<Parsed, Error> {
    let sig = buf.len().min(SIGNATURE.len());
    if buf[..sig] != SIGNATURE[..sig] {
        return Err(
            if buf.starts_with(b"PROXY ") || b"PROXY ".starts_with(buf) {
                Error::V1
            } else {
                Error::Signature
            },
        );
    }
    if buf.len() < FIXED_LEN {
        // Judge version and family as soon as their bytes are in.
        if let Some(&vc) = buf.get(12) {
            ver_cmd(vc)?;
        }
        if let Some(&fam) = buf.get(13) {
            family(fam)?;
        }
        return Ok(Parsed::Incomplete { need: FIXED_LEN });
    }
    let command = ver_cmd(buf[12])?;
    let fam = family(buf[13])?;
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let total = FIXED_LEN + len;
    let addr_len = match fam {
        Family::Unspec => 0,
        Family::Inet => 12,
        Family::Inet6 => 36,
        Family::Unix => 216,
    };
    if len < addr_len {
        return Err(Error::AddressLength {
            len,
            need: addr_len,
        });
    }
    if buf.len() < total {
        return Ok(Parsed::Incomplete { need: total });
    }
    let body = &buf[FIXED_LEN..total];
    let (source, destination) = match fam {
        Family::Inet => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        Family::Inet6 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        Family::Unspec | Family::Unix => (None, None),
    };
    check_tlvs(&body[addr_len..], FIXED_LEN + addr_len)?;
    let (source, destination) = match command {
        // LOCAL: the addresses, if any, say nothing about a client.
        Command::Local => (None, None),
        Command::Proxy => (source, destination),
    };
    Ok(Parsed::Complete(Header {
        len: total,
        command,
        source,
        destination,
    }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

fn ver_cmd(b: u8) -> Result<Command, Error> {
    match (b >> 4, b & 0x0f) {
        (2, 0) => Ok(Command::Local),
        (2, 1) => Ok(Command::Proxy),
        (2, c) => Err(Error::Command(c)),
        (v, _) => Err(Error::Version(v)),
    }
}

fn family(b: u8) -> Result<Family, Error> {
    let fam = match b >> 4 {
        0 => Family::Unspec,
        1 => Family::Inet,
        2 => Family::Inet6,
        3 => Family::Unix,
        _ => return Err(Error::Family(b)),
    };
    // Transport: UNSPEC, STREAM or DGRAM.
    if b & 0x0f > 2 {
        return Err(Error::Family(b));
    }
    Ok(fam)
}

/// Each TLV must fit in what is left; `base` is the offset of `tlvs` in the header.
fn check_tlvs(mut tlvs: &[u8], base: usize) -> Result<(), Error> {
    let mut at = base;
    while !tlvs.is_empty() {
        if tlvs.len() < 3 {
            return Err(Error::Tlv(at));
        }
        let n = 3 + u16::from_be_bytes([tlvs[1], tlvs[2]]) as usize;
        if n > tlvs.len() {
            return Err(Error::Tlv(at));
        }
        tlvs = &tlvs[n..];
        at += n;
    }
    Ok(())
}

/// Builds a v2 header (for tests and the demo's simulated NLB): PROXY over IPv4 or IPv6
/// when `addrs` is given, LOCAL/UNSPEC otherwise, followed by `tlvs` as they are.
pub fn encode(addrs: Option<(SocketAddr, SocketAddr)>, tlvs: &[u8]) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    let mut body = Vec::new();
    match addrs {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            out.extend([0x21, 0x11]);
            body.extend(s.ip().octets());
            body.extend(d.ip().octets());
            body.extend(s.port().to_be_bytes());
            body.extend(d.port().to_be_bytes());
        }
        Some((s, d)) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend([0x21, 0x21]);
            body.extend(v6(s).octets());
            body.extend(v6(d).octets());
            body.extend(s.port().to_be_bytes());
            body.extend(d.port().to_be_bytes());
        }
        None => out.extend([0x20, 0x00]),
    }
    body.extend_from_slice(tlvs);
    let len = u16::try_from(body.len()).expect("a test header fits in u16");
    out.extend(len.to_be_bytes());
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> (SocketAddr, SocketAddr) {
        (
            "203.0.113.7:51234".parse().unwrap(),
            "10.0.1.5:8080".parse().unwrap(),
        )
    }

    #[test]
    fn proxy_ipv4_with_an_aws_tlv() {
        // PP2_TYPE_AWS (0xEA), subtype 0x01, a VPC endpoint id.
        let tlv = [&[0xEA, 0x00, 0x05, 0x01][..], b"vpce"].concat();
        let h = encode(Some(v4()), &tlv);
        let mut stream = h.clone();
        stream.extend_from_slice(b"payload");
        let Ok(Parsed::Complete(got)) = parse(&stream) else {
            panic!("{:?}", parse(&stream))
        };
        assert_eq!(got.len, h.len());
        assert_eq!(got.command, Command::Proxy);
        assert_eq!(got.source, Some(v4().0));
        assert_eq!(got.destination, Some(v4().1));
        assert_eq!(&stream[got.len..], b"payload");
    }

    #[test]
    fn proxy_ipv6_and_local() {
        let (s, d): (SocketAddr, SocketAddr) = (
            "[2001:db8::1]:443".parse().unwrap(),
            "[2001:db8::2]:80".parse().unwrap(),
        );
        let Ok(Parsed::Complete(h)) = parse(&encode(Some((s, d)), &[])) else {
            panic!()
        };
        assert_eq!((h.len, h.source, h.destination), (52, Some(s), Some(d)));
        let Ok(Parsed::Complete(h)) = parse(&encode(None, &[])) else {
            panic!()
        };
        assert_eq!((h.len, h.command, h.source), (16, Command::Local, None));
    }

    #[test]
    fn incomplete_until_the_announced_length() {
        let h = encode(Some(v4()), &[0x04, 0x00, 0x01, 0xff]);
        for n in 0..h.len() {
            match parse(&h[..n]) {
                Ok(Parsed::Incomplete { need }) => assert!(need > n && need <= h.len(), "{n}"),
                other => panic!("{n} bytes: {other:?}"),
            }
        }
        assert!(matches!(parse(&h), Ok(Parsed::Complete(_))));
    }

    #[test]
    fn malformed_headers_are_refused_with_a_kind() {
        let good = encode(Some(v4()), &[]);
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        let mut short_len = good.clone();
        short_len[15] = 11; // IPv4 needs 12
        let mut bad_tlv = encode(Some(v4()), &[0x01, 0x00, 0x09, 0x00]);
        let n = bad_tlv.len();
        bad_tlv[n - 1] = 0;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "an HTTP request",
                b"GET / HTTP/1.1\r\n".to_vec(),
                "signature",
            ),
            ("one wrong byte", b"G".to_vec(), "signature"),
            (
                "v1 text",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
                "v1",
            ),
            ("v1 prefix", b"PRO".to_vec(), "v1"),
            ("signature off by one", with(11, b'X'), "signature"),
            ("version 1", with(12, 0x11), "version"),
            ("version 3", with(12, 0x31), "version"),
            ("command 2", with(12, 0x22), "command"),
            ("family 4", with(13, 0x41), "family"),
            ("transport 3", with(13, 0x13), "family"),
            ("length below IPv4 addresses", short_len, "length"),
            ("TLV runs past the end", bad_tlv, "tlv"),
            ("TLV of two bytes", encode(Some(v4()), &[0x01, 0x00]), "tlv"),
        ];
        for (what, bytes, kind) in cases {
            match parse(&bytes) {
                Err(e) => assert_eq!(e.kind(), kind, "{what}: {e}"),
                Ok(p) => panic!("{what}: accepted as {p:?}"),
            }
            assert!(Error::KINDS.contains(&kind));
        }
        // Rejected early: the bad version byte is judged before the length arrives.
        assert_eq!(parse(&with(12, 0x11)[..13]), Err(Error::Version(1)));
    }

    /// A cheap fuzz: every prefix and every single-byte corruption of valid headers parses
    /// to something (no panic), and a complete header never claims more bytes than given.
    #[test]
    fn never_panics_on_corruption() {
        let headers = [
            encode(Some(v4()), &[0xEA, 0x00, 0x01, 0x01]),
            encode(
                Some(("[::1]:1".parse().unwrap(), "[::2]:2".parse().unwrap())),
                &[],
            ),
            encode(None, &[]),
        ];
        for h in headers {
            for i in 0..h.len() {
                for b in [0x00, 0x01, 0x21, 0x7f, 0xff] {
                    let mut c = h.clone();
                    c[i] = b;
                    for n in [i + 1, c.len()] {
                        if let Ok(Parsed::Complete(got)) = parse(&c[..n]) {
                            assert!(got.len <= n);
                        }
                    }
                }
            }
        }
    }
}
