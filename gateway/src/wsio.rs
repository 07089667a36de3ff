//! A WebSocket connection after its upgrade: the TCP socket itself, read and written by the
//! Session actor with no HTTP dispatcher, channel or writer task in between.
//!
//! Why not actix-ws: it keeps the upgraded connection inside actix-http's HTTP/1 dispatcher,
//! which holds an 8 KiB read buffer and an 8 KiB write buffer for the life of the connection,
//! plus a 32-frame channel and a streaming body. An idle chat connection needs none of that.
//! Here a connection holds only the socket and, while bytes are in flight, what they need:
//!
//! - [`WsReader`] reads into a per-thread scratch buffer and keeps bytes only while a frame is
//!   incomplete; an idle connection holds no read buffer at all. Frames are parsed by
//!   actix-http's WebSocket codec (the same parser actix-ws uses) and continuations are
//!   aggregated here, up to a size limit.
//! - [`WsWriter`] writes frames straight to the socket, a batch per vectored write (frame
//!   headers from the stack, payloads from the shared text of the envelopes: nothing copied).
//!   Only what the kernel does not take waits in `pending`, which the session's flusher drains
//!   when the socket is writable again.
//!
//! The writer starts closed: it holds what it is given (first of all the `101` response head)
//! until [`WsWriter::open`], so the session can join the registry, and even receive
//! deliveries, before the client is told the upgrade succeeded.

use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame, Item, ProtocolError};
use actix_web::web::{Buf, Bytes, BytesMut};
use actix_ws::{AggregatedMessage, CloseReason};
use bytestring::ByteString;
use futures::Stream;
use tokio::net::TcpStream;

/// How much one read takes from the socket at most.
const READ_CHUNK: usize = 16 * 1024;

/// The most frames [`WsWriter::send_batch`] writes at once.
pub(crate) const MAX_BATCH: usize = 64;

/// The largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

thread_local! {
    /// Where reads land before the bytes of an incomplete frame are kept: shared by every
    /// connection on the thread, so an idle connection holds no read buffer.
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// The socket is gone: nothing more can be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// The socket, shared by the two halves, and what the writer's close needs to know of the
/// reader.
struct Io {
    stream: TcpStream,
    /// The reader holds no part of a frame: bytes read from here on start at a frame header.
    between_frames: Cell<bool>,
}

impl std::ops::Deref for Io {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

/// Frame opcodes the server sends (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Text = 0x1,
    Close = 0x8,
    Pong = 0xA,
}

/// Splits an upgraded connection into its two halves. `early` holds bytes the client sent
/// after its upgrade request and that were already read (they are the first frames).
pub(crate) fn split(
    io: TcpStream,
    early: BytesMut,
    head: BytesMut,
    max_frame: usize,
    max_message: usize,
) -> (WsReader, WsWriter) {
    let io = Rc::new(Io {
        stream: io,
        between_frames: Cell::new(early.is_empty()),
    });
    // `early` is the HTTP layer's read buffer (8 KiB or more): keep its bytes, not its room.
    let early = if early.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&early[..])
    };
    let reader = WsReader {
        io: Rc::clone(&io),
        buf: early,
        codec: Codec::new().max_size(max_frame),
        max_frame,
        max_message,
        parts: BytesMut::new(),
        parts_text: false,
        overflowed: false,
        done: false,
    };
    let writer = WsWriter {
        io,
        pending: head,
        open: false,
    };
    (reader, writer)
}

/// The messages a client sends, continuations joined: a `Stream` for the session actor.
pub(crate) struct WsReader {
    io: Rc<Io>,
    /// The bytes of a frame not yet complete (empty, with no allocation, between frames).
    buf: BytesMut,
    codec: Codec,
    /// The largest frame.
    max_frame: usize,
    /// The largest message (all of its continuation frames together).
    max_message: usize,
    /// The fragments of a message so far, joined (never more than `max_message` bytes).
    parts: BytesMut,
    parts_text: bool,
    /// The current fragmented message went over `max_message`: its rest is dropped.
    overflowed: bool,
    /// The socket ended or failed: the stream is over.
    done: bool,
}

