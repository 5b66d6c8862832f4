//! One connection in the transmission phase: many requests in flight, replies matched by
//! cookie.
//!
//! A writer task sends the encoded requests in the order they were queued (several per
//! `write` when they queue up), so that a request is never torn by a cancelled caller; a
//! reader task reads replies and puts read data straight into the request's buffer. When
//! either side fails, every request in flight ends as [`Outcome::Lost`] and the driver
//! decides what follows (reconnect, or fail).

use super::handshake::{ExportInfo, Mode};
use super::stream::Stream;
use crate::buffer::SgList;
use crate::error::BlockError;
use nbd_proto::{
    cmd_flags, state, ChunkType, Command, NbdErrno, ReplyHeader, RequestHeader,
    EXTENDED_REPLY_HEADER, REPLY_FLAG_DONE,
};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Requests in flight on one connection (QEMU's client has 16; servers take many more).
pub const MAX_IN_FLIGHT: usize = 64;

/// The largest chunk payload taken other than read data: an error with its message, or a
/// block status reply (one extent asked for, a few tolerated).
const MAX_SMALL_PAYLOAD: u64 = 64 * 1024;

/// A request, as the driver asks for it.
#[derive(Debug, Clone)]
pub enum Op {
    /// `NBD_CMD_READ` into the list.
    Read {
        /// Offset.
        offset: u64,
        /// Where the data goes.
        buf: SgList,
    },
    /// `NBD_CMD_WRITE` from the list.
    Write {
        /// Offset.
        offset: u64,
        /// The data.
        buf: SgList,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `NBD_CMD_WRITE_ZEROES` with its flags.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Command flags (`FUA`, `NO_HOLE`, `FAST_ZERO`).
        flags: u16,
    },
    /// `NBD_CMD_BLOCK_STATUS` with `REQ_ONE`.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `NBD_CMD_DISC` (no reply).
    Disconnect,
}

/// How a request ended on this connection.
#[derive(Debug)]
pub enum Outcome {
    /// The server replied: success (with the extent, for block status) or its error.
    Done(Result<Option<(u64, u32)>, BlockError>),
    /// The connection went away before the reply was complete.
    Lost,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Still working.
    Alive,
    /// The socket failed or closed: a reconnect may help.
    Io,
    /// The server broke the protocol: QEMU gives up on such a server.
    Protocol,
    /// We closed it.
    Closed,
}

struct Pending {
    command: Command,
    offset: u64,
    len: u64,
    buf: Option<SgList>,
    error: Option<BlockError>,
    extent: Option<(u64, u32)>,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Table {
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
}

/// Called once when the connection ends.
pub type OnExit = Box<dyn Fn(Exit) + Send + Sync>;

/// A connection in the transmission phase.
pub struct Conn {
    info: ExportInfo,
    table: Mutex<Table>,
    exit: AtomicU8,
    slots: Semaphore,
    tx: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    on_exit: OnExit,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("info", &self.info)
            .field("exit", &self.exit())
            .finish_non_exhaustive()
    }
}

fn exit_code(e: Exit) -> u8 {
    match e {
        Exit::Alive => 0,
        Exit::Io => 1,
        Exit::Protocol => 2,
        Exit::Closed => 3,
    }
}

/// A protocol violation by the server: the connection cannot go on.
#[derive(Debug)]
struct Violation(String);

enum ReadError {
    Io(io::Error),
    Protocol(Violation),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<Violation> for ReadError {
    fn from(v: Violation) -> Self {
        ReadError::Protocol(v)
    }
}

fn violation<T>(m: impl Into<String>) -> Result<T, ReadError> {
    Err(ReadError::Protocol(Violation(m.into())))
}

/// An error the server replied with, as a block-layer error of the same errno.
fn server_error(errno: NbdErrno, message: Option<String>) -> BlockError {
    let code = match errno {
        NbdErrno::EPERM => libc::EPERM,
        NbdErrno::EIO => libc::EIO,
        NbdErrno::ENOMEM => libc::ENOMEM,
        NbdErrno::EINVAL => libc::EINVAL,
        NbdErrno::ENOSPC => libc::ENOSPC,
        NbdErrno::EOVERFLOW => libc::EOVERFLOW,
        NbdErrno::ENOTSUP => libc::ENOTSUP,
        NbdErrno::ESHUTDOWN => libc::ESHUTDOWN,
        // "a client SHOULD treat an unexpected value as if it were NBD_EINVAL"
        _ => libc::EINVAL,
    };
    if code == libc::ENOSPC {
        return BlockError::NoSpace;
    }
    let context = match message {
        Some(m) if !m.is_empty() => format!("NBD server: {m}"),
        _ => "NBD server".to_string(),
    };
    BlockError::io(context, io::Error::from_raw_os_error(code))
}

impl Conn {
    /// Starts the transmission phase on `stream` (after the handshake agreed `info`), with
    /// its tasks on the current runtime. `on_exit` is called once when it ends.
    pub fn start(
        stream: Stream,
        info: ExportInfo,
        runtime: &tokio::runtime::Handle,
        on_exit: OnExit,
    ) -> Arc<Conn> {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            info,
            table: Mutex::new(Table {
                next_cookie: 1,
                ..Table::default()
            }),
            exit: AtomicU8::new(0),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            tx: Mutex::new(Some(tx)),
            tasks: Mutex::new(Vec::new()),
            on_exit,
        });
        let reader = runtime.spawn(read_loop(Arc::downgrade(&conn), rd));
        let writer = runtime.spawn(write_loop(Arc::downgrade(&conn), wr, rx));
        conn.lock_tasks()
            .extend([reader.abort_handle(), writer.abort_handle()]);
        conn
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the connection ended, and why.
    pub fn exit(&self) -> Exit {
        match self.exit.load(Ordering::Acquire) {
            0 => Exit::Alive,
            1 => Exit::Io,
            2 => Exit::Protocol,
            _ => Exit::Closed,
        }
    }

    /// Ends the connection (the first reason given wins): every request in flight is
    /// [`Outcome::Lost`], the tasks stop, the socket closes.
    pub fn end(&self, why: Exit) {
        if self
            .exit
            .compare_exchange(0, exit_code(why), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        // No more requests go out.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let pending = std::mem::take(&mut self.lock_table().pending);
        for (_, p) in pending {
            let _ = p.tx.send(Outcome::Lost);
        }
        if why != Exit::Closed {
            for t in self.lock_tasks().drain(..) {
                t.abort();
            }
        }
        (self.on_exit)(why);
    }

    /// Sends `op` and waits for its reply.
    pub async fn submit(&self, op: &Op) -> Outcome {
        let Ok(_slot) = self.slots.acquire().await else {
            return Outcome::Lost;
        };
        let extended = self.info.mode == Mode::Extended;
        let (command, offset, len, flags, payload, buf) = match op {
            Op::Read { offset, buf } => {
                (Command::READ, *offset, buf.len() as u64, 0, None, Some(buf))
            }
            Op::Write { offset, buf, fua } => (
                Command::WRITE,
                *offset,
                buf.len() as u64,
                if *fua { cmd_flags::FUA } else { 0 },
                Some(buf),
                None,
            ),
            Op::Flush => (Command::FLUSH, 0, 0, 0, None, None),
            Op::Trim { offset, len } => (Command::TRIM, *offset, *len, 0, None, None),
            Op::WriteZeroes { offset, len, flags } => {
                (Command::WRITE_ZEROES, *offset, *len, *flags, None, None)
            }
            Op::BlockStatus { offset, len } => (
                Command::BLOCK_STATUS,
                *offset,
                *len,
                cmd_flags::REQ_ONE,
                None,
                None,
            ),
            Op::Disconnect => (Command::DISC, 0, 0, 0, None, None),
        };
        let (tx, rx) = oneshot::channel();
        let cookie = {
            let mut t = self.lock_table();
            if self.exit() != Exit::Alive {
                return Outcome::Lost;
            }
            let cookie = t.next_cookie;
            t.next_cookie = t.next_cookie.wrapping_add(1).max(1);
            if command != Command::DISC {
                t.pending.insert(
                    cookie,
                    Pending {
                        command,
                        offset,
                        len,
                        buf: buf.cloned(),
                        error: None,
                        extent: None,
                        tx,
                    },
                );
            }
            cookie
        };
        let header_len = if extended { 32 } else { 28 };
        let mut out = Vec::with_capacity(header_len + payload.map_or(0, |p| p.len()));
        RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length: len,
        }
        .encode(extended, &mut out);
        if let Some(p) = payload {
            let at = out.len();
            out.resize(at + p.len(), 0);
            p.copy_to_slice(0, &mut out[at..]);
        }
        let sent = match &*self.tx.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.send(out).is_ok(),
            None => false,
        };
        if command == Command::DISC {
            return Outcome::Done(Ok(None));
        }
        if !sent {
            self.lock_table().pending.remove(&cookie);
            return Outcome::Lost;
        }
        rx.await.unwrap_or(Outcome::Lost)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection once it is written.
    pub async fn disconnect(&self) {
        if self.exit() == Exit::Alive {
            let _ = self.submit(&Op::Disconnect).await;
            // Dropping the sender ends the writer after it wrote what is queued.
            self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        self.end(Exit::Closed);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
    }
}

async fn write_loop(
    conn: Weak<Conn>,
    mut wr: WriteHalf<Stream>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut batch = Vec::new();
    let result: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            // Requests that queued up meanwhile go out in the same write.
            if rx.is_empty() || first.len() >= 64 * 1024 {
                wr.write_all(&first).await?;
            } else {
                batch.clear();
                batch.extend_from_slice(&first);
                while batch.len() < 256 * 1024 {
                    match rx.try_recv() {
                        Ok(next) => batch.extend_from_slice(&next),
                        Err(_) => break,
                    }
                }
                wr.write_all(&batch).await?;
            }
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    }
    .await;
    if let (Err(e), Some(conn)) = (result, conn.upgrade()) {
        tracing::debug!("NBD client: sending failed: {e}");
        conn.end(Exit::Io);
    }
}

async fn read_loop(conn: Weak<Conn>, rd: ReadHalf<Stream>) {
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let mut scratch = Vec::new();
    let result = loop {
        let r = read_reply(&conn, &mut rd, &mut scratch).await;
        if let Err(e) = r {
            break e;
        }
    };
    let Some(conn) = conn.upgrade() else { return };
    match result {
        ReadError::Io(e) => {
            if conn.exit() == Exit::Alive {
                tracing::debug!("NBD client: connection lost: {e}");
            }
            conn.end(Exit::Io)
        }
        ReadError::Protocol(Violation(m)) => {
            tracing::warn!(target: "operator", "NBD server broke the protocol: {m}");
            conn.end(Exit::Protocol)
        }
    }
}

type Reader = BufReader<ReadHalf<Stream>>;

/// What a chunk is for: the parts of the pending request the reader needs.
struct Target {
    command: Command,
    offset: u64,
    len: u64,
    buf: Option<SgList>,
}

fn target(conn: &Conn, cookie: u64) -> Result<Target, ReadError> {
    let t = conn.lock_table();
    match t.pending.get(&cookie) {
        Some(p) => Ok(Target {
            command: p.command,
            offset: p.offset,
            len: p.len,
            buf: p.buf.clone(),
        }),
        None => violation(format!("reply with unexpected cookie {cookie}")),
    }
}

/// Applies `f` to the pending request, then completes it if `done`.
fn update(conn: &Conn, cookie: u64, done: bool, f: impl FnOnce(&mut Pending)) {
    let mut t = conn.lock_table();
    if let Some(p) = t.pending.get_mut(&cookie) {
        f(p);
    }
    if done {
        if let Some(p) = t.pending.remove(&cookie) {
            drop(t);
            let result = match p.error {
                Some(e) => Err(e),
                None => Ok(p.extent),
            };
            let _ = p.tx.send(Outcome::Done(result));
        }
    }
}

async fn read_reply(
    conn: &Weak<Conn>,
    rd: &mut Reader,
    scratch: &mut Vec<u8>,
) -> Result<(), ReadError> {
    let mut head = [0u8; EXTENDED_REPLY_HEADER];
    rd.read_exact(&mut head[..4]).await?;
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let Some(size) = ReplyHeader::size(magic) else {
        return violation(format!("invalid reply magic {magic:#x}"));
    };
    rd.read_exact(&mut head[4..size]).await?;
    let header = ReplyHeader::decode(&head[..size]).map_err(|e| Violation(e.to_string()))?;
    let Some(conn) = conn.upgrade() else {
        return Err(ReadError::Io(io::ErrorKind::ConnectionAborted.into()));
    };
    let mode = conn.info.mode;
    let cookie = header.cookie();
    let target = target(&conn, cookie)?;
    match header {
        ReplyHeader::Simple { error, .. } => {
            if mode == Mode::Extended {
                return violation("simple reply with extended headers");
            }
            if error.0 != 0 {
                update(&conn, cookie, true, |p| {
                    p.error = Some(server_error(error, None))
                });
                return Ok(());
            }
            if target.command == Command::READ {
                if mode >= Mode::Structured {
                    return violation("simple reply to a structured read");
                }
                let buf = target.buf.expect("reads have a buffer");
                read_into(rd, scratch, &buf, 0, buf.len()).await?;
            }
            update(&conn, cookie, true, |_| {});
        }
        ReplyHeader::Chunk {
            flags, ty, length, ..
        } => {
            if mode == Mode::Simple {
                return violation("structured reply without structured replies");
            }
            let done = flags & REPLY_FLAG_DONE != 0;
            match ty {
                ChunkType::NONE => {
                    if !done || length != 0 {
                        return violation("NBD_REPLY_TYPE_NONE chunk not alone and last");
                    }
                    update(&conn, cookie, true, |_| {});
                }
                ChunkType::OFFSET_DATA => {
                    let Some(buf) = target.buf.filter(|_| target.command == Command::READ) else {
                        return violation("unexpected NBD_REPLY_TYPE_OFFSET_DATA chunk");
                    };
                    if length <= 8 || length - 8 > target.len {
                        return violation("invalid payload for NBD_REPLY_TYPE_OFFSET_DATA");
                    }
                    let mut at = [0u8; 8];
                    rd.read_exact(&mut at).await?;
                    let at = u64::from_be_bytes(at);
                    let n = length - 8;
                    if at < target.offset || at - target.offset > target.len - n {
                        return violation("server sent chunk exceeding requested region");
                    }
                    read_into(rd, scratch, &buf, (at - target.offset) as usize, n as usize).await?;
                    update(&conn, cookie, done, |_| {});
                }
                ChunkType::OFFSET_HOLE => {
                    let Some(buf) = target.buf.filter(|_| target.command == Command::READ) else {
                        return violation("unexpected NBD_REPLY_TYPE_OFFSET_HOLE chunk");
                    };
                    if length != 12 {
                        return violation("invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE");
                    }
                    let mut p = [0u8; 12];
                    rd.read_exact(&mut p).await?;
                    let at = u64::from_be_bytes(p[0..8].try_into().expect("8 bytes"));
                    let n = u64::from(u32::from_be_bytes(p[8..12].try_into().expect("4 bytes")));
                    if n == 0
                        || at < target.offset
                        || n > target.len
                        || at - target.offset > target.len - n
                    {
                        return violation("server sent hole exceeding requested region");
                    }
                    buf.fill_zero((at - target.offset) as usize, n as usize);
                    update(&conn, cookie, done, |_| {});
                }
                ChunkType::BLOCK_STATUS | ChunkType::BLOCK_STATUS_EXT => {
                    if target.command != Command::BLOCK_STATUS {
                        return violation("unexpected block status chunk");
                    }
                    let payload = read_small(rd, scratch, length).await?;
                    let extent = parse_status(
                        payload,
                        ty == ChunkType::BLOCK_STATUS_EXT,
                        &conn.info,
                        target.len,
                    )?;
                    update(&conn, cookie, done, |p| {
                        if p.extent.is_none() {
                            p.extent = Some(extent);
                        }
                    });
                }
                ty if ty.0 & (1 << 15) != 0 => {
                    let payload = read_small(rd, scratch, length).await?;
                    if payload.len() < 6 {
                        return violation("invalid payload for structured error");
                    }
                    let errno = NbdErrno(u32::from_be_bytes(
                        payload[0..4].try_into().expect("4 bytes"),
                    ));
                    if errno.0 == 0 {
                        return violation("structured error chunk with error = 0");
                    }
                    let msg_len = usize::from(u16::from_be_bytes([payload[4], payload[5]]));
                    if msg_len > payload.len() - 6 {
                        return violation("structured error chunk with incorrect message size");
                    }
                    let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
                    update(&conn, cookie, done, |p| {
                        if p.error.is_none() {
                            p.error = Some(server_error(errno, Some(message)));
                        }
                    });
                }
                ty => {
                    return violation(format!("unexpected reply type {ty} for {}", target.command))
                }
            }
        }
    }
    Ok(())
}

/// Reads `n` bytes of data from the socket into `buf` at `at` (through `scratch`: the list
/// may be foreign memory, which is never made a Rust slice).
async fn read_into(
    rd: &mut Reader,
    scratch: &mut Vec<u8>,
    buf: &SgList,
    at: usize,
    n: usize,
) -> io::Result<()> {
    const STEP: usize = 1 << 20;
    let mut done = 0;
    while done < n {
        let k = (n - done).min(STEP);
        scratch.resize(k, 0);
        rd.read_exact(&mut scratch[..k]).await?;
        buf.copy_from_slice(at + done, &scratch[..k]);
        done += k;
    }
    Ok(())
}

async fn read_small<'a>(
    rd: &mut Reader,
    scratch: &'a mut Vec<u8>,
    length: u64,
) -> Result<&'a [u8], ReadError> {
    if length > MAX_SMALL_PAYLOAD {
        return violation(format!("payload too large ({length} bytes)"));
    }
    scratch.resize(length as usize, 0);
    rd.read_exact(scratch).await?;
    Ok(&scratch[..])
}

