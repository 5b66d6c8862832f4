//! The node graph: every node by name, and the rules for adding and removing them.
//!
//! As in QEMU, a node added by `blockdev-add` is owned by the monitor, and the children that
//! the same command opened (inline definitions, named or not, and backing files opened from
//! an image header) are implicit: they belong to their parent. `blockdev-del` deletes a
//! monitor-owned node together with the implicit children nobody else uses; an implicit
//! child that an export still uses stays until that export is gone
//! ([`NodeGraph::sweep`]).

use crate::error::BlockError;
use crate::node::{AttachError, Attachment, BitmapExists, ChildRole, Node};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a graph operation failed, with QEMU's messages. Not `#[non_exhaustive]`: callers map
/// every variant (to a protocol's error class) in one exhaustive match.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// No node is called so (QEMU's `bdrv_lookup_bs`, which names what it was given: a
    /// reference names both, a node-name lookup only the node; see
    /// [`GraphError::not_found`] and [`GraphError::reference_not_found`]).
    #[error("Cannot find device='{device}' nor node-name='{node_name}'")]
    NotFound {
        /// The device (block backend) name looked for; empty when none was.
        device: String,
        /// The node name looked for.
        node_name: String,
    },
    /// `blockdev-del`, `blockdev-set-active` or a removal named no node.
    #[error("Failed to find node with node-name='{0}'")]
    NoSuchNode(String),
    /// A new node's name is not an identifier.
    #[error("Invalid node-name: '{0}'")]
    InvalidName(String),
    /// A new node's name is taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateName(String),
    /// A new node's name is longer than 31 bytes.
    #[error("Node name too long")]
    NameTooLong,
    /// `blockdev-del` of a node that a user other than its parents holds.
    #[error("Node {0} is in use")]
    InUse(String),
    /// `blockdev-del` of a node that another node's `blockdev-add` opened.
    #[error("Node {0} is not owned by the monitor")]
    NotOwnedByMonitor(String),
    /// `blockdev-del` of a node that a parent still holds.
    #[error("Block device {0} is in use")]
    DeviceInUse(String),
    /// Removing a node that has a user.
    #[error("Node '{node}' is busy: it is used by {user}")]
    Busy {
        /// The node.
        node: String,
        /// The description of its first user.
        user: String,
    },
    /// `blockdev-set-active` inactivating a node whose parent is active.
    #[error("Node has active parent node")]
    ActiveParent,
    /// `blockdev-set-active` without a node: an inactivation failed (QEMU puts the cause in
    /// the message).
    #[error("Failed to inactivate all nodes: {0}")]
    InactivateAll(ActiveError),
    /// `blockdev-set-active` of one node: its inactivation failed.
    #[error("Failed to inactivate node: {0}")]
    Inactivate(ActiveError),
    /// A node could not attach to its child (a permission conflict).
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A bitmap loaded from an image has the name of one the node has.
    #[error(transparent)]
    BitmapExists(#[from] BitmapExists),
    /// Activating a node failed.
    #[error(transparent)]
    Activate(#[from] ActiveError),
    /// `blockdev-add`: the options were refused.
    #[error(transparent)]
    Options(#[from] crate::qapi::OptionError),
    /// `blockdev-add`: `detect-zeroes=unmap` without `discard=unmap`.
    #[error(
        "setting detect-zeroes to unmap is not allowed without setting discard operation to \
         unmap"
    )]
    DetectZeroesUnmapWithoutDiscard,
    /// `blockdev-add`: `force-share=on` on a writable node.
    #[error("force-share=on can only be used with read-only images")]
    ForceShareWritable,
    /// `blockdev-add` of a driver this build leaves out (a cargo feature).
    #[error("Driver '{0}' is not built into this version of blockexportd")]
    NotBuilt(&'static str),
    /// `blockdev-add`: the driver could not open its image. The text is the error with its
    /// causes, as QEMU prints them ([`crate::open::error_text`]: "Could not open 'x': No
    /// such file or directory").
    #[error("{}", crate::open::error_text(.0.as_ref()))]
    Open(Box<dyn std::error::Error + Send + Sync>),
    /// `blockdev-add`: the backing file named in a qcow2 header could not be opened.
    #[error("Could not open backing file: {0}")]
    BackingFile(Box<GraphError>),
}

impl GraphError {
    /// No node `name`, looked up by node name (`device=''`).
    pub fn not_found(name: &str) -> GraphError {
        GraphError::NotFound {
            device: String::new(),
            node_name: name.to_string(),
        }
    }

    /// No node `name`, looked up as a reference (device or node name: both named).
    pub fn reference_not_found(name: &str) -> GraphError {
        GraphError::NotFound {
            device: name.to_string(),
            node_name: name.to_string(),
        }
    }
}

/// All named nodes of a daemon.
#[derive(Debug, Default)]
pub struct NodeGraph {
    nodes: Mutex<BTreeMap<String, Arc<Node>>>,
    /// Attachments that parent nodes hold on their children, keyed by the parent's name.
    child_holds: Mutex<BTreeMap<String, Vec<Attachment>>>,
    /// Nodes that their parent's `blockdev-add` opened, which the monitor does not own.
    implicit: Mutex<BTreeSet<String>>,
    next_auto_name: AtomicU64,
    /// Where drivers find secrets and TLS credentials.
    objects: std::sync::RwLock<Option<Arc<dyn crate::objects::ObjectLookup>>>,
}

impl NodeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        NodeGraph::default()
    }

    /// Lends the graph the objects (secrets, TLS credentials) that drivers look up by id when
    /// they open; none until this is called.
    pub fn set_objects(&self, objects: Arc<dyn crate::objects::ObjectLookup>) {
        *self.objects.write().unwrap_or_else(|e| e.into_inner()) = Some(objects);
    }

    /// The objects lent with [`set_objects`](Self::set_objects), or none.
    pub fn objects(&self) -> Arc<dyn crate::objects::ObjectLookup> {
        self.objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| Arc::new(crate::objects::NoObjects))
    }

    /// A node name for a node whose options gave none, as QEMU makes them (`#block123`).
    pub fn generate_name(&self) -> String {
        loop {
            let n = self.next_auto_name.fetch_add(1, Ordering::Relaxed);
            let name = format!("#block{}", 100 + n);
            if !self.contains(&name) {
                return name;
            }
        }
    }

    /// Whether a node has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Node>>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks that `name` is a valid, unused node name, as QEMU checks them in this order:
    /// an identifier ([`id_wellformed`]), unused, then at most 31 bytes.
    pub fn check_new_name(&self, name: &str) -> Result<(), GraphError> {
        if !id_wellformed(name) {
            return Err(GraphError::InvalidName(name.to_string()));
        }
        if self.contains(name) {
            return Err(GraphError::DuplicateName(name.to_string()));
        }
        if name.len() > 31 {
            return Err(GraphError::NameTooLong);
        }
        Ok(())
    }

    /// Inserts a node built by a driver's open function, attaching it to its children.
    pub fn insert(&self, node: Arc<Node>) -> Result<(), GraphError> {
        let mut holds = Vec::new();
        for (role, child) in node.children() {
            let writable = !node.read_only() && *role == ChildRole::File;
            let description = format!(
                "node '{}' (uses node '{}' as '{}' child)",
                node.name(),
                child.name(),
                role.as_str()
            );
            let hold = if writable && node.driver().exclusive_file_writer() {
                child.attach_exclusive_writer(description)
            } else {
                child.attach(description, writable)
            }?;
            holds.push(hold);
        }
        let mut nodes = self.lock();
        if nodes.contains_key(node.name()) {
            return Err(GraphError::DuplicateName(node.name().to_string()));
        }
        nodes.insert(node.name().to_string(), node.clone());
        drop(nodes);
        self.child_holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.name().to_string(), holds);
        Ok(())
    }

    /// The node named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Node>, GraphError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| GraphError::reference_not_found(name))
    }

    /// Every node, ordered by name.
    pub fn all(&self) -> Vec<Arc<Node>> {
        self.lock().values().cloned().collect()
    }

    /// Marks nodes as implicit children of the node that a `blockdev-add` opened: the
    /// monitor does not own them, and they go with their parent.
    pub fn set_implicit<S: AsRef<str>>(&self, names: &[S]) {
        let mut implicit = self.implicit.lock().unwrap_or_else(|e| e.into_inner());
        implicit.extend(names.iter().map(|n| n.as_ref().to_string()));
    }

    /// Whether the node `name` is an implicit child (not owned by the monitor).
    pub fn is_implicit(&self, name: &str) -> bool {
        self.implicit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// `blockdev-del`: removes the monitor-owned node `name` and the implicit children that
    /// nobody else uses, and returns them, parents first, for the caller to close. The
    /// checks and messages are QEMU's (`qmp_blockdev_del`), in its order.
    pub fn delete(&self, name: &str) -> Result<Vec<Arc<Node>>, GraphError> {
        let node = self
            .get(name)
            .map_err(|_| GraphError::NoSuchNode(name.to_string()))?;
        let parent_holds = self.parent_hold_ids(&node);
        let users = node.users();
        if users.iter().any(|u| !parent_holds.contains(&u.id)) {
            return Err(GraphError::InUse(name.to_string()));
        }
        if self.is_implicit(name) {
            return Err(GraphError::NotOwnedByMonitor(name.to_string()));
        }
        if !users.is_empty() {
            return Err(GraphError::DeviceInUse(name.to_string()));
        }
        let mut removed = vec![self.remove(name)?];
        removed.extend(self.sweep());
        Ok(removed)
    }

    /// The nodes that have `node` as a child.
    fn parents(&self, node: &Arc<Node>) -> Vec<Arc<Node>> {
        self.lock()
            .values()
            .filter(|p| p.children().iter().any(|(_, c)| Arc::ptr_eq(c, node)))
            .cloned()
            .collect()
    }

    /// The ids of the attachments that parent nodes hold on `node`.
    fn parent_hold_ids(&self, node: &Arc<Node>) -> BTreeSet<u64> {
        self.child_holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .filter(|hold| Arc::ptr_eq(hold.node(), node))
            .map(Attachment::id)
            .collect()
    }

    /// `blockdev-set-active`: activates or inactivates the node `name`, or every node, with
    /// QEMU's rules and messages. An inactive node is flushed and lets go of its image (its
    /// `file` layers release their locks); it serves only reads ([`Node::is_active`]).
    /// Inactivation goes down to the children whose parents are all inactive, and is
    /// refused while a parent is active or an export may write to the node without
    /// [allowing it](Node::allow_inactive). Activation takes the children along.
    pub async fn set_active(&self, name: Option<&str>, active: bool) -> Result<(), GraphError> {
        let Some(name) = name else {
            for node in self.all() {
                let result = if active {
                    self.activate(&node).await
                } else if self.parents(&node).is_empty() {
                    self.inactivate(&node, true).await
                } else {
                    Ok(())
                };
                if let Err(e) = result {
                    // QEMU prefixes only the inactivation's error.
                    return Err(if active {
                        GraphError::Activate(e)
                    } else {
                        GraphError::InactivateAll(e)
                    });
                }
            }
            return Ok(());
        };
        let node = self
            .get(name)
            .map_err(|_| GraphError::NoSuchNode(name.to_string()))?;
        if active {
            return Ok(self.activate(&node).await?);
        }
        if self.parents(&node).iter().any(|p| p.is_active()) {
            return Err(GraphError::ActiveParent);
        }
        self.inactivate(&node, true)
            .await
            .map_err(GraphError::Inactivate)
    }

    /// Activates `node` and its children (QEMU's `bdrv_activate`): an export without
    /// `allow-inactive` does this to its node.
    pub async fn activate(&self, node: &Arc<Node>) -> Result<(), ActiveError> {
        for (_, child) in node.children() {
            Box::pin(self.activate(child)).await?;
        }
        // Also for an active node: one opened for an inactive parent takes its image now.
        node.driver().set_active(true).await?;
        node.set_active_flag(true);
        Ok(())
    }

    /// QEMU's `bdrv_inactivate_recurse`.
    async fn inactivate(&self, node: &Arc<Node>, top_level: bool) -> Result<(), ActiveError> {
        if !node.is_active() {
            return Ok(());
        }
        if !top_level && self.parents(node).iter().any(|p| p.is_active()) {
            return Ok(());
        }
        let holds = self.parent_hold_ids(node);
        if node
            .users()
            .iter()
            .any(|u| !holds.contains(&u.id) && u.writable && !u.allow_inactive)
        {
            return Err(ActiveError::InUse);
        }
        // New writes are refused from here on; those in flight are waited for, as QEMU
        // drains the node, and what was written is then flushed.
        node.set_active_flag(false);
        node.drain_changes().await;
        if let Err(e) = node.driver().flush().await {
            node.set_active_flag(true);
            return Err(ActiveError::Driver(e));
        }
        node.driver().set_active(false).await?;
        for (_, child) in node.children() {
            Box::pin(self.inactivate(child, false)).await?;
        }
        Ok(())
    }

    /// Removes the implicit nodes that nobody uses any more (their parent was deleted, and
    /// the export that kept one was too), parents first, and returns them for the caller
    /// to close.
    pub fn sweep(&self) -> Vec<Arc<Node>> {
        let mut out = Vec::new();
        loop {
            let unused: Vec<String> = self
                .implicit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|name| {
                    self.lock()
                        .get(name.as_str())
                        .is_some_and(|n| n.users().is_empty())
                })
                .cloned()
                .collect();
            if unused.is_empty() {
                return out;
            }
            for name in unused {
                if let Ok(node) = self.remove(&name) {
                    out.push(node);
                }
            }
        }
    }

    /// Removes a node that nobody uses and returns it, so that the caller can close it. Its
    /// children become free again (they stay in the graph).
    pub fn remove(&self, name: &str) -> Result<Arc<Node>, GraphError> {
        let mut nodes = self.lock();
        let node = nodes
            .get(name)
            .cloned()
            .ok_or_else(|| GraphError::NoSuchNode(name.to_string()))?;
        let users = node.users();
        if let Some(user) = users.first() {
            return Err(GraphError::Busy {
                node: name.to_string(),
                user: user.description.clone(),
            });
        }
        nodes.remove(name);
        drop(nodes);
        self.implicit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.child_holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        Ok(node)
    }

    /// Removes every node, parents before children, and returns them in that order so that
    /// the caller can flush and close each.
    pub fn drain(&self) -> Vec<Arc<Node>> {
        let mut out = Vec::new();
        loop {
            let candidates: Vec<String> = self
                .lock()
                .values()
                .filter(|n| n.users().is_empty())
                .map(|n| n.name().to_string())
                .collect();
            if candidates.is_empty() {
                break;
            }
            for name in candidates {
                if let Ok(node) = self.remove(&name) {
                    out.push(node);
                }
            }
        }
        // Whatever is left is still used by something outside the graph: hand it over too.
        let rest: Vec<_> = std::mem::take(&mut *self.lock()).into_values().collect();
        self.child_holds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.implicit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        out.extend(rest);
        out
    }
}

