//! A guest kernel with VDUSE, built from Debian's kernel source (neither the host's kernel nor
//! Debian's packaged one has `CONFIG_VDPA_USER`).
//!
//! [`vduse_kernel`] starts from `make tinyconfig` and turns on [`FRAGMENT`]: what the harness's
//! guest needs (serial console, initramfs, virtio-pci and virtio-blk, PVH boot, ACPI for the
//! CPUs and the power-off), what blockexportd and qemu-storage-daemon call (epoll, eventfd,
//! io_uring, file locks, ...) and VDUSE with the vDPA bus and its virtio driver, all built in:
//! the guest loads no modules. Every option of the fragment is checked to be `=y` after
//! `make olddefconfig`, since Kconfig drops an option whose dependencies are off without a word.
//!
//! The bzImage is kept outside the checkout, in [`cache_dir`], named by a hash of the fragment
//! and of the source tarball's size and mtime, so that a fresh clone on the same machine finds
//! it. The build runs once per machine: under an exclusive `flock` of a lock file there, in a
//! temporary directory there, and the image is renamed into place when complete.

use crate::under_ci;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// Debian's kernel source (package linux-source-6.1).
pub const SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// The host programs a kernel build runs.
pub const BUILD_TOOLS: &[&str] = &["tar", "xz", "make", "gcc", "ld", "flex", "bison", "bc"];

/// The libelf header (libelf-dev): objtool, which an x86-64 build always runs, needs it.
const LIBELF_HEADER: &str = "/usr/include/libelf.h";

/// The options set on top of `make tinyconfig`, one `CONFIG_...=y` a line; each must come out
/// `=y` in the final `.config`.
pub const FRAGMENT: &str = "\
# The machine: 64-bit, several CPUs (listed by ACPI's MADT: without ACPI the guest sees one,
# and ACPI powers it off), PCI, QEMU's PVH entry point (the harness boots the ELF image).
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_ACPI=y
CONFIG_PCI=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PVH=y
# The console: kernel messages and the harness's markers on the first serial port.
CONFIG_PRINTK=y
CONFIG_TTY=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
# Boot from the harness's initramfs and run busybox, its scripts and dynamic programs.
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_MULTIUSER=y
# What /init mounts: /proc, /sys, /dev (device nodes appear by themselves), /tmp, /dev/shm.
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_TMPFS=y
CONFIG_SHMEM=y
# virtio over PCI: the disks the host gives the guest, and a virtio console.
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_PCI=y
CONFIG_BLOCK=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_CONSOLE=y
# What the daemons call: unix sockets (QMP), futexes (threads), epoll, eventfd, signalfd,
# timerfd, io_uring and Linux AIO, POSIX timers, madvise, file locks (image locking).
CONFIG_NET=y
CONFIG_UNIX=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_EVENTFD=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_IO_URING=y
CONFIG_AIO=y
CONFIG_POSIX_TIMERS=y
CONFIG_ADVISE_SYSCALLS=y
CONFIG_FILE_LOCKING=y
# System V IPC: fio (bench vduse-bench) keeps its job table in a shared memory segment.
CONFIG_SYSVIPC=y
# VDUSE: /dev/vduse/control, the vDPA bus (managed with `vdpa`, over generic netlink, which
# comes with NET) and the driver that puts a virtio device on a vDPA device.
CONFIG_VDPA=y
CONFIG_VDPA_USER=y
CONFIG_VIRTIO_VDPA=y
";

/// Bumped when the way the kernel is built changes in a way the fragment does not show.
const RECIPE_VERSION: u32 = 1;

/// Where built kernels are kept: `$BLOCKEXPORTD_CACHE_DIR` if set, else
/// `/var/cache/blockexportd` if it can be created and written, else
/// `$HOME/.cache/blockexportd`.
pub fn cache_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("BLOCKEXPORTD_CACHE_DIR") {
        let dir = PathBuf::from(dir);
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        return Ok(dir);
    }
    let system = Path::new("/var/cache/blockexportd");
    if fs::create_dir_all(system).is_ok() && writable(system) {
        return Ok(system.to_path_buf());
    }
    let home = std::env::var_os("HOME").ok_or("neither /var/cache/blockexportd nor $HOME")?;
    let dir = Path::new(&home).join(".cache/blockexportd");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn writable(dir: &Path) -> bool {
    tempfile::tempfile_in(dir).is_ok()
}

