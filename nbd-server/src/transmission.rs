//! The transmission phase: requests in, replies out, many in flight.
//!
//! One task per connection drives three things with `select!`: a cancel-safe reader that
//! decodes the next request from a buffer, up to [`MAX_IN_FLIGHT`] request futures in a
//! `FuturesUnordered` (no task spawn per request), and a writer that sends whatever replies
//! are ready in one `write` call (replies complete out of order, as the spec allows).
//!
//! Every request is checked here before the node sees it; `validate` is pure and quotes
//! the spec for each error. A bad request ends that request with an error reply; only a
//! request whose payload cannot be consumed (larger than the 32 MiB maximum: "either the
//! server or the client MAY initiate a hard disconnect if a payload length ... would be large
//! enough to be deemed a denial of service attack") or a header with a bad magic ends the
//! connection.

use crate::export::Export;
use crate::handshake::{Mode, Session};
use crate::meta::MetaContext;
use crate::proto::{
    cmd_flags, encode_chunk_header, encode_simple_reply, state, BlockStatusPayload, ChunkType,
    Command, NbdErrno, RequestHeader, COMPACT_REQUEST_SIZE, EXTENDED_REQUEST_SIZE, MAX_PAYLOAD,
    MAX_STRING_SIZE, REPLY_FLAG_DONE,
};
use crate::socket::Rebind;
use crate::splice::{Pipe, Pipes, SpliceSink, SPLICE_MIN};
use block_core::{Attachment, DirtyBitmap, SgList, WriteFlags, ZeroFlags};
use bytes::{Buf, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

/// Requests executed at once on one connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// No new request is read while the data of requests in flight exceeds this many bytes.
const IN_FLIGHT_BYTES: usize = 8 << 20;
/// No new request is read while this many reply bytes wait to be sent.
const OUT_HIGH_WATER: usize = 1 << 20;
/// Once a connection stops reading and its requests are done, the client gets this long to
/// take the remaining replies before the connection is dropped.
const FINAL_FLUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection idle this long gives back the reply buffers it pooled and a request buffer
/// grown past [`READ_BUF`] (a client that read much and then idles keeps no memory).
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(2);
/// The request buffer's usual capacity.
const READ_BUF: usize = 64 * 1024;
/// Most extents in one block status chunk: QEMU's `NBD_MAX_BLOCK_STATUS_EXTENTS` (1 MiB / 8,
/// a 1 MiB chunk in compact form), below the spec's "SHOULD NOT send more than 2^20".
const MAX_EXTENTS: usize = 1024 * 1024 / 8;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Reading or writing the socket failed.
    #[error("I/O error on the connection")]
    Io(#[source] io::Error),
    /// A request header did not have the negotiated magic.
    #[error("invalid request magic 0x{0:x}")]
    BadMagic(u32),
    /// The client closed the connection in the middle of a request.
    #[error("connection closed in the middle of a request")]
    Truncated,
    /// The client did not take the last replies within the grace period after the
    /// connection stopped reading requests.
    #[error("the client stopped reading replies")]
    Stalled,
    /// A payload was larger than the server accepts; the connection was ended after the
    /// error reply.
    #[error("request payload of {0} bytes is larger than the 32 MiB maximum")]
    PayloadTooLarge(u64),
}

/// A decoded request ready to execute.
#[derive(Debug)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u64,
        fua: bool,
        df: bool,
    },
    Write {
        offset: u64,
        data: BytesMut,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Cache,
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
        contexts: Vec<MetaContext>,
    },
}

/// A request refused before execution: its error value and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) errno: NbdErrno,
    pub(crate) message: String,
}

fn refuse(errno: NbdErrno, message: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        message: message.into(),
    }
}

/// What the connection knows about its export, fixed at the end of the handshake.
#[derive(Debug)]
pub(crate) struct Params {
    pub(crate) mode: Mode,
    pub(crate) size: u64,
    pub(crate) writable: bool,
    pub(crate) alignment: u32,
    pub(crate) contexts: Vec<MetaContext>,
}

