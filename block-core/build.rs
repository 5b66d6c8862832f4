//! The `rbd` feature's link check: the driver is built where librbd and librados are
//! installed (Debian: `librbd-dev`), and left out with a warning elsewhere, so that a default
//! build of the binary, which asks for it, works on a machine without Ceph's libraries.
//! Under CI (`CI=true`) a missing library is an error, never a silent omission.

use std::path::{Path, PathBuf};

/// The directories searched: `LIBRARY_PATH`, then the usual system ones.
fn dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/lib64",
            "/usr/local/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.retain(|d| d.is_dir());
    dirs
}

fn found(dirs: &[PathBuf], lib: &str) -> bool {
    dirs.iter()
        .any(|d| Path::new(d).join(format!("lib{lib}.so")).exists())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(librbd)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=LIBRARY_PATH");
    if std::env::var_os("CARGO_FEATURE_RBD").is_none() {
        return;
    }
    let dirs = dirs();
    // Installing or removing the libraries changes their directory: the check runs again.
    for d in &dirs {
        println!("cargo::rerun-if-changed={}", d.display());
    }
    if found(&dirs, "rbd") && found(&dirs, "rados") {
        println!("cargo::rustc-cfg=librbd");
        return;
    }
    let message = "librbd/librados not found (Debian: apt-get install librbd-dev): the rbd driver is left out";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}");
    }
    println!("cargo::warning={message}");
}