/// 64-bit FNV-1a: a hash that stays the same across Rust releases, for the cache key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cache key: the recipe's version, the fragment, and the source tarball's path, size and
/// mtime (a new linux-source package replaces the tarball).
fn cache_key() -> Result<String, String> {
    let meta = fs::metadata(SOURCE).map_err(|e| format!("{SOURCE}: {e}"))?;
    let material = format!(
        "recipe {RECIPE_VERSION}\n{FRAGMENT}\n{SOURCE} {} {}.{:09}\n",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    Ok(format!("{:016x}", fnv1a(material.as_bytes())))
}

/// The cached image for the current key.
fn cached_image() -> Result<PathBuf, String> {
    Ok(cache_dir()?.join(format!("vduse-{}.bzImage", cache_key()?)))
}

/// What a build lacks: missing tools, the libelf header, the source.
fn missing_for_build() -> Vec<String> {
    let mut missing: Vec<String> = BUILD_TOOLS
        .iter()
        .filter(|t| crate::guest::which(t).is_err())
        .map(|t| t.to_string())
        .collect();
    for path in [LIBELF_HEADER, SOURCE] {
        if !Path::new(path).is_file() {
            missing.push(path.to_string());
        }
    }
    missing
}

/// Whether the VDUSE kernel is cached or can be built. Under CI anything missing fails the
/// test loudly; elsewhere the caller skips with the message printed here.
pub fn require_vduse_kernel() -> bool {
    if cached_image().is_ok_and(|p| p.is_file()) {
        return true;
    }
    let missing = missing_for_build();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "building the VDUSE guest kernel needs {} (install linux-source-6.1, make, gcc, \
         flex, bison, bc, libelf-dev and xz-utils, see .ci/run)",
        missing.join(", ")
    );
    assert!(!under_ci(), "{msg} (CI=true)");
    eprintln!("skipping: {msg}");
    false
}

/// The bzImage of the VDUSE guest kernel: from the cache, or built now (9 to 18 minutes on
/// this 2-core machine) and cached. Once per process; other processes wait on the lock while one builds.
pub fn vduse_kernel() -> Result<PathBuf, String> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE.get_or_init(cached_or_built).clone()
}

fn cached_or_built() -> Result<PathBuf, String> {
    let image = cached_image()?;
    if image.is_file() {
        return Ok(image);
    }
    let dir = image.parent().expect("the image is in the cache dir");
    let lock_path = dir.join("vduse-kernel.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    // Blocks while another process builds; released when `lock` is closed.
    // SAFETY: flock on a descriptor `lock` owns for the duration of the call.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    if image.is_file() {
        return Ok(image); // built while this process waited
    }
    let missing = missing_for_build();
    if !missing.is_empty() {
        return Err(format!(
            "cannot build the VDUSE guest kernel: {} missing",
            missing.join(", ")
        ));
    }
    remove_leftovers(dir, &image);
    eprint!(
        "guest kernel: building {} from {SOURCE} (once per machine, about 10 min on 2 cores) ...",
        image.display()
    );
    let t0 = Instant::now();
    let result = build(dir, &image);
    match &result {
        Ok(()) => eprintln!(" done in {:.0} s", t0.elapsed().as_secs_f64()),
        Err(_) => eprintln!(" failed"),
    }
    result.map(|()| image)
}

/// Under the lock: removes images of other keys and build directories of builds that died.
fn remove_leftovers(dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".vduse-build-") {
            let _ = fs::remove_dir_all(&path);
        } else if name.starts_with("vduse-") && name.ends_with(".bzImage") && path != keep {
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(path.with_extension("config"));
        }
    }
}

