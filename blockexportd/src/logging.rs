//! Diagnostics on stderr: quiet by default, as qemu-storage-daemon is.
//!
//! The filter comes from `BLOCKEXPORTD_LOG`, else from `RUST_LOG`, in `tracing`'s
//! `EnvFilter` syntax (`debug`, `nbd_server=info,fuser=debug`, ...); without either only
//! warnings and errors are printed. Libraries that log through the `log` crate (`fuser`) go
//! through the same filter. Colours are used only when stderr is a terminal.
//!
//! Messages to the operator (what QSD prints with `error_report`/`info_report`: "waiting for
//! connection on ...", a chardev that cannot connect) are events with the target
//! [`OPERATOR`]: they are printed whatever the filter, as QEMU prints them
//! (`blockexportd: TEXT`), and never in `tracing`'s format.
//!
//! One message is dropped whatever the filter: fuser's "Failed to send FUSE reply" when the
//! kernel answers `ENOENT`, which means the request was interrupted and already forgotten by
//! the kernel (libfuse, and so QSD, ignores that error too).

use std::io::{IsTerminal, Write};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// The target of messages to the operator ([module docs](self)):
/// `tracing::warn!(target: OPERATOR, "...")`.
pub const OPERATOR: &str = "operator";

/// The filter used when neither variable is set.
pub const DEFAULT_FILTER: &str = "warn";

/// The variables read for the filter, first set wins.
pub const FILTER_VARIABLES: [&str; 2] = ["BLOCKEXPORTD_LOG", "RUST_LOG"];

/// Installs the global subscriber (and the `log` bridge). Call once, before any thread starts.
pub fn init() {
    let mut warning = None;
    let filter = match FILTER_VARIABLES
        .iter()
        .find_map(|v| std::env::var(v).ok().map(|value| (*v, value)))
    {
        Some((var, value)) => EnvFilter::try_new(&value).unwrap_or_else(|e| {
            warning = Some(format!("blockexportd: {var}={value}: {e}"));
            EnvFilter::new(DEFAULT_FILTER)
        }),
        None => EnvFilter::new(DEFAULT_FILTER),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry()
        .with(QuietInterruptedReplies)
        .with(OperatorMessages(std::io::stderr).with_filter(operator_only()))
        .with(fmt.with_filter(without_operator(filter)))
        .init();
    if let Some(w) = warning {
        eprintln!("{w}");
    }
}

/// Only operator messages (`info!` and above). Both filters decide per callsite once (static
/// interest), so that a disabled `debug!` on the data path stays as cheap as with one global
/// filter; and the most verbose level either lets through is what the `log` bridge lets in
/// (fuser logs every request at `debug`), so this one stops at `info`.
fn operator_only() -> Targets {
    Targets::new().with_target(OPERATOR, LevelFilter::INFO)
}

/// `filter` without the operator messages.
fn without_operator(filter: EnvFilter) -> EnvFilter {
    filter.add_directive(
        format!("{OPERATOR}=off")
            .parse()
            .expect("a directive that parses"),
    )
}

/// Prints operator messages as QEMU does: `blockexportd: TEXT` ([module docs](self)).
pub struct OperatorMessages<W>(pub W);

impl<S: Subscriber, W: for<'w> MakeWriter<'w> + 'static> Layer<S> for OperatorMessages<W> {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let _ = writeln!(self.0.make_writer(), "blockexportd: {}", fields.message);
    }
}

/// Drops fuser's report of a reply to an interrupted request ([module docs](self)).
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietInterruptedReplies;

impl<S: Subscriber> Layer<S> for QuietInterruptedReplies {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let mut fields = Fields::default();
        event.record(&mut fields);
        // Events bridged from `log` carry their target as a field.
        let target = fields
            .log_target
            .as_deref()
            .unwrap_or(event.metadata().target());
        !is_interrupted_reply(target, &fields.message)
    }
}

/// Whether an event is fuser's failure to reply that the kernel gave `ENOENT`.
fn is_interrupted_reply(target: &str, message: &str) -> bool {
    target == "fuser::reply"
        && message.starts_with("Failed to send FUSE reply")
        && message.contains(&std::io::Error::from_raw_os_error(libc::ENOENT).to_string())
}

#[derive(Default)]
struct Fields {
    message: String,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "log.target" => self.log_target = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_interrupted_reply_is_dropped_other_errors_are_kept() {
        let buf = Buffer::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(DEFAULT_FILTER))
            .with(QuietInterruptedReplies)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            // As the `log` bridge delivers fuser's records: the target as a field.
            tracing::error!(
                log.target = "fuser::reply",
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
            tracing::error!(
                target: "fuser::reply",
                "Failed to send FUSE reply: No such file or directory (os error 2)"
            );
            tracing::error!(
                log.target = "fuser::reply",
                "Failed to send FUSE reply: Invalid argument (os error 22)"
            );
            tracing::error!("something else: No such file or directory (os error 2)");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            !text.contains("Failed to send FUSE reply: No such"),
            "{text}"
        );
        assert!(text.contains("Invalid argument"), "{text}");
        assert!(text.contains("something else"), "{text}");
    }

    #[test]
    fn operator_messages_are_printed_plainly_whatever_the_filter() {
        let (plain, fmt) = (Buffer::default(), Buffer::default());
        let (p, f) = (plain.clone(), fmt.clone());
        let subscriber = tracing_subscriber::registry()
            .with(OperatorMessages(move || p.clone()).with_filter(operator_only()))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || f.clone())
                    .with_filter(without_operator(EnvFilter::new("error"))),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: OPERATOR, "waiting for connection on: {}", "x");
            tracing::error!("an error");
            tracing::warn!("a filtered warning");
        });
        let plain = String::from_utf8(plain.0.lock().unwrap().clone()).unwrap();
        let fmt = String::from_utf8(fmt.0.lock().unwrap().clone()).unwrap();
        assert_eq!(plain, "blockexportd: waiting for connection on: x\n");
        assert!(
            fmt.contains("an error") && !fmt.contains("waiting"),
            "{fmt}"
        );
        assert!(!fmt.contains("a filtered warning"), "{fmt}");
    }

    #[test]
    fn operator_messages_do_not_raise_the_level_the_log_bridge_lets_in() {
        let subscriber = tracing_subscriber::registry()
            .with(OperatorMessages(std::io::sink).with_filter(operator_only()))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::sink)
                    .with_filter(without_operator(EnvFilter::new(DEFAULT_FILTER))),
            );
        let hint = tracing::Subscriber::max_level_hint(&subscriber);
        assert_eq!(hint, Some(LevelFilter::INFO));
    }
}
