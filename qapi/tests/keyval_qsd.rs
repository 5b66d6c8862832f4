//! Differential test of `qsd_qapi::keyval` and `qsd_qapi::from_keyval` against the real `qemu-storage-daemon`.
//!
//! For each argument, QSD is run with `--blockdev ARG` (implied key `driver`),
//! `--nbd-server ARG` (no implied key) or `--export ARG` (implied key `type`), followed
//! by an option that always fails, so that QSD exits whatever ARG does. Then:
//!
//! - if our parser rejects ARG, QSD must print exactly our message;
//! - if our parser accepts ARG, QSD must not fail with a parse error (it fails later,
//!   in the visitor or at the trailing option).
//!
//! Requires `qemu-storage-daemon`: fails when it is missing and `CI=true`, skips
//! with a message otherwise.

use std::process::Command;

use qsd_qapi::keyval;

const QSD: &str = "qemu-storage-daemon";

/// Whether QSD is installed; panics if it is not and `CI` is `true`.
fn have_qsd() -> bool {
    test_support::require_runs(QSD)
}

/// The message QSD prints for `option arg`, without its `qemu-storage-daemon: OPTION
/// ARG: ` prefix, or `None` if it printed no error about this option.
fn qsd_error(option: &str, arg: &str) -> Option<String> {
    let out = Command::new(QSD)
        .arg(option)
        .arg(arg)
        // Always fails, so QSD exits even when ARG is accepted.
        .args(["--object", "no-such-object-type,id=keyval-test-end"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {QSD}: {e}"));
    assert!(!out.status.success(), "{QSD} {option} {arg:?} did not fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("qemu-storage-daemon: {option} {arg}: ");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
}

/// Whether `msg` is one of the errors of QEMU's keyval or JSON parsing, as opposed to
/// the errors of the visitor or of the object creation that follow.
fn is_parse_error(msg: &str) -> bool {
    msg.starts_with("Invalid parameter '")
        || msg.starts_with("Expected '=' after parameter")
        || msg.ends_with("used inconsistently")
        || (msg.starts_with("Parameter '") && msg.ends_with("' missing"))
        || msg.ends_with("is too long")
        || msg == "Help is not available for this option"
        || msg.starts_with("JSON parse error")
        || msg == "Expecting at most one JSON value"
}

fn check(option: &str, implied: Option<&str>, arg: &str) {
    let ours = keyval::parse_json_or_keyval(arg, implied);
    let theirs = qsd_error(option, arg);
    match ours {
        Err(e) => assert_eq!(
            theirs.as_deref(),
            Some(e.to_string().as_str()),
            "{option} {arg:?}: we reject it"
        ),
        Ok(map) => {
            if let Some(msg) = theirs {
                assert!(
                    !is_parse_error(&msg),
                    "{option} {arg:?}: we parse {map:?}, QSD says {msg:?}"
                );
            }
        }
    }
}

#[test]
fn hand_picked_arguments_match_qsd() {
    if !have_qsd() {
        return;
    }
    let blockdev = [
        "",
        ",",
        "=x",
        "driver=file,,x",
        "null-co,,x",
        "a,b",
        "a,b=1,c",
        "a.b=1,a=2",
        "a=2,a.b=1",
        "a.0=1,a.b=2",
        "a.1=1,a.2=2",
        "x.1=a",
        "a.1=x,b.1=y",
        "b.1=y,a.1=x",
        "a..b=1",
        ".a=1",
        "a.=1",
        "0=1",
        "a.0x=1",
        "é=1",
        "help",
        "?",
        "null-co,help",
        "help.abc",
        "driver=null-co,",
        "driver=null-co,node-name=x,node-name=y,size=,,",
        "a.__com.redhat_x=1",
        "__com.redhat_x=1",
        "a.00=1,a.0=2",
        "l.01=a,l.1=b,l.0=z,l.3=q",
        "a.99999999999999999999=x",
        "list.0=null,list.2=eins,list.02=zwei",
        &format!("{}=v", "k".repeat(128)),
        &format!("k.{}=v", "k".repeat(128)),
        &format!("{}=v", "k".repeat(127)),
        "{\"driver\":1",
        "{",
        "{\"driver\":\"null-co\"} x",
        "{\"driver\":\"null-co\"}}",
        "{\"driver\":\"null-co\",}",
        "{\"a\":1, \"a\":2}",
        "{'driver':'nope'}",
        "{\"x\": [1,2}",
        "{\"x\": tru}",
        "{\"d\": \"n\" \"x\": 1}",
        "{\"d\": \"n\", 1: 1}",
        "{\"x\" 1}",
        "{\"x\": \"\\q\"}",
        "{\"x\": \"\\u12\"}",
        "{\"x\": \"\\ud800\"}",
        "{\"x\": 01}",
        "{\"x\": @}",
        "{\"x\": 1.}",
        "{\"x\": 1e}",
        "{\"x\": [1,]}",
        "{\"a\" 1 @}",
        "{\"a\": True}",
        "{\"a\": -}",
        "{\"a\": \"abc",
        "{\"a\": 1.",
        "{\"a\": 0e5}",
        "{\"a\": 0.5e1, \"b\": -0, \"c\": 1E+2}",
        "{\"a\": ]}",
        "{\"a\": [}",
        "{\"a\": \"x\", \"a\": [}",
        "{\"a\": \"\\u1\\\"x\"}",
        "{\"a\": \"\\udc00\"}",
        "{\"a\": \"\\ud83d\\ude00\"}",
        "{\"driver\": \"null-co\"} @",
        &format!("{{\"a\":{}{}}}", "[".repeat(1024), "]".repeat(1024)),
        &format!("{{\"a\":{}{}}}", "[".repeat(1023), "]".repeat(1023)),
    ];
    for arg in blockdev {
        check("--blockdev", Some("driver"), arg);
    }
    for arg in [
        "unix",
        "addr.type=unix,addr.type=inet",
        "addr.type=unix,help",
        "addr.type=unix,addr.path.x=1",
        "addr,x=1",
    ] {
        check("--nbd-server", None, arg);
    }
    for arg in ["c0,pretty", "c0,,x", "help", "c0,a.1=x", "{\"chardev\": 1"] {
        check("--monitor", Some("chardev"), arg);
    }
    for arg in [
        "nbd,id=e,bitmaps.1=b",
        "nbd,,x",
        "nbd,id=e,bitmaps.0=a,bitmaps.x=b",
    ] {
        check("--export", Some("type"), arg);
    }
}

use test_support::Rng;

#[test]
fn random_arguments_match_qsd() {
    if !have_qsd() {
        return;
    }
    // Token soup: mostly malformed arguments.
    let tokens = [
        "a", "b", "0", "1", "01", "2", ".", ".", ",", ",", ",,", "=", "=", "driver", "help", "?",
        "x-y", "_", "__a.b_c", "é", "null-co",
    ];
    // Well-formed elements with colliding dotted keys: lists, gaps, conflicts.
    let fragments = ["a", "b", "0", "1", "01", "2", "x-y", "__a.b_c"];
    let values = ["", "v", ",,", "w,,=", "0"];
    let mut rng = Rng::new(0x6b65_7976_616c);
    for round in 0..300 {
        let len = 1 + rng.index(6);
        let arg: String = if round % 2 == 0 {
            (0..len).map(|_| tokens[rng.index(tokens.len())]).collect()
        } else {
            let elements: Vec<String> = (0..len)
                .map(|_| {
                    let depth = 1 + rng.index(3);
                    let key: Vec<&str> = (0..depth)
                        .map(|_| fragments[rng.index(fragments.len())])
                        .collect();
                    format!("{}={}", key.join("."), values[rng.index(values.len())])
                })
                .collect();
            elements.join(",")
        };
        check("--blockdev", Some("driver"), &arg);
        check("--nbd-server", None, &arg);
    }
}

/// QSD's stdout and stderr for `--chardev arg`, followed by an option that always fails.
fn qsd_chardev(arg: &str) -> (String, String) {
    let out = Command::new(QSD)
        .args(["--chardev", arg])
        .args(["--object", "no-such-object-type,id=keyval-test-end"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {QSD}: {e}"));
    assert!(
        !out.status.success(),
        "{QSD} --chardev {arg:?} did not fail"
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn chardev_opts_syntax_matches_qsd() {
    if !have_qsd() {
        return;
    }
    let prefix = |arg: &str| format!("qemu-storage-daemon: --chardev {arg}: ");

    // Short-form booleans: the same deprecation warnings, in the same order. The path
    // cannot be bound, so QSD fails once the options are parsed.
    for arg in [
        "socket,id=c,path=/nonexistent/keyval-test,server,nowait",
        "socket,id=c,path=/nonexistent/keyval-test,server,nodelay,delay,wait=off",
        "socket,path=/nonexistent/keyval-test,id=c,noserver,server,nowait,wait",
    ] {
        let ours = keyval::parse_opts(arg, Some("backend")).expect("parses");
        let (_, stderr) = qsd_chardev(arg);
        let lines: Vec<&str> = stderr.lines().collect();
        let warning = format!("{}warning: ", prefix(arg));
        let theirs: Vec<String> = lines
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                let first = l.strip_prefix(&warning)?;
                Some(format!(
                    "{first}\n{}",
                    lines.get(i + 1).copied().unwrap_or_default()
                ))
            })
            .collect();
        assert_eq!(ours.warnings, theirs, "{arg:?}");
        assert!(!ours.warnings.is_empty());
    }

    // The implied backend value, with doubled commas: QSD echoes it back.
    for arg in ["a,,b,id=c", "a,,id=x", "x,,,,y,id=c", "q,,,id=c"] {
        let ours = keyval::parse_opts(arg, Some("backend")).expect("parses");
        let (_, stderr) = qsd_chardev(arg);
        let backend = ours.values.get("backend").and_then(|v| v.as_str());
        let Some(backend) = backend else {
            panic!("{arg:?}: no backend in {:?}", ours.values);
        };
        assert!(
            stderr.contains(&format!(
                "{}'{backend}' is not a valid char driver name",
                prefix(arg)
            )),
            "{arg:?}: we read backend {backend:?}, QSD says {stderr:?}"
        );
    }

    // The id check comes first.
    for arg in [
        "socket,id=1c",
        "socket,id=,path=/x",
        "socket,path=/x,id=a b",
    ] {
        let err = keyval::parse_opts(arg, Some("backend"))
            .map(|o| format!("{o:?}"))
            .unwrap_err();
        let (_, stderr) = qsd_chardev(arg);
        assert!(
            stderr.starts_with(&format!("{}{err}\n", prefix(arg))),
            "{arg:?}: we say {err}, QSD says {stderr:?}"
        );
    }

    // help anywhere but first: QSD prints the option list.
    for arg in ["socket,id=c,help", "socket,?"] {
        let ours = keyval::parse_opts(arg, Some("backend")).expect("parses");
        assert!(ours.help, "{arg:?}");
        let (stdout, _) = qsd_chardev(arg);
        assert!(
            stdout.starts_with("chardev options:"),
            "{arg:?}: {stdout:?}"
        );
    }
}

#[test]
fn random_json_matches_qsd() {
    if !have_qsd() {
        return;
    }
    let tokens = [
        "{",
        "}",
        "[",
        "]",
        ":",
        ":",
        ",",
        ",",
        " ",
        "\"a\"",
        "\"b\"",
        "'c'",
        "\"\\u0041\"",
        "\"\\q\"",
        "1",
        "0",
        "-",
        ".",
        "e",
        "5",
        "true",
        "null",
        "True",
        "@",
        "\"d\":",
    ];
    let mut rng = Rng::new(0x6a73_6f6e);
    for _ in 0..200 {
        let len = 1 + rng.index(8);
        let arg: String = std::iter::once("{")
            .chain((0..len).map(|_| tokens[rng.index(tokens.len())]))
            .collect();
        check("--blockdev", Some("driver"), &arg);
    }
}

/// One typed parameter of a QSD option, to check [`qsd_qapi::from_keyval`] against QSD's
/// own conversion: QSD gets `{prefix}{name}={value}`, and when we accept the value QSD must
/// fail (or go on) for another reason, which `accepted` recognises.
struct Typed {
    option: &'static str,
    prefix: &'static str,
    name: &'static str,
    /// Reads `{name}={value}` into a struct with the member's QAPI type.
    read: fn(&str) -> Result<String, String>,
    accepted: fn(&str) -> bool,
}

/// Reads keyval `arg` as a `T`, as the daemon reads an option.
fn read<T: serde::de::DeserializeOwned + std::fmt::Debug>(arg: &str) -> Result<String, String> {
    let map = keyval::parse(arg, None).map_err(|e| e.to_string())?;
    qsd_qapi::from_keyval::<T>(serde_json::Value::Object(map))
        .map(|v| format!("{v:?}"))
        .map_err(|e| e.to_string())
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct MaxConnections {
    max_connections: u32,
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Addr {
    addr: UnixAbstract,
}

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct UnixAbstract {
    #[serde(rename = "abstract")]
    abstract_: bool,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct PollMaxNs {
    poll_max_ns: i64,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct LogicalBlockSize {
    logical_block_size: qsd_qapi::Size,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct NumQueues {
    num_queues: u16,
}

fn check_typed(t: &Typed, value: &str) {
    let arg = format!("{}{}={}", t.prefix, t.name, value);
    let ours = (t.read)(&format!("{}={}", t.name, value));
    let theirs = qsd_error(t.option, &arg);
    match ours {
        Err(e) => assert_eq!(
            theirs.as_deref(),
            Some(e.as_str()),
            "{} {arg:?}: we reject it",
            t.option
        ),
        Ok(v) => {
            // No message means QSD went on to the trailing option and failed there.
            let msg = theirs.unwrap_or_default();
            assert!(
                (t.accepted)(&msg),
                "{} {arg:?}: we read {v}, QSD says {msg:?}",
                t.option
            );
        }
    }
}

#[test]
fn typed_values_match_qsd() {
    if !have_qsd() {
        return;
    }
    let typed = [
        Typed {
            option: "--nbd-server",
            prefix: "addr.type=unix,addr.path=/nonexistent/keyval-test,",
            name: "max-connections",
            read: read::<MaxConnections>,
            accepted: |m| m.starts_with("Failed to bind socket"),
        },
        Typed {
            option: "--nbd-server",
            prefix: "addr.type=unix,addr.path=/nonexistent/keyval-test,",
            name: "addr.abstract",
            read: read::<Addr>,
            // Abstract sockets bind anywhere; a path does not.
            accepted: |m| m.is_empty() || m.starts_with("Failed to bind socket"),
        },
        Typed {
            option: "--object",
            prefix: "iothread,id=keyval-test,",
            name: "poll-max-ns",
            read: read::<PollMaxNs>,
            accepted: |m| m.is_empty() || m.starts_with("poll-max-ns value must be in range"),
        },
        Typed {
            option: "--export",
            prefix: "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,",
            name: "logical-block-size",
            read: read::<LogicalBlockSize>,
            accepted: |m| m == "Cannot find device='' nor node-name='n'",
        },
        Typed {
            option: "--export",
            prefix: "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=/x,",
            name: "num-queues",
            read: read::<NumQueues>,
            accepted: |m| m == "Cannot find device='' nor node-name='n'",
        },
    ];
    let values = [
        "0",
        "1",
        "16",
        "0x10",
        "010",
        "08",
        "-1",
        "-0x10",
        "+5",
        " 7",
        "7 ",
        "65535",
        "65536",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775809",
        "1k",
        "4k",
        "1.5k",
        "0x1000",
        "1e3",
        "",
        "x",
        "on",
        "off",
        "yes",
        "no",
        "true",
        "false",
        "y",
        "n",
        "On",
        "TRUE",
        "1.",
    ];
    for t in &typed {
        for v in values {
            check_typed(t, v);
        }
    }
    let pieces = ["0", "1", "9", "x", "k", "M", ".", "-", "+", "5", "e", "f"];
    let mut rng = Rng::new(0x7479_7065);
    for _ in 0..60 {
        let len = 1 + rng.index(5);
        let v: String = (0..len).map(|_| pieces[rng.index(pieces.len())]).collect();
        for t in &typed {
            check_typed(t, &v);
        }
    }
}