/// The length of the client frame at the start of `buf` (header, mask and payload), once its
/// header is there; an error when it announces a payload over `max_payload`.
fn frame_len(buf: &[u8], max_payload: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (payload, header) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut len = [0u8; 8];
            len.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(len), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if payload > max_payload as u64 {
        return Err(ProtocolError::Overflow);
    }
    let mask = if buf[1] & 0x80 != 0 { 4 } else { 0 };
    Ok(Some(header + mask + payload as usize))
}

/// RSV1, RSV2 and RSV3 of a frame's first byte.
const RESERVED_BITS: u8 = 0x70;

/// The error a frame with a reserved bit set gives (the session closes with 1002).
fn reserved_bits_set() -> ProtocolError {
    ProtocolError::Io(io::Error::other(
        "a reserved bit is set and no extension was negotiated",
    ))
}

/// The error a message over the continuation limit gives (the session closes with 1009).
pub(crate) fn message_too_large() -> ProtocolError {
    ProtocolError::Io(io::Error::other(
        "message exceeds the maximum continuation size",
    ))
}

/// Whether `err` is [`message_too_large`].
pub(crate) fn is_message_too_large(err: &ProtocolError) -> bool {
    matches!(err, ProtocolError::Io(e) if e.to_string().contains("continuation size"))
}

fn text(bytes: Bytes) -> Result<AggregatedMessage, ProtocolError> {
    ByteString::try_from(bytes)
        .map(AggregatedMessage::Text)
        .map_err(|e| ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))
}

/// One non-blocking read from `io` into the thread's scratch buffer; `f` sees what was read.
fn read_scratch(io: &TcpStream, f: impl FnOnce(&[u8])) -> io::Result<usize> {
    READ_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let n = io.try_read(&mut scratch[..])?;
        f(&scratch[..n]);
        Ok(n)
    })
}

impl WsReader {
    /// One decoded frame as a message, or `None` while a fragmented message is incomplete.
    fn message(&mut self, frame: Frame) -> Option<Result<AggregatedMessage, ProtocolError>> {
        let (first, last, bytes) = match frame {
            Frame::Text(bytes) => return Some(text(bytes)),
            Frame::Binary(bytes) => return Some(Ok(AggregatedMessage::Binary(bytes))),
            Frame::Ping(bytes) => return Some(Ok(AggregatedMessage::Ping(bytes))),
            Frame::Pong(bytes) => return Some(Ok(AggregatedMessage::Pong(bytes))),
            Frame::Close(reason) => return Some(Ok(AggregatedMessage::Close(reason))),
            Frame::Continuation(Item::FirstText(bytes)) => (Some(true), false, bytes),
            Frame::Continuation(Item::FirstBinary(bytes)) => (Some(false), false, bytes),
            Frame::Continuation(Item::Continue(bytes)) => (None, false, bytes),
            Frame::Continuation(Item::Last(bytes)) => (None, true, bytes),
        };
        if let Some(is_text) = first {
            self.parts_text = is_text;
        }
        if self.overflowed {
            if last {
                self.overflowed = false;
            }
            return None;
        }
        if self.parts.len() + bytes.len() > self.max_message {
            self.parts = BytesMut::new();
            self.overflowed = !last;
            return Some(Err(message_too_large()));
        }
        // Copied, so a fragment never keeps the read it came in alive.
        self.parts.extend_from_slice(&bytes);
        if !last {
            return None;
        }
        let whole = std::mem::take(&mut self.parts).freeze();
        Some(if self.parts_text {
            text(whole)
        } else {
            Ok(AggregatedMessage::Binary(whole))
        })
    }

