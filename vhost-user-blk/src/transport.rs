//! How a vhost-user ring tells the frontend about used buffers: the call eventfd, which the
//! frontend may replace while the ring runs (`SET_VRING_CALL`).

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use virtio_blk::worker::Transport;

/// The ring's call eventfd, if the frontend gave one.
#[derive(Debug, Default)]
pub struct CallFd(Mutex<Option<File>>);

impl CallFd {
    /// Replaces the eventfd (`None`: the frontend polls, nothing is signalled).
    pub fn set(&self, fd: Option<File>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }
}

impl Transport for CallFd {
    fn notify(&self) {
        let call = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = call.as_ref() {
            let _ = (&*f).write(&1u64.to_ne_bytes());
        }
    }
}
