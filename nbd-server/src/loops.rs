//! Event loops for connections: a few threads, each running a single-threaded tokio runtime.
//!
//! A connection is one task that reads requests, runs them and writes replies. On a
//! multi-threaded runtime every wake-up of that task may hand it to another worker thread
//! (and wake that thread through a futex): with client and server sharing a few cores, those
//! hand-offs cost more than the request itself (a 4 KiB write through the page cache takes a
//! few microseconds). On a single-threaded loop a connection stays on one thread; the loops
//! spread connections over the cores. After the handshake the server moves each connection
//! to the loop that has the fewest ([`Loops::pick`]).

use block_core::IoThread;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;

/// What the server and the connections on a loop share. The loop thread runs until the last
/// holder is gone (the server and every lease): a connection is never cut off by the server
/// being dropped before it ends.
#[derive(Debug)]
struct Shared {
    clients: AtomicUsize,
    /// Dropped with the last holder: its loop then ends.
    thread: IoThread,
}

/// The server's connection loops.
#[derive(Debug)]
pub(crate) struct Loops {
    loops: Vec<Arc<Shared>>,
}

/// A connection counted on its loop, and keeping it running, until dropped.
#[derive(Debug)]
pub(crate) struct LoopLease(Arc<Shared>);

impl Drop for LoopLease {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Loops {
    /// Starts `n` loop threads named `nbd-loop-K`.
    pub(crate) fn start(n: usize) -> io::Result<Loops> {
        let mut loops = Vec::with_capacity(n);
        for k in 0..n {
            loops.push(Arc::new(Shared {
                clients: AtomicUsize::new(0),
                thread: IoThread::spawn(format!("nbd-loop-{k}"))?,
            }));
        }
        Ok(Loops { loops })
    }

    /// The loop with the fewest connections, with a lease that counts one more there.
    pub(crate) fn pick(&self) -> Option<(Handle, LoopLease)> {
        let l = self
            .loops
            .iter()
            .min_by_key(|l| l.clients.load(Ordering::Relaxed))?;
        l.clients.fetch_add(1, Ordering::Relaxed);
        Some((l.thread.handle().clone(), LoopLease(Arc::clone(l))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_spread_over_the_loops_and_leave_them() {
        let loops = Loops::start(2).expect("loops");
        let (a, la) = loops.pick().expect("a loop");
        let (b, lb) = loops.pick().expect("a loop");
        assert_ne!(
            a.id(),
            b.id(),
            "the second connection goes to the idle loop"
        );
        drop(la);
        let (c, _lc) = loops.pick().expect("a loop");
        assert_eq!(c.id(), a.id(), "a freed loop is picked again");
        // Work runs on the loop's thread.
        let (tx, rx) = std::sync::mpsc::channel();
        b.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx.recv().expect("the loop runs the task");
        assert!(name.is_some_and(|n| n.starts_with("nbd-loop-")));
        // A lease keeps its loop running after the server dropped the loops.
        drop(loops);
        let (tx, rx) = std::sync::mpsc::channel();
        b.spawn(async move {
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("the leased loop still runs tasks");
        drop(lb);
        assert!(Loops::start(0).expect("no loops").pick().is_none());
    }
}
