//! Nodes: a driver with a name, its children, its users and its dirty bitmaps; and
//! [`Attachment`], a user's hold on a node and the one handle exports do I/O through.
//!
//! Every request of an export goes through its [`Attachment`] (QEMU's BlockBackend): it is
//! checked against the attachment's permission and the node's size here, so that drivers
//! only see valid requests, and every write marks the node's enabled dirty bitmaps,
//! whichever export it came from. A node's own I/O and its driver are private to this crate.

use crate::bitmap::DirtyBitmap;
use crate::buffer::SgList;
use crate::driver::{BlockDriver, Extent, ImageDetails, WriteFlags, ZeroFlags};
use crate::error::{BlockError, Result};
use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// How a child is attached to its parent node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRole {
    /// The layer a format driver reads its bytes from (QAPI `file`).
    File,
    /// The backing layer of a qcow2 node (QAPI `backing`).
    Backing,
}

impl ChildRole {
    /// The QAPI name of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
        }
    }
}

/// The `detect-zeroes` option of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Writes are passed on as they are.
    #[default]
    Off,
    /// A write whose buffer is all zeroes becomes a write-zeroes request.
    On,
    /// As `On`, and the zeroes may be unmapped when the node has `discard=unmap`.
    Unmap,
}

impl DetectZeroes {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Why a user could not attach to a node: QEMU's permission checks, with its messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// A writable user of a read-only node.
    #[error("Block node '{node}' is read-only")]
    ReadOnly {
        /// The node.
        node: String,
    },
    /// A writable user while another holds the node as its only writer, or an exclusive
    /// writer while another user may write.
    #[error(
        "Permission conflict on node '{node}': permissions 'write, resize' are both required \
         by {needed_by} and unshared by {unshared_by}."
    )]
    PermissionConflict {
        /// The node.
        node: String,
        /// The user that wants to write.
        needed_by: String,
        /// The user that does not share writing.
        unshared_by: String,
    },
}

/// A dirty bitmap of this name is already on the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Bitmap already exists: {0}")]
pub struct BitmapExists(pub String);

/// The generic options of a node (QAPI `BlockdevOptionsBase`) that the node itself applies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NodeConfig {
    /// `discard=unmap`: discard requests reach the driver and write-zeroes may unmap. With
    /// `discard=ignore` (QEMU's default, and [`NodeConfig::default`]) discard requests
    /// succeed without doing anything and write-zeroes never unmaps.
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `cache.direct` (reported by `query-named-block-nodes`).
    pub cache_direct: bool,
    /// `cache.no-flush` (reported by `query-named-block-nodes`).
    pub cache_no_flush: bool,
}

impl NodeConfig {
    /// The configuration of [`Node::new`]: every request is passed to the driver as it is
    /// (discard included).
    pub fn passthrough() -> NodeConfig {
        NodeConfig {
            discard_unmap: true,
            ..NodeConfig::default()
        }
    }
}

/// A user of a node: an export, or a parent node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// Unique id of this attachment.
    pub id: u64,
    /// Who uses the node, e.g. `export 'exp0'` or `node 'fmt0'`.
    pub description: String,
    /// Whether the user may write.
    pub writable: bool,
    /// Whether the user lets the node become inactive while it writes (QEMU's export option
    /// `allow-inactive`).
    pub allow_inactive: bool,
}

/// A node of the block graph.
pub struct Node {
    name: String,
    driver: Arc<dyn BlockDriver>,
    children: Vec<(ChildRole, Arc<Node>)>,
    users: Mutex<Vec<UserInfo>>,
    /// The user that may write and shares writing with nobody (id, description).
    exclusive_writer: Mutex<Option<(u64, String)>>,
    next_user: AtomicU64,
    bitmaps: RwLock<Vec<Arc<DirtyBitmap>>>,
    config: NodeConfig,
    /// Cleared while the node is inactive (see [`Node::is_active`]).
    active: std::sync::atomic::AtomicBool,
    /// Requests that change the node, in flight (see [`Node::drain_changes`]).
    changing: std::sync::atomic::AtomicUsize,
    /// Woken when `changing` drops to zero while `draining` is not zero.
    drained: tokio::sync::Notify,
    /// Callers of [`Node::drain_changes`] waiting.
    draining: std::sync::atomic::AtomicUsize,
    /// The size after the last resize, for [`Node::watch_size`].
    size_tx: tokio::sync::watch::Sender<u64>,
}