/// Checks a request against the negotiated parameters (pure; `payload` is the consumed
/// payload, if the request carried one).
pub(crate) fn validate(
    p: &Params,
    h: &RequestHeader,
    payload: Option<BytesMut>,
) -> Result<Op, Refusal> {
    let extended = p.mode >= Mode::Extended;
    let structured = p.mode >= Mode::Structured;
    // "NBD_CMD_FLAG_FUA ... This flag is valid for all commands, provided NBD_FLAG_SEND_FUA
    // has been negotiated, in which case the server MUST accept all commands with this bit
    // set" (we always advertise SEND_FUA).
    let mut valid = cmd_flags::FUA;
    match h.command {
        Command::READ if structured => valid |= cmd_flags::DF,
        Command::WRITE if extended => valid |= cmd_flags::PAYLOAD_LEN,
        Command::WRITE_ZEROES => valid |= cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        Command::BLOCK_STATUS => {
            valid |= cmd_flags::REQ_ONE;
            if extended && !p.contexts.is_empty() {
                valid |= cmd_flags::PAYLOAD_LEN;
            }
        }
        Command::READ
        | Command::WRITE
        | Command::FLUSH
        | Command::TRIM
        | Command::CACHE
        | Command::DISC => {}
        other => {
            // "The server SHOULD return NBD_EINVAL if it receives an unknown command."
            return Err(refuse(
                NbdErrno::EINVAL,
                format!("invalid request type ({}) received", other.0),
            ));
        }
    }
    // "The server SHOULD return NBD_EINVAL if it receives an unknown command flag. It also
    // SHOULD return NBD_EINVAL if it receives a request with a flag not explicitly
    // documented as applicable to the given request."
    if h.flags & !valid != 0 {
        return Err(refuse(
            NbdErrno::EINVAL,
            format!(
                "unsupported flags for command {} (got 0x{:x})",
                h.command, h.flags
            ),
        ));
    }
    let fua = h.flags & cmd_flags::FUA != 0;
    let writes = matches!(
        h.command,
        Command::WRITE | Command::TRIM | Command::WRITE_ZEROES
    );
    // "it SHOULD return NBD_EPERM if it receives a write or trim request on a read-only
    // export."
    if writes && !p.writable {
        return Err(refuse(NbdErrno::EPERM, "Export is read-only"));
    }
    // Block status in payload form: the effect length is in the payload.
    let mut bs_ids: Option<Vec<u32>> = None;
    let effect_len = match (&payload, h.command) {
        (Some(data), Command::WRITE) => data.len() as u64,
        (Some(data), Command::BLOCK_STATUS) => {
            let decoded = BlockStatusPayload::decode(data).map_err(|e| {
                refuse(
                    NbdErrno::EINVAL,
                    format!("invalid block status payload: {e}"),
                )
            })?;
            bs_ids = Some(decoded.ids);
            decoded.effect_length
        }
        _ => h.length,
    };
    if h.command == Command::READ && effect_len > MAX_PAYLOAD.into() {
        // With simple replies the client "MUST NOT request a length larger than the maximum
        // payload size". With structured replies, "The server SHOULD NOT return
        // NBD_EOVERFLOW except as documented in response to NBD_CMD_READ when
        // NBD_CMD_FLAG_DF is supported": with DF, "A server MAY reject a client's request
        // with the error NBD_EOVERFLOW if the length is too large to send without
        // fragmentation"; without it, NBD_EINVAL as QEMU (which answers NBD_EINVAL with DF
        // too).
        let errno = if h.flags & cmd_flags::DF != 0 {
            NbdErrno::EOVERFLOW
        } else {
            NbdErrno::EINVAL
        };
        return Err(refuse(
            errno,
            format!("len ({effect_len}) is larger than max len ({MAX_PAYLOAD})"),
        ));
    }
    let checks_range = !matches!(h.command, Command::FLUSH | Command::DISC);
    if checks_range && (h.offset > p.size || effect_len > p.size - h.offset) {
        // "The server SHOULD return NBD_ENOSPC if it receives a write request including one
        // or more sectors beyond the size of the device" (likewise for write zeroes); "It
        // SHOULD return NBD_EINVAL if it receives a read or trim request including one or
        // more sectors beyond the size of the device".
        let errno = if matches!(h.command, Command::WRITE | Command::WRITE_ZEROES) {
            NbdErrno::ENOSPC
        } else {
            NbdErrno::EINVAL
        };
        return Err(refuse(
            errno,
            format!(
                "operation past EOF; From: {}, Len: {}, Size: {}",
                h.offset, effect_len, p.size
            ),
        ));
    }
    let aligned_cmd = matches!(
        h.command,
        Command::READ | Command::WRITE | Command::TRIM | Command::WRITE_ZEROES | Command::CACHE
    );
    let align = u64::from(p.alignment);
    if aligned_cmd && align > 1 && ((h.offset | effect_len) % align != 0) {
        // "It SHOULD return NBD_EINVAL ... if a read or write request is not aligned to
        // advertised minimum block sizes." The node cannot do read-modify-write.
        return Err(refuse(
            NbdErrno::EINVAL,
            format!("request is not aligned to {align} bytes"),
        ));
    }
    Ok(match h.command {
        Command::READ => Op::Read {
            offset: h.offset,
            len: effect_len,
            fua,
            df: h.flags & cmd_flags::DF != 0,
        },
        Command::WRITE => Op::Write {
            offset: h.offset,
            data: payload.unwrap_or_default(),
            fua,
        },
        Command::FLUSH => Op::Flush,
        Command::TRIM => Op::Trim {
            offset: h.offset,
            len: effect_len,
            fua,
        },
        Command::CACHE => Op::Cache,
        Command::WRITE_ZEROES => Op::WriteZeroes {
            offset: h.offset,
            len: effect_len,
            flags: ZeroFlags {
                fua,
                may_unmap: h.flags & cmd_flags::NO_HOLE == 0,
                fast: h.flags & cmd_flags::FAST_ZERO != 0,
            },
        },
        Command::BLOCK_STATUS => {
            // "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless within the negotiation
            // phase it sent NBD_OPT_SET_META_CONTEXT ... Servers SHOULD reply with
            // NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without selecting at least
            // one metadata context."
            if p.contexts.is_empty() {
                return Err(refuse(NbdErrno::EINVAL, "CMD_BLOCK_STATUS not negotiated"));
            }
            if effect_len == 0 {
                return Err(refuse(NbdErrno::EINVAL, "need non-zero length"));
            }
            let contexts = match bs_ids {
                None => p.contexts.clone(),
                Some(ids) => {
                    // "or detects duplicate or unknown metacontext ids in the client's
                    // payload, the server MUST gracefully consume the client's payload
                    // before failing with NBD_EINVAL."
                    let mut chosen: Vec<MetaContext> = Vec::new();
                    for id in ids {
                        let Some(ctx) = p.contexts.iter().find(|c| c.id() == id) else {
                            return Err(refuse(
                                NbdErrno::EINVAL,
                                format!("unknown metadata context id {id}"),
                            ));
                        };
                        if chosen.contains(ctx) {
                            return Err(refuse(
                                NbdErrno::EINVAL,
                                format!("duplicate metadata context id {id}"),
                            ));
                        }
                        chosen.push(ctx.clone());
                    }
                    if chosen.is_empty() {
                        return Err(refuse(NbdErrno::EINVAL, "no metadata context id"));
                    }
                    chosen
                }
            };
            Op::BlockStatus {
                offset: h.offset,
                len: effect_len,
                req_one: h.flags & cmd_flags::REQ_ONE != 0,
                contexts,
            }
        }
        // DISC is handled by the reader; unknown commands were refused above.
        _ => return Err(refuse(NbdErrno::EINVAL, "unexpected command")),
    })
}

/// What the reader produced.
#[derive(Debug)]
enum Incoming {
    /// A request with its payload (if any).
    Request {
        header: RequestHeader,
        payload: Option<BytesMut>,
    },
    /// A request whose payload is too large to consume: refused, then the connection ends.
    Oversized { header: RequestHeader, len: u64 },
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Eof,
}

/// Decodes requests from a buffer; `next` is cancel-safe (all state lives in the struct).
struct RequestReader<R> {
    rd: R,
    buf: BytesMut,
    extended: bool,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    fn header_len(&self) -> usize {
        if self.extended {
            EXTENDED_REQUEST_SIZE
        } else {
            COMPACT_REQUEST_SIZE
        }
    }

    /// Parses one request out of the buffer if it is complete. `Ok(None)`: read more, after
    /// making room for `need` bytes in total.
    fn try_parse(&mut self) -> Result<Result<Incoming, usize>, ConnError> {
        let hlen = self.header_len();
        if self.buf.len() < hlen {
            return Ok(Err(hlen));
        }
        let header = match RequestHeader::decode(&self.buf[..hlen], self.extended) {
            Ok(h) => h,
            Err(_) => {
                let magic =
                    u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                return Err(ConnError::BadMagic(magic));
            }
        };
        if header.command == Command::DISC {
            // "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC
            // command."
            self.buf.advance(hlen);
            return Ok(Ok(Incoming::Disconnect));
        }
        let payload_len = if self.extended {
            // "With extended headers, the meaning of the length field depends on whether
            // flags contains NBD_CMD_FLAG_PAYLOAD_LEN". A write without the flag is
            // non-compliant; like QEMU, treat its length as the payload anyway.
            if header.flags & cmd_flags::PAYLOAD_LEN != 0 || header.command == Command::WRITE {
                header.length
            } else {
                0
            }
        } else if header.command == Command::WRITE {
            header.length
        } else {
            0
        };
        if payload_len > MAX_PAYLOAD.into() {
            // Checked before allocating: refuse, then end the connection ("A server SHOULD
            // initiate hard disconnect if a client sets the NBD_CMD_FLAG_PAYLOAD_LEN flag and
            // uses a length larger than a server's advertised or default maximum payload
            // length").
            self.buf.advance(hlen);
            return Ok(Ok(Incoming::Oversized {
                header,
                len: payload_len,
            }));
        }
        let total = hlen + payload_len as usize;
        if self.buf.len() < total {
            return Ok(Err(total));
        }
        self.buf.advance(hlen);
        let payload = if payload_len > 0 || header.command == Command::WRITE {
            Some(self.buf.split_to(payload_len as usize))
        } else {
            None
        };
        Ok(Ok(Incoming::Request { header, payload }))
    }