/// The first extent of a block status chunk, clamped to the request (as QEMU does).
fn parse_status(
    payload: &[u8],
    wide: bool,
    info: &ExportInfo,
    requested: u64,
) -> Result<(u64, u32), ReadError> {
    let (need, id) = if wide { (8 + 16, 4) } else { (4 + 8, 4) };
    if payload.len() < need {
        return violation("invalid payload for block status");
    }
    let id_value = u32::from_be_bytes(payload[0..id].try_into().expect("4 bytes"));
    if Some(id_value) != info.context {
        return violation(format!("block status for unexpected context {id_value}"));
    }
    let (len, flags) = if wide {
        let len = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
        let flags = u64::from_be_bytes(payload[16..24].try_into().expect("8 bytes"));
        (len, flags as u32)
    } else {
        let len = u32::from_be_bytes(payload[4..8].try_into().expect("4 bytes"));
        let flags = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
        (u64::from(len), flags)
    };
    if len == 0 {
        return violation("server sent status chunk with zero length");
    }
    // QEMU's reading of `qemu:allocation-depth` through x-dirty-bitmap: every depth above
    // 2 counts as 2 (only the low two bits mean something to block status).
    let flags = if info.alloc_depth && flags > 2 {
        2
    } else {
        flags & (state::HOLE | state::ZERO)
    };
    Ok((len.min(requested), flags))
}
