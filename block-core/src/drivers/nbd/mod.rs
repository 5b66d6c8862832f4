//! The `nbd` driver: an export of a remote NBD server as a node (QEMU's `block/nbd.c`).
//!
//! The handshake asks for extended headers, else structured replies, the `base:allocation`
//! metadata context (or the one `x-dirty-bitmap` names) and the server's block sizes, over
//! TLS when `tls-creds` names client credentials. Up to 64 requests are in flight per
//! connection, replies are matched by cookie, and read data goes straight into the request's
//! buffer. A server that allows multi-conn (`NBD_FLAG_CAN_MULTI_CONN`) gets [`MULTI_CONN`]
//! connections, which requests take in turn (QEMU's client uses one). Requests larger than
//! the server's
//! maximum payload are split. FUA, flush, trim and write-zeroes (with `NO_HOLE` and
//! `FAST_ZERO`) are passed on when the server offers them; without write-zeroes the node
//! writes zeroes, without trim a discard does nothing, as in QEMU.
//!
//! When a connection breaks (the server goes away, a socket error), a task reconnects in
//! the background (all connections), as long as the node is open. Requests that were in flight, and new
//! ones, wait for it up to `reconnect-delay` seconds and are then sent again on the new
//! connection; after that delay, until a connection is back, every request fails with
//! `EIO` at once: QEMU's behaviour. A server that breaks the protocol is not reconnected to.
//! `open-timeout` retries the first connection for that many seconds.

mod cache;
mod conn;
mod handshake;
mod stream;

pub use handshake::{ExportInfo, HandshakeError, Mode};
pub use stream::{Addr, Tls};

use crate::buffer::SgList;
use crate::driver::{
    write_zero_buffers, BlockDriver, BlockIo, Extent, ImageDetails, ImageFacts, Resize, WriteFlags,
    ZeroFlags,
};
use crate::error::{BlockError, Result};
use async_trait::async_trait;
use conn::{Conn, Exit, Op, Outcome};
use nbd_proto::{cmd_flags, state, transmission_flags as tf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// The largest request sent (QEMU's `NBD_MAX_BUFFER_SIZE`), unless the server asks for less.
pub const MAX_REQUEST: u32 = 32 << 20;

/// Connections opened to a server that allows multi-conn (`NBD_FLAG_CAN_MULTI_CONN`), as
/// nbdcopy does by default.
pub const MULTI_CONN: usize = 4;

/// How long a further connection to a multi-conn server may take to be set up.
const EXTRA_CONN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one connection attempt (connect, TLS, handshake) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the driver connects to and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server.
    pub addr: Addr,
    /// The export name (`""`: the server's default export).
    pub export: String,
    /// TLS, from `tls-creds` (and `tls-hostname`).
    pub tls: Option<Tls>,
    /// `x-dirty-bitmap`: the metadata context that block status reports instead of
    /// `base:allocation` (QEMU's experimental option, for reading a dirty bitmap).
    pub dirty_bitmap: Option<String>,
    /// `reconnect-delay`: how long requests wait for a lost connection to come back.
    pub reconnect_delay: Duration,
    /// `open-timeout`: how long opening retries the first connection.
    pub open_timeout: Duration,
}

/// Why opening failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No connection to the server (QEMU: `Failed to connect to 'ADDR': REASON`).
    #[error("Failed to connect to '{addr}': {}", qsd_qapi::strerror(.source))]
    Connect {
        /// The server's address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed.
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    /// The export is read-only and the node was asked to be writable.
    #[error("NBD export is read-only")]
    ReadOnly,
    /// The attempt took too long.
    #[error("Timed out connecting to '{0}'")]
    Timeout(String),
}

enum State {
    /// One connection, or several when the server allows multi-conn; requests take turns.
    Connected(Arc<[Arc<Conn>]>),
    /// The connection was lost; requests wait until `wait_until`, then fail at once.
    Connecting { wait_until: Instant },
    /// Closed, or the server broke the protocol.
    Quit,
}

struct Inner {
    cfg: Config,
    info: ExportInfo,
    read_only: bool,
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
    filename: String,
    /// The connection the next request takes.
    turn: std::sync::atomic::AtomicUsize,
    /// Ranges known to hold data (unused with `x-dirty-bitmap`, whose answers are no
    /// allocation).
    data: cache::DataCache,
}