    /// Whether the buffer holds more memory than it needs between requests.
    fn oversized(&self) -> bool {
        self.buf.is_empty() && self.buf.capacity() > READ_BUF
    }

    /// Gives back a grown buffer (when nothing is buffered).
    fn shrink(&mut self) {
        if self.oversized() {
            self.buf = BytesMut::with_capacity(READ_BUF);
        }
    }

    async fn next(&mut self) -> Result<Incoming, ConnError> {
        loop {
            let need = match self.try_parse()? {
                Ok(incoming) => return Ok(incoming),
                Err(need) => need,
            };
            let want = need.max(self.buf.len() + 4096);
            if self.buf.capacity() < want {
                self.buf.reserve(want.max(READ_BUF) - self.buf.len());
            }
            let n = self
                .rd
                .read_buf(&mut self.buf)
                .await
                .map_err(ConnError::Io)?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(Incoming::Eof)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
    }
}

/// A future that polls the one it wraps only once that one asked to be woken (and at the
/// first poll). For a future polled at every turn of a busy loop that is almost never ready,
/// such as the connection's shutdown watch (two `watch` receivers, each taking a lock per
/// poll: 3% of the server's CPU at 150,000 writes per second).
struct Gated<F> {
    inner: std::pin::Pin<Box<F>>,
    wake: Arc<GateWake>,
}

struct GateWake {
    woken: std::sync::atomic::AtomicBool,
    outer: futures::task::AtomicWaker,
}

impl std::task::Wake for GateWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.outer.wake();
    }
}

impl<F: std::future::Future> Gated<F> {
    fn new(inner: F) -> Gated<F> {
        Gated {
            inner: Box::pin(inner),
            wake: Arc::new(GateWake {
                // The first poll goes through.
                woken: std::sync::atomic::AtomicBool::new(true),
                outer: futures::task::AtomicWaker::new(),
            }),
        }
    }
}

impl<F: std::future::Future> std::future::Future for Gated<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.wake.outer.register(cx.waker());
        if !self
            .wake
            .woken
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(Arc::clone(&self.wake));
        self.inner
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
    }
}

/// The per-connection state shared by request futures.
struct Conn {
    /// Pipes for zero-copy reads, when the connection can splice.
    pipes: Option<Pipes>,
    /// Buffers of large replies already sent, for the next copied reads.
    bufs: BufPool,
    export: Arc<Export>,
    /// The export's I/O handle.
    io: Attachment,
    params: Params,
}

impl Conn {
    fn extended(&self) -> bool {
        self.params.mode >= Mode::Extended
    }

    fn structured(&self) -> bool {
        self.params.mode >= Mode::Structured
    }

    /// A reply without payload for a successful request: a simple reply, unless extended
    /// headers forbid it ("If extended headers have been negotiated, a simple reply MUST NOT
    /// be used").
    fn ok_reply(&self, out: &mut Vec<u8>, cookie: u64, offset: u64) {
        if self.extended() {
            encode_chunk_header(
                out,
                true,
                REPLY_FLAG_DONE,
                ChunkType::NONE,
                cookie,
                offset,
                0,
            );
        } else {
            encode_simple_reply(out, NbdErrno(0), cookie);
        }
    }

    /// An error reply: an error chunk with a message once structured replies are on ("The
    /// server SHOULD prefer sending errors via a structured reply"), else a simple reply.
    fn error_reply(&self, out: &mut Vec<u8>, cookie: u64, offset: u64, refusal: &Refusal) {
        if self.structured() {
            let mut msg = refusal.message.as_bytes();
            if msg.len() > MAX_STRING_SIZE {
                msg = &msg[..MAX_STRING_SIZE];
            }
            encode_chunk_header(
                out,
                self.extended(),
                REPLY_FLAG_DONE,
                ChunkType::ERROR,
                cookie,
                offset,
                6 + msg.len() as u32,
            );
            out.extend_from_slice(&refusal.errno.0.to_be_bytes());
            out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            out.extend_from_slice(msg);
        } else {
            encode_simple_reply(out, refusal.errno, cookie);
        }
    }

    fn block_error(&self, what: &str, e: &block_core::BlockError) -> Refusal {
        refuse(NbdErrno::from_errno(e.errno()), format!("{what}: {e}"))
    }

    /// Runs one request and returns the encoded reply.
    async fn execute(&self, h: RequestHeader, op: Op) -> Reply {
        let mut out = Vec::new();
        let result = match op {
            Op::Read {
                offset,
                len,
                fua,
                df,
            } => {
                if fua {
                    // QEMU flushes before a read with FUA.
                    if let Err(e) = self.io.flush().await {
                        let r = self.block_error("flush failed", &e);
                        self.error_reply(&mut out, h.cookie, h.offset, &r);
                        return Reply::Bytes(out);
                    }
                }
                return self.read(h, offset, len, df).await;
            }
            Op::Write { offset, data, fua } => {
                let flags = WriteFlags {
                    fua: fua || self.export.writethrough,
                };
                self.io
                    .writev(offset, &SgList::from_owned(data), flags)
                    .await
                    .map_err(|e| self.block_error("writing to file failed", &e))
            }
            Op::Flush => self
                .io
                .flush()
                .await
                .map_err(|e| self.block_error("flush failed", &e)),
            Op::Trim { offset, len, fua } => {
                let mut r = self.io.discard(offset, len).await;
                if r.is_ok() && (fua || self.export.writethrough) {
                    r = self.io.flush().await;
                }
                r.map_err(|e| self.block_error("discard failed", &e))
            }
            // A hint: "The server MAY use this information to speed up further access";
            // block-core has no prefetch, so a checked request succeeds without effect.
            Op::Cache => Ok(()),
            Op::WriteZeroes {
                offset,
                len,
                mut flags,
            } => {
                flags.fua |= self.export.writethrough;
                self.io
                    .write_zeroes(offset, len, flags)
                    .await
                    .map_err(|e| self.block_error("writing to file failed", &e))
            }
            Op::BlockStatus {
                offset,
                len,
                req_one,
                contexts,
            } => return Reply::Bytes(self.block_status(h, offset, len, req_one, &contexts).await),
        };
        match result {
            Ok(()) => self.ok_reply(&mut out, h.cookie, h.offset),
            Err(r) => self.error_reply(&mut out, h.cookie, h.offset, &r),
        }
        Reply::Bytes(out)
    }

