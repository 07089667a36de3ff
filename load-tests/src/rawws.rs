//! A lean client WebSocket for connections that mostly read: the fan-out scenario's members
//! (10,000 of them reading 300,000 frames a second on the same two cores as the server) and the
//! chat and churn users.
//!
//! `tokio-tungstenite` serves the generator's other connections. For a reader it costs
//! more than the frames do: each frame is read through its waker proxies and sync adapter,
//! copied into a message of its own, and handed up a `Stream`. Here a connection is a socket
//! and one buffer: [`RawWs::read_frames`] waits until the socket is readable, reads what it
//! holds (often several frames) in one call and hands each complete frame to a closure, as a
//! borrowed `&str` for text. What the scenarios check stays checked: the upgrade (status 101
//! and `Sec-WebSocket-Accept`), the frame rules a client must enforce (no mask from a server,
//! no reserved bits, control frames short and whole, text valid UTF-8, fragments in order), and
//! close frames (their code is reported). Pings are answered with pongs. Frames the client
//! sends are masked with a random key, as RFC 6455 requires.
//!
//! The scenarios `select!` over a read and their timers, so a read may be dropped at any await.
//! Nothing is lost or split then: frames handed out are past the buffer's start, a socket read
//! is cancel-safe, and what this side writes (pongs, close replies, sends) waits in one buffer
//! that goes out one `write` call at a time, the next call going on where a dropped one stopped.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{ConnectError, tcp_connect};
use crate::guard::Target;

/// The read buffer's size while frames are small (a `new-message` is about 300 bytes).
const READ_BUFFER: usize = 4096;

/// The longest message accepted (the gateway's frames are far smaller).
const MAX_MESSAGE: usize = 1 << 20;

/// The longest upgrade response accepted.
const MAX_RESPONSE_HEAD: usize = 8192;

/// The GUID of RFC 6455 §1.3, for `Sec-WebSocket-Accept`.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A frame handed to [`RawWs::read_frames`]'s closure.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole text message (fragments joined).
    Text(&'a str),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// The server's close frame, with its code when it sent one (1005 when not). Nothing is
    /// read after it.
    Close(u16),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The server closed the TCP connection without a close frame.
    #[error("connection closed")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server broke a rule of RFC 6455.
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

impl ReadError {
    /// A short label to tally failures by.
    pub fn cause(&self) -> String {
        match self {
            Self::Eof => "closed without a close frame".to_owned(),
            Self::Io(e) => format!("{}", e.kind()),
            Self::Protocol(what) => format!("protocol: {what}"),
        }
    }
}

/// A client WebSocket over a TCP stream (see the module docs).
#[derive(Debug)]
pub struct RawWs {
    stream: TcpStream,
    /// Bytes read, `buf[start..end]` not yet handed out.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A fragmented message being joined: its opcode and the payload so far.
    partial: Option<(u8, Vec<u8>)>,
    /// Frames for the server not written yet (see the module docs).
    out: Vec<u8>,
    /// A close frame was read.
    closed: bool,
    /// This side queued its close frame (nothing may follow it).
    close_sent: bool,
}

/// A frame's header, parsed.
struct Header {
    fin: bool,
    opcode: u8,
    /// Header bytes.
    size: usize,
    len: usize,
}

/// The header at the start of `b`, `Ok(None)` when `b` does not hold all of it yet.
fn header(b: &[u8]) -> Result<Option<Header>, ReadError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
    if rsv != 0 {
        return Err(ReadError::Protocol(
            "reserved bits set (no extension was agreed)",
        ));
    }
    if b[1] & 0x80 != 0 {
        return Err(ReadError::Protocol("a server frame is masked"));
    }
    let (size, len) = match b[1] & 0x7F {
        126 => match b.get(2..4) {
            Some(n) => (4, usize::from(u16::from_be_bytes([n[0], n[1]]))),
            None => return Ok(None),
        },
        127 => match b.get(2..10) {
            Some(n) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(n);
                (
                    10,
                    usize::try_from(u64::from_be_bytes(be)).unwrap_or(usize::MAX),
                )
            }
            None => return Ok(None),
        },
        n => (2, usize::from(n)),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(ReadError::Protocol(
            "a control frame is fragmented or too long",
        ));
    }
    if len > MAX_MESSAGE {
        return Err(ReadError::Protocol("frame too large"));
    }
    Ok(Some(Header {
        fin,
        opcode,
        size,
        len,
    }))
}