    /// Reads what the socket has into `buf`; `Ok(false)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            let buf = &mut self.buf;
            match read_scratch(&self.io, |bytes| buf.extend_from_slice(bytes)) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(_) => {
                    self.io.between_frames.set(false);
                    return Poll::Ready(Ok(true));
                }
                // The readiness was stale: `try_read` cleared it, so the next poll waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Stream for WsReader {
    type Item = Result<AggregatedMessage, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            // No extension is negotiated, so a frame with a reserved bit set breaks the
            // protocol (RFC 6455 §5.2): closed with 1002 before its payload is read.
            if this.buf.first().is_some_and(|b| b & RESERVED_BITS != 0) {
                this.done = true;
                return Poll::Ready(Some(Err(reserved_bits_set())));
            }
            // The codec is only given whole frames: a header announcing more than the frame
            // limit is refused before anything is buffered, and the buffer grows only with
            // what the client actually sent.
            let whole = match frame_len(&this.buf, this.max_frame) {
                Err(err) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Ok(len) => len.is_some_and(|len| this.buf.len() >= len),
            };
            if whole {
                match this.codec.decode(&mut this.buf) {
                    Err(err) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(err)));
                    }
                    Ok(Some(frame)) => {
                        if this.buf.is_empty() {
                            // Let go of the allocation: the next frame starts a new one.
                            this.buf = BytesMut::new();
                            this.io.between_frames.set(true);
                        }
                        match this.message(frame) {
                            Some(item) => return Poll::Ready(Some(item)),
                            None => continue,
                        }
                    }
                    Ok(None) => {}
                }
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Err(err) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(err))));
                }
            }
        }
    }
}

/// The sending half: frames go to the socket as they are sent.
pub(crate) struct WsWriter {
    io: Rc<Io>,
    /// Encoded bytes the socket has not taken yet (empty, with no allocation, when idle).
    pending: BytesMut,
    /// Whether bytes may go to the socket yet (see [`WsWriter::open`]).
    open: bool,
}