/// The `nbd` driver.
pub struct NbdDriver {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDriver")
            .field("cfg", &self.inner.cfg)
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

/// One connection: connect, TLS, handshake, within [`ATTEMPT_TIMEOUT`].
async fn attempt(cfg: &Config) -> Result<(stream::Stream, ExportInfo), OpenError> {
    let work = async {
        let s = stream::connect(&cfg.addr)
            .await
            .map_err(|source| OpenError::Connect {
                addr: cfg.addr.to_string(),
                source,
            })?;
        Ok(handshake::negotiate(s, cfg).await?)
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, work)
        .await
        .map_err(|_| OpenError::Timeout(cfg.addr.to_string()))?
}

/// The pseudo file name QEMU shows for the node.
fn filename(cfg: &Config) -> String {
    let export = &cfg.export;
    match (&cfg.addr, export.is_empty()) {
        (Addr::Unix(p), false) => format!("nbd+unix:///{export}?socket={}", p.display()),
        (Addr::Unix(p), true) => format!("nbd+unix://?socket={}", p.display()),
        (Addr::Inet { host, port }, false) => format!("nbd://{host}:{port}/{export}"),
        (Addr::Inet { host, port }, true) => format!("nbd://{host}:{port}"),
    }
}

impl NbdDriver {
    /// Connects to the server of `cfg` and opens its export: read-only if `read_only`, or
    /// if the export is and `auto_read_only` allows it.
    pub async fn open(
        cfg: Config,
        read_only: bool,
        auto_read_only: bool,
    ) -> Result<Self, OpenError> {
        let deadline = Instant::now() + cfg.open_timeout;
        let mut backoff = Duration::from_millis(50);
        let (stream, info) = loop {
            match attempt(&cfg).await {
                Ok(r) => break r,
                // open-timeout: retry what may get better (the server not up yet).
                Err(
                    e @ (OpenError::Connect { .. } | OpenError::Handshake(HandshakeError::Io(_))),
                ) if Instant::now() + backoff < deadline => {
                    tracing::debug!("NBD client: {e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        };
        let export_ro = info.flags & tf::READ_ONLY != 0;
        if export_ro && !read_only && !auto_read_only {
            return Err(OpenError::ReadOnly);
        }
        let runtime = tokio::runtime::Handle::current();
        let more = more_streams(&cfg, &info).await;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| {
            let conns = std::iter::once((stream, info))
                .chain(more)
                .map(|(s, i)| Conn::start(s, i, &runtime, on_exit(weak.clone())))
                .collect();
            Inner {
                filename: filename(&cfg),
                cfg,
                info,
                read_only: read_only || export_ro,
                runtime: runtime.clone(),
                state: Mutex::new(State::Connected(conns)),
                changed: tokio::sync::watch::channel(0).0,
                turn: Default::default(),
                data: Default::default(),
            }
        });
        Ok(NbdDriver { inner })
    }

    /// What the handshake agreed (of the first connection).
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    fn max_request(&self) -> u64 {
        let max = self.inner.info.max_block;
        u64::from(if max == 0 {
            MAX_REQUEST
        } else {
            max.min(MAX_REQUEST)
        })
    }

    /// The longest trim, write-zeroes or block status request: unlimited with extended
    /// headers, else what 32 bits hold (aligned down).
    fn max_effect(&self) -> u64 {
        if self.inner.info.mode == Mode::Extended {
            u64::MAX
        } else {
            let align = u64::from(self.request_alignment().max(1));
            (u64::from(u32::MAX) / align) * align
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.inner.info.flags & flag != 0
    }

    /// Runs `op` to its end: on a lost connection, again on the next one (within the
    /// reconnect delay).
    async fn request(&self, op: Op) -> Result<Option<(u64, u32)>> {
        loop {
            let conn = self.inner.connection().await?;
            match conn.submit(&op).await {
                Outcome::Done(r) => return r,
                Outcome::Lost => conn.end(Exit::Io),
            }
        }
    }
}

fn lost() -> BlockError {
    BlockError::io(
        "NBD server connection lost",
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

fn on_exit(inner: Weak<Inner>) -> conn::OnExit {
    Box::new(move |why| {
        if let Some(inner) = inner.upgrade() {
            inner.connection_ended(why);
        }
    })
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A current connection's end: reconnect (or give up on a server that broke the
    /// protocol). The other connections end too: they are made again together.
    fn connection_ended(self: &Arc<Self>, why: Exit) {
        let mut st = self.lock();
        let others = match &*st {
            State::Connected(conns) if conns.iter().any(|c| c.exit() != Exit::Alive) => {
                Arc::clone(conns)
            }
            _ => return,
        };
        match why {
            Exit::Alive | Exit::Closed => return,
            Exit::Protocol => *st = State::Quit,
            Exit::Io => {
                tracing::warn!(
                    target: "operator",
                    "NBD server {} disconnected; reconnecting",
                    self.cfg.addr
                );
                *st = State::Connecting {
                    wait_until: Instant::now() + self.cfg.reconnect_delay,
                };
                self.runtime.spawn(reconnect(Arc::downgrade(self)));
            }
        }
        drop(st);
        // Their requests in flight are sent again on the new connections.
        for c in others.iter() {
            c.end(Exit::Closed);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// The connection to send on, waiting for a reconnection within the delay.
    async fn connection(&self) -> Result<Arc<Conn>> {
        loop {
            let mut changed = self.changed.subscribe();
            let wait_until = match &*self.lock() {
                State::Connected(conns) => {
                    let n = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let c = &conns[n % conns.len()];
                    if c.exit() == Exit::Alive {
                        return Ok(Arc::clone(c));
                    }
                    Instant::now() + Duration::from_millis(10)
                }
                // Ended, and its end is being handled.
                State::Connecting { wait_until } => *wait_until,
                State::Quit => return Err(lost()),
            };
            if Instant::now() >= wait_until {
                return Err(lost());
            }
            let _ = tokio::time::timeout_at(wait_until, changed.changed()).await;
        }
    }
}

/// Connects again until it works (or the node is closed): the new connection must show the
/// same export (size, read-only).
async fn reconnect(inner: Weak<Inner>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(i) = inner.upgrade() else { return };
        if matches!(&*i.lock(), State::Quit) {
            return;
        }
        let cfg = i.cfg.clone();
        drop(i);
        let result = attempt(&cfg).await;
        let Some(i) = inner.upgrade() else { return };
        match result {
            Ok((stream, info)) => {
                let same = info.size == i.info.size
                    && (i.read_only || info.flags & tf::READ_ONLY == 0)
                    && info.context.is_some() == i.info.context.is_some();
                if same {
                    let more = more_streams(&cfg, &info).await;
                    let conns = std::iter::once((stream, info))
                        .chain(more)
                        .map(|(s, info)| Conn::start(s, info, &i.runtime, on_exit(inner.clone())))
                        .collect();
                    {
                        let mut st = i.lock();
                        if matches!(&*st, State::Quit) {
                            return;
                        }
                        *st = State::Connected(conns);
                    }
                    i.changed.send_modify(|v| *v += 1);
                    tracing::info!(target: "operator", "NBD server {} reconnected", cfg.addr);
                    return;
                }
                tracing::warn!(
                    target: "operator",
                    "NBD server {}: the export changed (size {} instead of {}, or its flags); not using it",
                    cfg.addr, info.size, i.info.size
                );
            }
            Err(e) => tracing::debug!("NBD client: reconnecting: {e}"),
        }
        drop(i);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The further connections to a server that allows multi-conn: as many of
/// [`MULTI_CONN`] - 1 as can be made now, showing the same export (none otherwise).
async fn more_streams(cfg: &Config, first: &ExportInfo) -> Vec<(stream::Stream, ExportInfo)> {
    if first.flags & tf::CAN_MULTI_CONN == 0 {
        return Vec::new();
    }
    let mut more = Vec::new();
    for _ in 1..MULTI_CONN {
        // A server may allow multi-conn and still take one client at a time (`qemu-nbd -r`
        // without `--shared`: the next connection waits in its backlog): give up soon.
        let Ok(r) = tokio::time::timeout(EXTRA_CONN_TIMEOUT, attempt(cfg)).await else {
            tracing::debug!("NBD client: no further connection within {EXTRA_CONN_TIMEOUT:?}");
            break;
        };
        match r {
            Ok((s, info))
                if info.size == first.size
                    && info.flags == first.flags
                    && info.context.is_some() == first.context.is_some() =>
            {
                more.push((s, info))
            }
            Ok(_) => break,
            Err(e) => {
                tracing::debug!("NBD client: no further connection: {e}");
                break;
            }
        }
    }
    more
}

impl ImageFacts for NbdDriver {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn filename(&self) -> Option<String> {
        Some(self.inner.filename.clone())
    }

    fn image_details(&self) -> ImageDetails {
        ImageDetails::default()
    }
}

#[async_trait]
impl BlockIo for NbdDriver {
    fn size(&self) -> u64 {
        self.inner.info.size
    }

    fn read_only(&self) -> bool {
        self.inner.read_only
    }

    fn request_alignment(&self) -> u32 {
        // QEMU: without a minimum from the server, 1 when block status is available or
        // the size is not sector-aligned, else 512.
        match self.inner.info.min_block {
            0 if self.inner.info.context.is_some() || self.inner.info.size % 512 != 0 => 1,
            0 => 512,
            min => min,
        }
    }

    fn preferred_alignment(&self) -> u32 {
        self.inner.info.pref_block.max(4096)
    }

    async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let max = self.max_request() as usize;
        if buf.len() <= max {
            self.request(Op::Read {
                offset,
                buf: buf.clone(),
            })
            .await?;
            return Ok(());
        }
        let parts = (0..buf.len()).step_by(max).map(|at| {
            let part = buf.slice(at, max.min(buf.len() - at));
            self.request(Op::Read {
                offset: offset + at as u64,
                buf: part,
            })
        });
        for r in futures_join(parts).await {
            r?;
        }
        Ok(())
    }

    async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        if self.inner.read_only {
            return Err(BlockError::ReadOnly);
        }
        // Without FUA on the server, a flush after the write makes it stable.
        if buf.is_empty() {
            return Ok(());
        }
        let fua = flags.fua && self.has(tf::SEND_FUA);
        let max = self.max_request() as usize;
        let parts = (0..buf.len()).step_by(max).map(|at| {
            let part = buf.slice(at, max.min(buf.len() - at));
            self.request(Op::Write {
                offset: offset + at as u64,
                buf: part,
                fua,
            })
        });
        for r in futures_join(parts).await {
            r?;
        }
        self.inner.data.insert(offset, offset + buf.len() as u64);
        if flags.fua && !fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if !self.has(tf::SEND_FLUSH) {
            return Ok(());
        }
        self.request(Op::Flush).await.map(|_| ())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.has(tf::SEND_TRIM) || self.inner.read_only {
            return Ok(());
        }
        // The range may read as a hole now: the server says when asked.
        self.inner.data.forget(offset, offset + len);
        let max = self.max_effect();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            self.request(Op::Trim {
                offset: offset + done,
                len: n,
            })
            .await?;
            done += n;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if self.inner.read_only {
            return Err(BlockError::ReadOnly);
        }
        if !self.has(tf::SEND_WRITE_ZEROES) {
            if flags.fast {
                return Err(BlockError::NotFast);
            }
            return write_zero_buffers(self, offset, len, flags.fua).await;
        }
        if flags.fast && !self.has(tf::SEND_FAST_ZERO) {
            return Err(BlockError::NotFast);
        }
        self.inner.data.forget(offset, offset + len);
        let fua = flags.fua && self.has(tf::SEND_FUA);
        let mut cflags = 0;
        if fua {
            cflags |= cmd_flags::FUA;
        }
        if !flags.may_unmap {
            cflags |= cmd_flags::NO_HOLE;
        }
        if flags.fast {
            cflags |= cmd_flags::FAST_ZERO;
        }
        let max = self.max_effect();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            let r = self
                .request(Op::WriteZeroes {
                    offset: offset + done,
                    len: n,
                    flags: cflags,
                })
                .await;
            match r {
                // The server's "not fast" is ENOTSUP (NBD_ENOTSUP for FAST_ZERO).
                Err(e) if flags.fast && e.errno() == libc::ENOTSUP => {
                    return Err(BlockError::NotFast)
                }
                r => r?,
            };
            done += n;
        }
        if flags.fua && !fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let info = &self.inner.info;
        if info.context.is_none() {
            return Ok(Extent::new(len, true, false, 1));
        }
        let cached = self.inner.cfg.dirty_bitmap.is_none();
        if cached {
            if let Some(end) = self.inner.data.data_end(offset) {
                return Ok(Extent::new(len.min(end - offset), true, false, 1));
            }
        }
        // Asked for the rest of the image (one extent comes back, REQ_ONE), the server says
        // how far the status goes: data found is remembered for the next requests.
        let ask = if cached {
            info.size
                .saturating_sub(offset)
                .min(self.max_effect())
                .max(len)
        } else {
            len.min(self.max_effect())
        };
        let (n, flags) = self
            .request(Op::BlockStatus { offset, len: ask })
            .await?
            .ok_or_else(|| {
                BlockError::io(
                    "NBD server did not reply with any status extents",
                    std::io::Error::from_raw_os_error(libc::EIO),
                )
            })?;
        let data = flags & state::HOLE == 0;
        let zero = flags & state::ZERO != 0;
        if cached && data {
            self.inner.data.insert(offset, offset + n);
        }
        Ok(Extent::new(n.min(len), data, zero, 1))
    }
}

/// Runs the futures concurrently, in order of their results.
async fn futures_join<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

#[async_trait]
impl Resize for NbdDriver {
    /// NBD cannot resize; as QEMU, a size not larger than the current one is accepted and
    /// changes nothing.
    async fn resize(&self, new_size: u64) -> Result<()> {
        if new_size > self.inner.info.size {
            return Err(BlockError::Invalid("Cannot grow NBD nodes".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for NbdDriver {
    fn resizer(&self) -> Option<&dyn Resize> {
        Some(self)
    }

    async fn close(&self) -> Result<()> {
        let conns = match std::mem::replace(&mut *self.inner.lock(), State::Quit) {
            State::Connected(c) => c.to_vec(),
            _ => Vec::new(),
        };
        self.inner.changed.send_modify(|v| *v += 1);
        for c in conns {
            c.disconnect().await;
        }
        Ok(())
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        let state = std::mem::replace(&mut *self.inner.lock(), State::Quit);
        if let State::Connected(conns) = state {
            for c in conns.iter() {
                c.end(Exit::Closed);
            }
        }
    }
}