/// Why a node could not change between active and inactive.
#[derive(Debug, thiserror::Error)]
pub enum ActiveError {
    /// A user may write and does not allow the node to become inactive (QEMU's `-EPERM`).
    #[error("Operation not permitted")]
    InUse,
    /// The driver could not flush, or release or take back its image.
    #[error(transparent)]
    Driver(#[from] BlockError),
}

/// QEMU's `id_wellformed` (util/id.c), the rule for export, object and chardev ids and node
/// names: a letter first, then only letters, digits, `-`, `.` and `_` (ASCII).
pub fn id_wellformed(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open, BlockError, WriteFlags};
    use serde_json::json;

    #[test]
    fn ids_are_well_formed_as_qemu_says() {
        for id in ["a", "A-b.c_d", "x1"] {
            assert!(id_wellformed(id), "{id}");
        }
        for id in [
            "", "1a", "_a", "-a", ".a", "a b", "é", "aé", "a/b", "a\0b", "#block1",
        ] {
            assert!(!id_wellformed(id), "{id:?}");
        }
    }

    #[tokio::test]
    async fn inactivation_waits_for_writes_in_flight() {
        let g = NodeGraph::new();
        let n = open::blockdev_add(
            &g,
            crate::BlockdevOptions::from_json(
                json!({"driver": "null-co", "node-name": "n", "latency-ns": 300_000_000u64}),
            )
            .expect("options"),
        )
        .await
        .expect("open");
        let export = n.attach("export 'e'", true).expect("attach");
        n.allow_inactive(export.id());
        let node = Arc::clone(&n);
        let write =
            tokio::spawn(async move { node.write(0, &[7u8; 512], WriteFlags::default()).await });
        // Once the write is past the node's check, inactivation must wait for it.
        while n.changes_in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        g.set_active(Some("n"), false).await.expect("inactivate");
        assert!(write.is_finished(), "inactivated with a write in flight");
        write
            .await
            .expect("task")
            .expect("the write in flight completes");
    }