/// The header of an unmasked, final frame of `len` payload bytes; returns its length.
fn frame_header(head: &mut [u8; 10], opcode: OpCode, len: usize) -> usize {
    head[0] = 0x80 | opcode as u8;
    if len < 126 {
        head[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Appends to `pending` what a vectored write of `slices` left unwritten after `written` bytes.
fn keep_unwritten(pending: &mut BytesMut, slices: &[IoSlice<'_>], mut written: usize) {
    for slice in slices {
        if written >= slice.len() {
            written -= slice.len();
        } else {
            pending.extend_from_slice(&slice[written..]);
            written = 0;
        }
    }
}

/// A close frame's payload: the code and as much of the reason as fits in 125 bytes.
fn close_payload(reason: Option<CloseReason>) -> Vec<u8> {
    let Some(reason) = reason else {
        return Vec::new();
    };
    let mut payload = u16::from(reason.code).to_be_bytes().to_vec();
    if let Some(description) = reason.description {
        let mut end = description.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !description.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&description.as_bytes()[..end]);
    }
    payload
}

/// Finds the client's close frame in what it sends while the server's close lingers, holding
/// no more than one read's bytes: payloads are skipped, not kept.
#[derive(Default)]
struct CloseScan {
    /// The start of the next frame (at most one read's worth, usually a header).
    buf: BytesMut,
    /// Payload bytes of the current frame not read yet.
    skip: usize,
    /// A header that cannot be right: stop looking (the end of stream still ends the wait).
    lost: bool,
}

/// A frame header announcing more than this is taken for garbage by [`CloseScan`].
const SCAN_MAX_PAYLOAD: usize = 1 << 40;

impl CloseScan {
    /// Whether `bytes`, following what was scanned before, hold the start of a close frame.
    fn saw_close(&mut self, bytes: &[u8]) -> bool {
        if self.lost {
            return false;
        }
        let n = self.skip.min(bytes.len());
        self.skip -= n;
        self.buf.extend_from_slice(&bytes[n..]);
        loop {
            match frame_len(&self.buf, SCAN_MAX_PAYLOAD) {
                Ok(None) => return false,
                Err(_) => {
                    self.lost = true;
                    self.buf = BytesMut::new();
                    return false;
                }
                Ok(Some(_)) if self.buf[0] & 0x0F == OpCode::Close as u8 => return true,
                Ok(Some(len)) if self.buf.len() >= len => self.buf.advance(len),
                Ok(Some(len)) => {
                    self.skip = len - self.buf.len();
                    self.buf.clear();
                    return false;
                }
            }
        }
    }
}

impl WsWriter {
    /// Lets bytes go to the socket, starting with those held so far.
    pub fn open(&mut self) {
        self.open = true;
    }

    /// Whether bytes may go to the socket (the `101` was let out).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Whether a frame sent now goes straight to the socket: open, and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.open && self.pending.is_empty()
    }

    /// Sends one frame: written now as far as the socket takes it (when nothing waits), the
    /// rest kept in order.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), Closed> {
        self.send_batch(std::iter::once((opcode, payload)))
    }

    /// Sends the first [`MAX_BATCH`] of `frames` (the caller sends the rest later) with one
    /// vectored write: headers from the stack, payloads where they are. What
    /// the socket does not take (or everything, while something already waits) goes to `pending`,
    /// in order.
    pub fn send_batch<'a>(
        &mut self,
        frames: impl Iterator<Item = (OpCode, &'a [u8])>,
    ) -> Result<(), Closed> {
        let mut payloads: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        let mut heads = [[0u8; 10]; MAX_BATCH];
        let mut head_lens = [0usize; MAX_BATCH];
        let mut n = 0;
        for (opcode, payload) in frames.take(MAX_BATCH) {
            let payload = match opcode {
                OpCode::Text => payload,
                _ => &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)],
            };
            head_lens[n] = frame_header(&mut heads[n], opcode, payload.len());
            payloads[n] = payload;
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
        for i in 0..n {
            slices[2 * i] = IoSlice::new(&heads[i][..head_lens[i]]);
            slices[2 * i + 1] = IoSlice::new(payloads[i]);
        }
        let written = if self.is_idle() {
            match self.io.try_write_vectored(&slices[..2 * n]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(_) => return Err(Closed),
            }
        } else {
            0
        };
        keep_unwritten(&mut self.pending, &slices[..2 * n], written);
        Ok(())
    }

    /// Sends a close frame.
    pub fn send_close(&mut self, reason: Option<CloseReason>) -> Result<(), Closed> {
        self.send(OpCode::Close, &close_payload(reason))
    }

    /// Writes what is pending. `Ready(Ok)` once nothing is; `Pending` (woken when the socket
    /// can take more) while the socket is full or the writer is not open.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        if !self.open {
            return Poll::Pending;
        }
        while !self.pending.is_empty() {
            ready!(self.io.poll_write_ready(cx)).map_err(|_| Closed)?;
            match self.io.try_write(&self.pending) {
                Ok(0) => return Poll::Ready(Err(Closed)),
                Ok(n) => self.pending.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Err(Closed)),
            }
        }
        // Let go of the allocation until the socket backs up again.
        self.pending = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Ends the connection: opens the writer if it was not, writes what is pending and a close
    /// frame, shuts the sending side and reads until the client closes too (so no unread
    /// bytes turn the close into a reset), all within `grace`.
    pub async fn close(mut self, reason: Option<CloseReason>, grace: Duration) {
        self.open();
        let finish = async {
            if self.send_close(reason).is_err() {
                return;
            }
            if std::future::poll_fn(|cx| self.poll_flush(cx))
                .await
                .is_err()
            {
                return;
            }
            let _ = socket2::SockRef::from(&self.io.stream).shutdown(std::net::Shutdown::Write);
            // Read (and drop) what the client still sends, until its close frame or its end
            // of stream. Frames are only told apart when the reader stopped between two;
            // otherwise only the end of stream ends the wait.
            let mut scan = self.io.between_frames.get().then(CloseScan::default);
            loop {
                if self.io.readable().await.is_err() {
                    return;
                }
                let mut closed = false;
                match read_scratch(&self.io, |bytes| {
                    closed = scan.as_mut().is_some_and(|s| s.saw_close(bytes));
                }) {
                    Ok(0) => return,
                    Ok(_) if closed => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(grace, finish).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_ws::CloseCode;
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A masked client text frame.
    fn client_text(payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        assert!(payload.len() < 126);
        let mut out = vec![0x81, 0x80 | payload.len() as u8];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (server, client)
    }

    /// The point of this module: between frames a connection holds no buffer on either side.
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffers() {
        let (server, mut client) = pair().await;
        let head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let (mut reader, mut writer) = split(
            server,
            BytesMut::new(),
            BytesMut::from(&head[..]),
            1024,
            4096,
        );

        client
            .write_all(&client_text(b"hello"))
            .await
            .expect("write");
        let got = reader.next().await.expect("a message").expect("valid");
        assert_eq!(got, AggregatedMessage::Text("hello".into()));
        assert_eq!(
            reader.buf.capacity(),
            0,
            "no read buffer kept after a whole frame"
        );

        // Half a frame is kept until the rest comes, then let go again.
        let frame = client_text(b"split");
        client.write_all(&frame[..4]).await.expect("write");
        let early = tokio::time::timeout(Duration::from_millis(50), reader.next()).await;
        assert!(early.is_err(), "no message from half a frame");
        assert_eq!(reader.buf.len(), 4);
        client.write_all(&frame[4..]).await.expect("write");
        let got = reader.next().await.expect("a message").expect("valid");
        assert_eq!(got, AggregatedMessage::Text("split".into()));
        assert_eq!(reader.buf.capacity(), 0);

        // The writer holds what it is given until it opens, then writes it all.
        writer.send(OpCode::Text, b"held").expect("send");
        writer.open();
        std::future::poll_fn(|cx| writer.poll_flush(cx))
            .await
            .expect("flush");
        assert!(writer.is_idle());
        assert_eq!(
            writer.pending.capacity(),
            0,
            "no write buffer kept once written"
        );
        writer.send(OpCode::Text, b"direct").expect("send");
        assert!(writer.is_idle(), "an open writer with room writes at once");
        let mut got = vec![0u8; head.len() + 6 + 2 + 6];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got[..head.len()], head, "the head first");
        assert_eq!(&got[head.len()..], b"\x81\x04held\x81\x06direct");
        drop(reader);
    }

    /// Batches cut by a full socket still reach the client whole and in order (every possible
    /// cut is checked on its own in `whatever_a_write_cuts_off_is_kept_in_order`).
    #[tokio::test]
    async fn partial_vectored_writes_keep_every_frame_whole_and_in_order() {
        let (server, client) = pair().await;
        let (_reader, mut writer) = split(server, BytesMut::new(), BytesMut::new(), 1024, 4096);
        writer.open();
        // Sizes that need every header form, numbered so order and wholeness can be checked.
        let frames: Vec<Vec<u8>> = (0..600u32)
            .map(|i| {
                let len = [3, 125, 126, 1000, 70_000][i as usize % 5];
                let mut payload = vec![(i % 251) as u8; len];
                payload[..3].copy_from_slice(&i.to_be_bytes()[1..]);
                payload
            })
            .collect();
        for chunk in frames.chunks(MAX_BATCH / 2) {
            writer
                .send_batch(chunk.iter().map(|p| (OpCode::Text, p.as_slice())))
                .expect("send");
        }
        assert!(
            !writer.is_idle(),
            "the socket filled up, so some bytes wait"
        );
        let expected: usize = frames
            .iter()
            .map(|p| {
                p.len()
                    + if p.len() < 126 {
                        2
                    } else if p.len() < 65_536 {
                        4
                    } else {
                        10
                    }
            })
            .sum();
        let read = async move {
            let mut client = client;
            let mut got = vec![0u8; expected];
            client.read_exact(&mut got).await.expect("read");
            got
        };
        let flush = std::future::poll_fn(|cx| writer.poll_flush(cx));
        let (got, flushed) = tokio::join!(read, flush);
        flushed.expect("flushed");
        let mut at = 0;
        for (i, payload) in frames.iter().enumerate() {
            assert_eq!(got[at], 0x81, "frame {i} starts with its header");
            let (len, skip) = match got[at + 1] {
                126 => (u16::from_be_bytes([got[at + 2], got[at + 3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(got[at + 2..at + 10].try_into().expect("8")) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            assert_eq!(len, payload.len(), "frame {i}");
            assert_eq!(
                &got[at + skip..at + skip + len],
                payload.as_slice(),
                "frame {i}"
            );
            at += skip + len;
        }
        assert_eq!(at, expected);
    }

    /// Every cut of a vectored write (inside a header, inside a payload, between frames)
    /// leaves exactly the unwritten bytes, in order.
    #[test]
    fn whatever_a_write_cuts_off_is_kept_in_order() {
        let parts: [&[u8]; 6] = [
            b"\x81\x03",
            b"abc",
            b"\x81\x7e\x00\x02",
            b"de",
            b"\x8a\x00",
            b"",
        ];
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let all: Vec<u8> = parts.concat();
        for written in 0..=all.len() {
            let mut pending = BytesMut::new();
            keep_unwritten(&mut pending, &slices, written);
            assert_eq!(&pending[..], &all[written..], "cut after {written} bytes");
        }
    }

    #[test]
    fn a_frame_is_measured_from_its_header_and_an_oversized_one_refused_at_once() {
        assert_eq!(frame_len(&[], 100).expect("ok"), None);
        assert_eq!(frame_len(&[0x81], 100).expect("ok"), None);
        assert_eq!(frame_len(&[0x81, 0x85], 100).expect("ok"), Some(2 + 4 + 5));
        assert_eq!(frame_len(&[0x81, 0xFE, 0], 1000).expect("ok"), None);
        assert_eq!(
            frame_len(&[0x81, 0xFE, 0x03, 0xE8], 1000).expect("ok"),
            Some(4 + 4 + 1000)
        );
        assert!(matches!(
            frame_len(&[0x81, 0xFE, 0x03, 0xE9], 1000),
            Err(ProtocolError::Overflow)
        ));
        // 2^62 bytes announced: refused from the header alone.
        let huge = [0x81, 0xFF, 0x40, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            frame_len(&huge, 1 << 20),
            Err(ProtocolError::Overflow)
        ));
    }

    /// A masked client frame of any length and opcode.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
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
        out.extend_from_slice(&[9, 9, 9, 9]);
        out.extend(payload.iter().map(|b| b ^ 9));
        out
    }

    /// The lingering close finds the client's close frame behind other frames, whatever the
    /// reads cut them into, without keeping payloads; a header that cannot be right ends the
    /// search (the end of stream still ends the wait).
    #[test]
    fn the_close_scan_finds_the_close_frame_wherever_reads_cut() {
        let mut stream = client_frame(0x1, b"hello");
        stream.extend(client_frame(0x1, &vec![b'x'; 70_000]));
        stream.extend(client_frame(0x9, b"ping"));
        let close_at = stream.len();
        stream.extend(client_frame(0x8, &1000u16.to_be_bytes()));
        for cut in [1, 2, 3, 7, 100, 4096, 16 * 1024, stream.len()] {
            let mut scan = CloseScan::default();
            let mut seen = None;
            for (i, chunk) in stream.chunks(cut).enumerate() {
                assert!(
                    scan.buf.len() <= cut.max(14),
                    "cut {cut}: kept {}",
                    scan.buf.len()
                );
                if scan.saw_close(chunk) {
                    seen = Some(i * cut + chunk.len());
                    break;
                }
            }
            let seen = seen.unwrap_or_else(|| panic!("cut {cut}: no close found"));
            assert!(seen > close_at, "cut {cut}: close reported before it came");
        }

        let mut scan = CloseScan::default();
        assert!(!scan.saw_close(&client_frame(0x1, b"just text")));
        let mut garbage = vec![0x81, 0xFF];
        garbage.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(!scan.saw_close(&garbage));
        assert!(
            !scan.saw_close(&client_frame(0x8, b"")),
            "lost: no more frames told apart"
        );
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        let mut head = [0u8; 10];
        assert_eq!(frame_header(&mut head, OpCode::Text, 125), 2);
        assert_eq!(head[..2], [0x81, 125]);
        assert_eq!(frame_header(&mut head, OpCode::Text, 126), 4);
        assert_eq!(head[..4], [0x81, 126, 0, 126]);
        assert_eq!(frame_header(&mut head, OpCode::Pong, 65_535), 4);
        assert_eq!(head[..4], [0x8A, 126, 0xFF, 0xFF]);
        assert_eq!(frame_header(&mut head, OpCode::Close, 65_536), 10);
        assert_eq!(head[..10], [0x88, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn a_close_reason_is_cut_to_fit_a_control_frame_on_a_char_boundary() {
        let long = "é".repeat(100);
        let payload = close_payload(Some(CloseReason {
            code: CloseCode::Policy,
            description: Some(long),
        }));
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(payload[..2], 1008u16.to_be_bytes());
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(payload.len(), 2 + 122);
        assert!(close_payload(None).is_empty());
    }
}