    /// `header`, then the `len` bytes at `offset`: spliced when the connection and the node
    /// can, else read into a buffer from the pool. An error replaces the whole reply.
    async fn data_reply(&self, h: RequestHeader, header: &[u8], offset: u64, len: u64) -> Reply {
        let failed = |e: block_core::BlockError| {
            let mut out = Vec::new();
            let r = self.block_error("reading from file failed", &e);
            self.error_reply(&mut out, h.cookie, h.offset, &r);
            Reply::Bytes(out)
        };
        match self.try_splice(header, offset, len).await {
            Ok(Some(reply)) => return reply,
            Ok(None) => {}
            Err(e) => return failed(e),
        }
        // <= 32 MiB, checked by validate().
        let mut out = self.bufs.take(header.len() + len as usize);
        out[..header.len()].copy_from_slice(header);
        let (out, r) = self.read_into(out, header.len(), offset).await;
        match r {
            Ok(()) => Reply::Bytes(out),
            Err(e) => {
                self.bufs.put(out);
                failed(e)
            }
        }
    }

    /// Reads the bytes at `offset` into `out[at..]` (straight into the vector's memory, which
    /// travels with the request as an [`SgList`]) and gives the vector back.
    async fn read_into(
        &self,
        out: Vec<u8>,
        at: usize,
        offset: u64,
    ) -> (Vec<u8>, Result<(), block_core::BlockError>) {
        let list = SgList::from_vec(out);
        let r = self
            .io
            .readv(offset, &list.slice(at, list.len() - at))
            .await;
        // Every clone is gone once the request is done; a copy otherwise (not expected).
        let out = list.into_vec().unwrap_or_else(|list| list.to_vec());
        (out, r)
    }

    /// The zero-copy read: `header`, then the `len` bytes at `offset` in pipes filled from
    /// the page cache (see [`crate::splice`]). `Ok(None)`: this read cannot take that path
    /// (no pipes on this connection, too short, a node that cannot splice, no descriptor
    /// left) and must be copied; pipes filled so far are dropped, not reused.
    async fn try_splice(
        &self,
        header: &[u8],
        offset: u64,
        len: u64,
    ) -> Result<Option<Reply>, block_core::BlockError> {
        let Some(pool) = &self.pipes else {
            return Ok(None);
        };
        if len < SPLICE_MIN || len > pool.max_bytes() as u64 || pool.declined() {
            return Ok(None);
        }
        let mut pipes = Vec::new();
        let mut done = 0u64;
        while done < len {
            // A pipe holds `capacity` bytes only from page boundaries: each of its slots
            // takes (part of) one page, so a range starting inside a page needs one slot more.
            let room =
                pool.capacity() - ((offset + done) % block_core::driver::page_size()) as usize;
            let n = (len - done).min(room as u64) as usize;
            let Some(pipe) = pool.take() else {
                return Ok(None);
            };
            if !self
                .io
                .splice_read(offset + done, n, pipe.write_end())
                .await?
            {
                // A node that cannot splice leaves the pipe empty: keep it, and do not ask
                // again on this connection. A partly filled pipe is dropped.
                if pipe.is_empty() {
                    pool.put(pipe);
                    if done == 0 {
                        pool.decline();
                    }
                }
                return Ok(None);
            }
            pipes.push((pipe, n));
            done += n as u64;
        }
        Ok(Some(Reply::Spliced {
            header: header.to_vec(),
            pipes,
        }))
    }

    async fn read(&self, h: RequestHeader, offset: u64, len: u64, df: bool) -> Reply {
        let mut out = Vec::new();
        if !self.structured() {
            // Simple reply: header then data; on error no payload ("If it chooses not to
            // [disconnect], it MUST NOT send any payload for this request").
            encode_simple_reply(&mut out, NbdErrno(0), h.cookie);
            return self.data_reply(h, &out, offset, len).await;
        }
        if len == 0 {
            self.ok_reply_chunk(&mut out, h);
            return Reply::Bytes(out);
        }
        // As QEMU's sparse reads: the node's block status over the range, one
        // `OFFSET_HOLE` chunk per extent that reads as zeroes and one `OFFSET_DATA` chunk per
        // other extent, at the node's own granularity (a qcow2 cluster, a file system
        // block). With DF "the server MUST send at most one content chunk": one data chunk.
        // A range that is all data is one data chunk too (spliced when it can be).
        let first = if df {
            None
        } else {
            match self.io.block_status(offset, len).await {
                Ok(e) => Some(e),
                Err(e) => {
                    let r = self.block_error("reading from file failed", &e);
                    self.error_reply(&mut out, h.cookie, h.offset, &r);
                    return Reply::Bytes(out);
                }
            }
        };
        let first = first.filter(|e| e.zero || e.len < len);
        let Some(first) = first else {
            encode_chunk_header(
                &mut out,
                self.extended(),
                REPLY_FLAG_DONE,
                ChunkType::OFFSET_DATA,
                h.cookie,
                h.offset,
                8 + len as u32,
            );
            out.extend_from_slice(&offset.to_be_bytes());
            return self.data_reply(h, &out, offset, len).await;
        };
        // Sparse read: one content chunk per extent; the reply is sent only once complete,
        // so an error replaces all content chunks with one error chunk.
        if let Err(e) = self.sparse_read(&mut out, h, offset, len, first).await {
            out.clear();
            let r = self.block_error("reading from file failed", &e);
            self.error_reply(&mut out, h.cookie, h.offset, &r);
        }
        Reply::Bytes(out)
    }

    fn ok_reply_chunk(&self, out: &mut Vec<u8>, h: RequestHeader) {
        encode_chunk_header(
            out,
            self.extended(),
            REPLY_FLAG_DONE,
            ChunkType::NONE,
            h.cookie,
            h.offset,
            0,
        );
    }

    async fn sparse_read(
        &self,
        out: &mut Vec<u8>,
        h: RequestHeader,
        offset: u64,
        len: u64,
        first: block_core::Extent,
    ) -> Result<(), block_core::BlockError> {
        let ext = self.extended();
        let mut pos = offset;
        let end = offset + len;
        let mut last_flags_at = 0;
        let mut next = Some(first);
        while pos < end {
            let extent = match next.take() {
                Some(e) => e,
                None => self.io.block_status(pos, end - pos).await?,
            };
            let n = extent.len.min(end - pos);
            last_flags_at = out.len() + 4;
            if extent.zero {
                encode_chunk_header(out, ext, 0, ChunkType::OFFSET_HOLE, h.cookie, h.offset, 12);
                out.extend_from_slice(&pos.to_be_bytes());
                out.extend_from_slice(&(n as u32).to_be_bytes());
            } else {
                encode_chunk_header(
                    out,
                    ext,
                    0,
                    ChunkType::OFFSET_DATA,
                    h.cookie,
                    h.offset,
                    8 + n as u32,
                );
                out.extend_from_slice(&pos.to_be_bytes());
                let start = out.len();
                out.resize(start + n as usize, 0);
                let (back, r) = self.read_into(std::mem::take(out), start, pos).await;
                *out = back;
                r?;
            }
            pos += n;
        }
        // The last chunk carries NBD_REPLY_FLAG_DONE ("the server MAY use a content or error
        // chunk as the final chunk by setting the NBD_REPLY_FLAG_DONE flag").
        out[last_flags_at..last_flags_at + 2].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        Ok(())
    }