    #[tokio::test]
    async fn an_inactive_node_serves_reads_only() {
        let g = NodeGraph::new();
        let n = open::blockdev_add(
            &g,
            crate::BlockdevOptions::from_json(
                json!({"driver": "null-co", "node-name": "n", "read-zeroes": true}),
            )
            .expect("options"),
        )
        .await
        .expect("open");
        let export = n.attach("export 'e'", true).expect("attach");
        // A writable user that does not allow it keeps the node active.
        let err = g.set_active(Some("n"), false).await.expect_err("in use");
        assert_eq!(
            err.to_string(),
            "Failed to inactivate node: Operation not permitted"
        );
        n.allow_inactive(export.id());
        g.set_active(Some("n"), false).await.expect("inactivate");
        assert!(!n.is_active());
        let mut buf = [1u8; 512];
        n.read(0, &mut buf).await.expect("read");
        assert_eq!(buf, [0u8; 512]);
        n.block_status(0, 512)
            .await
            .expect("block status, as for a sparse read");
        for result in [
            n.write(0, &buf, WriteFlags::default()).await,
            n.flush().await,
            n.discard(0, 512).await,
            n.resize(4096).await,
        ] {
            assert!(matches!(result, Err(BlockError::Inactive)), "{result:?}");
        }
        g.set_active(None, true).await.expect("activate");
        n.write(0, &buf, WriteFlags::default())
            .await
            .expect("write once active again");
    }
}
