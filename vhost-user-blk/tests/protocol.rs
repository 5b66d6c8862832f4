//! The backend driven by `vhost`'s own frontend: negotiation and config space, and messages
//! a frontend could get wrong refused without harm to the daemon.

use block_core::drivers::null::NullDriver;
use block_core::{BlockDriver, Node, Submitter};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_blk::{Listen, Options, VhostUserBlk};

const SIZE: u64 = 64 << 20;

fn memfd(len: u64) -> File {
    // SAFETY: a valid NUL-terminated name; no other memory is involved.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("set_len");
    f
}

#[test]
fn negotiation_config_and_bad_messages() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vub.sock");
    let node = Node::new(
        "null",
        Arc::new(NullDriver::new(SIZE, true, false, 0)) as Arc<dyn BlockDriver>,
        Vec::new(),
    );
    let submitter = Submitter::new(
        node.attach("test", true).expect("attach"),
        runtime.handle().clone(),
    );
    let server = VhostUserBlk::start(
        submitter,
        Options {
            writable: true,
            num_queues: 2,
            logical_block_size: 4096,
            ..Options::new(Listen::Path(sock.clone()))
        },
    )
    .expect("start");

    let mut fe = Frontend::connect(&sock, 2).expect("connect");
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features");
    assert_ne!(features & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(features & (1 << 13), 0, "DISCARD on a writable export");
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("protocol features");
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(proto.contains(f), "{f:?}");
    }
    fe.set_protocol_features(proto)
        .expect("set_protocol_features");
    // Every message asks for its answer (REPLY_ACK), as libblkio's do.
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().expect("queue num"), 2);

    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("get_config");
    assert_eq!(&config[0..8], &(SIZE / 512).to_le_bytes(), "capacity");
    assert_eq!(&config[20..24], &4096u32.to_le_bytes(), "blk_size");
    assert_eq!(&config[34..36], &2u16.to_le_bytes(), "num_queues");
    assert_eq!(config[32], 1, "write cache on");
    // The write-cache byte is the driver's; nothing else is.
    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("writeback off");
    let (_, config) = fe
        .get_config(32, 1, VhostUserConfigFlags::WRITABLE, &[0u8; 1])
        .expect("get_config");
    assert_eq!(config[..], [0]);
    assert!(fe
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .is_err());
    let (_, config) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .expect("get_config");
    assert_eq!(
        &config[0..8],
        &(SIZE / 512).to_le_bytes(),
        "capacity unchanged"
    );

    // A memory region larger than its file is refused (touching it would fault).
    let small = memfd(4096);
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: 0x7000_0000,
        mmap_offset: 0,
        mmap_handle: small.as_raw_fd(),
    };
    assert!(fe.add_mem_region(&region).is_err(), "region past EOF");
    // So is an in-flight log larger than its file, and a ring size that is no power of two.
    let log = VhostUserInflight {
        mmap_size: 1 << 20,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 128,
    };
    assert!(fe.set_inflight_fd(&log, small.as_raw_fd()).is_err());
    assert!(fe.set_vring_num(0, 100).is_err());
    assert!(fe.set_vring_num(7, 128).is_err(), "no such ring");

    // A good region and a log of the backend's own are taken.
    let mem = memfd(1 << 20);
    let region = VhostUserMemoryRegionInfo {
        mmap_handle: mem.as_raw_fd(),
        ..region
    };
    fe.add_mem_region(&region).expect("add_mem_region");
    let (got, file) = fe
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        })
        .expect("get_inflight_fd");
    assert_eq!(got.num_queues, 2);
    assert!(file.metadata().expect("stat").len() >= got.mmap_size);
    fe.set_inflight_fd(&got, file.as_raw_fd())
        .expect("set_inflight_fd");
    assert!(server.has_client());
    assert_eq!(fe.get_queue_num().expect("still answering"), 2);
    drop(fe);
    // The backend serves the next frontend.
    let fe = Frontend::connect(&sock, 2).expect("reconnect");
    fe.set_owner().expect("set_owner");
    assert_eq!(fe.get_features().expect("get_features"), features);
    drop(fe);
    server.stop();
    assert!(!server.has_client());
}

/// Counts the frontend's `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`s.
#[derive(Default)]
struct ConfigChanges(std::sync::atomic::AtomicUsize);

impl vhost::vhost_user::VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(0)
    }
}

/// With `BACKEND_REQ` (and `REPLY_ACK`), a resize of the node sends
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel, asking for the answer, and
/// the config space then holds the new capacity (QSD: `vu_blk_exp_resize`).
#[test]
fn a_resize_sends_config_change() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vub.sock");
    let image = dir.path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    let graph = block_core::NodeGraph::new();
    let node = runtime
        .block_on(block_core::open::blockdev_add(
            &graph,
            block_core::BlockdevOptions::from_json(
                serde_json::json!({"driver": "file", "node-name": "disk0", "filename": image}),
            )
            .unwrap(),
        ))
        .expect("blockdev-add");
    let submitter = Submitter::new(
        node.attach("test", true).expect("attach"),
        runtime.handle().clone(),
    );
    let server = VhostUserBlk::start(
        submitter,
        Options {
            writable: true,
            ..Options::new(Listen::Path(sock.clone()))
        },
    )
    .expect("start");

    let mut fe = Frontend::connect(&sock, 1).expect("connect");
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features");
    fe.set_features(features).expect("set_features");
    let proto = fe.get_protocol_features().expect("protocol features");
    assert!(proto.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    fe.set_protocol_features(proto)
        .expect("set_protocol_features");
    let changes = Arc::new(ConfigChanges::default());
    let mut channel =
        vhost::vhost_user::FrontendReqHandler::new(Arc::clone(&changes)).expect("channel");
    channel.set_reply_ack_flag(true);
    fe.set_backend_request_fd(&channel.get_tx_raw_fd())
        .expect("set_backend_request_fd");
    // The backend has the channel once it answered a later message.
    assert_eq!(fe.get_queue_num().expect("queue num"), 1);

    runtime
        .block_on(node.resize(SIZE * 2))
        .expect("block_resize");
    // Takes the message and answers it (the backend waits for the answer), on a thread so
    // that a message that never comes fails the test rather than hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            channel
                .handle_request()
                .map(drop)
                .map_err(|e| e.to_string()),
        );
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("a config-change message within 10 s")
        .expect("the config-change message");
    assert_eq!(changes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (_, config) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .expect("get_config");
    assert_eq!(&config[0..8], &(SIZE * 2 / 512).to_le_bytes(), "capacity");
    drop(fe);
    server.stop();
}
