//! The server over real unix sockets (and TCP, and an in-memory stream),
//! driven by a plain tokio client.

use std::path::PathBuf;
use std::sync::Arc;

use qmp_server::{
    parse_arguments, MonitorOptions, QmpError, QmpServer, ServerLimits, StreamLimits, VersionInfo,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

fn version() -> VersionInfo {
    VersionInfo {
        major: 10,
        minor: 0,
        micro: 2,
        package: "test".into(),
    }
}

struct Daemon {
    server: QmpServer,
    dir: tempfile::TempDir,
    listeners: Vec<JoinHandle<()>>,
}

impl Daemon {
    fn new(limits: ServerLimits) -> Self {
        let server = QmpServer::with_limits(version(), limits);
        server.register("echo", |args| async move {
            #[derive(serde::Deserialize)]
            struct A {
                text: String,
            }
            let a: A = parse_arguments(args)?;
            Ok::<_, QmpError>(json!({ "text": a.text }))
        });
        server.register("boom", |_| async {
            if true {
                panic!("handler bug");
            }
            Ok::<_, QmpError>(Value::Null)
        });
        server.register("fail", |_| async {
            Err::<Value, _>(QmpError::device_not_found("Node 'x' not found"))
        });
        Self {
            server,
            dir: tempfile::tempdir().expect("tempdir"),
            listeners: Vec::new(),
        }
    }

    /// Adds a unix listener (a `--monitor`) and returns its path.
    fn listen(&mut self, name: &str, pretty: bool) -> PathBuf {
        let path = self.dir.path().join(name);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = self.server.clone();
        self.listeners.push(tokio::spawn(async move {
            server.serve_unix(listener, MonitorOptions { pretty }).await
        }));
        path
    }

    async fn stop(self) {
        self.server.shutdown();
        for l in self.listeners {
            l.await.expect("listener task");
        }
    }
}

struct Client {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects and checks the greeting.
    async fn connect(path: &PathBuf) -> Self {
        let mut c = Self::connect_raw(path).await;
        let g = c.recv().await;
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                "package": "test"}, "capabilities": ["oob"]}})
        );
        c
    }

    async fn connect_raw(path: &PathBuf) -> Self {
        let s = UnixStream::connect(path).await.expect("connect");
        let (r, w) = s.into_split();
        Self {
            r: BufReader::new(r),
            w,
        }
    }

    async fn negotiated(path: &PathBuf) -> Self {
        let mut c = Self::connect(path).await;
        assert_eq!(
            c.cmd(r#"{"execute": "qmp_capabilities"}"#).await,
            json!({"return": {}})
        );
        c
    }

    async fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).await.expect("write");
        self.w.write_all(b"\n").await.expect("write");
    }

    async fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).await.expect("read");
        assert!(n > 0, "unexpected EOF");
        assert!(line.ends_with("\r\n"), "line not ended by CR LF: {line:?}");
        line
    }

    async fn recv(&mut self) -> Value {
        let line = self.recv_line().await;
        serde_json::from_str(&line).expect("server sent JSON")
    }

    /// Reads one pretty-printed message (it ends with a `}` in column 0).
    async fn recv_pretty(&mut self) -> String {
        let mut text = String::new();
        loop {
            let l = self.recv_line().await;
            text.push_str(&l);
            if l == "}\r\n" {
                return text;
            }
        }
    }

    async fn cmd(&mut self, s: &str) -> Value {
        self.send(s).await;
        self.recv().await
    }
}

