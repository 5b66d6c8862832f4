//! Differential test against the real qemu-storage-daemon: the same input
//! bytes sent to QSD's monitor and to ours must produce the same output
//! bytes (greeting, replies, errors, layout, member order, CR LF), in
//! compact and pretty mode.
//!
//! Needs `qemu-storage-daemon` in PATH: with `CI=true` its absence fails the
//! test; otherwise the test is skipped with a message.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use qmp_server::{parse_arguments, MonitorOptions, QmpError, QmpServer, VersionInfo};
use serde::Deserialize;
use serde_json::Value;

const QSD: &str = "qemu-storage-daemon";

/// A daemonized QSD; killed on drop.
struct Qsd {
    pid: i32,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
    }
}

fn start_qsd(dir: &Path) -> (Qsd, PathBuf, PathBuf) {
    let compact = dir.join("qsd.sock");
    let pretty = dir.join("qsd-pretty.sock");
    let pidfile = dir.join("qsd.pid");
    // --daemonize returns once the monitors are listening: no waiting needed.
    let status = Command::new(QSD)
        .arg("--daemonize")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            compact.display()
        ))
        .arg("--monitor")
        .arg("chardev=m0")
        .arg("--chardev")
        .arg(format!(
            "socket,id=m1,path={},server=on,wait=off",
            pretty.display()
        ))
        .arg("--monitor")
        .arg("chardev=m1,pretty=on")
        .status()
        .expect("run qemu-storage-daemon");
    assert!(status.success(), "qemu-storage-daemon failed: {status}");
    let pid = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    (Qsd { pid }, compact, pretty)
}

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn new(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect");
        Self {
            r: BufReader::new(s.try_clone().expect("clone")),
            w: s,
        }
    }

    /// Reads one message (one line, or a pretty block ending in a `}` line).
    fn message(&mut self) -> String {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("read");
            assert!(n > 0, "EOF after {text:?}");
            text.push_str(&line);
            if serde_json::from_str::<Value>(&text).is_ok() {
                return text;
            }
        }
    }

    /// Sends `input` then a sentinel request; returns everything up to and
    /// including the sentinel's reply.
    fn exchange(&mut self, input: &[u8]) -> String {
        self.w.write_all(input).expect("write");
        self.w
            .write_all(b"\n{\"execute\": \"query-version\", \"id\": \"sentinel\"}\n")
            .expect("write");
        let mut out = String::new();
        loop {
            let m = self.message();
            out.push_str(&m);
            let v: Value = serde_json::from_str(&m).expect("JSON");
            if v.get("id") == Some(&Value::from("sentinel")) {
                return out;
            }
        }
    }
}

