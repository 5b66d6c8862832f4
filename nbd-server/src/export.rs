//! Exports: a named node with its NBD settings, and the count of clients using it.

use crate::proto::transmission_flags as tf;
use block_core::{Attachment, DirtyBitmap, ExportGone};
use std::sync::Arc;
use tokio::sync::watch;

/// What [`NbdServer::add_export`](crate::NbdServer::add_export) needs to export a node:
/// [`ExportConfig::new`], then the setters of what differs (more settings may come: the struct
/// cannot be built by hand).
#[derive(Debug)]
#[non_exhaustive]
pub struct ExportConfig {
    /// The export name clients ask for (at most 4096 bytes, unique on the server).
    pub name: String,
    /// A free-form description shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION` (at most
    /// 4096 bytes).
    pub description: Option<String>,
    /// The node and whether this export may write to it.
    pub attachment: Attachment,
    /// Every write is done with FUA, as QEMU's `writethrough` export option.
    pub writethrough: bool,
    /// Dirty bitmaps exported as `qemu:dirty-bitmap:<bitmap name>` (QEMU's `bitmaps`), in
    /// this order (context ids 2, 3, ...). [`add_export`](crate::NbdServer::add_export)
    /// checks them as QEMU does and marks them busy while the export exists.
    pub bitmaps: Vec<Arc<DirtyBitmap>>,
    /// Offer `qemu:allocation-depth` (QEMU's `allocation-depth`).
    pub allocation_depth: bool,
    /// The event loop this export's connections run in after the handshake (QEMU's
    /// `iothread`); `None`: the one that accepted them. The listener and the handshake stay
    /// where they are; once a client picked this export, its socket moves to this runtime's
    /// reactor and every request of it (reading, decoding, the node's I/O, replying) runs
    /// there.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl ExportConfig {
    /// An export of `attachment` named `name`, with no description, no writethrough, no
    /// bitmap, no allocation depth context, and running in the runtime that accepts its
    /// clients.
    pub fn new(name: impl Into<String>, attachment: Attachment) -> Self {
        ExportConfig {
            name: name.into(),
            description: None,
            attachment,
            writethrough: false,
            bitmaps: Vec::new(),
            allocation_depth: false,
            runtime: None,
        }
    }

    /// Sets [`ExportConfig::description`].
    pub fn description(mut self, description: Option<String>) -> Self {
        self.description = description;
        self
    }

    /// Sets [`ExportConfig::writethrough`].
    pub fn writethrough(mut self, writethrough: bool) -> Self {
        self.writethrough = writethrough;
        self
    }

    /// Sets [`ExportConfig::bitmaps`].
    pub fn bitmaps(mut self, bitmaps: Vec<Arc<DirtyBitmap>>) -> Self {
        self.bitmaps = bitmaps;
        self
    }

    /// Sets [`ExportConfig::allocation_depth`].
    pub fn allocation_depth(mut self, allocation_depth: bool) -> Self {
        self.allocation_depth = allocation_depth;
        self
    }

    /// Sets [`ExportConfig::runtime`].
    pub fn runtime(mut self, runtime: Option<tokio::runtime::Handle>) -> Self {
        self.runtime = runtime;
        self
    }
}

/// A running export.
#[derive(Debug)]
pub(crate) struct Export {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) attachment: Attachment,
    pub(crate) writethrough: bool,
    pub(crate) bitmaps: Vec<Arc<DirtyBitmap>>,
    pub(crate) allocation_depth: bool,
    /// Where the connections run after the handshake (`None`: where they were accepted).
    pub(crate) runtime: Option<tokio::runtime::Handle>,
    multi_conn: bool,
    /// Number of connections in transmission phase on this export.
    clients: watch::Sender<usize>,
    /// Set when the export is removed in hard mode (or the server stops): its connections end.
    closed: watch::Sender<bool>,
}

impl Export {
    pub(crate) fn new(cfg: ExportConfig, multi_conn: bool) -> Arc<Export> {
        // As QEMU's nbd_export_create: the bitmaps are busy (no QMP change) while exported.
        for bitmap in &cfg.bitmaps {
            bitmap.set_busy(true);
        }
        Arc::new(Export {
            name: cfg.name,
            description: cfg.description,
            attachment: cfg.attachment,
            writethrough: cfg.writethrough,
            bitmaps: cfg.bitmaps,
            allocation_depth: cfg.allocation_depth,
            runtime: cfg.runtime,
            multi_conn,
            clients: watch::channel(0).0,
            closed: watch::channel(false).0,
        })
    }

    /// The metadata contexts the export offers.
    pub(crate) fn contexts(&self) -> Vec<crate::meta::MetaContext> {
        crate::meta::available(self.allocation_depth, self.bitmaps.iter().map(|b| b.name()))
    }

    /// Whether clients may write.
    pub(crate) fn writable(&self) -> bool {
        self.attachment.writable() && !self.attachment.node().read_only()
    }

    /// The size clients see: the node's size rounded down to 512 bytes, as QEMU exports it.
    pub(crate) fn size(&self) -> u64 {
        self.attachment.node().size() & !511
    }

    /// The request alignment of the node (the minimum block size).
    pub(crate) fn alignment(&self) -> u32 {
        self.attachment.node().request_alignment().clamp(1, 1 << 16)
    }

    /// The transmission flags, as QEMU 10 sets them: flush, FUA and cache always;
    /// multi-conn unless the server allows a single connection; trim, write-zeroes and
    /// fast-zero when writable, else read-only; DF once structured replies are on;
    /// block-status payload as the caller decides (extended headers and contexts, or
    /// `NBD_OPT_INFO` with extended headers).
    pub(crate) fn transmission_flags(&self, structured: bool, block_status_payload: bool) -> u16 {
        let mut flags = tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_CACHE;
        if self.multi_conn {
            flags |= tf::CAN_MULTI_CONN;
        }
        if self.writable() {
            flags |= tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
        } else {
            flags |= tf::READ_ONLY;
        }
        if structured {
            flags |= tf::SEND_DF;
        }
        if block_status_payload {
            flags |= tf::BLOCK_STAT_PAYLOAD;
        }
        flags
    }

    /// Registers a client; the returned lease unregisters it when dropped.
    pub(crate) fn lease(self: &Arc<Self>) -> ExportLease {
        self.clients.send_modify(|n| *n += 1);
        ExportLease {
            export: Arc::clone(self),
        }
    }

    pub(crate) fn client_count(&self) -> usize {
        *self.clients.borrow()
    }

    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    pub(crate) fn closed_receiver(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// A future resolving once the export itself is dropped: no connection holds it any
    /// more and its attachment (declared before `clients`, so dropped first) is released.
    /// The caller must not keep an `Arc` of the export.
    pub(crate) fn gone(&self) -> ExportGone {
        let mut rx = self.clients.subscribe();
        ExportGone::new(async move {
            // `changed` fails once the sender, a field of the export, is dropped.
            while rx.changed().await.is_ok() {}
        })
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        for bitmap in &self.bitmaps {
            bitmap.set_busy(false);
        }
    }
}

/// A connection's hold on an export.
#[derive(Debug)]
pub(crate) struct ExportLease {
    pub(crate) export: Arc<Export>,
}

impl Drop for ExportLease {
    fn drop(&mut self) {
        self.export
            .clients
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
