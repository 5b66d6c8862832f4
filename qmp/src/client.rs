//! The client-side transport: the daemon connects out to whoever serves as the QMP client,
//! as a QEMU `--chardev socket` without `server=on` does.
//!
//! The peer listens and the daemon connects; after the connection the roles are the usual
//! ones (the daemon sends the greeting, the peer negotiates and sends commands). With a
//! reconnect delay, a connection that ends, or a connect that fails, is retried after the
//! delay, and every new connection is a new monitor with a new greeting, as QEMU's
//! `reconnect-ms` does.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::server::{until_dead, MonitorOptions, QmpServer};

impl QmpServer {
    /// Serves monitors over connections the daemon makes itself, until
    /// [`shutdown`](Self::shutdown).
    ///
    /// `first` is a connection already made (a daemon that must fail at startup when its
    /// peer is not there connects once itself and passes it here); without it the first
    /// connection is made by calling `connect`. When a session ends, or `connect` fails,
    /// and `reconnect` is `Some(delay)`, `connect` is called again after `delay`; with
    /// `None` this returns instead. `connect` is where a daemon reports a failed attempt
    /// (QEMU reports the first failure after each connection, not every retry); errors are
    /// not logged here.
    pub async fn serve_client<C, Fut, S>(
        &self,
        mut connect: C,
        first: Option<S>,
        reconnect: Option<Duration>,
        opts: MonitorOptions,
    ) where
        C: FnMut() -> Fut + Send,
        Fut: Future<Output = io::Result<S>> + Send,
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut shutdown = self.shutdown_receiver();
        let mut next = first;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let stream = match next.take() {
                Some(s) => Some(s),
                None => tokio::select! {
                    r = connect() => r.ok(),
                    _ = until_dead(&mut shutdown) => return,
                },
            };
            if let Some(stream) = stream {
                self.serve_stream(stream, opts).await;
            }
            let Some(delay) = reconnect else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = until_dead(&mut shutdown) => return,
            }
        }
    }
}