/// A message's payload as handed out: text must be UTF-8.
fn message(opcode: u8, payload: &[u8]) -> Result<Frame<'_>, ReadError> {
    if opcode == OP_TEXT {
        std::str::from_utf8(payload)
            .map(Frame::Text)
            .map_err(|_| ReadError::Protocol("text frame is not valid UTF-8"))
    } else {
        Ok(Frame::Binary(payload))
    }
}

/// Appends `payload` to `out` as a client frame: FIN, `opcode`, masked with a random key.
fn put_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// The `Sec-WebSocket-Accept` a server must answer `key` with.
fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// The status and `Sec-WebSocket-Accept` of an upgrade response head.
fn response_head(head: &str) -> Result<(u16, Option<&str>), ConnectError> {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ConnectError::Handshake("not an HTTP/1.1 response".to_owned()))?;
    let accept = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-accept")
            .then(|| value.trim())
    });
    Ok((status, accept))
}

impl RawWs {
    /// Opens an authenticated WebSocket to `target` from `source` (any local address when
    /// `None`): TCP connect, then the HTTP upgrade with `?token=`, within `timeout`.
    pub async fn connect(
        target: &Target,
        source: Option<IpAddr>,
        token: &str,
        timeout: Duration,
    ) -> Result<Self, ConnectError> {
        tokio::time::timeout(timeout, Self::open(target, source, token))
            .await
            .unwrap_or(Err(ConnectError::Timeout))
    }