/// Unpacks the source into a temporary directory under `dir`, configures, checks the
/// configuration, builds, and renames the bzImage (and its `.config`, beside it) into place.
fn build(dir: &Path, image: &Path) -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix(".vduse-build-")
        .tempdir_in(dir)
        .map_err(|e| format!("temporary directory in {}: {e}", dir.display()))?;
    let src = tmp.path().join("linux");
    fs::create_dir(&src).map_err(|e| format!("create {}: {e}", src.display()))?;
    let mut log = Log::create(&tmp.path().join("build.log"), dir)?;

    let mut tar = Command::new("tar");
    tar.arg("-xf")
        .arg(SOURCE)
        .arg("-C")
        .arg(&src)
        .arg("--strip-components=1");
    log.run("unpacking the source", &mut tar)?;

    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.arg("-C").arg(&src).arg("ARCH=x86_64").args(args);
        // Nothing from the caller's environment reaches kbuild (a jobserver of an outer make,
        // another architecture, another output directory).
        for var in [
            "MAKEFLAGS",
            "MFLAGS",
            "MAKELEVEL",
            "CROSS_COMPILE",
            "KBUILD_OUTPUT",
        ] {
            cmd.env_remove(var);
        }
        cmd
    };
    log.run("make tinyconfig", &mut make(&["tinyconfig"]))?;
    let config = src.join(".config");
    // Appended: a later assignment of a symbol wins over tinyconfig's.
    OpenOptions::new()
        .append(true)
        .open(&config)
        .and_then(|mut f| f.write_all(FRAGMENT.as_bytes()))
        .map_err(|e| format!("append to {}: {e}", config.display()))?;
    log.run("make olddefconfig", &mut make(&["olddefconfig"]))?;
    let final_config =
        fs::read_to_string(&config).map_err(|e| format!("read {}: {e}", config.display()))?;
    let dropped = dropped_options(&final_config);
    if !dropped.is_empty() {
        return Err(format!(
            "after make olddefconfig these options are not =y (their dependencies are off): {}",
            dropped.join(", ")
        ));
    }
    let jobs = std::thread::available_parallelism().map_or(1, usize::from);
    log.run(
        "make bzImage",
        &mut make(&[&format!("-j{jobs}"), "bzImage"]),
    )?;

    install(&src.join(".config"), &image.with_extension("config"))?;
    install(&src.join("arch/x86/boot/bzImage"), image)
}

/// The fragment's options that are not `=y` in `config`.
fn dropped_options(config: &str) -> Vec<String> {
    FRAGMENT
        .lines()
        .filter_map(|l| l.strip_suffix("=y"))
        .filter(|opt| !config.lines().any(|l| l.strip_suffix("=y") == Some(*opt)))
        .map(str::to_string)
        .collect()
}

/// Copies `from` to a temporary name beside `to`, syncs it and renames it to `to`.
fn install(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_extension(format!("tmp-{}", std::process::id()));
    fs::copy(from, &tmp)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, to))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("install {} as {}: {e}", from.display(), to.display())
        })
}

/// The build's output, in one file; kept in the cache directory when a step fails.
struct Log {
    file: File,
    path: PathBuf,
    keep_as: PathBuf,
}

impl Log {
    fn create(path: &Path, cache: &Path) -> Result<Log, String> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        Ok(Log {
            file,
            path: path.to_path_buf(),
            keep_as: cache.join("vduse-build-failed.log"),
        })
    }

    /// Runs `cmd` with its output in the log; on failure the error names the step, the
    /// status, where the log was kept and its last lines.
    fn run(&mut self, step: &str, cmd: &mut Command) -> Result<(), String> {
        let out = self.file.try_clone().map_err(|e| e.to_string())?;
        let err = self.file.try_clone().map_err(|e| e.to_string())?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("{step}: {e}"))?;
        if status.success() {
            return Ok(());
        }
        let mut text = String::new();
        let _ = self.file.seek(SeekFrom::Start(0));
        let _ = self.file.read_to_string(&mut text);
        let kept = fs::copy(&self.path, &self.keep_as).is_ok();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        Err(format!(
            "{step} failed ({status}); {}, last lines:\n{tail}",
            if kept {
                format!("the whole log is {}", self.keep_as.display())
            } else {
                "the log could not be kept".to_string()
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_lines_are_options_or_comments() {
        for line in FRAGMENT.lines() {
            assert!(
                line.starts_with('#')
                    || (line.starts_with("CONFIG_") && line.ends_with("=y") && !line.contains(' ')),
                "{line:?}"
            );
        }
    }

    #[test]
    fn dropped_options_are_named() {
        let all: String = FRAGMENT
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(dropped_options(&all).is_empty());
        let without = all.replace("CONFIG_VDPA_USER=y\n", "# CONFIG_VDPA_USER is not set\n");
        assert_eq!(dropped_options(&without), ["CONFIG_VDPA_USER"]);
        // A module is not built in.
        let module = all.replace("CONFIG_VIRTIO_VDPA=y", "CONFIG_VIRTIO_VDPA=m");
        assert_eq!(dropped_options(&module), ["CONFIG_VIRTIO_VDPA"]);
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // The FNV-1a test vectors for "" and "a".
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
