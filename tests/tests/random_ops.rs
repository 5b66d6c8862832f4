//! block-core's randomised differential test, over NBD: libnbd (`tests/random_ops.py`) sends
//! random batches of writes, write-zeroes, trims, reads and flushes, all in flight at once, to
//! the real binary, and the same to qemu-storage-daemon with the same command line, on every
//! driver stack and every `discard`/`detect-zeroes` setting. Every read is checked against a
//! model, and the image file at the end with `qemu-img compare` and `qemu-img check`.
//!
//! The seed is printed; replay or soak with
//! `RANDOM_OPS_SEED=N RANDOM_OPS_BATCHES=2000 cargo test -p blockexportd-tests --test random_ops`.

use blockexportd_tests::{require_python_nbd, require_tools, run_ok, Daemon, Flavor};
use std::path::Path;
use std::process::Command;

/// Not a multiple of 4 KiB, as in block-core's run.
const SIZE: u64 = (4 << 20) - 3584;

#[derive(Debug, Clone, Copy)]
enum Stack {
    Raw,
    Qcow2(u64),
    Qcow2Backing,
}

const STACKS: [Stack; 5] = [
    Stack::Raw,
    Stack::Qcow2(512),
    Stack::Qcow2(4096),
    Stack::Qcow2(65536),
    Stack::Qcow2Backing,
];

const SETTINGS: [(&str, &str); 5] = [
    ("ignore", "off"),
    ("ignore", "on"),
    ("unmap", "off"),
    ("unmap", "on"),
    ("unmap", "unmap"),
];

/// Makes the images in `dir`; returns the top image, its format and the starting content.
fn create(stack: Stack, dir: &Path) -> (String, &'static str, Vec<u8>) {
    let size = SIZE.to_string();
    let mut model = vec![0u8; SIZE as usize];
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let qemu_img = |args: &[&str]| {
        run_ok(Command::new("qemu-img").args(args));
    };
    match stack {
        Stack::Raw => {
            qemu_img(&["create", "-q", "-f", "raw", &path("top.raw"), &size]);
            (path("top.raw"), "raw", model)
        }
        Stack::Qcow2(cluster) => {
            let opts = format!("cluster_size={cluster}");
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                &path("top.qcow2"),
                &size,
            ]);
            (path("top.qcow2"), "qcow2", model)
        }
        Stack::Qcow2Backing => {
            qemu_img(&["create", "-q", "-f", "qcow2", &path("base.qcow2"), &size]);
            run_ok(Command::new("qemu-io").args([
                "-f",
                "qcow2",
                "-c",
                "write -P 0x11 4096 1M",
                "-c",
                "write -P 0x22 2M 1028096",
                &path("base.qcow2"),
            ]));
            model[4096..4096 + (1 << 20)].fill(0x11);
            model[2 << 20..(2 << 20) + 1_028_096].fill(0x22);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &path("top.qcow2"),
                &size,
            ]);
            (path("top.qcow2"), "qcow2", model)
        }
    }
}

fn unit(stack: Stack) -> u64 {
    match stack {
        Stack::Raw => 4096,
        Stack::Qcow2(c) => c,
        Stack::Qcow2Backing => 65536,
    }
}