    async fn block_status(
        &self,
        h: RequestHeader,
        offset: u64,
        len: u64,
        req_one: bool,
        contexts: &[MetaContext],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.io.node().is_active() {
            // QEMU's NBD server serves only reads from an inactive node (block status of the
            // node itself stays possible, for sparse reads).
            let r = self.block_error("block status failed", &block_core::BlockError::Inactive);
            self.error_reply(&mut out, h.cookie, h.offset, &r);
            return out;
        }
        let ext = self.extended();
        // Compact replies carry 32-bit extent lengths: never describe more than that.
        let len = if ext {
            len
        } else {
            len.min(u32::MAX as u64 & !511)
        };
        let max = if req_one { 1 } else { MAX_EXTENTS };
        for (i, ctx) in contexts.iter().enumerate() {
            let extents = match ctx {
                MetaContext::BaseAllocation => self.allocation_extents(offset, len, max).await,
                MetaContext::AllocationDepth => self.depth_extents(offset, len, max).await,
                MetaContext::DirtyBitmap { index, .. } => {
                    match self.export.bitmaps.get(*index as usize) {
                        Some(bitmap) => Ok(bitmap_extents(bitmap, offset, len, max)),
                        // Contexts are made from the export's own bitmaps: not reached.
                        None => Err(block_core::BlockError::Invalid(format!(
                            "no dirty bitmap {index}"
                        ))),
                    }
                }
            };
            let extents = match extents {
                Ok(e) => e,
                Err(e) => {
                    out.clear();
                    let r = self.block_error("block status failed", &e);
                    self.error_reply(&mut out, h.cookie, h.offset, &r);
                    return out;
                }
            };
            let done = if i + 1 == contexts.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            if ext {
                let payload = 8 + 16 * extents.len();
                encode_chunk_header(
                    &mut out,
                    true,
                    done,
                    ChunkType::BLOCK_STATUS_EXT,
                    h.cookie,
                    h.offset,
                    payload as u32,
                );
                out.extend_from_slice(&ctx.id().to_be_bytes());
                out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
                for (l, f) in &extents {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&u64::from(*f).to_be_bytes());
                }
            } else {
                let payload = 4 + 8 * extents.len();
                encode_chunk_header(
                    &mut out,
                    false,
                    done,
                    ChunkType::BLOCK_STATUS,
                    h.cookie,
                    h.offset,
                    payload as u32,
                );
                out.extend_from_slice(&ctx.id().to_be_bytes());
                for (l, f) in &extents {
                    out.extend_from_slice(&(*l as u32).to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
        out
    }

    /// `base:allocation` extents over `[offset, offset+len)`, consecutive equal statuses
    /// merged, at most `max` of them.
    async fn allocation_extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, block_core::BlockError> {
        let mut extents = Extents::new(max);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let e = self.io.block_status(pos, end - pos).await?;
            let n = e.len.min(end - pos);
            let mut flags = 0;
            if !e.data {
                flags |= state::HOLE;
            }
            if e.zero {
                flags |= state::ZERO;
            }
            if !extents.add(n, flags) {
                break;
            }
            pos += n;
        }
        Ok(extents.list)
    }

    /// `qemu:allocation-depth` extents: the depth of the backing chain layer that allocates
    /// each range (QEMU's `blockalloc_to_extents`: 0 unallocated, 1 this layer, 2+ backing).
    async fn depth_extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, block_core::BlockError> {
        let mut extents = Extents::new(max);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let e = self.io.block_status(pos, end - pos).await?;
            let n = e.len.min(end - pos);
            if !extents.add(n, e.depth) {
                break;
            }
            pos += n;
        }
        Ok(extents.list)
    }
}

/// `qemu:dirty-bitmap:NAME` extents over `[offset, offset+len)`: flag 1
/// (`NBD_STATE_DIRTY`) where the bitmap is dirty, as QEMU's `bitmap_to_extents` (which
/// covers the whole range unless the extent list is full).
fn bitmap_extents(bitmap: &DirtyBitmap, offset: u64, len: u64, max: usize) -> Vec<(u64, u32)> {
    let granularity = u64::from(bitmap.granularity()).max(1);
    let mut extents = Extents::new(max);
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let (n, dirty) = bitmap.extent(pos, end - pos);
        let flags = if dirty { state::DIRTY } else { 0 };
        // `extent` stops at the bitmap's end: past it (a node grown after the bitmap was
        // made, before the bitmap follows), the range is clean.
        let chunk_end = ((pos / granularity) + 1) * granularity;
        let full = chunk_end.min(end) - pos;
        let n = n.min(end - pos);
        if n == 0 || n < full {
            if n > 0 && !extents.add(n, flags) {
                break;
            }
            extents.add(end - pos - n, 0);
            break;
        }
        if !extents.add(n, flags) {
            break;
        }
        pos += n;
    }
    extents.list
}

/// Extents being collected for one context: consecutive extents with the same flags merged
/// (QEMU's `nbd_extent_array_add`), at most `max` of them.
struct Extents {
    list: Vec<(u64, u32)>,
    max: usize,
}

impl Extents {
    fn new(max: usize) -> Self {
        Extents {
            list: Vec::new(),
            max,
        }
    }

    /// Adds an extent; false (and nothing added) once the list is full.
    fn add(&mut self, len: u64, flags: u32) -> bool {
        if len == 0 {
            return true;
        }
        match self.list.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => {
                if self.list.len() == self.max {
                    return false;
                }
                self.list.push((len, flags));
            }
        }
        true
    }
}

/// A reply ready to send.
#[derive(Debug)]
pub(crate) enum Reply {
    /// All of it in one buffer.
    Bytes(Vec<u8>),
    /// A header, then data waiting in pipes (the zero-copy read, see [`crate::splice`]).
    Spliced {
        header: Vec<u8>,
        pipes: Vec<(Pipe, usize)>,
    },
}

/// Large reply buffers already sent, kept for the next reads: reused memory needs neither
/// zero-filling nor fresh pages from the kernel (with TLS, where nothing is spliced, that was
/// a tenth of the server's time in sequential reads).
#[derive(Debug, Default)]
struct BufPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// Buffers smaller than this are not kept.
    const MIN: usize = 64 * 1024;
    /// Nor larger ones: a few huge reads must not pin their memory for the connection's life.
    const MAX_SIZE: usize = 2 << 20;
    /// Buffers kept at most.
    const MAX: usize = 8;

    /// A buffer of `len` bytes whose contents are unspecified (the caller overwrites them).
    fn take(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest that fits.
            free.iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i)
                .map(|i| free.swap_remove(i))
        };
        match found {
            Some(mut b) => {
                // Only bytes beyond the buffer's old length get zeroed.
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                b
            }
            None => vec![0; len],
        }
    }

    /// Whether no buffer is kept.
    fn is_empty(&self) -> bool {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Gives every kept buffer back.
    fn clear(&self) {
        let free = std::mem::take(&mut *self.free.lock().unwrap_or_else(|e| e.into_inner()));
        drop(free);
    }

    /// Keeps `buf` for a later read if it is large and the pool is not full.
    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() < Self::MIN || buf.capacity() > Self::MAX_SIZE {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < Self::MAX {
            free.push(buf);
        }
    }
}

