//! Mounting and unmounting an export.

use crate::config::{AllowOther, FuseExportConfig};
use crate::error::FuseError;
use crate::fs::{ExportFs, Shared};
use crate::sys::{self, MountKind, Reservation};
use block_core::{Attachment, ExportGone, RemoveMode};
use fuser::{Config, Session, SessionACL};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::runtime::Handle;

/// How many threads read requests from `/dev/fuse`, each on its own cloned descriptor
/// (`FUSE_DEV_IOC_CLONE`). They only decode requests and spawn their I/O on the runtime, so
/// a few suffice to keep many requests in flight.
const READER_THREADS: usize = 4;

/// A node exported as a regular file through FUSE, mounted until [`unmount`](Self::unmount) or
/// drop.
#[derive(Debug)]
pub struct FuseExport {
    mountpoint: PathBuf,
    shared: Arc<Shared>,
    kind: MountKind,
    reservation: Option<Reservation>,
    done: bool,
}

impl FuseExport {
    /// Mounts the node of `attachment` on `cfg.mountpoint`.
    ///
    /// Checks first that no other export of this process uses the mountpoint and that it is a
    /// regular file (with QSD's error messages), then mounts (with `allow_other` as
    /// `cfg.allow_other` says; `auto` retries without it), negotiates the protocol with the
    /// kernel and starts the reader threads. The block-layer I/O runs on `rt`.
    ///
    /// With `CAP_SYS_ADMIN` (root) it calls `mount(2)` itself; otherwise it goes through the
    /// setuid `fusermount3` of fuse3, as libfuse does (`allow_other` then needs
    /// `user_allow_other` in `/etc/fuse.conf`).
    pub fn mount(
        cfg: FuseExportConfig,
        attachment: Attachment,
        rt: Handle,
    ) -> Result<FuseExport, FuseError> {
        if cfg.writable && !attachment.writable() {
            return Err(FuseError::ReadOnlyAttachment(
                attachment.node().name().to_owned(),
            ));
        }
        let reservation = Reservation::claim(&cfg.mountpoint)?;
        sys::check_regular_file(&cfg.mountpoint)?;

        let mode = if cfg.writable { 0o600 } else { 0o400 };
        let (device, kind, allow_other) = match cfg.allow_other {
            AllowOther::Off => {
                let (device, kind) = sys::mount(&cfg.mountpoint, mode, false)?;
                (device, kind, false)
            }
            AllowOther::On => {
                let (device, kind) = sys::mount(&cfg.mountpoint, mode, true)?;
                (device, kind, true)
            }
            AllowOther::Auto => match sys::mount(&cfg.mountpoint, mode, true) {
                Ok((device, kind)) => (device, kind, true),
                Err(first) => {
                    tracing::debug!(error = %first, "mounting with allow_other failed, retrying without");
                    let (device, kind) = sys::mount(&cfg.mountpoint, mode, false)?;
                    (device, kind, false)
                }
            },
        };

        let shared = Shared::new(&cfg, attachment, allow_other, rt);
        let export = FuseExport {
            mountpoint: cfg.mountpoint,
            shared: Arc::clone(&shared),
            kind,
            reservation: Some(reservation),
            done: false,
        };
        // From here on, dropping `export` detaches the mount and releases the node.
        let mut config = Config::default();
        config.n_threads = Some(READER_THREADS);
        config.clone_fd = true;
        config.acl = if allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let acl = config.acl;
        let session = Session::from_fd(ExportFs::new(shared), OwnedFd::from(device), acl, config)
            .map_err(FuseError::Session)?;
        // The session thread runs until the kernel ends the connection, i.e. until the mount
        // is detached and the last descriptor on it is closed; it is not joined.
        session.spawn().map_err(FuseError::Session)?;
        tracing::info!(mountpoint = %export.mountpoint.display(), allow_other, "FUSE export mounted");
        Ok(export)
    }

    /// The path the export is mounted on, as given.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the mount uses `allow_other` (with [`AllowOther::Auto`], whether that worked).
    pub fn allow_other(&self) -> bool {
        self.shared.allow_other()
    }