/// One stack and setting on one daemon: the script's batches, then the checks of the file.
/// Returns what went wrong.
fn run_one(
    flavor: Flavor,
    stack: Stack,
    discard: &str,
    detect: &str,
    seed: u64,
    batches: u64,
) -> Result<(), String> {
    let what = format!(
        "{flavor:?} {stack:?} discard={discard} detect-zeroes={detect} (RANDOM_OPS_SEED={seed})"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, format, model) = create(stack, dir.path());
    let model_in = dir.path().join("model-in.raw");
    let model_out = dir.path().join("model-out.raw");
    std::fs::write(&model_in, &model).expect("write the model");
    let sock = dir.path().join("nbd.sock");
    let blockdev = format!(
        "driver={format},node-name=top,discard={discard},detect-zeroes={detect},\
         file.driver=file,file.filename={image}"
    );
    let server = format!("addr.type=unix,addr.path={}", sock.display());
    let mut d = Daemon::start_flavor(
        flavor,
        &[
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=exp0,node-name=top,name=disk,writable=on",
        ],
    );
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("random_ops.py"))
        .arg(&uri)
        .arg(seed.to_string())
        .arg(batches.to_string())
        .arg(unit(stack).to_string())
        .arg(&model_in)
        .arg(&model_out)
        .output()
        .expect("run random_ops.py");
    let exit = d.terminate();
    if !out.status.success() {
        return Err(format!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if !exit.status.success() {
        return Err(format!("{what}: daemon exit {:?}", exit.status));
    }
    // Quiet like QSD: a warning on stderr is a failure too (QEMU 10.0's qcow2 prints
    // "qcow2_free_clusters failed" in the runs where it loses track of a cluster).
    if !exit.stderr.is_empty() {
        return Err(format!(
            "{what}: daemon stderr: {}",
            String::from_utf8_lossy(&exit.stderr)
        ));
    }
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(&model_out)
        .arg(&image)
        .output()
        .expect("qemu-img compare");
    if !out.status.success() {
        return Err(format!(
            "{what}: qemu-img compare with the model: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if format == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["check", &image])
            .output()
            .expect("qemu-img check");
        if !out.status.success() {
            return Err(format!(
                "{what}: qemu-img check: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    }
    Ok(())
}

fn seed() -> u64 {
    let seed = blockexportd_tests::model::seed_from_env("RANDOM_OPS_SEED");
    eprintln!("random ops over NBD: RANDOM_OPS_SEED={seed}");
    seed
}

fn batches() -> u64 {
    blockexportd_tests::model::count_from_env("RANDOM_OPS_BATCHES", 100) as u64
}

/// Both daemons get the same sequences, one stack and setting after another. Ours must match
/// the model on every run. QSD must on `raw` (which shows the model and the script agree with
/// the reference); on qcow2, QEMU 10.0 loses or corrupts data in some runs (a fast or
/// unaligned write-zeroes that may unmap, beside writes allocating the same cluster: like the
/// imago bug, its check under the lock misses allocations in flight), so its failures there
/// are printed for comparison, not asserted.
#[test]
fn random_ops_over_nbd_match_the_model_on_both_daemons() {
    if !require_tools(&["qemu-img", "qemu-io", "qemu-storage-daemon"]) || !require_python_nbd() {
        return;
    }
    let seed = seed();
    let batches = batches();
    let mut i = 0u64;
    let mut qsd_failures = Vec::new();
    for stack in STACKS {
        for (discard, detect) in SETTINGS {
            let run_seed = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            if let Err(e) = run_one(
                Flavor::Blockexportd,
                stack,
                discard,
                detect,
                run_seed,
                batches,
            ) {
                panic!("{e}");
            }
            match run_one(Flavor::Qsd, stack, discard, detect, run_seed, batches) {
                Ok(()) => {}
                Err(e) if matches!(stack, Stack::Raw) => panic!("{e}"),
                Err(e) => qsd_failures.push(e),
            }
            i += 1;
        }
    }
    for e in &qsd_failures {
        eprintln!("for comparison, qemu-storage-daemon: {e}");
    }
    eprintln!(
        "random ops over NBD: blockexportd 25 of 25 runs right, qemu-storage-daemon {} of 25",
        25 - qsd_failures.len()
    );
}

/// The reproduction that found the lost writes: a sparse file of random 512-byte data and zero
/// runs copied by nbdcopy (one connection, one request buffer: it still sends the data and
/// zero runs of each buffer at once) into a fresh qcow2 export. QSD got it right; we lost
/// writes until imago's write-zeroes was fixed.
#[test]
fn nbdcopy_of_a_sparse_file_into_qcow2_loses_nothing() {
    if !require_tools(&["qemu-img", "nbdcopy"]) {
        return;
    }
    let seed = seed();
    for round in 0..3u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("f");
        let mut rng = seed.wrapping_add(round);
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // As the script: 100 times, 512 random bytes and 512 zero bytes, each at a
        // random multiple of 9973 below 32768 * 9973.
        let mut data = Vec::new();
        for _ in 0..100 {
            for zero in [false, true] {
                let at = (next() % 32768 * 9973) as usize;
                if data.len() < at + 512 {
                    data.resize(at + 512, 0);
                }
                let piece: Vec<u8> = if zero {
                    vec![0; 512]
                } else {
                    (0..512).map(|_| next() as u8).collect()
                };
                data[at..at + 512].copy_from_slice(&piece);
            }
        }
        std::fs::write(&source, &data).expect("write the source");
        let image = dir.path().join("q.qcow2");
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&image)
                .arg(data.len().to_string()),
        );
        let sock = dir.path().join("s.sock");
        let blockdev = format!(
            "driver=qcow2,file.driver=file,file.filename={},node-name=disk0",
            image.display()
        );
        let server = format!("addr.type=unix,addr.path={}", sock.display());
        let mut d = Daemon::start(&[
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=exp0,node-name=disk0,name=,writable=on",
        ]);
        run_ok(
            Command::new("nbdcopy")
                .args(["--threads=1", "--connections=1", "--requests=1"])
                .arg(&source)
                .arg(format!("nbd+unix:///?socket={}", sock.display())),
        );
        let exit = d.terminate();
        assert!(exit.status.success(), "daemon exit {:?}", exit.status);
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw"])
            .arg(&source)
            .args(["-F", "qcow2"])
            .arg(&image)
            .output()
            .expect("qemu-img compare");
        assert!(
            out.status.success(),
            "round {round} (RANDOM_OPS_SEED={seed}): {}",
            String::from_utf8_lossy(&out.stdout)
        );
        run_ok(Command::new("qemu-img").arg("check").arg(&image));
    }
}