/// Every input leaves the lexer ready for a new message (a pending open
/// brace would swallow the sentinel).
fn inputs() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        // Before negotiation.
        br#"{"execute":"query-version"}"#.to_vec(),
        br#"{"execute":"foo","id":5}"#.to_vec(),
        br#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#.to_vec(),
        br#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}"#.to_vec(),
        br#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#.to_vec(),
        br#"{"exec-oob":"qmp_capabilities"}"#.to_vec(),
        br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":"x"}"#.to_vec(),
        // Negotiated, oob enabled.
        br#"{"execute":"qmp_capabilities"}"#.to_vec(),
        br#"{"execute":"query-version","id":{"a":[1,{"b":null}]}}"#.to_vec(),
        br#"{"execute":"foo","id":[1,2]}"#.to_vec(),
        br#"{"exec-oob":"query-version","id":1}"#.to_vec(),
        br#"{"exec-oob":"nope","id":1}"#.to_vec(),
        br#"{"execute":"query-version","exec-oob":"x"}"#.to_vec(),
        br#"{"execute":"query-version","arguments":[]}"#.to_vec(),
        br#"{"execute":"query-version","arguments":null}"#.to_vec(),
        br#"{"execute":"query-version","control":{}}"#.to_vec(),
        br#"{"execute":1}"#.to_vec(),
        br#"{}"#.to_vec(),
        br#"{"id":1}"#.to_vec(),
        br#"{"id":[],"arguments":{},"execute":"nope"}"#.to_vec(),
        br#"{"execute":"quit","arguments":{"a":1}}"#.to_vec(),
        br#"{"execute":"query-commands","arguments":{"a":1},"id":0.1}"#.to_vec(),
        br#"{"execute":"query-version","id":1.5e3}{"execute":"query-version","id":-0}"#.to_vec(),
        br#"{"execute":"query-version","id":18446744073709551615}"#.to_vec(),
        br#"{"execute":"query-version","id":18446744073709551616}"#.to_vec(),
        br#"{"execute":"query-version","id":-9223372036854775809}"#.to_vec(),
        b"{'execute':'query-version','id':'x\"y'}".to_vec(),
        b"{\"execute\":\n\"query-version\"\n,\"id\":\n2}".to_vec(),
        br#"{"execute":"quer\u0079-version","id":"\u00e9\ud83d\ude00"}"#.to_vec(),
        b"{\"execute\":\"query-version\",\"id\":\"\xc3\xa9\xf0\x9f\x98\x80\x7f\"}".to_vec(),
        br#"{"execute":"query-version","id":"\/\b\f\n\r\t\"\\\u0001\u0000"}"#.to_vec(),
        // Malformed JSON.
        b"[1]".to_vec(),
        b"\"abc\"".to_vec(),
        b"1 true null".to_vec(),
        b"{bad\n}".to_vec(),
        b"}".to_vec(),
        b"]".to_vec(),
        br#"{"a" 1}"#.to_vec(),
        b"{1:2}".to_vec(),
        br#"{"a":1 "b":2}"#.to_vec(),
        b"[1 2]".to_vec(),
        br#"{"a":}"#.to_vec(),
        b"[1,]".to_vec(),
        br#"{"a":1,}"#.to_vec(),
        b"xyz".to_vec(),
        b"@".to_vec(),
        b"01".to_vec(),
        b"1.".to_vec(),
        b"-".to_vec(),
        b"\"a\x01b\"".to_vec(),
        b"\xff{\"execute\":\"nope\"}".to_vec(),
        b"{\"execute\":\"nope\",\"id\":\"\xc3\"}".to_vec(),
        b"{\"execute\":\"nope\",\"id\":\"\xed\xa0\x80\"}".to_vec(),
        br#"{"execute":"nope","id":"\ud83d"}"#.to_vec(),
        br#"{"execute":"nope","id":"\u12g4"}"#.to_vec(),
        br#"{"execute":"nope","id":"\uFFFE"}"#.to_vec(),
        br#"{"execute":"nope","id":"a\qb"}"#.to_vec(),
        b"{\"execute\":\"nope\",\"id\":\"\t\"}".to_vec(),
        br#"{"execute": "query-version", "id": %d}"#.to_vec(),
        br#"{"execute":"nope","id":{"b":1,"a":2,"b":3}}"#.to_vec(),
    ];
    v.push(b"[".repeat(1025));
    let mut deep = b"[".repeat(1024);
    deep.extend(b"]".repeat(1024));
    v.push(deep);
    v
}