    /// The file's mode bits (0600 writable, 0400 read-only, or what `chmod` set).
    pub fn mode(&self) -> u32 {
        self.shared.mode()
    }

    /// Unmounts the export, as QSD's `block-export-del`.
    ///
    /// The mount is detached lazily (`MNT_DETACH`), so this succeeds at once even while
    /// another process holds the file open: the path shows the file below again, and the
    /// kernel releases the FUSE connection when the last descriptor is closed. Requests in
    /// flight complete, then the node is flushed (no acknowledged write is lost) and the
    /// attachment released; I/O on a descriptor still open fails with `ENOTCONN` from then on,
    /// as with QSD.
    ///
    /// Blocks while requests finish and the node flushes (on a multi-threaded runtime's
    /// worker it uses `block_in_place`). Called from within a current-thread runtime, it cannot
    /// wait without deadlocking that runtime: it then detaches at once and finishes the flush
    /// on a helper thread, logging a failure; use [`unmount_async`](Self::unmount_async) there.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.shutdown()
    }

    /// Unmounts the export as [`unmount`](Self::unmount) does, waiting for the final flush
    /// without blocking the runtime (whatever its flavor).
    pub async fn unmount_async(mut self) -> Result<(), FuseError> {
        let Some(detached) = self.detach() else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let closed = tokio::task::spawn_blocking(move || {
            shared.close();
            shared.take_close_error()
        })
        .await;
        let closed = match closed {
            Ok(None) => Ok(()),
            Ok(Some(err)) => Err(err),
            Err(join) => Err(FuseError::CloseTask(join)),
        };
        detached.and(closed)
    }

    /// Ends the export as `block-export-del` does, in either [`RemoveMode`]: a FUSE export
    /// has no clients to refuse or disconnect (a process holding the file open is not one;
    /// QSD removes the export in `safe` mode too), so both modes unmount as
    /// [`unmount_async`](Self::unmount_async) does. The future resolves when the last request
    /// is done and the node flushed; a failure is logged, as there is nobody to tell.
    pub fn remove(self, mode: RemoveMode) -> ExportGone {
        let _ = mode;
        ExportGone::new(async move {
            let mountpoint = self.mountpoint.clone();
            if let Err(err) = self.unmount_async().await {
                tracing::error!(error = %err, mountpoint = %mountpoint.display(), "unmounting FUSE export");
            }
        })
    }

    /// Detaches the mount and frees the mountpoint; `None` when that was done already.
    fn detach(&mut self) -> Option<Result<(), FuseError>> {
        if self.done {
            return None;
        }
        self.done = true;
        let detached = sys::detach(&self.mountpoint, self.kind);
        // The path may be exported again right away: a new mount stacks on the file below.
        drop(self.reservation.take());
        Some(detached)
    }

    fn shutdown(&mut self) -> Result<(), FuseError> {
        let Some(detached) = self.detach() else {
            return Ok(());
        };
        if on_current_thread_runtime() {
            let shared = Arc::clone(&self.shared);
            let mountpoint = self.mountpoint.clone();
            let spawned = std::thread::Builder::new()
                .name("fuse-export-close".into())
                .spawn(move || {
                    shared.close();
                    if let Some(err) = shared.take_close_error() {
                        tracing::error!(error = %err, mountpoint = %mountpoint.display(), "closing FUSE export");
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start the thread that flushes the FUSE export");
            }
            return detached;
        }
        self.shared.close();
        let closed = match self.shared.take_close_error() {
            Some(err) => Err(err),
            None => Ok(()),
        };
        detached.and(closed)
    }
}

/// Whether the calling thread runs inside a current-thread tokio runtime, where blocking
/// until the export's tasks finish could wait forever.
fn on_current_thread_runtime() -> bool {
    Handle::try_current()
        .map(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        .unwrap_or(false)
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::error!(error = %err, mountpoint = %self.mountpoint.display(), "unmounting FUSE export");
        }
    }
}