/// One thing in the queue: bytes, or a pipe holding this many bytes.
#[derive(Debug)]
enum Item {
    Bytes(Vec<u8>),
    Pipe(Pipe, usize),
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Bytes(b) => b.len(),
            Item::Pipe(_, n) => *n,
        }
    }
}

/// Replies waiting to be sent, in order: whole reply buffers, written with vectored writes so
/// that read data is never copied again after the driver filled it, and pipes, spliced into
/// the socket.
#[derive(Debug, Default)]
struct OutQueue {
    items: VecDeque<Item>,
    /// Bytes of the front item already written.
    front_done: usize,
    /// Bytes still to write.
    len: usize,
}

impl OutQueue {
    /// Most buffers handed to one `write_vectored`.
    const MAX_SLICES: usize = 64;

    fn push(&mut self, buf: Vec<u8>) {
        if buf.is_empty() {
            return;
        }
        self.len += buf.len();
        // Coalesce small replies (headers, short reads) to keep the slice count low.
        if let Some(Item::Bytes(last)) = self.items.back_mut() {
            if buf.len() <= 512 && last.len() < 64 * 1024 {
                last.extend_from_slice(&buf);
                return;
            }
        }
        self.items.push_back(Item::Bytes(buf));
    }

    fn push_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Bytes(b) => self.push(b),
            Reply::Spliced { header, pipes } => {
                self.push(header);
                for (pipe, n) in pipes {
                    self.len += n;
                    self.items.push_back(Item::Pipe(pipe, n));
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes at the front, up to the first pipe.
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(self.items.len().min(Self::MAX_SLICES));
        for (i, item) in self.items.iter().take(Self::MAX_SLICES).enumerate() {
            let Item::Bytes(b) = item else { break };
            let part = if i == 0 {
                &b[self.front_done..]
            } else {
                &b[..]
            };
            v.push(IoSlice::new(part));
        }
        v
    }

    /// The pipe at the front and how many bytes are left in it.
    fn front_pipe(&self) -> Option<(&Pipe, usize)> {
        match self.items.front() {
            Some(Item::Pipe(p, n)) => Some((p, n - self.front_done)),
            _ => None,
        }
    }

    /// Drops the first `n` bytes; pipes emptied go back to `pool`, large buffers to `bufs`.
    fn advance(&mut self, mut n: usize, pool: Option<&Pipes>, bufs: Option<&BufPool>) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.items.front() else {
                break;
            };
            let left = front.len() - self.front_done;
            if n >= left {
                n -= left;
                match self.items.pop_front() {
                    Some(Item::Pipe(pipe, _)) => {
                        if let Some(pool) = pool {
                            pool.put(pipe);
                        }
                    }
                    Some(Item::Bytes(buf)) => {
                        if let Some(bufs) = bufs {
                            bufs.put(buf);
                        }
                    }
                    None => {}
                }
                self.front_done = 0;
            } else {
                self.front_done += n;
                n = 0;
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes as much of the queue as the stream takes at once or, once the queue is empty,
/// flushes what the stream itself buffered (cancel-safe). Returns the bytes written, 0 for a
/// completed flush. The flush matters for TLS: rustls accepts plaintext into its own buffer
/// and sends it on a later write or flush, so without one the last replies could wait for a
/// request that the client sends only after it has them.
async fn write_some<W: AsyncWrite + Unpin>(
    wr: &mut W,
    out: &OutQueue,
    sink: Option<&SpliceSink>,
) -> io::Result<usize> {
    if out.is_empty() {
        return wr.flush().await.map(|()| 0);
    }
    if let Some((pipe, left)) = out.front_pipe() {
        // Pipes are queued only on connections that have a sink.
        let Some(sink) = sink else {
            return Err(io::Error::other("no socket to splice into"));
        };
        return sink.splice_from(pipe, left).await;
    }
    let slices = out.slices();
    match wr.write_vectored(&slices).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// Serves the transmission phase of one connection until the client disconnects, the export
/// is closed or the server stops. In-flight requests always complete and their replies are
/// sent before the connection closes ("the server SHOULD wait for inflight requests to be
/// serviced prior to initiating a hard disconnect").
pub(crate) async fn run<S>(
    stream: S,
    session: Session,
    stop: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Rebind + Unpin,
{
    let export = Arc::clone(&session.export);
    // Zero-copy reads need the plaintext socket under the stream and pipes.
    let sink = stream.splice_fd().and_then(|fd| SpliceSink::new(fd).ok());
    let pipes = sink.as_ref().and_then(|_| Pipes::new());
    let conn = Conn {
        pipes,
        bufs: BufPool::default(),
        io: export.attachment.clone(),
        params: Params {
            mode: session.mode,
            size: session.size,
            writable: export.writable(),
            alignment: export.alignment(),
            contexts: session.contexts,
        },
        export,
    };
    let closed = conn.export.closed_receiver();
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = RequestReader {
        rd,
        buf: BytesMut::with_capacity(READ_BUF),
        extended: conn.extended(),
    };
    let mut inflight = FuturesUnordered::new();
    let mut inflight_bytes = 0usize;
    let mut out = OutQueue::default();
    let mut reading = !*stop.borrow() && !*closed.borrow();
    // One future for the whole connection (not one per loop turn): resolves when the server
    // stops or the export is closed (or either sender is gone).
    // Polled only when it was woken (`Gated`): the loop turns at every request.
    let mut shutdown = Gated::new(async move {
        let (mut stop, mut closed) = (stop, closed);
        tokio::select! {
            _ = stop.wait_for(|s| *s) => {}
            _ = closed.wait_for(|c| *c) => {}
        }
    });
    let mut outcome: Result<(), ConnError> = Ok(());
    let mut final_flush: Option<tokio::time::Instant> = None;
    // Written since the last flush.
    let mut unflushed = false;
    // Armed while the connection is idle and holds buffers it could give back.
    let idle_release = tokio::time::sleep(IDLE_RELEASE);
    tokio::pin!(idle_release);
    let mut release_armed = false;
    loop {
        if !reading && inflight.is_empty() {
            if out.is_empty() {
                break;
            }
            final_flush.get_or_insert_with(|| tokio::time::Instant::now() + FINAL_FLUSH_GRACE);
        }
        let idle = inflight.is_empty() && out.is_empty() && !unflushed;
        if !idle {
            release_armed = false;
        } else if !release_armed && (!conn.bufs.is_empty() || reader.oversized()) {
            idle_release
                .as_mut()
                .reset(tokio::time::Instant::now() + IDLE_RELEASE);
            release_armed = true;
        }
        let can_read = reading
            && inflight.len() < MAX_IN_FLIGHT
            && inflight_bytes < IN_FLIGHT_BYTES
            && out.len < OUT_HIGH_WATER;
        tokio::select! {
            biased;
            _ = &mut shutdown, if reading => reading = false,
            Some((reply, cost)) = inflight.next(), if !inflight.is_empty() => {
                inflight_bytes -= cost;
                out.push_reply(reply);
            }
            written = write_some(&mut wr, &out, sink.as_ref()), if !out.is_empty() || unflushed => {
                match written {
                    Ok(0) => unflushed = false,
                    Ok(n) => {
                        out.advance(n, conn.pipes.as_ref(), Some(&conn.bufs));
                        unflushed = true;
                    }
                    Err(e) => return Err(ConnError::Io(e)),
                }
            }
            _ = sleep_until_some(final_flush), if final_flush.is_some() => {
                return Err(ConnError::Stalled);
            }
            _ = &mut idle_release, if release_armed => {
                release_armed = false;
                conn.bufs.clear();
                reader.shrink();
            }
            incoming = reader.next(), if can_read => {
                match incoming {
                    Ok(Incoming::Request { header, payload }) => {
                        match validate(&conn.params, &header, payload) {
                            Ok(op) => {
                                let cost = match &op {
                                    Op::Read { len, .. } => *len as usize,
                                    Op::Write { data, .. } => data.len(),
                                    _ => 0,
                                };
                                inflight_bytes += cost;
                                let conn = &conn;
                                inflight.push(async move {
                                    (conn.execute(header, op).await, cost)
                                });
                            }
                            Err(refusal) => {
                                let mut reply = Vec::new();
                                conn.error_reply(&mut reply, header.cookie, header.offset, &refusal);
                                out.push(reply);
                            }
                        }
                    }
                    Ok(Incoming::Oversized { header, len }) => {
                        let refusal = refuse(
                            NbdErrno::EINVAL,
                            format!("len ({len}) is larger than max len ({MAX_PAYLOAD})"),
                        );
                        let mut reply = Vec::new();
                        conn.error_reply(&mut reply, header.cookie, header.offset, &refusal);
                        out.push(reply);
                        reading = false;
                        outcome = Err(ConnError::PayloadTooLarge(len));
                    }
                    Ok(Incoming::Disconnect) | Ok(Incoming::Eof) => reading = false,
                    Err(e) => {
                        reading = false;
                        outcome = Err(e);
                    }
                }
            }
        }
    }
    wr.flush().await.map_err(ConnError::Io)?;
    let _ = wr.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Command;

    #[test]
    fn bitmap_extents_merge_cap_and_stop_at_the_bitmap_end() {
        let b = DirtyBitmap::new("b", 1 << 20, 4096, false);
        b.set_range(0, 8192);
        b.set_range(16384, 4096);
        assert_eq!(
            bitmap_extents(&b, 0, 1 << 20, MAX_EXTENTS),
            vec![
                (8192, state::DIRTY),
                (8192, 0),
                (4096, state::DIRTY),
                ((1 << 20) - 20480, 0)
            ]
        );
        // Unaligned start, and the cap (REQ_ONE).
        assert_eq!(
            bitmap_extents(&b, 100, 1 << 20, 1),
            vec![(8192 - 100, state::DIRTY)]
        );
        assert_eq!(bitmap_extents(&b, 100, 50, 1), vec![(50, state::DIRTY)]);
        // Past the bitmap's end (a node grown before its bitmap): clean, in one extent.
        assert_eq!(bitmap_extents(&b, 1 << 20, 1 << 30, 8), vec![(1 << 30, 0)]);
        let odd = DirtyBitmap::new("odd", 6000, 4096, false);
        odd.set_range(4096, 1904);
        assert_eq!(
            bitmap_extents(&odd, 0, 1 << 20, 8),
            vec![(4096, 0), (1904, state::DIRTY), ((1 << 20) - 6000, 0)]
        );
    }

    #[test]
    fn out_queue_partial_writes() {
        let mut q = OutQueue::default();
        q.push(vec![1; 1000]);
        q.push(vec![2; 10]); // coalesced into the first
        q.push(vec![3; 2000]);
        q.push(Vec::new());
        assert_eq!(q.len, 3010);
        assert_eq!(q.slices().len(), 2);
        q.advance(1005, None, None);
        let s = q.slices();
        assert_eq!(s[0].len(), 5);
        assert_eq!(s[0][0], 2);
        assert_eq!(s[1].len(), 2000);
        drop(s);
        q.advance(5 + 1999, None, None);
        assert_eq!(q.len, 1);
        assert_eq!(q.slices()[0][..], [3]);
        q.advance(1, None, None);
        assert!(q.is_empty());
        assert!(q.slices().is_empty());
    }

    #[test]
    fn reply_buffers_are_reused_without_zeroing() {
        let bufs = BufPool::default();
        let mut q = OutQueue::default();
        let first = bufs.take(256 * 1024);
        let at = first.as_ptr();
        q.push(first);
        q.push(vec![1; 100]); // small: coalesced elsewhere, not pooled
        q.advance(256 * 1024 + 100, None, Some(&bufs));
        let again = bufs.take(200 * 1024);
        assert_eq!(again.as_ptr(), at, "the sent buffer came back");
        assert_eq!(again.len(), 200 * 1024);
        // Larger than any pooled buffer: a new one.
        let bigger = bufs.take(512 * 1024);
        assert_ne!(bigger.as_ptr(), at);
        // An idle connection gives them back.
        bufs.put(again);
        bufs.put(bigger);
        assert!(!bufs.is_empty());
        bufs.clear();
        assert!(bufs.is_empty());
        // Small and huge buffers are not kept.
        bufs.put(vec![0; 100]);
        bufs.put(vec![0; 4 << 20]);
        assert!(bufs.free.lock().unwrap().is_empty());
        // The smallest buffer that fits is taken.
        bufs.put(vec![0; 1 << 20]);
        bufs.put(vec![0; 128 * 1024]);
        assert_eq!(bufs.take(100 * 1024).capacity(), 128 * 1024);
    }

    #[test]
    fn out_queue_keeps_pipes_in_order_and_returns_them_drained() {
        let pool = Pipes::new().expect("pipes");
        let (a, b) = (pool.take().expect("pipe"), pool.take().expect("pipe"));
        let mut q = OutQueue::default();
        q.push(vec![1; 20]);
        q.push_reply(Reply::Spliced {
            header: vec![2; 28],
            pipes: vec![(a, 1000), (b, 24)],
        });
        q.push(vec![3; 16]); // after a pipe: not coalesced across it
        assert_eq!(q.len, 20 + 28 + 1000 + 24 + 16);
        // The bytes before the first pipe, then the pipe.
        assert_eq!(q.slices().iter().map(|s| s.len()).sum::<usize>(), 48);
        assert!(q.front_pipe().is_none());
        q.advance(48, Some(&pool), None);
        assert!(q.slices().is_empty());
        assert_eq!(q.front_pipe().map(|(_, n)| n), Some(1000));
        q.advance(600, Some(&pool), None);
        assert_eq!(q.front_pipe().map(|(_, n)| n), Some(400));
        assert_eq!(pool.idle(), 0);
        q.advance(400, Some(&pool), None);
        assert_eq!(pool.idle(), 1);
        q.advance(24, Some(&pool), None);
        assert_eq!(pool.idle(), 2);
        assert_eq!(q.slices()[0].len(), 16);
        q.advance(16, Some(&pool), None);
        assert!(q.is_empty());
    }

    fn params(mode: Mode) -> Params {
        Params {
            mode,
            size: 1 << 20,
            writable: true,
            alignment: 1,
            contexts: vec![MetaContext::BaseAllocation],
        }
    }

    fn hdr(command: Command, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    fn errno(r: Result<Op, Refusal>) -> NbdErrno {
        r.expect_err("request should be refused").errno
    }

    #[test]
    fn validation_errors() {
        let p = params(Mode::Structured);
        let size = p.size;
        assert_eq!(
            errno(validate(&p, &hdr(Command(42), 0, 0, 0), None)),
            NbdErrno::EINVAL
        );
        assert_eq!(
            errno(validate(&p, &hdr(Command::READ, 1 << 9, 0, 512), None)),
            NbdErrno::EINVAL
        );
        assert_eq!(
            errno(validate(&p, &hdr(Command::READ, 0, size - 256, 512), None)),
            NbdErrno::EINVAL
        );
        let payload = BytesMut::from(&[0u8; 512][..]);
        assert_eq!(
            errno(validate(
                &p,
                &hdr(Command::WRITE, 0, size - 256, 512),
                Some(payload)
            )),
            NbdErrno::ENOSPC
        );
        assert_eq!(
            errno(validate(&p, &hdr(Command::WRITE_ZEROES, 0, size, 1), None)),
            NbdErrno::ENOSPC
        );
        assert_eq!(
            errno(validate(&p, &hdr(Command::TRIM, 0, size, 1), None)),
            NbdErrno::EINVAL
        );
        // Too long: NBD_EOVERFLOW only with DF, as the spec reserves it.
        assert_eq!(
            errno(validate(&p, &hdr(Command::READ, 0, 0, 33 << 20), None)),
            NbdErrno::EINVAL
        );
        assert_eq!(
            errno(validate(
                &p,
                &hdr(Command::READ, cmd_flags::DF, 0, 33 << 20),
                None
            )),
            NbdErrno::EOVERFLOW
        );
        let mut ext = params(Mode::Extended);
        ext.size = 2 << 40;
        assert_eq!(
            errno(validate(&ext, &hdr(Command::READ, 0, 0, 1 << 40), None)),
            NbdErrno::EINVAL
        );
        assert_eq!(
            errno(validate(
                &params(Mode::Simple),
                &hdr(Command::READ, 0, 0, 33 << 20),
                None
            )),
            NbdErrno::EINVAL
        );
        // DF is only valid once structured replies are negotiated.
        assert!(validate(&p, &hdr(Command::READ, cmd_flags::DF, 0, 512), None).is_ok());
        assert_eq!(
            errno(validate(
                &params(Mode::Simple),
                &hdr(Command::READ, cmd_flags::DF, 0, 512),
                None
            )),
            NbdErrno::EINVAL
        );
        // FUA is accepted on every command.
        assert!(validate(&p, &hdr(Command::FLUSH, cmd_flags::FUA, 0, 0), None).is_ok());
        assert_eq!(
            errno(validate(&p, &hdr(Command::BLOCK_STATUS, 0, 0, 0), None)),
            NbdErrno::EINVAL
        );
        let mut no_ctx = params(Mode::Structured);
        no_ctx.contexts.clear();
        assert_eq!(
            errno(validate(
                &no_ctx,
                &hdr(Command::BLOCK_STATUS, 0, 0, 512),
                None
            )),
            NbdErrno::EINVAL
        );
        let mut ro = params(Mode::Structured);
        ro.writable = false;
        assert_eq!(
            errno(validate(&ro, &hdr(Command::TRIM, 0, 0, 512), None)),
            NbdErrno::EPERM
        );
        let mut aligned = params(Mode::Structured);
        aligned.alignment = 512;
        assert_eq!(
            errno(validate(&aligned, &hdr(Command::READ, 0, 1, 512), None)),
            NbdErrno::EINVAL
        );
        assert!(validate(&aligned, &hdr(Command::READ, 0, 512, 512), None).is_ok());
    }

    #[test]
    fn block_status_payload_form() {
        let p = params(Mode::Extended);
        let mut data = Vec::new();
        data.extend_from_slice(&4096u64.to_be_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        let h = hdr(
            Command::BLOCK_STATUS,
            cmd_flags::PAYLOAD_LEN,
            0,
            data.len() as u64,
        );
        match validate(&p, &h, Some(BytesMut::from(&data[..]))) {
            Ok(Op::BlockStatus { len, contexts, .. }) => {
                assert_eq!(len, 4096);
                assert_eq!(contexts, vec![MetaContext::BaseAllocation]);
            }
            other => panic!("unexpected {other:?}"),
        }
        data.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            errno(validate(&p, &h, Some(BytesMut::from(&data[..])))),
            NbdErrno::EINVAL
        );
        // Without extended headers the flag is invalid.
        assert_eq!(
            errno(validate(&params(Mode::Structured), &h, None)),
            NbdErrno::EINVAL
        );
    }

    proptest::proptest! {
        /// Any header, with or without a payload, in any mode: an operation or a refusal,
        /// never a panic; accepted operations lie within the export.
        #[test]
        fn validate_never_panics(
            flags: u16, cmd in 0u16..12, offset: u64, length: u64,
            payload in proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)),
            mode in 0usize..4, writable: bool, alignment in proptest::sample::select(vec![1u32, 512, 4096]),
        ) {
            let mode = [Mode::ExportName, Mode::Simple, Mode::Structured, Mode::Extended][mode];
            let mut p = params(mode);
            p.writable = writable;
            p.alignment = alignment;
            let h = hdr(Command(cmd), flags, offset, length);
            match validate(&p, &h, payload.map(|v| BytesMut::from(&v[..]))) {
                Ok(Op::Read { offset, len, .. })
                | Ok(Op::Trim { offset, len, .. })
                | Ok(Op::WriteZeroes { offset, len, .. })
                | Ok(Op::BlockStatus { offset, len, .. }) => {
                    proptest::prop_assert!(offset.checked_add(len).is_some_and(|e| e <= p.size));
                }
                Ok(Op::Write { offset, data, .. }) => {
                    proptest::prop_assert!(writable);
                    proptest::prop_assert!(offset + data.len() as u64 <= p.size);
                }
                Ok(Op::Flush) | Ok(Op::Cache) | Err(_) => {}
            }
        }
    }
}
