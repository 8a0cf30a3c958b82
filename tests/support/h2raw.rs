//! A raw HTTP/2 (prior knowledge) client that shows every frame the proxy sends, so tests can
//! assert what a library client hides: the two GOAWAYs of a graceful close and their
//! last-stream-ids, the PING between them, RST_STREAM codes, and whether the connection
//! ended with a FIN or an RST.
//!
//! Requests are encoded as HPACK literals without indexing or Huffman coding (RFC 7541
//! §6.2.2), which every decoder accepts; responses are not decoded beyond frame headers.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

pub const CANCEL: u32 = 0x8;

/// One frame from the server, as far as the tests care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data { stream: u32, len: usize, end: bool },
    Headers { stream: u32, end: bool },
    RstStream { stream: u32, code: u32 },
    Settings { ack: bool },
    Ping { ack: bool },
    GoAway { last_stream: u32, code: u32 },
    WindowUpdate { stream: u32 },
    Other { kind: u8 },
}

/// How the connection ended, when it did.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// A clean FIN (read returned 0).
    Fin,
    /// Reset by the peer.
    Reset,
}

pub struct H2 {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Answer the server's PINGs (a well-behaved client does).
    pub ack_pings: bool,
    /// Answer them this much later: a network's round trip.
    pub ping_delay: Duration,
    /// The payload of the last PING received, for [`H2::ack_ping`].
    last_ping: Vec<u8>,
    /// Every frame received so far, in order.
    pub seen: Vec<Frame>,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> H2 {
        H2::connect_split(addr, None).await
    }

    /// As [`H2::connect`], the preface written in two parts (the first `at` bytes, a pause,
    /// the rest), as a slow network may deliver it.
    pub async fn connect_split(addr: SocketAddr, at: Option<usize>) -> H2 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let mut hello = PREFACE.to_vec();
        // SETTINGS: a large initial window, so flow control never stalls a test stream.
        push_frame(&mut hello, SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]);
        // And a large connection window.
        push_frame(
            &mut hello,
            WINDOW_UPDATE,
            0,
            0,
            &(0x7fff_0000u32).to_be_bytes(),
        );
        if let Some(at) = at {
            stream.write_all(&hello[..at]).await.expect("write preface");
            tokio::time::sleep(Duration::from_millis(100)).await;
            stream.write_all(&hello[at..]).await.expect("write preface");
        } else {
            stream.write_all(&hello).await.expect("write preface");
        }
        H2 {
            stream,
            buf: Vec::new(),
            ack_pings: true,
            ping_delay: Duration::ZERO,
            last_ping: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Opens stream `id` with a request; `end` ends the stream with the headers.
    pub async fn request(&mut self, id: u32, method: &str, path: &str, extra: &[(&str, &str)]) {
        let mut block = Vec::new();
        for (k, v) in [
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "test.local"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            literal(&mut block, k, v);
        }
        let mut out = Vec::new();
        push_frame(&mut out, HEADERS, END_HEADERS | END_STREAM, id, &block);
        self.stream.write_all(&out).await.expect("write headers");
    }

    /// The next frame, or how the connection ended. Answers SETTINGS (and PINGs when
    /// `ack_pings`) as it goes. `Err` if nothing came within `within`.
    pub async fn next(&mut self, within: Duration) -> Result<Result<Frame, End>, &'static str> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((frame, ack)) = self.parse() {
                if let Some(ack) = ack {
                    if matches!(frame, Frame::Ping { .. }) && !self.ping_delay.is_zero() {
                        tokio::time::sleep(self.ping_delay).await;
                    }
                    let _ = self.stream.write_all(&ack).await;
                }
                self.seen.push(frame.clone());
                return Ok(Ok(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            match read {
                Err(_) => return Err("no frame in time"),
                Ok(Ok(0)) => return Ok(Err(End::Fin)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) if is_reset(&e) => return Ok(Err(End::Reset)),
                Ok(Err(e)) => panic!("read failed: {e}"),
            }
        }
    }

    /// Reads frames until the connection ends; returns how it ended.
    pub async fn until_end(&mut self, within: Duration) -> Result<End, &'static str> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Ok(_) => continue,
                Err(end) => return Ok(end),
            }
        }
    }

    /// Reads frames until `f` matches one (returned), or the connection ends or time runs out.
    pub async fn until(
        &mut self,
        within: Duration,
        mut f: impl FnMut(&Frame) -> bool,
    ) -> Result<Frame, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Ok(Ok(frame)) if f(&frame) => return Ok(frame),
                Ok(Ok(_)) => continue,
                Ok(Err(end)) => {
                    return Err(format!("connection ended ({end:?}); saw {:?}", self.seen))
                }
                Err(e) => return Err(format!("{e}; saw {:?}", self.seen)),
            }
        }
    }

    /// Acknowledges the last PING received (when `ack_pings` is off).
    pub async fn ack_ping(&mut self) {
        let mut out = Vec::new();
        push_frame(&mut out, PING, ACK, 0, &self.last_ping);
        self.stream.write_all(&out).await.expect("write ping ack");
    }

    pub fn goaways(&self) -> Vec<u32> {
        self.seen
            .iter()
            .filter_map(|f| match f {
                Frame::GoAway { last_stream, .. } => Some(*last_stream),
                _ => None,
            })
            .collect()
    }

    /// DATA bytes received on `stream`.
    pub fn data_len(&self, stream: u32) -> usize {
        self.seen
            .iter()
            .map(|f| match f {
                Frame::Data { stream: s, len, .. } if *s == stream => *len,
                _ => 0,
            })
            .sum()
    }

    fn parse(&mut self) -> Option<(Frame, Option<Vec<u8>>)> {
        if self.buf.len() < 9 {
            return None;
        }
        let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
        if self.buf.len() < 9 + len {
            return None;
        }
        let kind = self.buf[3];
        let flags = self.buf[4];
        let stream =
            u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) & 0x7fff_ffff;
        let payload: Vec<u8> = self.buf[9..9 + len].to_vec();
        self.buf.drain(..9 + len);
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut reply = None;
        let frame = match kind {
            DATA => Frame::Data {
                stream,
                len,
                end: flags & END_STREAM != 0,
            },
            HEADERS => Frame::Headers {
                stream,
                end: flags & END_STREAM != 0,
            },
            RST_STREAM => Frame::RstStream {
                stream,
                code: be(&payload),
            },
            SETTINGS => {
                let ack = flags & ACK != 0;
                if !ack {
                    let mut out = Vec::new();
                    push_frame(&mut out, SETTINGS, ACK, 0, &[]);
                    reply = Some(out);
                }
                Frame::Settings { ack }
            }
            PING => {
                let ack = flags & ACK != 0;
                if !ack {
                    self.last_ping = payload.clone();
                }
                if !ack && self.ack_pings {
                    let mut out = Vec::new();
                    push_frame(&mut out, PING, ACK, 0, &payload);
                    reply = Some(out);
                }
                Frame::Ping { ack }
            }
            GOAWAY => Frame::GoAway {
                last_stream: be(&payload[..4]) & 0x7fff_ffff,
                code: be(&payload[4..8]),
            },
            WINDOW_UPDATE => Frame::WindowUpdate { stream },
            kind => Frame::Other { kind },
        };
        Some((frame, reply))
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
    )
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK literal header field without indexing, new name, no Huffman.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127, "short headers only");
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}
