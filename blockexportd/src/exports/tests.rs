//! The registry and the common checks of `block-export-add`, in process against a
//! [`Daemon`], with QSD 10's messages (each checked against qemu-storage-daemon).

use crate::daemon::Daemon;
use serde_json::{json, Map, Value};
use std::sync::Arc;

fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        v => panic!("not an object: {v}"),
    }
}

/// A daemon with a `null-co` node `n` and, in `dir`, a running NBD server.
async fn daemon(dir: &tempfile::TempDir) -> Arc<Daemon> {
    let qmp = qmp_server::QmpServer::new(crate::run::qmp_version());
    let d = Daemon::new(qmp, tokio::runtime::Handle::current());
    d.blockdev_add(map(
        json!({"driver": "null-co", "node-name": "n", "size": 1 << 20}),
    ))
    .await
    .expect("blockdev-add");
    let path = dir.path().join("nbd.sock");
    let addr = json!({"addr": {"type": "unix", "path": path.to_str().expect("UTF-8")}});
    d.nbd_server_start(qmp_server::parse_arguments(map(addr)).expect("options"))
        .await
        .expect("nbd-server-start");
    d
}

/// `block-export-add` with `args`: its error message, or `None` when it succeeded.
async fn add(d: &Daemon, args: Value) -> Option<String> {
    let result = match d.parse_export(map(args), false) {
        Ok(request) => d.block_export_add(request).await,
        Err(e) => Err(e),
    };
    result.err().map(|e| e.desc)
}

async fn ids(d: &Daemon) -> Vec<String> {
    let list = d.query_block_exports().await.expect("query-block-exports");
    let list = list.as_array().expect("a list").clone();
    list.iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_tells_unknown_from_unserved_types() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    let base = |ty: Value| json!({"type": ty, "id": "e", "node-name": "n"});
    assert_eq!(
        add(&d, base(json!("bogus"))).await.as_deref(),
        Some("Parameter 'type' does not accept value 'bogus'")
    );
    for ty in ["vhost-user-blk", "vduse-blk"] {
        assert_eq!(
            add(&d, base(json!(ty))).await,
            Some(format!(
                "Export type '{ty}' is not supported by this version of blockexportd"
            ))
        );
    }
    assert_eq!(
        add(&d, base(json!(1))).await.as_deref(),
        Some("Invalid parameter type for 'type', expected: string")
    );
    assert_eq!(
        add(&d, json!({"id": "e", "node-name": "n"}))
            .await
            .as_deref(),
        Some("Parameter 'type' is missing")
    );
    assert!(ids(&d).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_common_base_is_parsed_before_the_type_s_members() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    assert_eq!(
        add(&d, json!({"type": "nbd", "node-name": "n", "bogus": 1}))
            .await
            .as_deref(),
        Some("Parameter 'id' is missing")
    );
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e", "node-name": "n", "bogus": 1})
        )
        .await
        .as_deref(),
        Some("Parameter 'bogus' is unexpected")
    );
    // A FUSE member on an NBD export is no member of it.
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e", "node-name": "n", "mountpoint": "/x"})
        )
        .await
        .as_deref(),
        Some("Parameter 'mountpoint' is unexpected")
    );
    // The type's own values are checked as they are parsed, before the daemon's state.
    assert_eq!(
        add(
            &d,
            json!({"type": "fuse", "id": "f", "node-name": "n", "mountpoint": "/x",
                   "allow-other": "bogus", "iothread": "nope"})
        )
        .await
        .as_deref(),
        Some("Parameter 'allow-other' does not accept value 'bogus'")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_checks_come_in_qemu_s_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    let all_wrong = json!({"type": "nbd", "id": "1bad", "node-name": "missing",
                           "iothread": "nope"});
    assert_eq!(
        add(&d, all_wrong).await.as_deref(),
        Some("Invalid block export id")
    );
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e", "node-name": "missing", "iothread": "nope"})
        )
        .await
        .as_deref(),
        Some("Cannot find device='' nor node-name='missing'")
    );
    d.blockdev_add(map(
        json!({"driver": "null-co", "node-name": "ro", "read-only": true}),
    ))
    .await
    .expect("blockdev-add");
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e", "node-name": "ro", "writable": true,
                   "iothread": "nope"})
        )
        .await
        .as_deref(),
        Some("Cannot export read-only node as writable")
    );
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e", "node-name": "n", "iothread": "nope",
                   "bitmaps": ["b"]})
        )
        .await
        .as_deref(),
        Some("iothread \"nope\" not found")
    );
    assert_eq!(
        add(
            &d,
            json!({"type": "fuse", "id": "f", "node-name": "n", "mountpoint": "/x",
                   "allow-inactive": true})
        )
        .await
        .as_deref(),
        Some("Export type does not support inactive exports")
    );
    // The type's own checks come last.
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e", "node-name": "n", "bitmaps": ["b"]})
        )
        .await
        .as_deref(),
        Some("Bitmap 'b' is not found")
    );
    assert!(ids(&d).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_unique_across_types_and_free_again_once_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    assert_eq!(
        add(&d, json!({"type": "nbd", "id": "e0", "node-name": "n"})).await,
        None
    );
    // The FUSE export is refused before anything is mounted (the mountpoint does not exist).
    assert_eq!(
        add(
            &d,
            json!({"type": "fuse", "id": "e0", "node-name": "n", "mountpoint": "/nonexistent"})
        )
        .await
        .as_deref(),
        Some("Block export id 'e0' is already in use")
    );
    assert_eq!(ids(&d).await, ["e0"]);
    let del = |id: &'static str| {
        let d = Arc::clone(&d);
        async move {
            d.block_export_del(id, block_core::RemoveMode::Safe)
                .await
                .err()
                .map(|e| e.desc)
        }
    };
    assert_eq!(del("zz").await.as_deref(), Some("Export 'zz' is not found"));
    assert_eq!(del("e0").await, None);
    assert!(ids(&d).await.is_empty());
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e0", "node-name": "n", "name": "again"})
        )
        .await,
        None
    );
    d.close_all_exports().await;
    assert!(ids(&d).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iothread_in_use_by_an_export_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    d.object_add(map(json!({"qom-type": "iothread", "id": "io0"})), false)
        .await
        .expect("object-add");
    assert_eq!(
        add(
            &d,
            json!({"type": "nbd", "id": "e0", "node-name": "n", "iothread": "io0"})
        )
        .await,
        None
    );
    let del = || d.object_del(qmp_server::parse_arguments(map(json!({"id": "io0"}))).unwrap());
    assert_eq!(
        del().await.err().map(|e| e.desc).as_deref(),
        Some("object 'io0' is in use by export 'e0' and cannot be deleted")
    );
    d.nbd_server_stop().await.expect("nbd-server-stop");
    assert!(ids(&d).await.is_empty(), "nbd-server-stop ends NBD exports");
    del().await.expect("object-del");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyval_input_is_typed_by_the_common_and_the_type_s_tables() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    let kv = |extra: Value| {
        let mut args = map(json!({"type": "nbd", "id": "e0", "node-name": "n"}));
        args.extend(map(extra));
        d.parse_export(args, true).err().map(|e| e.desc)
    };
    assert_eq!(
        kv(json!({"writable": "off", "allocation-depth": "on"})),
        None
    );
    assert!(kv(json!({"writable": "maybe"})).is_some_and(|e| e.contains("writable")));
    // `growable` is FUSE's: a string NBD does not know.
    assert_eq!(
        kv(json!({"growable": "on"})).as_deref(),
        Some("Parameter 'growable' is unexpected")
    );
}
