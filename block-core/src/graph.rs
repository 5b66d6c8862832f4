//! The node graph: every node by name, and the rules for adding and removing them.

use crate::node::{Attachment, ChildRole, Node};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a graph operation failed. The messages follow QEMU's where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// No node has this name (QMP class `DeviceNotFound` where QEMU uses it).
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NotFound(String),
    /// Any other failure (QMP class `GenericError`).
    #[error("{0}")]
    Failed(String),
}

/// All named nodes of a daemon.
#[derive(Debug, Default)]
pub struct NodeGraph {
    nodes: Mutex<BTreeMap<String, Arc<Node>>>,
    /// Attachments that parent nodes hold on their children, keyed by the parent's name.
    child_holds: Mutex<BTreeMap<String, Vec<Attachment>>>,
    next_auto_name: AtomicU64,
}

impl NodeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        NodeGraph::default()
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

    /// Checks that `name` is a valid, unused node name (QEMU's rules: it starts with a letter
    /// and holds only letters, digits, `-`, `.` and `_`, at most 31 characters).
    pub fn check_new_name(&self, name: &str) -> Result<(), GraphError> {
        let valid = name.len() < 32
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid {
            return Err(GraphError::Failed(
                "Invalid node-name: '".to_string() + name + "'",
            ));
        }
        if self.contains(name) {
            return Err(GraphError::Failed(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
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
            }
            .map_err(|e| GraphError::Failed(e.to_string()))?;
            holds.push(hold);
        }
        let mut nodes = self.lock();
        if nodes.contains_key(node.name()) {
            return Err(GraphError::Failed(format!(
                "Duplicate nodes with node-name='{}'",
                node.name()
            )));
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
            .ok_or_else(|| GraphError::NotFound(name.to_string()))
    }

    /// Every node, ordered by name.
    pub fn all(&self) -> Vec<Arc<Node>> {
        self.lock().values().cloned().collect()
    }

    /// Removes a node that nobody uses (`blockdev-del`) and returns it, so that the caller
    /// can close it. Its children become free again (they stay in the graph).
    pub fn remove(&self, name: &str) -> Result<Arc<Node>, GraphError> {
        let mut nodes = self.lock();
        let node = nodes.get(name).cloned().ok_or_else(|| {
            GraphError::Failed(format!("Failed to find node with node-name='{name}'"))
        })?;
        let users = node.users();
        if let Some(user) = users.first() {
            return Err(GraphError::Failed(format!(
                "Node '{name}' is busy: it is used by {}",
                user.description
            )));
        }
        nodes.remove(name);
        drop(nodes);
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
        out.extend(rest);
        out
    }
}
