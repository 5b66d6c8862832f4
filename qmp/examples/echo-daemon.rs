//! A tiny daemon with one command, `echo`, on a QMP unix socket.
//!
//! ```text
//! cargo run -p qmp-server --example echo-daemon -- /tmp/echo.sock
//! ```
//!
//! Then talk to it (one JSON request per line):
//!
//! ```text
//! {"execute": "qmp_capabilities"}
//! {"execute": "echo", "arguments": {"text": "hello"}, "id": 1}
//! {"execute": "quit"}
//! ```
//!
//! `echo` returns its text and emits an `ECHOED` event to every negotiated
//! monitor; `quit` ends the daemon.

use qmp_server::{parse_arguments, MonitorOptions, QmpError, QmpServer, VersionInfo};
use serde::Deserialize;

#[derive(Deserialize)]
struct EchoArgs {
    text: String,
    #[serde(default)]
    times: Option<u32>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/echo.sock".to_string());
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;

    let server = QmpServer::new(VersionInfo {
        major: 0,
        minor: 1,
        micro: 0,
        package: "echo-daemon".into(),
    });
    let events = server.events();
    server.register("echo", move |args| {
        let events = events.clone();
        async move {
            let a: EchoArgs = parse_arguments(args)?;
            let text = a.text.repeat(a.times.unwrap_or(1) as usize);
            events.emit("ECHOED", serde_json::json!({ "text": text }));
            Ok::<_, QmpError>(serde_json::json!({ "text": text }))
        }
    });

    let s = server.clone();
    let serving =
        tokio::spawn(async move { s.serve_unix(listener, MonitorOptions::default()).await });
    eprintln!("echo-daemon: QMP on {path}");
    server.quit_requested().await;
    server.shutdown();
    serving.await?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