/// A request that changes the node, counted while it runs.
struct Changing<'a>(&'a Node);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        // Notify (a lock) only while somebody drains.
        if self.0.changing.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.draining.load(Ordering::SeqCst) > 0
        {
            self.0.drained.notify_waiters();
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver.driver_name())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node named `name` over `driver`, holding `children` (which it keeps in use), with
    /// [`NodeConfig::passthrough`].
    pub fn new(
        name: impl Into<String>,
        driver: Arc<dyn BlockDriver>,
        children: Vec<(ChildRole, Arc<Node>)>,
    ) -> Arc<Node> {
        Node::with_config(name, driver, children, NodeConfig::passthrough())
    }

    /// A node as [`Node::new`], with the generic options in `config`.
    pub fn with_config(
        name: impl Into<String>,
        driver: Arc<dyn BlockDriver>,
        children: Vec<(ChildRole, Arc<Node>)>,
        config: NodeConfig,
    ) -> Arc<Node> {
        let size_tx = tokio::sync::watch::Sender::new(driver.size());
        let node = Arc::new(Node {
            name: name.into(),
            driver,
            children,
            users: Mutex::new(Vec::new()),
            exclusive_writer: Mutex::new(None),
            next_user: AtomicU64::new(1),
            bitmaps: RwLock::new(Vec::new()),
            config,
            active: std::sync::atomic::AtomicBool::new(true),
            changing: std::sync::atomic::AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
            draining: std::sync::atomic::AtomicUsize::new(0),
            size_tx,
        });
        node.driver.attach_node(Arc::downgrade(&node));
        node
    }

    /// The generic options of the node.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The child in `role`, if the node has one.
    pub fn child(&self, role: ChildRole) -> Option<&Arc<Node>> {
        self.children
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, n)| n)
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver of this node (crate-private: outside, I/O goes through an
    /// [`Attachment`]).
    pub(crate) fn driver(&self) -> &Arc<dyn BlockDriver> {
        &self.driver
    }

    /// The QAPI driver name (`file`, `raw`, `qcow2`, `null-co`, `host_device`).
    pub fn driver_name(&self) -> &'static str {
        self.driver.driver_name()
    }

    /// The file name `query-named-block-nodes` shows, if any.
    pub fn filename(&self) -> Option<String> {
        self.driver.filename()
    }

    /// Facts about the image (QAPI `ImageInfo`).
    pub fn image_details(&self) -> ImageDetails {
        self.driver.image_details()
    }

    /// The alignment requests must have (e.g. 512 or 4096 under O_DIRECT; 1 for any byte).
    pub fn request_alignment(&self) -> u32 {
        self.driver.request_alignment()
    }

    /// The preferred request size (e.g. a qcow2 cluster).
    pub fn preferred_alignment(&self) -> u32 {
        self.driver.preferred_alignment()
    }

    /// Whether the node can store persistent dirty bitmaps (a writable qcow2).
    pub fn supports_persistent_bitmaps(&self) -> bool {
        self.driver.supports_persistent_bitmaps()
    }

    /// Whether reads can be spliced into a pipe (see [`Attachment::splice_read`]).
    pub fn can_splice(&self) -> bool {
        self.driver.splice().is_some()
    }

    /// Flushes and releases what the driver holds: called once, when the node leaves the
    /// graph (parents before children: qcow2 stores its metadata and bitmaps then).
    pub async fn close(&self) -> Result<()> {
        self.driver.close().await
    }

    /// The child nodes and their roles.
    pub fn children(&self) -> &[(ChildRole, Arc<Node>)] {
        &self.children
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// A receiver of the node's size, marked changed after every successful
    /// [`resize`](Self::resize) of this node (`block_resize`, or an export's
    /// [`Attachment::resize`]), so that an export can tell its client (QEMU's
    /// `BlockDevOps.resize_cb`): a virtio device raises a config interrupt, for example.
    ///
    /// The receiver holds the size in bytes as of the last resize; [`size`](Self::size) is
    /// always the current one. The channel works from any async runtime; a thread without one
    /// can poll [`has_changed`](tokio::sync::watch::Receiver::has_changed). A resize of a
    /// child node (the `file` under a `raw`) is not seen by its parent's receivers.
    pub fn watch_size(&self) -> tokio::sync::watch::Receiver<u64> {
        self.size_tx.subscribe()
    }

    /// Whether the node itself is read-only.
    pub fn read_only(&self) -> bool {
        self.driver.read_only()
    }

    /// Whether the node is active (QEMU's `active`, the default). An inactive node was
    /// handed over to another process, as at the end of a migration: it serves reads and
    /// block status, and refuses every other request with [`BlockError::Inactive`] (waiting
    /// for those in flight when it becomes inactive). The graph changes it
    /// ([`NodeGraph::set_active`](crate::NodeGraph::set_active)).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn set_active_flag(&self, active: bool) {
        self.active.store(active, Ordering::Release);
    }

    /// Lets the user `id` (an [`Attachment::id`]) keep the node while it becomes inactive.
    pub fn allow_inactive(&self, id: u64) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(user) = users.iter_mut().find(|u| u.id == id) {
            user.allow_inactive = true;
        }
    }

    fn check_active(&self) -> Result<()> {
        if self.is_active() {
            Ok(())
        } else {
            Err(BlockError::Inactive)
        }
    }

    /// Starts a request that changes the node: refused once the node is inactive, counted
    /// until the guard drops. Counted before the check, so that [`Node::drain_changes`]
    /// after clearing the flag sees every request that got past it.
    fn begin_change(&self) -> Result<Changing<'_>> {
        self.changing.fetch_add(1, Ordering::SeqCst);
        let guard = Changing(self);
        self.check_active()?;
        Ok(guard)
    }

    /// How many requests that change the node are in flight.
    #[cfg(test)]
    pub(crate) fn changes_in_flight(&self) -> usize {
        self.changing.load(Ordering::SeqCst)
    }

    /// Waits until no request that changes the node is in flight (QEMU drains a node before
    /// it inactivates it: a write acknowledged after the flush would be lost).
    pub(crate) async fn drain_changes(&self) {
        struct Draining<'a>(&'a Node);
        impl Drop for Draining<'_> {
            fn drop(&mut self) {
                self.0.draining.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.draining.fetch_add(1, Ordering::SeqCst);
        let _draining = Draining(self);
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            // Registered before the count is read: a request ending after the read sees
            // `draining` set and notifies (both SeqCst).
            drained.as_mut().enable();
            if self.changing.load(Ordering::SeqCst) == 0 {
                return;
            }
            drained.await;
        }
    }

    /// The users currently attached.
    pub fn users(&self) -> Vec<UserInfo> {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Attaches a user. A writable user is refused on a read-only node, and while a parent
    /// holds the node as its exclusive writer (see [`Node::attach_exclusive_writer`]).
    pub fn attach(
        self: &Arc<Self>,
        description: impl Into<String>,
        writable: bool,
    ) -> std::result::Result<Attachment, AttachError> {
        self.attach_user(description.into(), writable, false)
    }

    /// Attaches a writable user that shares writing with nobody, as a qcow2 node does with
    /// its file: refused when another user may write, and later writable users are refused
    /// until this one detaches. The messages are QEMU's permission-conflict messages.
    pub fn attach_exclusive_writer(
        self: &Arc<Self>,
        description: impl Into<String>,
    ) -> std::result::Result<Attachment, AttachError> {
        self.attach_user(description.into(), true, true)
    }

    fn attach_user(
        self: &Arc<Self>,
        description: String,
        writable: bool,
        exclusive: bool,
    ) -> std::result::Result<Attachment, AttachError> {
        if writable && self.read_only() {
            return Err(AttachError::ReadOnly {
                node: self.name.clone(),
            });
        }
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut exclusive_writer = self
            .exclusive_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if writable && !exclusive {
            if let Some((_, holder)) = exclusive_writer.as_ref() {
                return Err(AttachError::PermissionConflict {
                    node: self.name.clone(),
                    needed_by: description,
                    unshared_by: holder.clone(),
                });
            }
        }
        if exclusive {
            if let Some(writer) = users.iter().find(|u| u.writable) {
                return Err(AttachError::PermissionConflict {
                    node: self.name.clone(),
                    needed_by: writer.description.clone(),
                    unshared_by: description,
                });
            }
        }
        let id = self.next_user.fetch_add(1, Ordering::Relaxed);
        if exclusive {
            *exclusive_writer = Some((id, description.clone()));
        }
        users.push(UserInfo {
            id,
            description,
            writable,
            allow_inactive: false,
        });
        Ok(Attachment::new(Arc::clone(self), id, writable))
    }

    fn detach(&self, id: u64) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.retain(|u| u.id != id);
        let mut exclusive_writer = self
            .exclusive_writer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if exclusive_writer
            .as_ref()
            .is_some_and(|(holder, _)| *holder == id)
        {
            *exclusive_writer = None;
        }
    }

    /// The dirty bitmaps of this node.
    pub fn bitmaps(&self) -> Vec<Arc<DirtyBitmap>> {
        self.bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds a dirty bitmap; its name must be unique on the node.
    pub fn add_bitmap(&self, bitmap: Arc<DirtyBitmap>) -> std::result::Result<(), BitmapExists> {
        let mut bitmaps = self.bitmaps.write().unwrap_or_else(|e| e.into_inner());
        if bitmaps.iter().any(|b| b.name() == bitmap.name()) {
            return Err(BitmapExists(bitmap.name().to_string()));
        }
        bitmaps.push(bitmap);
        Ok(())
    }

    /// Removes the dirty bitmap `name` and returns it.
    pub fn remove_bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        let mut bitmaps = self.bitmaps.write().unwrap_or_else(|e| e.into_inner());
        let pos = bitmaps.iter().position(|b| b.name() == name)?;
        Some(bitmaps.remove(pos))
    }

    /// The dirty bitmap `name`, if the node has it.
    pub fn bitmap(&self, name: &str) -> Option<Arc<DirtyBitmap>> {
        self.bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|b| b.name() == name)
            .cloned()
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        for bitmap in self
            .bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            bitmap.mark(offset, len);
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub(crate) async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.driver.readv(offset, buf).await
    }

    /// Reads into a slice (through a buffer of the crate's own: for metadata and tests).
    pub(crate) async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let list = SgList::zeroed(buf.len());
        self.readv(offset, &list).await?;
        list.copy_to_slice(0, buf);
        Ok(())
    }

    /// Appends the `len` bytes at `offset` to a pipe without copying them, when every layer
    /// down to the file can (a `raw` node over a `file` node without `O_DIRECT`): see
    /// [`SpliceRead`](crate::driver::SpliceRead). On `Ok(false)` read instead and discard
    /// the pipe.
    pub(crate) async fn splice_read(
        &self,
        offset: u64,
        len: usize,
        pipe: &Arc<OwnedFd>,
    ) -> Result<bool> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(true);
        }
        match self.driver.splice() {
            Some(s) => s.splice_read(offset, len, pipe).await,
            None => Ok(false),
        }
    }

    /// Writes `buf` at `offset`.
    pub(crate) async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        let _changing = self.begin_change()?;
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.mark_dirty(offset, buf.len() as u64);
        if self.config.detect_zeroes != DetectZeroes::Off && buf.is_zero() {
            let zero = ZeroFlags {
                fua: flags.fua,
                may_unmap: self.config.detect_zeroes == DetectZeroes::Unmap
                    && self.config.discard_unmap,
                fast: false,
            };
            return self
                .driver
                .write_zeroes(offset, buf.len() as u64, zero)
                .await;
        }
        self.driver.writev(offset, buf, flags).await
    }

    /// Writes a slice (copied into a buffer of the crate's own: for metadata and tests).
    pub(crate) async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.writev(offset, &SgList::from_vec(buf.to_vec()), flags)
            .await
    }

    /// Makes completed writes stable.
    pub(crate) async fn flush(&self) -> Result<()> {
        // An inactive node was flushed when it became inactive.
        self.check_active()?;
        self.driver.flush().await
    }

    /// Discards the range.
    pub(crate) async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _changing = self.begin_change()?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 || !self.config.discard_unmap {
            return Ok(());
        }
        self.mark_dirty(offset, len);
        self.driver.discard(offset, len).await
    }

    /// Makes the range read as zeroes.
    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _changing = self.begin_change()?;
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.mark_dirty(offset, len);
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.config.discard_unmap,
            ..flags
        };
        self.driver.write_zeroes(offset, len, flags).await
    }

    /// The status of the extent at `offset`, at most `len` bytes long (`len` > 0).
    pub(crate) async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        // Allowed on an inactive node, as in QEMU's block layer (an NBD read of an inactive
        // node asks it; the NBD server refuses the block status command itself).
        self.check_range(offset, len)?;
        if len == 0 {
            return Err(BlockError::Invalid("block status of an empty range".into()));
        }
        let mut extent = self.driver.block_status(offset, len).await?;
        extent.len = extent.len.clamp(1, len);
        Ok(extent)
    }

    /// Resizes the node (the management operation `block_resize`; exports resize through
    /// [`Attachment::resize`]).
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        let _changing = self.begin_change()?;
        self.check_writable()?;
        let resizer = self
            .driver
            .resizer()
            .ok_or(BlockError::Unsupported("resize"))?;
        resizer.resize(new_size).await?;
        for bitmap in self.bitmaps() {
            bitmap.resize(new_size);
        }
        self.size_tx.send_replace(self.size());
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only() {
            Err(BlockError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

/// A user's hold on a node, and the one handle its I/O goes through (QEMU's BlockBackend).
///
/// Exports keep one for as long as they run. Every request is checked here: writes need a
/// writable attachment ([`BlockError::ReadOnly`] otherwise, even on a writable node), every
/// range must lie inside the node, and writes mark the node's dirty bitmaps. Clones share
/// the hold; the user is detached when the last clone is dropped.
///
/// Reads and writes take an [`SgList`], whose memory travels with the request (see
/// [`crate::buffer`]); [`read`](Self::read) and [`write`](Self::write) are conveniences
/// over slices that copy. Threads that are not tokio workers submit through a
/// [`Submitter`](crate::Submitter).
#[derive(Debug, Clone)]
pub struct Attachment {
    hold: Arc<Hold>,
}

#[derive(Debug)]
struct Hold {
    node: Arc<Node>,
    id: u64,
    writable: bool,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.node.detach(self.id);
    }
}

impl Attachment {
    fn new(node: Arc<Node>, id: u64, writable: bool) -> Attachment {
        Attachment {
            hold: Arc::new(Hold { node, id, writable }),
        }
    }

    /// The id of this user, as listed by [`Node::users`].
    pub fn id(&self) -> u64 {
        self.hold.id
    }

    /// The attached node (its name, size, bitmaps and facts; its I/O goes through the
    /// attachment).
    pub fn node(&self) -> &Arc<Node> {
        &self.hold.node
    }

    /// Whether this user may write.
    pub fn writable(&self) -> bool {
        self.hold.writable
    }

    /// The node's current size in bytes.
    pub fn size(&self) -> u64 {
        self.hold.node.size()
    }

    /// A receiver of the node's size, changed by every resize (see [`Node::watch_size`]).
    pub fn watch_size(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hold.node.watch_size()
    }

    fn check_write(&self) -> Result<()> {
        if self.hold.writable {
            Ok(())
        } else {
            Err(BlockError::ReadOnly)
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn readv(&self, offset: u64, buf: &SgList) -> Result<()> {
        self.hold.node.readv(offset, buf).await
    }

    /// Reads `buf.len()` bytes at `offset` into a slice (a convenience: the bytes are read
    /// into a buffer of the block layer's and copied).
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.hold.node.read(offset, buf).await
    }

    /// Appends the `len` bytes at `offset` to a pipe without copying them, when every layer
    /// down to the file can (see [`SpliceRead`](crate::driver::SpliceRead)); on `Ok(false)`
    /// read with [`readv`](Self::readv) instead and discard the pipe.
    pub async fn splice_read(&self, offset: u64, len: usize, pipe: &Arc<OwnedFd>) -> Result<bool> {
        self.hold.node.splice_read(offset, len, pipe).await
    }

    /// Writes `buf` at `offset`.
    pub async fn writev(&self, offset: u64, buf: &SgList, flags: WriteFlags) -> Result<()> {
        self.check_write()?;
        self.hold.node.writev(offset, buf, flags).await
    }

    /// Writes a slice at `offset` (a convenience: the bytes are copied first).
    pub async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.check_write()?;
        self.hold.node.write(offset, buf, flags).await
    }

    /// Makes completed writes stable.
    pub async fn flush(&self) -> Result<()> {
        self.hold.node.flush().await
    }

    /// Discards the range (nothing happens unless the node has `discard=unmap`).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write()?;
        self.hold.node.discard(offset, len).await
    }

    /// Makes the range read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_write()?;
        self.hold.node.write_zeroes(offset, len, flags).await
    }

    /// The status of the extent at `offset`, at most `len` bytes long (`len` > 0).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.hold.node.block_status(offset, len).await
    }

    /// Resizes the node (a writable attachment only).
    pub async fn resize(&self, new_size: u64) -> Result<()> {
        self.check_write()?;
        self.hold.node.resize(new_size).await
    }
}
