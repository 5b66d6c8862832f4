//! The libraries' errors as QMP errors: one exhaustive mapping per domain (no catch-all arm,
//! so that a new variant must be decided here), each row tested.
//!
//! QEMU reports all of these with `error_setg`, so their class is `GenericError`; the text is
//! the library's, which is QEMU's.

use block_core::{AttachError, BitmapExists, GraphError};
use qmp_server::QmpError;

/// A node graph error (`blockdev-add`, `blockdev-del`, `blockdev-set-active`, lookups).
pub(crate) fn graph(e: GraphError) -> QmpError {
    match &e {
        GraphError::NotFound { .. }
        | GraphError::NoSuchNode(_)
        | GraphError::InvalidName(_)
        | GraphError::DuplicateName(_)
        | GraphError::NameTooLong
        | GraphError::InUse(_)
        | GraphError::NotOwnedByMonitor(_)
        | GraphError::DeviceInUse(_)
        | GraphError::Busy { .. }
        | GraphError::ActiveParent
        | GraphError::InactivateAll(_)
        | GraphError::Inactivate(_)
        | GraphError::Attach(_)
        | GraphError::BitmapExists(_)
        | GraphError::Activate(_)
        | GraphError::Options(_)
        | GraphError::DetectZeroesUnmapWithoutDiscard
        | GraphError::ForceShareWritable
        | GraphError::NotBuilt(_)
        | GraphError::Open(_)
        | GraphError::BackingFile(_) => QmpError::generic(e.to_string()),
    }
}

/// A user that could not attach to its node (an export being added).
pub(crate) fn attach(e: AttachError) -> QmpError {
    match &e {
        AttachError::ReadOnly { .. } | AttachError::PermissionConflict { .. } => {
            QmpError::generic(e.to_string())
        }
    }
}

/// `block-dirty-bitmap-add` of a name the node has.
pub(crate) fn bitmap_exists(e: BitmapExists) -> QmpError {
    QmpError::generic(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use block_core::graph::ActiveError;
    use block_core::{BlockError, OptionError};
    use qmp_server::ErrorClass;

    fn row(e: QmpError, desc: &str) {
        assert_eq!(e.class, ErrorClass::GENERIC_ERROR, "{desc}");
        assert_eq!(e.desc, desc);
    }

    #[test]
    fn every_graph_error_is_a_generic_error_with_qemus_text() {
        let rows = [
            (
                GraphError::not_found("n"),
                "Cannot find device='' nor node-name='n'",
            ),
            (
                GraphError::reference_not_found("n"),
                "Cannot find device='n' nor node-name='n'",
            ),
            (
                GraphError::NoSuchNode("n".into()),
                "Failed to find node with node-name='n'",
            ),
            (
                GraphError::InvalidName("1".into()),
                "Invalid node-name: '1'",
            ),
            (
                GraphError::DuplicateName("n".into()),
                "Duplicate nodes with node-name='n'",
            ),
            (GraphError::NameTooLong, "Node name too long"),
            (GraphError::InUse("n".into()), "Node n is in use"),
            (
                GraphError::NotOwnedByMonitor("n".into()),
                "Node n is not owned by the monitor",
            ),
            (
                GraphError::DeviceInUse("n".into()),
                "Block device n is in use",
            ),
            (
                GraphError::Busy {
                    node: "n".into(),
                    user: "export 'e'".into(),
                },
                "Node 'n' is busy: it is used by export 'e'",
            ),
            (GraphError::ActiveParent, "Node has active parent node"),
            (
                GraphError::InactivateAll(ActiveError::InUse),
                "Failed to inactivate all nodes: Operation not permitted",
            ),
            (
                GraphError::Inactivate(ActiveError::InUse),
                "Failed to inactivate node: Operation not permitted",
            ),
            (
                GraphError::Attach(AttachError::ReadOnly { node: "n".into() }),
                "Block node 'n' is read-only",
            ),
            (
                GraphError::BitmapExists(BitmapExists("b".into())),
                "Bitmap already exists: b",
            ),
            (
                GraphError::Activate(ActiveError::Driver(BlockError::ReadOnly)),
                "node is read-only",
            ),
            (
                GraphError::Options(OptionError::OutOfRange {
                    value: -1,
                    path: "file.aio-max-batch".into(),
                }),
                "Value '-1' is out of range for parameter 'file.aio-max-batch'",
            ),
            (
                GraphError::Options(OptionError::Argument(qsd_qapi::ArgumentError::Missing(
                    "filename".into(),
                ))),
                "Parameter 'filename' is missing",
            ),
            (
                GraphError::DetectZeroesUnmapWithoutDiscard,
                "setting detect-zeroes to unmap is not allowed without setting discard \
                 operation to unmap",
            ),
            (
                GraphError::ForceShareWritable,
                "force-share=on can only be used with read-only images",
            ),
            (
                GraphError::NotBuilt("qcow2"),
                "Driver 'qcow2' is not built into this version of blockexportd",
            ),
            (
                GraphError::Open(Box::new(BlockError::io(
                    "Could not open 'x'",
                    std::io::Error::from_raw_os_error(libc::ENOENT),
                ))),
                "Could not open 'x': No such file or directory",
            ),
            (
                GraphError::BackingFile(Box::new(GraphError::NotBuilt("raw"))),
                "Could not open backing file: Driver 'raw' is not built into this version of \
                 blockexportd",
            ),
        ];
        for (e, desc) in rows {
            row(graph(e), desc);
        }
    }

    #[test]
    fn attach_and_bitmap_errors_are_generic_errors_with_qemus_text() {
        row(
            attach(AttachError::ReadOnly { node: "n".into() }),
            "Block node 'n' is read-only",
        );
        row(
            attach(AttachError::PermissionConflict {
                node: "f".into(),
                needed_by: "export 'e'".into(),
                unshared_by: "node 'q'".into(),
            }),
            "Permission conflict on node 'f': permissions 'write, resize' are both required by \
             export 'e' and unshared by node 'q'.",
        );
        row(
            bitmap_exists(BitmapExists("b".into())),
            "Bitmap already exists: b",
        );
    }
}
