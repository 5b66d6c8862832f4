//! A tiny Linux guest under QEMU (TCG) that runs a shell script a test hands it and prints
//! its results on the serial console: attached to a vhost-user-blk socket, to virtio-blk
//! disks over host image files, or both.
//!
//! The guest boots one of two kernels ([`GuestKernel`]): Debian's packaged kernel, newest in
//! `/boot`, with its `virtio_pci` and `virtio_blk` modules; or a kernel image with everything
//! built in, such as the VDUSE kernel of [`crate::kernel::vduse_kernel`] ([`vduse_config`]).
//!
//! The initramfs is built at test time from what the host has installed: busybox (static,
//! with a link per applet), the packaged kernel's modules with everything `modules.dep` says
//! they need (none for a built-in kernel), and the host's `fio` and `blkdiscard` with the
//! libraries `ldd` names. It is written as a newc cpio by this module; the part that does not
//! change between tests is built once per test process and kernel kind and kept in memory,
//! and each guest gets it followed by a second archive with its own `/test.sh`, data files
//! and programs ([`VmConfig::program`]: a host binary, its debug info stripped, with the
//! libraries `ldd` names); the kernel unpacks concatenated archives in order.
//!
//! The guest's `/init` mounts proc, sysfs, devtmpfs and tmpfs on `/tmp` and `/dev/shm`,
//! loads the modules, checks that the disks are there, prints `@@BOOT`, sources `/test.sh` in
//! a subshell (where `report KEY VALUE...` prints `@@R KEY VALUE...`, which the test reads
//! with [`Vm::result`]), prints `@@END RC` with the script's exit status, syncs and powers
//! off. The harness reads QEMU's stdout (the serial console) line by line, with a deadline
//! for every wait; nothing here sleeps.
//!
//! QEMU's QMP monitor connects out to a socket the harness listens on, so that it is connected
//! before the guest runs (`Vm::qmp`).

use crate::{under_ci, Qmp};
use serde_json::json;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long any one wait on the guest may take by default: a boot under TCG takes about 7 s
/// on an idle machine, and these machines are shared.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

/// The host tools the guest is made of, besides the kernel.
pub const GUEST_TOOLS: &[&str] = &["qemu-system-x86_64", "busybox", "fio", "blkdiscard", "ldd"];

/// `VM_TEST_CONSOLE=1`: the kernel boots without `quiet` and every console line is copied
/// to stderr with the time since QEMU started (`--nocapture` shows them).
pub fn verbose() -> bool {
    std::env::var_os("VM_TEST_CONSOLE").is_some_and(|v| v == "1")
}

/// One guest at a time in a test process: the machine has two cores, and a TCG guest keeps
/// one busy. Hold the guard for the whole test case.
pub fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest kernel: `/boot/vmlinuz-VERSION` and `/lib/modules/VERSION`.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub version: String,
    pub image: PathBuf,
    pub modules: PathBuf,
}

/// The newest kernel in `/boot` whose modules are installed (with a `modules.dep`).
pub fn find_kernel() -> Option<Kernel> {
    let mut found: Vec<Kernel> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            let modules = Path::new("/lib/modules").join(&version);
            modules.join("modules.dep").is_file().then(|| Kernel {
                image: Path::new("/boot").join(&name),
                modules,
                version,
            })
        })
        .collect();
    found.sort_by_key(|k| version_key(&k.version));
    found.pop()
}

fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Which kernel a guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestKernel {
    /// Debian's packaged kernel ([`find_kernel`]), virtio-pci and virtio-blk loaded from its
    /// modules.
    Packaged,
    /// A bzImage with every driver the guest needs built in (it loads no modules), e.g.
    /// [`crate::kernel::vduse_kernel`].
    Image(PathBuf),
}

/// The host tools a VDUSE guest needs besides [`GUEST_TOOLS`]: `vdpa` (iproute2) runs in it,
/// and `objcopy` strips the debug info of the programs copied in.
pub const VDUSE_GUEST_TOOLS: &[&str] = &["vdpa", "objcopy"];

/// Whether everything the guest needs is installed. Under CI a missing piece fails the test
/// loudly; elsewhere the caller skips with the message printed here.
pub fn require_guest() -> bool {
    if !crate::require_tools(GUEST_TOOLS) {
        return false;
    }
    if find_kernel().is_none() {
        let msg = "no guest kernel: /boot/vmlinuz-* with /lib/modules/*/modules.dep \
                   (install linux-image-amd64, see .ci/run)";
        assert!(!under_ci(), "{msg} (CI=true)");
        eprintln!("skipping: {msg}");
        return false;
    }
    true
}

