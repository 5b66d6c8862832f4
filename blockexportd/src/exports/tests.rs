//! The registry and the common checks of `block-export-add`, in process against a
//! [`Daemon`], with the messages QSD 10 gives.

use crate::daemon::Daemon;
use serde_json::{json, Map, Value};
use std::future::Future;
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
    // Every QAPI type is served: each parses its own members next (QSD's messages).
    assert_eq!(
        add(&d, base(json!("vduse-blk"))).await.as_deref(),
        Some("Parameter 'name' is missing")
    );
    assert_eq!(
        add(&d, base(json!("vhost-user-blk"))).await.as_deref(),
        Some("Parameter 'addr' is missing")
    );
    // A QAPI type a registry lacks is refused as not served, not as unknown.
    let mut partial = super::Registry::default();
    partial.register(super::fuse::Fuse);
    assert_eq!(
        partial.find("vduse-blk").err().map(|e| e.desc).as_deref(),
        Some("Export type 'vduse-blk' is not supported by this version of blockexportd")
    );
    assert!(partial.find("fuse").is_ok());
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

/// A QMP monitor on the daemon, to read its events.
struct Monitor {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Monitor {
    async fn open(d: &Arc<Daemon>) -> Monitor {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("socketpair");
        let qmp = d.qmp().clone();
        tokio::spawn(async move {
            qmp.serve_stream(theirs, qmp_server::MonitorOptions { pretty: false })
                .await
        });
        let (r, mut w) = ours.into_split();
        let mut lines = tokio::io::BufReader::new(r).lines();
        lines
            .next_line()
            .await
            .expect("greeting")
            .expect("greeting");
        w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
            .await
            .expect("write");
        let reply = lines.next_line().await.expect("reply").expect("reply");
        assert_eq!(reply, r#"{"return": {}}"#);
        Monitor { lines, writer: w }
    }

    /// Sends a command; the messages before its reply are the events sent until then.
    async fn events_before_a_reply(&mut self) -> Vec<Value> {
        use tokio::io::AsyncWriteExt;
        self.writer
            .write_all(b"{\"execute\": \"query-block-exports\"}\n")
            .await
            .expect("write");
        let mut events = Vec::new();
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .expect("read")
                .expect("a message");
            let msg: Value = serde_json::from_str(&line).expect("JSON");
            if msg.get("event").is_none() {
                return events;
            }
            events.push(json!({"event": msg["event"], "data": msg["data"]}));
        }
    }
}

/// An NBD client (oldstyle `NBD_OPT_EXPORT_NAME`, simple replies) that asks for a 32 MiB
/// read and takes only the reply's header: the server is then stuck writing the data, with
/// the request in flight, until [`read_rest`](Self::read_rest).
struct StuckClient(tokio::net::UnixStream);

const READ_LEN: u32 = 32 << 20;

impl StuckClient {
    async fn connect(path: &std::path::Path, export: &str) -> StuckClient {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.expect("greeting");
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
        let mut hello = 3u32.to_be_bytes().to_vec();
        hello.extend(b"IHAVEOPT");
        hello.extend(1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        hello.extend((export.len() as u32).to_be_bytes());
        hello.extend(export.as_bytes());
        s.write_all(&hello).await.expect("option");
        let mut info = [0u8; 10]; // size, transmission flags
        s.read_exact(&mut info).await.expect("export info");
        let mut read = 0x2560_9513u32.to_be_bytes().to_vec();
        read.extend(0u16.to_be_bytes()); // flags
        read.extend(0u16.to_be_bytes()); // NBD_CMD_READ
        read.extend(7u64.to_be_bytes()); // handle
        read.extend(0u64.to_be_bytes()); // offset
        read.extend(READ_LEN.to_be_bytes());
        s.write_all(&read).await.expect("request");
        let mut header = [0u8; 16];
        s.read_exact(&mut header).await.expect("reply header");
        assert_eq!(
            &header[..8],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0],
            "a simple reply, no error"
        );
        StuckClient(s)
    }

    async fn read_rest(mut self) {
        use tokio::io::AsyncReadExt;
        let mut data = vec![0u8; READ_LEN as usize];
        self.0.read_exact(&mut data).await.expect("the read's data");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_removal_drains_in_the_background_and_quit_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&dir).await;
    d.blockdev_add(map(
        json!({"driver": "null-co", "node-name": "big", "size": 64 << 20}),
    ))
    .await
    .expect("blockdev-add");
    let mut monitor = Monitor::open(&d).await;
    assert_eq!(
        add(&d, json!({"type": "nbd", "id": "e0", "node-name": "big"})).await,
        None
    );
    let client = StuckClient::connect(&dir.path().join("nbd.sock"), "big").await;
    let del = |mode| {
        let d = Arc::clone(&d);
        async move { d.block_export_del("e0", mode).await.err().map(|e| e.desc) }
    };
    assert_eq!(
        del(block_core::RemoveMode::Safe).await.as_deref(),
        Some("export 'e0' still in use")
    );
    assert_eq!(del(block_core::RemoveMode::Hard).await, None);
    // Its request is still in flight: the export drains, listed as shutting down.
    let list = d.query_block_exports().await.unwrap();
    assert_eq!(
        list,
        json!([{"id": "e0", "type": "nbd", "node-name": "big", "shutting-down": true}])
    );
    assert_eq!(
        del(block_core::RemoveMode::Hard).await.as_deref(),
        Some("Export 'e0' is already shutting down")
    );
    // The drain cannot progress while the client reads nothing, so `quit` must stay pending
    // (it would be ready at its first poll if it did not wait).
    let mut quit = std::pin::pin!(d.close_all_exports());
    let pending =
        std::future::poll_fn(|cx| std::task::Poll::Ready(quit.as_mut().poll(cx).is_pending()))
            .await;
    assert!(pending, "quit waits for the export still draining");
    client.read_rest().await;
    quit.await;
    assert!(ids(&d).await.is_empty());
    // One event, when the last request was done.
    assert_eq!(
        monitor.events_before_a_reply().await,
        [json!({"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}})]
    );
}