// Mirrors of three QSD commands' QAPI argument types, to compare argument
// errors (every input below is invalid, so QSD never runs the command).

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ExportDelMode {
    Safe,
    Hard,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct BlockExportDel {
    id: String,
    mode: Option<ExportDelMode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct BlockResize {
    device: Option<String>,
    node_name: Option<String>,
    size: i64,
}

/// QAPI `SocketAddressLegacy`, as an adjacently tagged enum.
#[derive(Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
#[allow(dead_code)]
enum LegacyAddr {
    Inet(InetAddr),
    Unix(UnixAddr),
    Vsock(Value),
    Fd(Value),
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct UnixAddr {
    path: String,
    #[serde(rename = "abstract")]
    is_abstract: Option<bool>,
    tight: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct InetAddr {
    host: String,
    port: String,
    numeric: Option<bool>,
    to: Option<u16>,
    ipv4: Option<bool>,
    ipv6: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct NbdServerStart {
    addr: LegacyAddr,
    tls_creds: Option<String>,
    tls_authz: Option<String>,
    max_connections: Option<u32>,
}

fn unreachable_ok() -> Result<Value, QmpError> {
    Err(QmpError::generic("arguments unexpectedly valid"))
}

fn register_mirrors(server: &QmpServer) {
    server.register("block-export-del", |args| async move {
        parse_arguments::<BlockExportDel>(args)?;
        unreachable_ok()
    });
    server.register("block_resize", |args| async move {
        parse_arguments::<BlockResize>(args)?;
        unreachable_ok()
    });
    server.register("nbd-server-start", |args| async move {
        parse_arguments::<NbdServerStart>(args)?;
        unreachable_ok()
    });
}

fn argument_inputs() -> Vec<Vec<u8>> {
    let inet = r#"{"type":"inet","data":{"host":"x","port":"1"}}"#;
    [
        r#"{"execute":"block-export-del"}"#.to_string(),
        r#"{"execute":"block-export-del","arguments":{}}"#.into(),
        r#"{"execute":"block-export-del","arguments":{"id":1}}"#.into(),
        r#"{"execute":"block-export-del","arguments":{"id":null}}"#.into(),
        r#"{"execute":"block-export-del","arguments":{"id":"x","extra":1}}"#.into(),
        r#"{"execute":"block-export-del","arguments":{"id":"x","mode":"foo"}}"#.into(),
        r#"{"execute":"block-export-del","arguments":{"id":"x","mode":1}}"#.into(),
        r#"{"execute":"block_resize","arguments":{"node-name":"n0","size":"x"}}"#.into(),
        r#"{"execute":"block_resize","arguments":{"node-name":"n0","size":true}}"#.into(),
        r#"{"execute":"block_resize","arguments":{"node-name":"n0","size":1.5}}"#.into(),
        r#"{"execute":"block_resize","arguments":{"node-name":"n0"}}"#.into(),
        r#"{"execute":"nbd-server-start"}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":1}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":1}}}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{}}}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":"/p","zz":1}}}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix"}}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"bogus"}}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":[]}}}"#.into(),
        format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{inet},"max-connections":"x"}}}}"#),
        format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{inet},"max-connections":-1}}}}"#),
        format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{inet},"max-connections":1.5}}}}"#),
        format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{inet},"max-connections":4294967296}}}}"#),
        format!(r#"{{"execute":"nbd-server-start","arguments":{{"addr":{inet},"tls-creds":false}}}}"#),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":"x","port":1}}}}"#.into(),
        r#"{"execute":"nbd-server-start","arguments":{"addr":{"type":"inet","data":{"host":"x","port":"1","to":70000}}}}"#.into(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// A QSD and our server side by side: two monitors each (compact, pretty),
/// our server reporting QSD's version so that greetings match. Dropping it
/// stops both (the runtime and QSD).
struct Pair {
    /// Connected to QSD's compact monitor, greeting read.
    theirs: Conn,
    greeting: String,
    qsd_pretty: PathBuf,
    ours_compact: PathBuf,
    ours_pretty: PathBuf,
    _rt: tokio::runtime::Runtime,
    _qsd: Qsd,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// `None` (after a message) when QSD is missing outside CI.
    fn start() -> Option<Self> {
        if !test_support::require_runs(QSD) {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (qsd, qsd_compact, qsd_pretty) = start_qsd(dir.path());
        let mut theirs = Conn::new(&qsd_compact);
        let greeting = theirs.message();
        let parsed: Value = serde_json::from_str(&greeting).expect("JSON");
        let v = &parsed["QMP"]["version"];
        let num = |k: &str| v["qemu"][k].as_u64().expect("version number") as u32;
        let version = VersionInfo {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
            package: v["package"].as_str().expect("package").to_string(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = QmpServer::new(version);
        register_mirrors(&server);
        let ours_compact = dir.path().join("ours.sock");
        let ours_pretty = dir.path().join("ours-pretty.sock");
        for (path, pretty) in [(&ours_compact, false), (&ours_pretty, true)] {
            let listener = {
                let _guard = rt.enter();
                tokio::net::UnixListener::bind(path).expect("bind")
            };
            let s = server.clone();
            rt.spawn(async move { s.serve_unix(listener, MonitorOptions { pretty }).await });
        }
        Some(Self {
            theirs,
            greeting,
            qsd_pretty,
            ours_compact,
            ours_pretty,
            _rt: rt,
            _qsd: qsd,
            _dir: dir,
        })
    }

    /// Our compact monitor, greeting checked against QSD's.
    fn ours(&self) -> Conn {
        let mut c = Conn::new(&self.ours_compact);
        assert_eq!(c.message(), self.greeting, "greeting");
        c
    }
}

fn runner() -> proptest::test_runner::TestRunner {
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        // More with e.g. QSD_DIFF_CASES=20000.
        cases: std::env::var("QSD_DIFF_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
        failure_persistence: None,
        ..Default::default()
    })
}

fn compare(ours: &mut Conn, theirs: &mut Conn) {
    for input in inputs().into_iter().chain(argument_inputs()) {
        let want = theirs.exchange(&input);
        let got = ours.exchange(&input);
        assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(&input));
    }
}

#[test]
fn same_bytes_as_qemu_storage_daemon() {
    let Some(mut pair) = Pair::start() else {
        return;
    };
    let mut ours = pair.ours();
    compare(&mut ours, &mut pair.theirs);

    let mut theirs = Conn::new(&pair.qsd_pretty);
    let mut ours = Conn::new(&pair.ours_pretty);
    assert_eq!(ours.message(), theirs.message(), "pretty greeting");
    compare(&mut ours, &mut theirs);
}

/// Random JSON-ish input (and random bytes) to both servers; the outputs
/// must be identical. The alphabet cannot spell a command name and random
/// bytes practically never form a valid request, so QSD runs nothing.
#[test]
fn random_input_same_bytes_as_qemu_storage_daemon() {
    use proptest::prelude::*;

    let Some(pair) = Pair::start() else {
        return;
    };
    let ours = std::cell::RefCell::new(pair.ours());
    let theirs = std::cell::RefCell::new(pair.theirs);
    let alphabet: Vec<u8> =
        b"{}[]:,\"'\\ \t\r\n0123456789-+.eEtrufalsn\x01\x7f\xc3\xa9\xff%@u".to_vec();
    let input = prop_oneof![
        prop::collection::vec(prop::sample::select(alphabet), 0..200),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    runner()
        .run(&input, |bytes| {
            // A control character always ends in a lexical error with an
            // empty buffer, and the newline resyncs: the sentinel is read.
            let mut msg = bytes.clone();
            msg.extend_from_slice(b"\x04");
            let want = theirs.borrow_mut().exchange(&msg);
            let got = ours.borrow_mut().exchange(&msg);
            prop_assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(&bytes));
            Ok(())
        })
        .expect("same output as QSD");
}

/// Random requests after negotiation (ids of every JSON type, misplaced and
/// extra members, bad arguments); the outputs must be identical. Only
/// commands without side effects (or unknown ones) are named.
#[test]
fn random_requests_same_bytes_as_qemu_storage_daemon() {
    use proptest::prelude::*;
    use serde_json::Map;

    let Some(pair) = Pair::start() else {
        return;
    };
    let ours = std::cell::RefCell::new(pair.ours());
    let theirs = std::cell::RefCell::new(pair.theirs);
    let negotiate = br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#;
    assert_eq!(
        ours.borrow_mut().exchange(negotiate),
        theirs.borrow_mut().exchange(negotiate)
    );

    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        "[a-z-]{0,6}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            // One-letter keys never share a QDict bucket: where keys do,
            // QEMU prints them in reverse insertion order, which we cannot
            // know (documented divergence).
            prop::collection::btree_map("[a-z]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    });
    let command = prop_oneof![
        4 => prop::sample::select(vec!["query-version", "qmp_capabilities", "nope", "x-y"])
            .prop_map(Value::from),
        1 => value.clone(),
    ];
    let arguments = prop_oneof![
        3 => ("[a-z-]{1,6}", value.clone()).prop_map(|(k, v)| {
            let mut m = Map::new();
            m.insert(k, v);
            Value::Object(m)
        }),
        2 => Just(Value::Object(Map::new())),
        // Not an object with several members: which of several unexpected
        // members QEMU names depends on GLib's hash table order (documented
        // divergence).
        1 => value.clone().prop_filter("not an object", |v| !v.is_object()),
    ];
    let member = |name: &'static str, strategy: BoxedStrategy<Value>| {
        prop::option::weighted(0.6, strategy).prop_map(move |v| v.map(|v| (name, v)))
    };
    let request = (
        member("execute", command.clone().boxed()),
        member("exec-oob", command.boxed()),
        member("arguments", arguments.boxed()),
        member("id", value.clone().boxed()),
        prop::option::weighted(
            0.2,
            (
                prop::sample::select(vec!["foo", "control", "ID", "execute "]),
                value,
            ),
        ),
    )
        .prop_map(|(a, b, c, d, extra)| {
            let mut m = Map::new();
            for (k, v) in [a, b, c, d].into_iter().flatten() {
                m.insert(k.to_string(), v);
            }
            if let Some((k, v)) = extra {
                m.insert(k.to_string(), v);
            }
            Value::Object(m)
        });
    runner()
        .run(&request, |req| {
            let bytes = serde_json::to_vec(&req).expect("serialize");
            let want = theirs.borrow_mut().exchange(&bytes);
            let got = ours.borrow_mut().exchange(&bytes);
            prop_assert_eq!(got, want, "request {}", req);
            Ok(())
        })
        .expect("same output as QSD");
}