/// Whether a VDUSE guest ([`vduse_config`]) can be booted: the guest's tools and the VDUSE
/// kernel, cached or buildable. Under CI a missing piece fails the test loudly.
pub fn require_vduse_guest() -> bool {
    crate::require_tools(GUEST_TOOLS)
        && crate::require_tools(VDUSE_GUEST_TOOLS)
        && crate::kernel::require_vduse_kernel()
}

/// A guest of the VDUSE kernel (built now if it is not cached) with `vdpa` and this
/// workspace's blockexportd (as `/usr/bin/blockexportd`), running `script`. Call
/// [`require_vduse_guest`] first.
pub fn vduse_config(script: &str) -> VmConfig {
    let image =
        crate::kernel::vduse_kernel().unwrap_or_else(|e| panic!("the VDUSE guest kernel: {e}"));
    VmConfig::bare(GuestKernel::Image(image), script)
        .host_program("vdpa")
        .program(&crate::daemon_binary(), "/usr/bin/blockexportd")
}

/// What QEMU's `-kernel` gets.
enum BootImage {
    /// The kernel's uncompressed ELF image, which QEMU starts at its PVH entry point: under
    /// TCG this saves the kernel's own decompression (about 6 s of a 13 s boot here).
    Elf(Vec<u8>),
    /// The bzImage as installed (a kernel without a PVH entry point).
    BzImage(PathBuf),
}

/// The boot image of `kernel`, made once per test process and kernel.
fn boot_image(kernel: &GuestKernel) -> Result<&'static BootImage, String> {
    static IMAGES: Mutex<Vec<(PathBuf, &'static BootImage)>> = Mutex::new(Vec::new());
    let bz_path = match kernel {
        GuestKernel::Packaged => find_kernel().ok_or("no guest kernel in /boot")?.image,
        GuestKernel::Image(path) => path.clone(),
    };
    let mut images = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, image)) = images.iter().find(|(p, _)| *p == bz_path) {
        return Ok(image);
    }
    let bz = read(&bz_path)?;
    let t0 = Instant::now();
    let image = match extract_elf(&bz) {
        Ok(elf) if has_pvh_note(&elf) => {
            eprintln!(
                "guest: {} decompressed in {:.1} s, booting its ELF image (PVH)",
                bz_path.display(),
                t0.elapsed().as_secs_f64()
            );
            BootImage::Elf(elf)
        }
        Ok(_) => BootImage::BzImage(bz_path.clone()),
        Err(e) => {
            eprintln!("guest: booting the bzImage ({e})");
            BootImage::BzImage(bz_path.clone())
        }
    };
    // One per kernel a test process boots: kept for the process's life.
    let image: &'static BootImage = Box::leak(Box::new(image));
    images.push((bz_path, image));
    Ok(image)
}

fn le(bytes: &[u8], at: usize, n: usize) -> Option<u64> {
    let b = bytes.get(at..at + n)?;
    Some(
        b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
    )
}

