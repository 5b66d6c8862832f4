//! The client-side transport: the test listens, the server connects out to it (and back
//! again after the test hangs up, with a reconnect delay).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qmp_server::{MonitorOptions, QmpServer, VersionInfo};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

fn server() -> QmpServer {
    QmpServer::new(VersionInfo {
        major: 10,
        minor: 0,
        micro: 0,
        package: "test".into(),
    })
}

/// Accepts the server's connection and reads its greeting.
async fn accept(listener: &UnixListener) -> (BufReader<UnixStream>, Value) {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("the server connects")
        .expect("accept");
    let mut r = BufReader::new(stream);
    let greeting = recv(&mut r).await;
    (r, greeting)
}

async fn recv(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    let n = r.read_line(&mut line).await.expect("read");
    assert!(n > 0, "connection closed");
    serde_json::from_str(&line).expect("JSON")
}

async fn cmd(r: &mut BufReader<UnixStream>, text: &str) -> Value {
    r.get_mut().write_all(text.as_bytes()).await.expect("write");
    recv(r).await
}

#[tokio::test]
async fn connects_out_and_reconnects_after_the_peer_hangs_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mon.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = server();
    let attempts = Arc::new(AtomicUsize::new(0));
    let task = {
        let (server, path, attempts) = (server.clone(), path.clone(), Arc::clone(&attempts));
        tokio::spawn(async move {
            let connect = move || {
                attempts.fetch_add(1, Ordering::SeqCst);
                UnixStream::connect(path.clone())
            };
            server
                .serve_client(
                    connect,
                    None,
                    Some(Duration::from_millis(20)),
                    MonitorOptions::default(),
                )
                .await
        })
    };
    let (mut c, greeting) = accept(&listener).await;
    assert_eq!(greeting["QMP"]["version"]["package"], "test");
    assert_eq!(
        cmd(&mut c, r#"{"execute": "qmp_capabilities"}"#).await,
        json!({"return": {}})
    );
    let v = cmd(&mut c, r#"{"execute": "query-version", "id": 1}"#).await;
    assert_eq!(v["id"], 1);
    assert_eq!(v["return"]["qemu"]["major"], 10);
    drop(c);
    // A new connection, a new monitor: greeting again, negotiation needed again.
    let (mut c, greeting) = accept(&listener).await;
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    let v = cmd(&mut c, r#"{"execute": "query-version"}"#).await;
    assert_eq!(v["error"]["class"], "CommandNotFound", "{v}");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    server.shutdown();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("serve_client ends at shutdown")
        .expect("task");
}

#[tokio::test]
async fn retries_until_the_peer_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mon.sock");
    let server = server();
    let attempts = Arc::new(AtomicUsize::new(0));
    let task = {
        let (server, path, attempts) = (server.clone(), path.clone(), Arc::clone(&attempts));
        tokio::spawn(async move {
            let connect = move || {
                attempts.fetch_add(1, Ordering::SeqCst);
                UnixStream::connect(path.clone())
            };
            server
                .serve_client(
                    connect,
                    None,
                    Some(Duration::from_millis(10)),
                    MonitorOptions::default(),
                )
                .await
        })
    };
    // Nobody listens yet: attempts fail and are retried.
    while attempts.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let listener = UnixListener::bind(&path).expect("bind");
    let (_c, greeting) = accept(&listener).await;
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    server.shutdown();
    task.await.expect("task");
}

#[tokio::test]
async fn without_reconnect_one_session_then_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mon.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let first = UnixStream::connect(&path).await.expect("connect");
    let server = server();
    let task = {
        let server = server.clone();
        tokio::spawn(async move {
            let never = || async { Err::<UnixStream, _>(std::io::Error::other("not called")) };
            server
                .serve_client(never, Some(first), None, MonitorOptions::default())
                .await
        })
    };
    let (stream, _) = listener.accept().await.expect("accept");
    let mut c = BufReader::new(stream);
    assert!(recv(&mut c).await.get("QMP").is_some());
    drop(c);
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("serve_client returns when its only session ends")
        .expect("task");
}
