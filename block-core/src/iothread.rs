//! Event-loop threads, QEMU's iothreads: a dedicated OS thread running a single-threaded
//! tokio runtime. Exports run their I/O there (`Handle::spawn`); the NBD server also uses
//! them as its connection loops.

use std::io;
use std::thread::JoinHandle;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A thread with its own event loop; dropping it stops the loop (tasks still on it are
/// cancelled) and waits for the thread, unless dropped on that thread itself.
#[derive(Debug)]
pub struct IoThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named `name` and its event loop.
    pub fn spawn(name: impl Into<String>) -> io::Result<IoThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(IoThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The event loop's handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The last owner may be a task on this very loop: it cannot wait for itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_tasks_on_its_named_thread_until_dropped() {
        let t = IoThread::spawn("iothread-test").expect("spawn");
        let (tx, rx) = std::sync::mpsc::channel();
        t.handle().spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        assert_eq!(rx.recv().expect("ran").as_deref(), Some("iothread-test"));
        let handle = t.handle().clone();
        drop(t);
        // The loop is gone: a task spawned now never runs (its sender is dropped unrun).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        handle.spawn(async move {
            let _ = tx.send(());
        });
        assert!(rx.recv().is_err());
    }

    #[test]
    fn dropped_on_its_own_thread_does_not_wait_for_itself() {
        let t = IoThread::spawn("iothread-self").expect("spawn");
        let handle = t.handle().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            drop(t);
            let _ = tx.send(());
        });
        rx.recv().expect("the drop returned");
    }
}