/// The ELF image inside a bzImage, through its boot protocol header (2.08 and later:
/// `payload_offset` and `payload_length`, relative to the protected-mode code), decompressed
/// with the host's tool for the payload's format.
fn extract_elf(bz: &[u8]) -> Result<Vec<u8>, String> {
    if bz.get(0x202..0x206) != Some(b"HdrS") || le(bz, 0x206, 2).unwrap_or(0) < 0x208 {
        return Err("no boot protocol 2.08 header".into());
    }
    let setup_sects = match le(bz, 0x1f1, 1).unwrap_or(0) {
        0 => 4,
        n => n,
    } as usize;
    let start = (setup_sects + 1) * 512 + le(bz, 0x248, 4).unwrap_or(0) as usize;
    let len = le(bz, 0x24c, 4).unwrap_or(0) as usize;
    let payload = bz
        .get(start..start + len)
        .ok_or("payload outside the file")?;
    let tool: &[&str] = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        &["xz", "-dc", "--single-stream"]
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        &["zstd", "-dcq"]
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        &["gzip", "-dc"]
    } else {
        return Err("a payload compression this harness does not decompress".into());
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", tool[0]))?;
    let mut stdin = child.stdin.take().expect("stdin");
    let payload = payload.to_vec();
    let writer = std::thread::spawn(move || {
        // The decompressor may stop reading at the end of its stream; the rest is padding.
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let _ = writer.join();
    if !out.stdout.starts_with(b"\x7fELF") {
        return Err(format!("{} did not give an ELF image", tool[0]));
    }
    Ok(out.stdout)
}

/// Whether an ELF64 image has the Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, 18), which
/// QEMU needs to boot it directly.
fn has_pvh_note(elf: &[u8]) -> bool {
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (le(elf, 0x20, 8), le(elf, 0x36, 2), le(elf, 0x38, 2))
    else {
        return false;
    };
    for i in 0..phnum as usize {
        let ph = phoff as usize + i * phentsize as usize;
        if le(elf, ph, 4) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (le(elf, ph + 8, 8), le(elf, ph + 32, 8)) else {
            continue;
        };
        let (mut at, end) = (off as usize, (off + size) as usize);
        while at + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (le(elf, at, 4), le(elf, at + 4, 4), le(elf, at + 8, 4))
            else {
                break;
            };
            let name = elf.get(at + 12..at + 12 + namesz as usize);
            if kind == 18 && name == Some(b"Xen\0") {
                return true;
            }
            at +=
                12 + (namesz as usize).next_multiple_of(4) + (descsz as usize).next_multiple_of(4);
        }
    }
    false
}

/// A newc ("070701") cpio archive being written.
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
        }
    }

    /// An archive unpacked after `base`: the directories and files there are not added again.
    fn continuing(base: &Base) -> Cpio {
        Cpio {
            dirs: base.dirs.clone(),
            names: base.names.clone(),
            ..Cpio::new()
        }
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// One header, name and data; `name` has no leading slash.
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("cpio member under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("name length"),
            0, // check
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    fn rel(path: &str) -> &str {
        path.trim_start_matches('/')
    }

    /// A directory and its parents, each once.
    fn dir(&mut self, path: &str) {
        let path = Cpio::rel(path);
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[]);
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = Cpio::rel(path).rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parent(path);
        self.names.insert(Cpio::rel(path).to_string());
        self.entry(Cpio::rel(path), S_IFREG | perm, (0, 0), data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.names.insert(Cpio::rel(path).to_string());
        self.entry(Cpio::rel(path), S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.parent(path);
        self.entry(Cpio::rel(path), S_IFCHR | 0o600, (major, minor), &[]);
    }

    /// A program at `guest` (`data` is its contents) and the libraries `ldd` names for the
    /// host binary `host`, the dynamic loader included, at the paths ldd names (the loader
    /// finds them there or in the RUNPATHs that name those directories); a library already
    /// in the archive, or in the base it continues, is not added again.
    fn program(&mut self, host: &Path, guest: &str, data: &[u8]) -> Result<(), String> {
        self.file(guest, 0o755, data);
        for lib in ldd(host)? {
            let name = lib.to_string_lossy();
            if !self.names.contains(Cpio::rel(&name)) {
                self.file(&name, 0o755, &read(&lib)?);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// The shared libraries `ldd` names for `binary`, the dynamic loader included (none for a
/// static binary).
fn ldd(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing.
        return if text.contains("not a dynamic")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic")
        {
            Ok(Vec::new())
        } else {
            Err(format!("ldd {} failed: {text}", binary.display()))
        };
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if line.contains("not found") {
            return Err(format!("ldd {}: {line}", binary.display()));
        }
    }
    Ok(libs)
}

/// Finds `tool` on PATH.
pub(crate) fn which(tool: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(tool))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| format!("{tool} is not on PATH"))
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

/// The modules to load, dependencies first, from `modules.dep` (paths relative to the
/// modules directory).
fn module_load_order(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<String>, String> {
    let dep_text = std::fs::read_to_string(kernel.modules.join("modules.dep"))
        .map_err(|e| format!("read modules.dep: {e}"))?;
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_name: HashMap<String, String> = HashMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module.to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
        by_name.insert(module_name(module), module.to_string());
    }
    fn visit(
        m: &str,
        deps: &HashMap<String, Vec<String>>,
        done: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<(), String> {
        if done.iter().any(|d| d == m) {
            return Ok(());
        }
        if path.iter().any(|p| p == m) {
            return Err(format!("dependency cycle at {m}"));
        }
        path.push(m.to_string());
        for d in deps
            .get(m)
            .ok_or_else(|| format!("{m} is not in modules.dep"))?
        {
            visit(d, deps, done, path)?;
        }
        path.pop();
        done.push(m.to_string());
        Ok(())
    }
    // A kernel may have some of them built in: nothing to load then.
    let builtin: BTreeSet<String> = std::fs::read_to_string(kernel.modules.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let mut order = Vec::new();
    for name in wanted.iter().filter(|n| !builtin.contains(**n)) {
        let module = by_name.get(*name).ok_or_else(|| {
            format!(
                "module {name} is neither in {}/modules.dep nor built in",
                kernel.modules.display()
            )
        })?;
        visit(module, &deps, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// `kernel/drivers/block/virtio_blk.ko.xz` -> `virtio_blk` (dashes read as underscores).
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// A module file as busybox insmod can load it: decompressed on the host when compressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return read(path);
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return Err(format!("unknown module compression: {name}"));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| format!("{tool} -dc {name}: {e} (install it to decompress modules)"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} -dc {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// The host programs copied into every guest, at their host paths.
const GUEST_PROGRAMS: &[&str] = &["fio", "blkdiscard"];

/// The guest's `/init`; `modules` are loaded in order, then the block devices named in
/// `/etc/vm-disks` (written for each guest) must exist.
fn init_script(modules: &[String]) -> String {
    let mut s = String::from(
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null\n\
         mkdir -p /dev/shm\n\
         for d in /tmp /dev/shm; do\n\
         \x20   mount -t tmpfs tmpfs $d || echo \"@@ERROR mount tmpfs on $d failed\"\n\
         done\n\
         # Only emergencies on the console, so that kernel messages do not split result lines.\n\
         grep -q quiet /proc/cmdline && echo 1 > /proc/sys/kernel/printk\n\
         echo @@BOOT\n",
    );
    for m in modules {
        let file = format!("/lib/modules/{}.ko", module_name(m));
        s.push_str(&format!(
            "insmod {file} || echo \"@@ERROR insmod {file} failed\"\n"
        ));
    }
    s.push_str(
        "# virtio_pci and virtio_blk probe synchronously (built in: before /init runs) and\n\
         # devtmpfs makes the nodes before insmod returns: the disks are there now or never.\n\
         for d in $(cat /etc/vm-disks); do\n\
         \x20   [ -b $d ] || echo \"@@ERROR no $d after loading virtio_blk\"\n\
         done\n\
         report() { echo \"@@R $*\"; }\n\
         ( . /test.sh )\n\
         echo \"@@END $?\"\n\
         sync\n\
         poweroff -f\n",
    );
    s
}

/// The part of the initramfs every guest of a kernel kind shares: one newc archive, and the
/// directories and files in it.
struct Base {
    archive: Vec<u8>,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

/// The shared part of the initramfs for Debian's packaged kernel, built once per process.
pub fn base_initramfs() -> Result<&'static [u8], String> {
    base(&GuestKernel::Packaged).map(|b| b.archive.as_slice())
}

/// The shared part of the initramfs for `kernel`'s kind (with its modules, or with none),
/// built once per process.
fn base(kernel: &GuestKernel) -> Result<&'static Base, String> {
    static PACKAGED: OnceLock<Result<Base, String>> = OnceLock::new();
    static BUILT_IN: OnceLock<Result<Base, String>> = OnceLock::new();
    let (cell, packaged) = match kernel {
        GuestKernel::Packaged => (&PACKAGED, true),
        GuestKernel::Image(_) => (&BUILT_IN, false),
    };
    cell.get_or_init(|| {
        let t0 = Instant::now();
        let modules = if packaged {
            Some(find_kernel().ok_or("no guest kernel in /boot")?)
        } else {
            None
        };
        let base = build_base(modules.as_ref())?;
        eprintln!(
            "guest: initramfs of {} MiB built in {:.1} s",
            base.archive.len() >> 20,
            t0.elapsed().as_secs_f64()
        );
        Ok(base)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The shared archive, with the virtio modules of `kernel` (None: a kernel with them built in).
fn build_base(kernel: Option<&Kernel>) -> Result<Base, String> {
    let mut cpio = Cpio::new();
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/etc",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("/dev/console", 5, 1);
    cpio.char_dev("/dev/null", 1, 3);

    for tool in GUEST_PROGRAMS {
        let bin = which(tool)?;
        let real = std::fs::canonicalize(&bin).map_err(|e| format!("{}: {e}", bin.display()))?;
        cpio.program(&real, &bin.to_string_lossy(), &read(&real)?)?;
    }

    // busybox and one link per applet, except where a host program already is.
    let busybox = std::fs::canonicalize(which("busybox")?).map_err(|e| e.to_string())?;
    cpio.program(&busybox, "/bin/busybox", &read(&busybox)?)?;
    let list = Command::new(&busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| format!("busybox --list-full: {e}"))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || cpio.names.contains(applet) {
            continue;
        }
        cpio.symlink(applet, "/bin/busybox");
    }

    let mut order = Vec::new();
    if let Some(kernel) = kernel {
        order = module_load_order(kernel, &["virtio_pci", "virtio_blk"])?;
        for m in &order {
            let bytes = module_bytes(&kernel.modules.join(m))?;
            cpio.file(
                &format!("/lib/modules/{}.ko", module_name(m)),
                0o644,
                &bytes,
            );
        }
    }
    cpio.file("/init", 0o755, init_script(&order).as_bytes());
    Ok(Base {
        dirs: cpio.dirs.clone(),
        names: cpio.names.clone(),
        archive: cpio.finish(),
    })
}

/// `program` without its debug info (a debug build of blockexportd is 140 MB, 30 MB
/// without), through a file in `dir`.
fn without_debug_info(program: &Path, dir: &Path) -> Result<Vec<u8>, String> {
    let out = dir.join("stripped");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(program)
        .arg(&out)
        .status()
        .map_err(|e| format!("objcopy: {e} (install binutils)"))?;
    if !status.success() {
        return Err(format!(
            "objcopy --strip-debug {} failed ({status})",
            program.display()
        ));
    }
    let data = read(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(data)
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The kernel the guest boots.
    pub kernel: GuestKernel,
    /// The vhost-user-blk socket the daemon listens on: the guest's `/dev/vda`. None: no
    /// vhost-user-blk device.
    pub socket: Option<PathBuf>,
    /// `num-queues` of the vhost-user-blk-pci device.
    pub num_queues: u32,
    /// vCPUs (Linux's virtio_blk uses at most one queue per possible CPU).
    pub cpus: u32,
    /// Guest memory in MiB (the initramfs, with its programs, lives in it).
    pub memory_mib: u32,
    /// `reconnect-ms` of the vhost-user chardev.
    pub reconnect_ms: Option<u32>,
    /// Whether a guest reboot restarts the machine (no `-no-reboot`).
    pub allow_reboot: bool,
    /// The script the guest sources as `/test.sh`.
    pub script: String,
    /// Further files in the guest (absolute paths), e.g. data for the script.
    pub files: Vec<(String, Vec<u8>)>,
    /// Host image files (raw), each a virtio-blk disk of the guest, after the vhost-user-blk
    /// disk: `/dev/vdb`, `/dev/vdc`, ... with one, `/dev/vda`, ... without (see
    /// [`VmConfig::disk_name`]). QEMU writes them through the host's page cache, so that the
    /// host reads what the guest wrote once the guest has powered off.
    pub disks: Vec<PathBuf>,
    /// Host programs copied into the guest, (host path, guest path), each with the libraries
    /// `ldd` names and without its debug info.
    pub programs: Vec<(PathBuf, String)>,
}

impl VmConfig {
    /// A guest of Debian's packaged kernel on the vhost-user-blk socket `socket`.
    pub fn new(socket: &Path, script: &str) -> VmConfig {
        VmConfig {
            socket: Some(socket.to_path_buf()),
            ..VmConfig::bare(GuestKernel::Packaged, script)
        }
    }

    /// A guest of `kernel` with no disk (add them with [`VmConfig::disk`]).
    pub fn bare(kernel: GuestKernel, script: &str) -> VmConfig {
        VmConfig {
            kernel,
            socket: None,
            num_queues: 1,
            cpus: 1,
            memory_mib: 512,
            reconnect_ms: None,
            allow_reboot: false,
            script: script.to_string(),
            files: Vec::new(),
            disks: Vec::new(),
            programs: Vec::new(),
        }
    }

    pub fn file(mut self, path: &str, data: &[u8]) -> VmConfig {
        self.files.push((path.to_string(), data.to_vec()));
        self
    }

    /// Adds a virtio-blk disk over the raw host image `image`; its guest device is
    /// [`VmConfig::disk_name`] of its index.
    pub fn disk(mut self, image: &Path) -> VmConfig {
        self.disks.push(image.to_path_buf());
        self
    }

    /// The guest's block device for `disks[index]`, e.g. `/dev/vdb` (PCI slots follow the
    /// command line, and virtio_blk names disks in the order it probes them).
    pub fn disk_name(&self, index: usize) -> String {
        let n = index + usize::from(self.socket.is_some());
        assert!(n < 26, "more disks than /dev/vda to /dev/vdz");
        format!("/dev/vd{}", char::from(b'a' + n as u8))
    }

    /// Copies the host binary `host` into the guest as `guest`, with its libraries.
    pub fn program(mut self, host: &Path, guest: &str) -> VmConfig {
        self.programs.push((host.to_path_buf(), guest.to_string()));
        self
    }

    /// Copies the host program `name`, found on PATH, to the same path in the guest, with its
    /// libraries. Panics if it is not installed (check with [`crate::require_tool`]).
    pub fn host_program(self, name: &str) -> VmConfig {
        let path = which(name).unwrap_or_else(|e| panic!("a program for the guest: {e}"));
        let guest = path.to_string_lossy().into_owned();
        self.program(&path, &guest)
    }

    /// The block devices the guest must have when its script starts.
    fn disk_names(&self) -> Vec<String> {
        let vhost_user = self.socket.iter().map(|_| "/dev/vda".to_string());
        vhost_user
            .chain((0..self.disks.len()).map(|i| self.disk_name(i)))
            .collect()
    }
}

/// The guest's own archive, unpacked after `base`: `/test.sh`, `/etc/vm-disks`, the files and
/// the programs of `cfg`.
fn guest_archive(cfg: &VmConfig, base: &Base, dir: &Path) -> Result<Vec<u8>, String> {
    let mut own = Cpio::continuing(base);
    own.file("/test.sh", 0o755, cfg.script.as_bytes());
    own.file(
        "/etc/vm-disks",
        0o644,
        cfg.disk_names().join("\n").as_bytes(),
    );
    for (path, data) in &cfg.files {
        own.file(path, 0o644, data);
    }
    for (host, guest) in &cfg.programs {
        let real = std::fs::canonicalize(host).map_err(|e| format!("{}: {e}", host.display()))?;
        own.program(&real, guest, &without_debug_info(&real, dir)?)?;
    }
    Ok(own.finish())
}

/// QEMU's options for the guest's disks: the vhost-user-blk device first, then the image
/// files, in the order [`VmConfig::disk_name`] counts them.
fn disk_args(cfg: &VmConfig) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(socket) = &cfg.socket {
        let mut vub = format!("socket,id=vub,path={}", socket.display());
        if let Some(ms) = cfg.reconnect_ms {
            vub.push_str(&format!(",reconnect-ms={ms}"));
        }
        args.extend([
            "-chardev".to_string(),
            vub,
            "-device".to_string(),
            format!(
                "vhost-user-blk-pci,chardev=vub,num-queues={}",
                cfg.num_queues
            ),
        ]);
    }
    for (i, image) in cfg.disks.iter().enumerate() {
        // QEMU's option syntax doubles a comma inside a value.
        let path = image.to_string_lossy().replace(',', ",,");
        args.extend([
            "-blockdev".to_string(),
            format!("driver=file,node-name=disk{i},filename={path}"),
            "-device".to_string(),
            format!("virtio-blk-pci,drive=disk{i},serial=disk{i}"),
        ]);
    }
    args
}

/// A line from the console, or its end.
enum Console {
    Line(String),
    Closed,
}

/// A running guest. Dropping it kills QEMU.
pub struct Vm {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    console: Receiver<Console>,
    closed: bool,
    /// Every console line so far (for failure messages).
    pub log: Vec<String>,
    /// `@@R` results read but not asked for yet, in order.
    pending: VecDeque<(String, String)>,
    stderr: Arc<Mutex<String>>,
    qmp: Option<Qmp>,
    /// Number of `@@BOOT` lines seen.
    pub boots: u32,
    pub started: Instant,
    pub dir: tempfile::TempDir,
}

impl Vm {
    /// Builds the initramfs and starts QEMU. Panics (with the reason) if anything the guest
    /// needs is missing; call [`require_guest`] first.
    pub fn boot(cfg: &VmConfig) -> Vm {
        let image = boot_image(&cfg.kernel).unwrap_or_else(|e| panic!("the guest kernel: {e}"));
        let base = base(&cfg.kernel).unwrap_or_else(|e| panic!("building the initramfs: {e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = dir.path().join("initrd.cpio");
        {
            let own = guest_archive(cfg, base, dir.path())
                .unwrap_or_else(|e| panic!("building the guest's own initramfs: {e}"));
            let mut f = std::fs::File::create(&initrd).expect("create initrd");
            f.write_all(&base.archive).expect("write initrd");
            f.write_all(&own).expect("write initrd");
        }

        let kernel = match image {
            BootImage::Elf(elf) => {
                let path = dir.path().join("vmlinux");
                std::fs::write(&path, elf).expect("write vmlinux");
                path
            }
            BootImage::BzImage(path) => path.clone(),
        };

        let qmp_path = dir.path().join("qemu-qmp.sock");
        let listener = UnixListener::bind(&qmp_path).expect("bind QMP listener");

        let cmdline = if verbose() {
            "console=ttyS0 panic=-1 printk.time=1"
        } else {
            "console=ttyS0 quiet panic=-1"
        };
        let mut cmd = Command::new("qemu-system-x86_64");
        let memory = cfg.memory_mib.to_string();
        cmd.args(["-accel", "tcg", "-m", &memory, "-nographic", "-nodefaults"])
            .args(["-serial", "stdio"])
            .args(["-smp", &cfg.cpus.to_string()])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", cmdline])
            .args(disk_args(cfg))
            .args([
                "-chardev",
                &format!("socket,id=qmp,path={}", qmp_path.display()),
                "-mon",
                "chardev=qmp,mode=control",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !cfg.allow_reboot {
            cmd.arg("-no-reboot");
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("start qemu-system-x86_64");

        let (tx, console) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Console::Closed);
                        return;
                    }
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send(Console::Line(line)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });

        let mut vm = Vm {
            stdin: child.stdin.take(),
            child: Some(child),
            console,
            closed: false,
            log: Vec::new(),
            pending: VecDeque::new(),
            stderr,
            qmp: None,
            boots: 0,
            started,
            dir,
        };
        // QEMU connects its monitor while it starts, before the guest runs; it may instead
        // exit (a bad option, the vhost-user socket refused), which the wait notices.
        let stream = vm.accept(&listener, Duration::from_secs(60));
        let mut qmp = Qmp::from_stream(stream);
        let r = qmp.execute("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}), "QEMU qmp_capabilities");
        vm.qmp = Some(qmp);
        vm
    }

    fn accept(
        &mut self,
        listener: &UnixListener,
        timeout: Duration,
    ) -> std::os::unix::net::UnixStream {
        let deadline = Instant::now() + timeout;
        loop {
            let mut fds = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Wake every 100 ms to notice QEMU exiting before it connected.
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut fds, 1, 100) };
            if n > 0 {
                let (s, _) = listener.accept().expect("accept QEMU's QMP connection");
                return s;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.drain_console(Duration::from_secs(5));
                self.fail(&format!(
                    "QEMU exited before connecting its monitor ({status})"
                ));
            }
            if Instant::now() >= deadline {
                self.fail("QEMU never connected its QMP monitor");
            }
        }
    }

    /// QEMU's QMP monitor, capabilities negotiated.
    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().expect("QMP")
    }

    /// What QEMU wrote to its stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Panics with `msg`, the console's last lines and QEMU's stderr.
    pub fn fail(&self, msg: &str) -> ! {
        let tail: Vec<&str> = self
            .log
            .iter()
            .rev()
            .take(80)
            .rev()
            .map(String::as_str)
            .collect();
        panic!(
            "{msg} (after {:.1} s)\n--- guest console (last lines) ---\n{}\n--- QEMU stderr ---\n{}",
            self.started.elapsed().as_secs_f64(),
            tail.join("\n"),
            self.stderr.lock().unwrap_or_else(|e| e.into_inner())
        );
    }

    fn drain_console(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.closed {
            if self.next_line(deadline).is_none() {
                break;
            }
        }
    }

    /// The next console line before `deadline`; None at the deadline or the console's end.
    fn next_line(&mut self, deadline: Instant) -> Option<String> {
        if self.closed {
            return None;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.console.recv_timeout(wait) {
            Ok(Console::Line(l)) => {
                if l.contains("@@BOOT") {
                    self.boots += 1;
                    eprintln!(
                        "guest: boot {} reached /init {:.1} s after QEMU started",
                        self.boots,
                        self.started.elapsed().as_secs_f64()
                    );
                }
                if verbose() {
                    eprintln!("[{:7.3}] {l}", self.started.elapsed().as_secs_f64());
                }
                self.log.push(l.clone());
                Some(l)
            }
            Ok(Console::Closed) | Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                None
            }
            Err(RecvTimeoutError::Timeout) => None,
        }
    }

    /// Waits for a console line that `pred` accepts (any line, markers or not).
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline) {
                Some(l) => {
                    self.note_markers(&l);
                    if pred(&l) {
                        return l;
                    }
                }
                None if self.closed => {
                    self.fail(&format!("the console ended while waiting for {what}"))
                }
                None => self.fail(&format!("timed out waiting for {what}")),
            }
        }
    }

    /// Keeps `@@R` results, fails on `@@ERROR`.
    fn note_markers(&mut self, line: &str) {
        let Some(at) = line.find("@@") else { return };
        let marker = &line[at..];
        if let Some(rest) = marker.strip_prefix("@@R ") {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            self.pending
                .push_back((k.to_string(), v.trim().to_string()));
        } else if marker.starts_with("@@ERROR") {
            self.fail(&format!("the guest reported {marker}"));
        }
    }

    /// The value of the next `report KEY ...` of the guest.
    pub fn result(&mut self, key: &str) -> String {
        self.result_within(key, DEFAULT_TIMEOUT)
    }

    pub fn result_within(&mut self, key: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.pending.iter().position(|(k, _)| k == key) {
                let v = self.pending.remove(pos).expect("pending").1;
                eprintln!(
                    "guest: {key} = {v:?} at {:.1} s",
                    self.started.elapsed().as_secs_f64()
                );
                return v;
            }
            match self.next_line(deadline) {
                Some(l) => {
                    if let Some(rc) = l.find("@@END ").map(|at| l[at + 6..].trim().to_string()) {
                        self.fail(&format!(
                            "the script ended (status {rc}) before reporting {key}"
                        ));
                    }
                    self.note_markers(&l);
                }
                None if self.closed => self.fail(&format!(
                    "the console ended before the guest reported {key}"
                )),
                None => self.fail(&format!("timed out waiting for the guest to report {key}")),
            }
        }
    }

    /// Waits for the script's end and returns its exit status.
    pub fn script_status(&mut self) -> i32 {
        let l = self.wait_line("the script's end", DEFAULT_TIMEOUT, |l| {
            l.contains("@@END ")
        });
        let rc = l[l.find("@@END ").expect("marker") + 6..].trim();
        rc.parse()
            .unwrap_or_else(|_| self.fail(&format!("bad end marker {l:?}")))
    }

    /// Waits for the script to end with status 0, and for QEMU to exit after the guest's
    /// power-off. Returns the time from QEMU's start.
    pub fn finish(&mut self) -> Duration {
        let rc = self.script_status();
        if rc != 0 {
            self.fail(&format!("the guest script failed with status {rc}"));
        }
        let status = self.wait_exit(DEFAULT_TIMEOUT);
        if !status.success() {
            self.fail(&format!(
                "QEMU exited with {status} after the guest powered off"
            ));
        }
        self.started.elapsed()
    }

    /// Waits for QEMU to exit (its console closes first).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while !self.closed {
            if let Some(l) = self.next_line(deadline) {
                self.note_markers(&l);
            } else if !self.closed {
                self.fail("timed out waiting for QEMU to exit");
            }
        }
        // The console closed: QEMU is exiting, or has.
        self.child
            .take()
            .expect("running")
            .wait()
            .expect("wait for QEMU")
    }

    /// Writes a line to the guest's console (the script reads it from stdin).
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to the guest console");
    }

    /// SIGKILLs QEMU and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        crate::signal(child.id(), libc::SIGKILL);
        let status = child.wait().expect("wait for QEMU");
        self.drain_console(Duration::from_secs(5));
        status
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Guest shell lines that start blockexportd with `options` (its `--blockdev` and the like)
/// and a QMP monitor on a pipe chardev (busybox has no unix-socket client), then define
/// `qmp JSON`, which prints the reply (events skipped), and negotiate capabilities.
pub fn qmp_over_pipe(options: &str) -> String {
    format!(
        r#"
mkfifo /tmp/qmp.in /tmp/qmp.out
blockexportd {options} \
  --chardev pipe,id=m,path=/tmp/qmp --monitor chardev=m 2>/tmp/daemon.err &
# Read-write opens of a FIFO never block (nor get EINTR from a child's exit).
exec 3<>/tmp/qmp.in 4<>/tmp/qmp.out
read -r greeting <&4
qmp() {{
  echo "$1" >&3
  while read -r l <&4; do
    case "$l" in *'"return"'*|*'"error"'*) echo "$l"; return;; esac
  done
}}
qmp '{{"execute":"qmp_capabilities"}}' >/dev/null
"#
    )
}