    async fn open(
        target: &Target,
        source: Option<IpAddr>,
        token: &str,
    ) -> Result<Self, ConnectError> {
        let mut stream = tcp_connect(target, source).await?;
        let key = BASE64.encode(rand::random::<[u8; 16]>());
        let request = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            target.addr
        );
        let handshake = |e: io::Error| ConnectError::Handshake(e.to_string());
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(handshake)?;
        let mut buf = vec![0u8; MAX_RESPONSE_HEAD];
        let mut end = 0;
        let head_end = loop {
            if end == buf.len() {
                return Err(ConnectError::Handshake("response head too long".to_owned()));
            }
            let n = stream.read(&mut buf[end..]).await.map_err(handshake)?;
            if n == 0 {
                return Err(ConnectError::Handshake(
                    "connection closed during the upgrade".to_owned(),
                ));
            }
            // The head's end may straddle two reads.
            let from = end.saturating_sub(3);
            end += n;
            if let Some(at) = memchr::memmem::find(&buf[from..end], b"\r\n\r\n") {
                break from + at + 4;
            }
        };
        let head = std::str::from_utf8(&buf[..head_end])
            .map_err(|_| ConnectError::Handshake("response head is not UTF-8".to_owned()))?;
        match response_head(head)? {
            (101, Some(accept)) if accept == accept_key(&key) => {}
            (101, _) => {
                return Err(ConnectError::Handshake(
                    "wrong or missing Sec-WebSocket-Accept".to_owned(),
                ));
            }
            (status, _) => return Err(ConnectError::Status(status)),
        }
        // Frames sent right behind the `101` may have come with it.
        buf.copy_within(head_end..end, 0);
        buf.truncate(READ_BUFFER.max(end - head_end));
        buf.shrink_to_fit();
        Ok(Self {
            stream,
            buf,
            start: 0,
            end: end - head_end,
            partial: None,
            out: Vec::new(),
            closed: false,
            close_sent: false,
        })
    }

    /// Hands `each` every complete message buffered (in order), reading the socket first when
    /// none is; then answers the pings read. Returns once at least one frame was taken (a
    /// message, a fragment or a control frame). After a [`Frame::Close`] (answered with a
    /// close frame of the same code) nothing more is read and every later call returns `Eof`.
    pub async fn read_frames(&mut self, mut each: impl FnMut(Frame<'_>)) -> Result<(), ReadError> {
        if self.closed {
            return Err(ReadError::Eof);
        }
        self.flush().await?;
        while self.hand_out(&mut each)? == 0 {
            self.make_room()?;
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            self.end += n;
        }
        let flushed = self.flush().await;
        // After the server's close frame its reply is best effort: the server may have dropped
        // the connection already.
        if !self.closed {
            flushed?;
        }
        Ok(())
    }

    /// Writes what waits in `out`, one `write` call at a time (see the module docs).
    async fn flush(&mut self) -> io::Result<()> {
        while !self.out.is_empty() {
            let n = self.stream.write(&self.out).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.out.drain(..n);
        }
        Ok(())
    }

    /// Room at the end of the buffer for the next read: what was handed out is dropped, and
    /// the buffer grows when one frame is larger than it.
    fn make_room(&mut self) -> Result<(), ReadError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        let needed = match header(&self.buf[self.start..self.end])? {
            Some(h) => h.size + h.len,
            None => 14,
        };
        if self.start > 0 && (self.buf.len() - self.start < needed || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.buf.len() - self.start < needed {
            self.buf.resize(self.start + needed, 0);
        }
        if self.end == self.buf.len() {
            // Only possible when `needed` fits already: a header is at most 14 bytes.
            self.buf.resize(self.buf.len() + READ_BUFFER, 0);
        }
        Ok(())
    }

    /// Hands out every complete frame in the buffer.
    fn hand_out(&mut self, each: &mut impl FnMut(Frame<'_>)) -> Result<usize, ReadError> {
        let mut taken = 0;
        while !self.closed {
            let bytes = &self.buf[self.start..self.end];
            let Some(h) = header(bytes)? else {
                break;
            };
            if bytes.len() < h.size + h.len {
                break;
            }
            let payload = &bytes[h.size..h.size + h.len];
            self.start += h.size + h.len;
            taken += 1;
            match h.opcode {
                OP_TEXT | OP_BINARY if self.partial.is_some() => {
                    return Err(ReadError::Protocol("a new message inside a fragmented one"));
                }
                OP_TEXT | OP_BINARY if h.fin => each(message(h.opcode, payload)?),
                OP_TEXT | OP_BINARY => self.partial = Some((h.opcode, payload.to_vec())),
                OP_CONTINUATION => {
                    let Some((opcode, mut joined)) = self.partial.take() else {
                        return Err(ReadError::Protocol("a continuation without a message"));
                    };
                    if joined.len() + payload.len() > MAX_MESSAGE {
                        return Err(ReadError::Protocol("message too large"));
                    }
                    joined.extend_from_slice(payload);
                    if h.fin {
                        each(message(opcode, &joined)?);
                    } else {
                        self.partial = Some((opcode, joined));
                    }
                }
                OP_CLOSE => {
                    let code = match payload {
                        [] => 1005,
                        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
                        [_] => return Err(ReadError::Protocol("a close frame of one byte")),
                    };
                    self.closed = true;
                    if !std::mem::replace(&mut self.close_sent, true) {
                        // 1005 means "no code" and is never sent (RFC 6455 §7.4.1).
                        let reply = if code == 1005 { 1000 } else { code };
                        put_client_frame(&mut self.out, OP_CLOSE, &reply.to_be_bytes());
                    }
                    each(Frame::Close(code));
                }
                OP_PING => put_client_frame(&mut self.out, OP_PONG, payload),
                OP_PONG => {}
                _ => return Err(ReadError::Protocol("unknown opcode")),
            }
        }
        Ok(taken)
    }

    /// Whether the server's close frame was read.
    pub fn close_received(&self) -> bool {
        self.closed
    }

    /// Sends a text message (one frame, masked).
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        put_client_frame(&mut self.out, OP_TEXT, text.as_bytes());
        self.flush().await
    }

    /// Sends a close frame (1000) and waits, at most `timeout`, for the server's. True when the
    /// server answered.
    pub async fn close(&mut self, timeout: Duration) -> bool {
        let closing = async {
            if self.closed {
                // Our reply to the server's close, if a dropped read left it unwritten.
                let _ = self.flush().await;
                return true;
            }
            self.close_sent = true;
            put_client_frame(&mut self.out, OP_CLOSE, &1000u16.to_be_bytes());
            if self.flush().await.is_err() {
                return false;
            }
            loop {
                let mut answered = false;
                match self
                    .read_frames(|f| answered |= matches!(f, Frame::Close(_)))
                    .await
                {
                    Ok(()) if answered => return true,
                    Ok(()) => {}
                    Err(_) => return false,
                }
            }
        };
        tokio::time::timeout(timeout, closing)
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) with `payload`.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xFFFF => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn accept_key_is_rfc_6455s_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn client_frames_are_masked() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut frame = Vec::new();
            put_client_frame(&mut frame, OP_TEXT, &payload);
            assert_eq!(frame[0], 0x81);
            assert_ne!(frame[1] & 0x80, 0, "mask bit");
            let (size, n) = match frame[1] & 0x7F {
                126 => (4, usize::from(u16::from_be_bytes([frame[2], frame[3]]))),
                127 => (
                    10,
                    u64::from_be_bytes(frame[2..10].try_into().expect("8 bytes")) as usize,
                ),
                n => (2, usize::from(n)),
            };
            assert_eq!(n, len);
            let mask = &frame[size..size + 4];
            let unmasked: Vec<u8> = frame[size + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn response_heads_are_read() {
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    sec-websocket-accept: abc= \r\n\r\n";
        assert_eq!(response_head(head).expect("a 101"), (101, Some("abc=")));
        let refused = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(response_head(refused).expect("a 401"), (401, None));
        assert!(response_head("SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    /// A connected pair: a `RawWs` and the server's end of its socket.
    async fn pair() -> (RawWs, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let ws = RawWs {
            stream: client.expect("connect"),
            buf: vec![0; 16],
            start: 0,
            end: 0,
            partial: None,
            out: Vec::new(),
            closed: false,
            close_sent: false,
        };
        (ws, server.expect("accept").0)
    }

    /// Reads until `want` messages came; their texts (binary as `<n bytes>`, close as `close N`).
    async fn read_n(ws: &mut RawWs, want: usize) -> Result<Vec<String>, ReadError> {
        let mut got = Vec::new();
        while got.len() < want {
            ws.read_frames(|f| {
                got.push(match f {
                    Frame::Text(t) => t.to_owned(),
                    Frame::Binary(b) => format!("<{} bytes>", b.len()),
                    Frame::Close(code) => format!("close {code}"),
                })
            })
            .await?;
        }
        Ok(got)
    }

    #[tokio::test]
    async fn frames_split_anywhere_are_joined_and_pings_answered() {
        let (mut ws, mut server) = pair().await;
        let big = "x".repeat(70_000);
        let mut bytes = server_frame(true, OP_TEXT, "héllo".as_bytes());
        bytes.extend(server_frame(false, OP_TEXT, b"frag"));
        bytes.extend(server_frame(true, OP_PING, b"hb"));
        bytes.extend(server_frame(true, OP_CONTINUATION, b"mented"));
        bytes.extend(server_frame(true, OP_TEXT, big.as_bytes()));
        bytes.extend(server_frame(true, OP_BINARY, &[1, 2, 3]));
        bytes.extend(server_frame(true, OP_CLOSE, &1001u16.to_be_bytes()));
        // Sent a few bytes at a time, so headers and payloads straddle reads (the buffer
        // starts at 16 bytes and grows for the large frame).
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(7) {
                server.write_all(chunk).await.expect("write");
                server.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
            server
        });
        let got = read_n(&mut ws, 5).await.expect("five messages");
        assert_eq!(got[0], "héllo");
        assert_eq!(got[1], "fragmented");
        assert_eq!(got[2], big);
        assert_eq!(got[3], "<3 bytes>");
        assert_eq!(got[4], "close 1001");
        assert!(matches!(ws.read_frames(|_| {}).await, Err(ReadError::Eof)));
        // The ping was answered with a masked pong carrying its payload.
        let mut server = writer.await.expect("writer task");
        let mut pong = [0u8; 8];
        server.read_exact(&mut pong).await.expect("the pong");
        assert_eq!(pong[0], 0x80 | OP_PONG);
        assert_eq!(pong[1], 0x80 | 2);
        assert_eq!([pong[6] ^ pong[2], pong[7] ^ pong[3]], *b"hb");
        // Then the server's close was answered with its code.
        let mut close = [0u8; 8];
        server
            .read_exact(&mut close)
            .await
            .expect("the close reply");
        assert_eq!(close[0], 0x80 | OP_CLOSE);
        assert_eq!(
            u16::from_be_bytes([close[6] ^ close[2], close[7] ^ close[3]]),
            1001
        );
    }

    #[tokio::test]
    async fn broken_frames_are_refused() {
        let cases: [(&[u8], &str); 5] = [
            (&[0x81, 0x82, 0, 0, 0, 0, b'h', b'i'], "masked"),
            (&[0xC1, 0x02, b'h', b'i'], "reserved"),
            (&[0x81, 0x02, 0xC3, 0x28], "UTF-8"),
            (&[0x09, 0x00], "control"),
            (&[0x80, 0x02, b'h', b'i'], "continuation"),
        ];
        for (bytes, what) in cases {
            let (mut ws, mut server) = pair().await;
            server.write_all(bytes).await.expect("write");
            let err = read_n(&mut ws, 1).await.expect_err("refused");
            assert!(
                err.to_string().contains(what),
                "{what}: got {err} for {bytes:?}"
            );
        }
        // A connection dropped without a close frame.
        let (mut ws, server) = pair().await;
        drop(server);
        assert!(matches!(read_n(&mut ws, 1).await, Err(ReadError::Eof)));
    }
}