fn error(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[tokio::test]
async fn greeting_and_negotiation() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::connect_raw(&path).await;
    // Byte for byte as QSD 10.0 sends it.
    assert_eq!(
        c.recv_line().await,
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
         \"package\": \"test\"}, \"capabilities\": [\"oob\"]}}\r\n"
    );
    let expecting = error(
        "CommandNotFound",
        "Expecting capabilities negotiation with 'qmp_capabilities'",
    );
    assert_eq!(c.cmd(r#"{"execute": "query-version"}"#).await, expecting);
    assert_eq!(c.cmd(r#"{"execute": "nope"}"#).await, expecting);
    assert_eq!(
        c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}"#)
            .await,
        error(
            "GenericError",
            "Parameter 'null' does not accept value 'foo'"
        )
    );
    assert_eq!(
        c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#)
            .await,
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(r#"{"execute": "qmp_capabilities"}"#).await,
        error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored"
        )
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-version"}"#).await,
        json!({"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "test"}})
    );
    let cmds = c.cmd(r#"{"execute": "query-commands"}"#).await;
    let names: Vec<&str> = cmds["return"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "fail",
            "boom",
            "echo",
            "quit",
            "query-commands",
            "query-version",
            "qmp_capabilities"
        ]
    );
    assert_eq!(
        c.cmd(r#"{"execute": "query-version", "arguments": {"x": 1}}"#)
            .await,
        error("GenericError", "Parameter 'x' is unexpected")
    );
    d.stop().await;
}

#[tokio::test]
async fn oob_can_be_enabled_but_no_command_supports_it() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::connect(&path).await;
    assert_eq!(
        c.cmd(r#"{"exec-oob": "echo"}"#).await,
        error("GenericError", "QMP input member 'exec-oob' is unexpected")
    );
    assert_eq!(
        c.cmd(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)
            .await,
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(r#"{"exec-oob": "echo", "id": 1}"#).await,
        json!({"id": 1, "error": {"class": "GenericError",
            "desc": "The command echo does not support OOB"}})
    );
    assert_eq!(
        c.cmd(r#"{"exec-oob": "nope", "id": 1}"#).await,
        json!({"id": 1, "error": {"class": "CommandNotFound",
            "desc": "The command nope has not been found"}})
    );
    d.stop().await;
}

#[tokio::test]
async fn id_is_echoed_verbatim() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    for id in [
        json!(7),
        json!(-1.5),
        json!("abc"),
        json!({"a": [1, {"b": null}]}),
        json!(null),
        json!([]),
    ] {
        let req = json!({"execute": "echo", "arguments": {"text": "t"}, "id": id});
        let r = c.cmd(&req.to_string()).await;
        assert_eq!(r, json!({"return": {"text": "t"}, "id": id}));
        let req = json!({"execute": "nope", "id": id});
        let r = c.cmd(&req.to_string()).await;
        assert_eq!(r["id"], id);
    }
    // The exact bytes, with QEMU's member order.
    c.send(r#"{"execute": "echo", "arguments": {"text": "t"}, "id": 5}"#)
        .await;
    assert_eq!(
        c.recv_line().await,
        "{\"return\": {\"text\": \"t\"}, \"id\": 5}\r\n"
    );
    c.send(r#"{"execute": "fail", "id": 5}"#).await;
    assert_eq!(
        c.recv_line().await,
        "{\"id\": 5, \"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Node 'x' not found\"}}\r\n"
    );
    d.stop().await;
}

#[tokio::test]
async fn unknown_command_and_argument_errors() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    assert_eq!(
        c.cmd(r#"{"execute": "block-export-frobnicate"}"#).await,
        error(
            "CommandNotFound",
            "The command block-export-frobnicate has not been found"
        )
    );
    assert_eq!(
        c.cmd(r#"{"execute": "echo"}"#).await,
        error("GenericError", "Parameter 'text' is missing")
    );
    // A panicking handler costs one error reply, not the connection.
    assert_eq!(
        c.cmd(r#"{"execute": "boom"}"#).await,
        error("GenericError", "Command boom failed unexpectedly")
    );
    assert_eq!(
        c.cmd(r#"{"execute": "echo", "arguments": {"text": 1}}"#)
            .await,
        error(
            "GenericError",
            "Invalid parameter type for 'text', expected: string"
        )
    );
    assert_eq!(
        c.cmd(r#"{"execute": "echo", "arguments": {"text": "a", "b": 1}}"#)
            .await,
        error("GenericError", "Parameter 'b' is unexpected")
    );
    d.stop().await;
}

#[tokio::test]
async fn bad_json_then_good_command_on_the_same_connection() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    assert_eq!(
        c.cmd("[1]").await,
        error("GenericError", "QMP input must be a JSON object")
    );
    assert_eq!(
        c.cmd(r#"{"execute": "echo", "bar": 1}"#).await,
        error("GenericError", "QMP input member 'bar' is unexpected")
    );
    c.send("{bad").await;
    assert_eq!(
        c.cmd("}").await,
        error("GenericError", "JSON parse error, invalid keyword 'bad'")
    );
    assert_eq!(
        c.cmd("@").await,
        error("GenericError", "JSON parse error, stray '@'")
    );
    let r = c
        .cmd(r#"{"execute": "echo", "arguments": {"text": "still here"}}"#)
        .await;
    assert_eq!(r, json!({"return": {"text": "still here"}}));
    d.stop().await;
}

#[tokio::test]
async fn stream_not_lines() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    // Two requests on one line, then one request over three writes.
    c.send(r#"{"execute": "echo", "arguments": {"text": "a"}, "id": 1}{"execute": "echo", "arguments": {"text": "b"}, "id": 2}"#)
        .await;
    assert_eq!(c.recv().await["id"], 1);
    assert_eq!(c.recv().await["id"], 2);
    c.w.write_all(b"{\"execute\":\n").await.expect("write");
    c.w.write_all(b"\"echo\", \"arguments\": {'text': 'x\"y'}")
        .await
        .expect("write");
    c.w.write_all(b", \"id\": 3}").await.expect("write");
    assert_eq!(c.recv().await, json!({"return": {"text": "x\"y"}, "id": 3}));
    d.stop().await;
}

#[tokio::test]
async fn two_monitors_receive_an_event_but_not_before_negotiation() {
    let mut d = Daemon::new(ServerLimits::default());
    let p1 = d.listen("a.sock", false);
    let p2 = d.listen("b.sock", true);
    let p3 = d.listen("c.sock", false);
    let mut a = Client::negotiated(&p1).await;
    let mut b = Client::connect_raw(&p2).await;
    let greeting = b.recv_pretty().await;
    assert!(
        greeting.starts_with("{\r\n    \"QMP\": {\r\n        \"version\": {\r\n"),
        "{greeting}"
    );
    let greeting: Value = serde_json::from_str(&greeting).expect("JSON");
    assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
    // Pretty monitor: the reply spans lines.
    b.send(r#"{"execute": "qmp_capabilities"}"#).await;
    assert_eq!(b.recv_line().await, "{\r\n");
    assert_eq!(b.recv_line().await, "    \"return\": {\r\n");
    assert_eq!(b.recv_line().await, "    }\r\n");
    assert_eq!(b.recv_line().await, "}\r\n");
    let mut c = Client::connect(&p3).await;
    assert_eq!(d.server.monitor_count(), 3);

    d.server
        .events()
        .emit("BLOCK_EXPORT_DELETED", json!({"id": "e0"}));

    let ev = a.recv().await;
    assert_eq!(ev["event"], "BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert!(ev["timestamp"]["seconds"].as_u64().expect("seconds") > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_u64().expect("us") < 1_000_000);
    let mut text = String::new();
    loop {
        let l = b.recv_line().await;
        text.push_str(&l);
        if l == "}\r\n" {
            break;
        }
    }
    assert!(
        text.starts_with("{\r\n    \"timestamp\": {\r\n        \"seconds\": "),
        "{text}"
    );
    assert!(text.ends_with("    \"event\": \"BLOCK_EXPORT_DELETED\",\r\n    \"data\": {\r\n        \"id\": \"e0\"\r\n    }\r\n}\r\n"), "{text}");
    // An event without data has no "data" member, as in QEMU; events can
    // be emitted from any thread, also outside the runtime.
    let events = d.server.events();
    std::thread::spawn(move || events.emit("RESUME", json!({})))
        .join()
        .expect("emitting thread");
    let ev = a.recv().await;
    assert_eq!(ev["event"], "RESUME");
    assert!(ev.get("data").is_none(), "{ev}");
    // The monitor still negotiating got no event: its next message is the
    // reply to its next command.
    assert_eq!(
        c.cmd(r#"{"execute": "qmp_capabilities", "id": 9}"#).await,
        json!({"return": {}, "id": 9})
    );
    d.stop().await;
}

#[tokio::test]
async fn one_client_at_a_time_per_listener() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut a = Client::negotiated(&path).await;
    // A second client connects and sends at once; it is not served yet.
    let mut b = Client::connect_raw(&path).await;
    b.send(r#"{"execute": "qmp_capabilities", "id": "b"}"#)
        .await;
    assert_eq!(
        a.cmd(r#"{"execute": "echo", "arguments": {"text": "a"}}"#)
            .await,
        json!({"return": {"text": "a"}})
    );
    assert_eq!(d.server.monitor_count(), 1);
    drop(a);
    // Once the first one is gone, the second gets its greeting and reply.
    assert!(b.recv().await.get("QMP").is_some());
    assert_eq!(b.recv().await, json!({"return": {}, "id": "b"}));
    d.stop().await;
}

#[tokio::test]
async fn commands_of_one_monitor_run_in_order() {
    let mut d = Daemon::new(ServerLimits::default());
    let release = Arc::new(Notify::new());
    let r = release.clone();
    d.server.register("wait", move |_| {
        let r = r.clone();
        async move {
            r.notified().await;
            Ok::<_, QmpError>(json!({}))
        }
    });
    let r = release.clone();
    d.server.register("release", move |_| {
        let r = r.clone();
        async move {
            r.notify_one();
            Ok::<_, QmpError>(json!({}))
        }
    });
    let p1 = d.listen("a.sock", false);
    let p2 = d.listen("b.sock", false);
    let mut a = Client::negotiated(&p1).await;
    let mut b = Client::negotiated(&p2).await;
    a.send(
        r#"{"execute": "wait", "id": 1} {"execute": "echo", "arguments": {"text": "x"}, "id": 2}"#,
    )
    .await;
    // The other monitor is not blocked by the waiting command.
    assert_eq!(
        b.cmd(r#"{"execute": "echo", "arguments": {"text": "b"}}"#)
            .await,
        json!({"return": {"text": "b"}})
    );
    assert_eq!(
        b.cmd(r#"{"execute": "release"}"#).await,
        json!({"return": {}})
    );
    assert_eq!(a.recv().await, json!({"return": {}, "id": 1}));
    assert_eq!(a.recv().await, json!({"return": {"text": "x"}, "id": 2}));
    d.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_others_keep_working() {
    let limits = ServerLimits {
        max_queued_output: 64 * 1024,
        ..ServerLimits::default()
    };
    let mut d = Daemon::new(limits);
    let p1 = d.listen("slow.sock", false);
    let p2 = d.listen("fast.sock", false);
    let mut slow = Client::negotiated(&p1).await;
    let mut fast = Client::negotiated(&p2).await;
    let events = d.server.events();
    let payload = "x".repeat(1024);
    const BATCHES: usize = 400;
    const PER_BATCH: usize = 10;
    for _ in 0..BATCHES {
        for _ in 0..PER_BATCH {
            events.emit("TICK", json!({ "payload": payload }));
        }
        for _ in 0..PER_BATCH {
            assert_eq!(fast.recv().await["event"], "TICK");
        }
    }
    // ~4 MB went out; the slow client's socket buffer plus 64 KiB of queue
    // cannot hold that, so it was dropped; the fast one is still served.
    assert_eq!(d.server.monitor_count(), 1);
    assert_eq!(
        fast.cmd(r#"{"execute": "echo", "arguments": {"text": "ok"}}"#)
            .await,
        json!({"return": {"text": "ok"}})
    );
    // The slow client sees a prefix of the events, then EOF.
    let mut buf = Vec::new();
    slow.r.read_to_end(&mut buf).await.expect("read");
    let got = buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count();
    assert!(
        got < BATCHES * PER_BATCH,
        "slow client got all {got} events"
    );
    d.stop().await;
}

#[tokio::test]
async fn an_over_long_message_gets_an_error_and_the_connection_lives_on() {
    let limits = ServerLimits {
        stream: StreamLimits {
            max_message_bytes: 4096,
            ..StreamLimits::default()
        },
        ..ServerLimits::default()
    };
    let mut d = Daemon::new(limits);
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    let long = format!(
        r#"{{"execute": "echo", "arguments": {{"text": "{}"}}}}"#,
        "y".repeat(100_000)
    );
    c.send(&long).await;
    assert_eq!(
        c.recv().await,
        error("GenericError", "JSON token size limit exceeded")
    );
    c.send(r#"{"execute": "echo", "arguments": {"text": "after"}, "id": "after"}"#)
        .await;
    // Recovery may report the tail of the dropped message; then the request.
    loop {
        let r = c.recv().await;
        if r.get("id") == Some(&json!("after")) {
            assert_eq!(r["return"], json!({"text": "after"}));
            break;
        }
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
    }
    // Nesting is limited as in QEMU.
    c.send(&"[".repeat(1025)).await;
    assert_eq!(
        c.recv().await,
        error("GenericError", "JSON nesting depth limit exceeded")
    );
    d.stop().await;
}

#[tokio::test]
async fn quit_is_answered_then_signalled_and_shutdown_closes_everything() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    let server = d.server.clone();
    let waiter = tokio::spawn(async move { server.quit_requested().await });
    assert_eq!(
        c.cmd(r#"{"execute": "quit", "id": "q"}"#).await,
        json!({"return": {}, "id": "q"})
    );
    waiter.await.expect("quit_requested resolved");
    d.server.shutdown();
    let mut rest = Vec::new();
    c.r.read_to_end(&mut rest).await.expect("read");
    assert!(rest.is_empty());
    for l in d.listeners {
        l.await.expect("listener ended");
    }
}

async fn greeting_over<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Value {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "EOF before greeting");
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"{\"execute\": \"qmp_capabilities\", \"id\": 1}\n")
        .await
        .expect("write");
    got.clear();
    while !got.ends_with(b"\r\n") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "EOF before reply");
        got.extend_from_slice(&buf[..n]);
    }
    serde_json::from_slice(&got).expect("JSON")
}

#[tokio::test]
async fn tcp_and_in_memory_streams() {
    let server = QmpServer::new(version());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let s = server.clone();
    let tcp = tokio::spawn(async move { s.serve_tcp(listener, MonitorOptions::default()).await });
    let conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert_eq!(greeting_over(conn).await, json!({"return": {}, "id": 1}));

    let (ours, theirs) = tokio::io::duplex(4096);
    let s = server.clone();
    let session =
        tokio::spawn(async move { s.serve_stream(theirs, MonitorOptions::default()).await });
    assert_eq!(greeting_over(ours).await, json!({"return": {}, "id": 1}));
    session
        .await
        .expect("session ends when the client goes away");

    server.shutdown();
    tcp.await.expect("tcp listener ends on shutdown");
}

#[tokio::test]
async fn quit_from_a_client_that_hangs_up_at_once_still_counts() {
    let mut d = Daemon::new(ServerLimits::default());
    let path = d.listen("m.sock", false);
    let mut s = UnixStream::connect(&path).await.expect("connect");
    s.write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"quit\"}")
        .await
        .expect("write");
    drop(s);
    d.server.quit_requested().await;
    d.stop().await;
}

#[tokio::test]
async fn a_client_sending_faster_than_it_reads_is_paced_not_dropped() {
    // A long run of NUL bytes gets one parse error each (as QSD answers), far more output
    // than the queue limit: the monitor must stop reading until the client reads, not
    // drop the client.
    let limits = ServerLimits {
        max_queued_output: 64 * 1024,
        ..ServerLimits::default()
    };
    let server = QmpServer::with_limits(version(), limits);
    let (client_in, server_in) = tokio::io::duplex(1 << 20);
    let (server_out, client_out) = tokio::io::duplex(4096);
    let s = server.clone();
    let session = tokio::spawn(async move {
        s.serve_session(server_in, server_out, MonitorOptions::default())
            .await
    });
    const NULS: usize = 20_000;
    let mut input = b"{\"execute\": \"qmp_capabilities\"}".to_vec();
    input.extend(std::iter::repeat_n(0u8, NULS));
    input.extend(b"{\"execute\": \"query-version\", \"id\": \"last\"}");
    let mut client_in = client_in;
    // Everything fits in the input pipe: written before any reply is read, so that the
    // whole ~1.5 MB of errors is produced while nobody reads.
    client_in.write_all(&input).await.expect("write");
    let mut lines = BufReader::new(client_out).lines();
    async fn next<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>) -> Value {
        let line = lines.next_line().await.expect("read").expect("not EOF");
        serde_json::from_str::<Value>(&line).expect("JSON")
    }
    assert!(next(&mut lines).await.get("QMP").is_some(), "greeting");
    assert_eq!(next(&mut lines).await, json!({"return": {}}));
    for i in 0..NULS {
        assert_eq!(
            next(&mut lines).await,
            json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray ''"}}),
            "reply {i}"
        );
    }
    let last = next(&mut lines).await;
    assert_eq!(last["id"], "last", "{last}");
    assert!(last["return"]["qemu"].is_object(), "{last}");
    drop(client_in);
    session.await.expect("session ends with its input");
}

#[tokio::test]
async fn the_quit_hook_runs_before_the_reply() {
    let mut d = Daemon::new(ServerLimits::default());
    let events = d.server.events();
    d.server.on_quit(move || {
        let events = events.clone();
        async move { events.emit("GONE", json!({"id": "e0"})) }
    });
    let path = d.listen("m.sock", false);
    let mut c = Client::negotiated(&path).await;
    c.send(r#"{"execute": "quit", "id": 1}"#).await;
    let event = c.recv().await;
    assert_eq!(event["event"], "GONE", "{event}");
    assert_eq!(event["data"], json!({"id": "e0"}));
    assert_eq!(c.recv().await, json!({"return": {}, "id": 1}));
    d.server.quit_requested().await;
    d.stop().await;
}
