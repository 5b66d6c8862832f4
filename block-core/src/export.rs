//! What every export type shares about its end: how it is removed ([`RemoveMode`]) and the
//! future that tells when it is over ([`ExportGone`]).
//!
//! QEMU's `block-export-del` takes a `mode` for every export type, and an export being
//! removed lives on until its last request is done. Each export crate (NBD, FUSE, ...) ends
//! its exports in a [`RemoveMode`] and hands back an [`ExportGone`], so that the daemon drives
//! the removal of every type the same way.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// How an export treats its connected clients when it is removed: QAPI
/// `BlockExportRemoveMode`, from [`qsd_qapi::types`].
pub use qsd_qapi::types::BlockExportRemoveMode as RemoveMode;

/// A future that resolves when a removed export is over: its last request is done, its last
/// client gone, and the node's attachment released.
///
/// Dropping it does not stop the export from ending; it only stops waiting.
#[must_use = "the future does nothing unless awaited; drop it to not wait"]
pub struct ExportGone {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl ExportGone {
    /// Wraps the future that resolves when the export is over.
    pub fn new(drained: impl Future<Output = ()> + Send + 'static) -> Self {
        ExportGone {
            inner: Box::pin(drained),
        }
    }

    /// An export that is over already.
    pub fn done() -> Self {
        ExportGone::new(std::future::ready(()))
    }
}

impl std::fmt::Debug for ExportGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportGone").finish_non_exhaustive()
    }
}

impl Future for ExportGone {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_mode_has_qapi_spellings_and_default() {
        let parse = |s: &str| serde_json::from_value::<RemoveMode>(serde_json::json!(s)).ok();
        assert_eq!(parse("safe"), Some(RemoveMode::Safe));
        assert_eq!(parse("hard"), Some(RemoveMode::Hard));
        assert_eq!(parse("Hard"), None);
        assert_eq!(RemoveMode::default(), RemoveMode::Safe);
    }

    #[tokio::test]
    async fn gone_resolves_when_its_drain_does() {
        ExportGone::done().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let gone = ExportGone::new(async move {
            let _ = rx.await;
        });
        let waiter = tokio::spawn(gone);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "resolved before its drain");
        drop(tx);
        waiter.await.unwrap();
    }
}
