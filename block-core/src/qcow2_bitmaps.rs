//! Persistent dirty bitmaps stored in a qcow2 image (the qcow2 "bitmaps extension").
//!
//! `imago`, the qcow2 library behind the `qcow2` driver, knows the bitmaps autoclear bit (and
//! clears it when it opens an image writable) but neither reads nor writes bitmaps: this
//! module does, directly on the image file, with
//! QEMU's on-disk format and behaviour (`docs/interop/qcow2.rst`, "Bitmaps extension",
//! "Bitmap directory", "Bitmap table"; `block/qcow2-bitmap.c`).
//!
//! # Contract with the qcow2 driver
//!
//! The functions here read and write the image file themselves: the header, the header
//! extensions, the refcount structures, and the bitmap clusters. They must only be called
//! while nothing else writes the image, and the daemon must hold the image alone (no other
//! process may open it writable meanwhile). The order for a writable qcow2 node:
//!
//! 1. before imago opens the image: [`load`] the bitmaps into memory ([`crate::bitmap`]),
//!    then [`mark_in_use`], which returns the [`BitmapsLayout`] it marked;
//! 2. imago opens the image writable. imago 0.2.6 clears *every* autoclear bit then,
//!    which makes the bitmaps extension stale (QEMU would ignore it);
//! 3. right after that open, before any I/O, [`restore_autoclear_bit`] with the layout sets
//!    the bit again, so that a crash leaves the bitmaps visible as `in_use` (inconsistent),
//!    as QEMU leaves them (optional: without it, a crash loses them and leaks their clusters);
//! 4. at clean close, once imago has flushed and been dropped, [`store_replacing`] with the
//!    layout writes the in-memory bitmaps and frees the old ones (it may free a stale
//!    extension's clusters only because the layout proves they are the ones marked in 1.).
//!
//! A read-only node only needs [`load`]: the image is not written at all.
//!
//! Every function does blocking I/O through [`ImageFile`] (implemented for [`File`]): call
//! them from a blocking context (e.g. `tokio::task::spawn_blocking`). Conversions from and to
//! the node's bitmaps: [`StoredBitmap::from_dirty_bitmap`], [`StoredBitmap::to_dirty_bitmap`].
//!
//! # Crash safety
//!
//! [`store_replacing`] writes the new bitmap clusters into free space, raises their refcounts (new
//! refcount blocks are written before the refcount table points at them), syncs, switches the
//! header to the new bitmap directory, syncs, and only then drops the refcounts of the old
//! bitmap clusters. A crash at any point leaves an image that `qemu-img check` accepts: at
//! worst some clusters are leaked. [`mark_in_use`] follows QEMU: it clears the autoclear bit,
//! rewrites the directory in place, and sets the bit again, syncing after each step.
//!
//! # Limits (as QEMU)
//!
//! Names are 1..=1023 bytes of UTF-8, at most 65535 bitmaps and a directory of at most
//! 64 MiB - 1 KiB, granularities are powers of two from 512 B to 2 GiB, and one bitmap may
//! occupy at most 512 MiB in the image. Refcount widths of 1 to 64 bits are supported. The
//! refcount table is never grown: when a new refcount block would not fit in it, [`store`]
//! fails with [`BitmapError::RefcountTableFull`] before writing anything that is referenced.

#![forbid(unsafe_code)]

use crate::bitmap::DirtyBitmap;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The most bitmaps one image may hold (QEMU's `QCOW2_MAX_BITMAPS`).
pub const MAX_BITMAPS: usize = 65535;
/// The longest bitmap name, in bytes (QEMU's `BME_MAX_NAME_SIZE`).
pub const MAX_NAME_LEN: usize = 1023;
/// The largest bitmap directory, in bytes (QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// The smallest granularity, in bytes.
pub const MIN_GRANULARITY: u32 = 1 << MIN_GRANULARITY_BITS;
/// The largest granularity, in bytes.
#[allow(dead_code)] // named in the docs and the tests
pub const MAX_GRANULARITY: u32 = 1 << MAX_GRANULARITY_BITS;

const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
/// QEMU's `BME_MAX_TABLE_SIZE`: entries of one bitmap table.
const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// QEMU's `BME_MAX_PHYS_SIZE`: bytes of bitmap data of one bitmap.
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// QEMU's limit on the refcount table (8 MiB).
const MAX_REFTABLE_SIZE: u64 = 8 << 20;

const QCOW_MAGIC: u32 = 0x5146_49fb;
const EXT_END: u32 = 0;
const EXT_BITMAPS: u32 = 0x2385_2875;
const BITMAPS_EXT_LEN: usize = 24;
const V3_HEADER_MIN: usize = 104;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Dirty, corrupt, external data file, compression type, extended L2.
const INCOMPAT_KNOWN: u64 = 0x1f;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Bitmaps and raw external data: the autoclear bits this implementation knows. The others
/// must be cleared by whoever writes the image.
const AUTOCLEAR_KNOWN: u64 = 0b11;

/// Byte offset of `autoclear_features` in the header.
const AUTOCLEAR_OFFSET: u64 = 88;

const DIR_ENTRY_HEADER: usize = 24;
const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ENTRY_ALL_ONES: u64 = 1;
const REFTABLE_OFFSET: u64 = !0x1ff;

/// Why reading or writing the bitmaps of an image failed.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// Reading, writing or syncing the image file failed.
    #[error("I/O error while {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with a qcow2 header.
    #[error("not a qcow2 image")]
    NotQcow2,
    /// The image's metadata is malformed.
    #[error("invalid qcow2 image: {0}")]
    InvalidImage(String),
    /// The image uses a feature this module cannot write around.
    #[error("unsupported qcow2 image: {0}")]
    Unsupported(String),
    /// Bitmaps can only be stored in qcow2 version 3 images.
    #[error("Cannot store dirty bitmaps in qcow2 v2 files")]
    Version2,
    /// The image is marked corrupt, or dirty (its refcounts cannot be trusted).
    #[error("the image is marked {0}: repair it with 'qemu-img check -r all' first")]
    NotClean(&'static str),
    /// A stored bitmap's directory entry or table breaks the format's constraints.
    #[error("Bitmap '{name}' doesn't satisfy the constraints: {reason}")]
    InvalidStoredBitmap {
        /// The bitmap's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bitmap to store breaks QEMU's constraints (wording as QEMU's).
    #[error("Bitmap '{name}' doesn't satisfy the constraints: {reason}")]
    Constraint {
        /// The bitmap's name.
        name: String,
        /// QEMU's description of the violated constraint.
        reason: String,
    },
    /// Two bitmaps have the same name.
    #[error("Bitmap '{0}' already exists in the image")]
    DuplicateName(String),
    /// More than [`MAX_BITMAPS`] bitmaps.
    #[error("Too many persistent bitmaps")]
    TooManyBitmaps,
    /// The directory would exceed [`MAX_DIRECTORY_SIZE`].
    #[error("Bitmap directory is too large")]
    DirectoryTooLarge,
    /// A refcount block is needed whose entry lies beyond the refcount table; growing the
    /// table is not implemented.
    #[error("the refcount table is full: cannot allocate clusters beyond offset {0}")]
    RefcountTableFull(u64),
    /// The header, its extensions and the backing file name do not fit in the first cluster.
    #[error(
        "the header extensions do not fit in the first cluster ({needed} > {cluster_size} bytes)"
    )]
    HeaderFull {
        /// Bytes needed.
        needed: usize,
        /// The cluster size.
        cluster_size: u64,
    },
}

type Result<T, E = BitmapError> = std::result::Result<T, E>;

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> BitmapError {
    move |source| BitmapError::Io { context, source }
}

fn invalid(msg: impl Into<String>) -> BitmapError {
    BitmapError::InvalidImage(msg.into())
}

/// The flags of a bitmap directory entry (an open set: unknown bits are kept as read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BitmapFlags(pub u32);

impl BitmapFlags {
    /// `in_use`: the bitmap was not saved correctly and may be inconsistent.
    pub const IN_USE: BitmapFlags = BitmapFlags(1 << 0);
    /// `auto`: the bitmap tracks every write (it is enabled).
    pub const AUTO: BitmapFlags = BitmapFlags(1 << 1);
    /// `extra_data_compatible`: unknown extra data may be ignored. QEMU supports no extra
    /// data and refuses this flag, and so do we.
    #[allow(dead_code)] // the spec's third flag, for completeness beside the other two
    pub const EXTRA_DATA_COMPATIBLE: BitmapFlags = BitmapFlags(1 << 2);
    /// The flags QEMU accepts (`in_use` and `auto`); any other bit makes the image unusable
    /// (QEMU's `BME_RESERVED_FLAGS`).
    pub const SUPPORTED: BitmapFlags = BitmapFlags(0b11);

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: BitmapFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One persistent dirty bitmap, as stored in (or to be stored into) an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    /// The bitmap's name, unique in the image.
    pub name: String,
    /// Bytes of the disk per bit: a power of two from [`MIN_GRANULARITY`] to
    /// [`MAX_GRANULARITY`].
    pub granularity: u32,
    /// The `auto` flag: the bitmap records writes (QEMU's "enabled").
    pub enabled: bool,
    /// The `in_use` flag: found set at [`load`] (the image was not closed cleanly) its content
    /// cannot be trusted and `bits` are all clear. [`store`] writes such a bitmap with
    /// `in_use` set and no data, as QEMU keeps inconsistent bitmaps.
    pub inconsistent: bool,
    /// The virtual disk size the bitmap covers, in bytes (the image's size).
    pub size: u64,
    /// One bit per `granularity` chunk of the disk, LSB first: chunk `c` is bit `c % 64` of
    /// word `c / 64`. Exactly [`StoredBitmap::words`]`(size, granularity)` words; bits past
    /// the last chunk are ignored when storing and clear when loaded.
    pub bits: Vec<u64>,
}

impl StoredBitmap {
    /// An empty (all clean), consistent bitmap.
    pub fn new(name: impl Into<String>, size: u64, granularity: u32, enabled: bool) -> Self {
        StoredBitmap {
            name: name.into(),
            granularity,
            enabled,
            inconsistent: false,
            size,
            bits: vec![0; Self::words(size, granularity)],
        }
    }

    /// Number of chunks of a disk of `size` bytes at `granularity`.
    pub fn chunks_for(size: u64, granularity: u32) -> u64 {
        size.div_ceil(u64::from(granularity.max(1)))
    }

    /// Number of `u64` words needed for a disk of `size` bytes at `granularity`.
    pub fn words(size: u64, granularity: u32) -> usize {
        usize::try_from(Self::chunks_for(size, granularity).div_ceil(64)).unwrap_or(usize::MAX)
    }

    /// Number of chunks (bits that count) of this bitmap.
    pub fn chunks(&self) -> u64 {
        Self::chunks_for(self.size, self.granularity)
    }

    /// Whether chunk `chunk` is dirty (false beyond the end).
    pub fn is_dirty(&self, chunk: u64) -> bool {
        chunk < self.chunks()
            && usize::try_from(chunk / 64)
                .ok()
                .and_then(|i| self.bits.get(i))
                .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Marks chunk `chunk` dirty (ignored beyond the end).
    pub fn set_dirty(&mut self, chunk: u64) {
        if chunk >= self.chunks() {
            return;
        }
        if let Some(w) = usize::try_from(chunk / 64)
            .ok()
            .and_then(|i| self.bits.get_mut(i))
        {
            *w |= 1 << (chunk % 64);
        }
    }

    /// The directory flags this bitmap is stored with.
    pub fn flags(&self) -> BitmapFlags {
        let mut flags = 0;
        if self.inconsistent {
            flags |= BitmapFlags::IN_USE.0;
        }
        if self.enabled {
            flags |= BitmapFlags::AUTO.0;
        }
        BitmapFlags(flags)
    }

    /// The stored form of `bitmap`, a dirty bitmap of a node of `size` bytes (to [`store`] at
    /// close): its name, granularity, enabled and inconsistent flags, and bits.
    pub fn from_dirty_bitmap(bitmap: &DirtyBitmap, size: u64) -> StoredBitmap {
        let mut out =
            StoredBitmap::new(bitmap.name(), size, bitmap.granularity(), bitmap.enabled());
        out.inconsistent = bitmap.inconsistent();
        if out.inconsistent {
            return out;
        }
        let g = u64::from(bitmap.granularity());
        let mut offset = 0;
        while offset < size {
            let (len, dirty) = bitmap.extent(offset, size - offset);
            if len == 0 {
                break;
            }
            if dirty {
                (offset / g..(offset + len).div_ceil(g)).for_each(|c| out.set_dirty(c));
            }
            offset += len;
        }
        out
    }

    /// The in-memory, persistent dirty bitmap for this stored one (at open, after [`load`]).
    pub fn to_dirty_bitmap(&self) -> DirtyBitmap {
        let bitmap = DirtyBitmap::new(self.name.clone(), self.size, self.granularity, true);
        let g = u64::from(self.granularity);
        let mut run: Option<u64> = None;
        for c in 0..=self.chunks() {
            match (self.is_dirty(c), run) {
                (true, None) => run = Some(c),
                (false, Some(first)) => {
                    bitmap.set_range(first * g, (c - first) * g);
                    run = None;
                }
                _ => {}
            }
        }
        bitmap.set_enabled(self.enabled);
        bitmap.set_inconsistent(self.inconsistent);
        bitmap
    }

    /// Word `i` with the bits past the last chunk cleared.
    fn masked_word(&self, i: usize) -> u64 {
        let w = self.bits.get(i).copied().unwrap_or(0);
        let chunks = self.chunks();
        let first = i as u64 * 64;
        if first + 64 <= chunks {
            w
        } else if first >= chunks {
            0
        } else {
            w & ((1u64 << (chunks - first)) - 1)
        }
    }
}

/// Checks QEMU's constraints on a persistent bitmap of an image with the given virtual
/// `disk_size` and `cluster_size` (QEMU's `check_constraints_on_bitmap`), with QEMU's
/// messages. The QMP layer can call it at `block-dirty-bitmap-add persistent=true`.
pub fn check_constraints(
    name: &str,
    granularity: u32,
    disk_size: u64,
    cluster_size: u64,
) -> Result<()> {
    let fail = |reason: String| BitmapError::Constraint {
        name: name.to_owned(),
        reason,
    };
    if !granularity.is_power_of_two() {
        return Err(fail("Granularity must be a power of two".into()));
    }
    if granularity < MIN_GRANULARITY {
        return Err(fail(format!(
            "Granularity is under minimum ({MIN_GRANULARITY} bytes)"
        )));
    }
    // u32 cannot exceed 2^31 as a power of two: MAX_GRANULARITY is the largest.
    let bytes = bitmap_bytes(disk_size, granularity);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE.saturating_mul(cluster_size) {
        return Err(fail(
            "Too much space will be occupied by the bitmap. Use larger granularity".into(),
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(fail(format!(
            "Name length exceeds maximum ({MAX_NAME_LEN} characters)"
        )));
    }
    if name.is_empty() {
        return Err(fail("Name must not be empty".into()));
    }
    Ok(())
}

/// Bytes of serialized bitmap data for a disk of `size` at `granularity`.
fn bitmap_bytes(size: u64, granularity: u32) -> u64 {
    StoredBitmap::chunks_for(size, granularity).div_ceil(8)
}

/// Entries of the bitmap table of a disk of `size` at `granularity`.
fn table_size_for(size: u64, granularity: u32, cluster_size: u64) -> u64 {
    bitmap_bytes(size, granularity).div_ceil(cluster_size)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn read_at(
    file: &dyn ImageFile,
    offset: u64,
    len: usize,
    context: &'static str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.image_read(&mut buf, offset).map_err(io_err(context))?;
    Ok(buf)
}

fn write_at(file: &dyn ImageFile, offset: u64, buf: &[u8], context: &'static str) -> Result<()> {
    file.image_write(buf, offset).map_err(io_err(context))
}

fn sync(file: &dyn ImageFile) -> Result<()> {
    file.image_sync().map_err(io_err("syncing the image"))
}

/// Positional access to the image file: a [`File`], or anything else that reaches the same
/// bytes (e.g. a wrapper over the file node). Offsets and lengths are arbitrary (not aligned
/// for `O_DIRECT`).
pub trait ImageFile {
    /// Reads exactly `buf.len()` bytes at `offset` (an error at the end of the file).
    fn image_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn image_write(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`).
    fn image_sync(&self) -> io::Result<()>;
}

impl ImageFile for File {
    fn image_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn image_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn image_sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BitmapsExt {
    nb_bitmaps: u32,
    directory_size: u64,
    directory_offset: u64,
}

impl BitmapsExt {
    fn encode(&self) -> [u8; BITMAPS_EXT_LEN] {
        let mut b = [0u8; BITMAPS_EXT_LEN];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        // 4..8: reserved, zero.
        b[8..16].copy_from_slice(&self.directory_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.directory_offset.to_be_bytes());
        b
    }
}

/// A header extension other than the bitmaps one, kept byte for byte.
#[derive(Debug, Clone)]
struct RawExt {
    magic: u32,
    data: Vec<u8>,
}

/// What the header says about the bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BitmapsState {
    /// No extension.
    Absent,
    /// An extension without the autoclear bit: written by a program unaware of bitmaps, it
    /// must be ignored (and is dropped on the next store). Its clusters may be reused already,
    /// unless it is the one [`mark_in_use`] saw (see [`BitmapsLayout`]). The fields are as
    /// read, unchecked.
    Stale(BitmapsExt),
    /// A valid extension.
    Valid(BitmapsExt),
}

/// The parts of the qcow2 header this module needs, and the first cluster's layout.
#[derive(Debug, Clone)]
struct Header {
    version: u32,
    cluster_size: u64,
    size: u64,
    backing_file_offset: u64,
    backing_file_size: u32,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    incompatible: u64,
    autoclear: u64,
    refcount_order: u32,
    /// The header fields, `header_length` bytes.
    raw: Vec<u8>,
    /// Other extensions in file order; `bitmaps_slot` is where the bitmaps one was.
    extensions: Vec<RawExt>,
    bitmaps_slot: Option<usize>,
    bitmaps: BitmapsState,
    /// The backing file name, when stored in the first cluster.
    backing_name: Option<Vec<u8>>,
}

impl Header {
    fn read(file: &dyn ImageFile) -> Result<Header> {
        let fixed = read_at(file, 0, 72, "reading the qcow2 header").map_err(|e| match e {
            BitmapError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof => {
                BitmapError::NotQcow2
            }
            e => e,
        })?;
        if be32(&fixed, 0) != QCOW_MAGIC {
            return Err(BitmapError::NotQcow2);
        }
        let version = be32(&fixed, 4);
        let cluster_bits = be32(&fixed, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} out of 9..=21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_size,
            size: be64(&fixed, 24),
            backing_file_offset: be64(&fixed, 8),
            backing_file_size: be32(&fixed, 16),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            raw: fixed,
            extensions: Vec::new(),
            bitmaps_slot: None,
            bitmaps: BitmapsState::Absent,
            backing_name: None,
        };
        match version {
            2 => return Ok(h),
            3 => {}
            v => return Err(BitmapError::Unsupported(format!("qcow2 version {v}"))),
        }
        let first = read_at(file, 0, cluster_size as usize, "reading the first cluster")?;
        h.incompatible = be64(&first, 72);
        h.autoclear = be64(&first, 88);
        h.refcount_order = be32(&first, 96);
        let header_length = be32(&first, 100) as usize;
        if header_length < V3_HEADER_MIN
            || header_length % 8 != 0
            || header_length as u64 > cluster_size
        {
            return Err(invalid(format!("header_length {header_length}")));
        }
        h.raw = first[..header_length].to_vec();

        if h.backing_file_offset != 0 {
            if h.backing_file_size > 1023 {
                return Err(invalid("backing file name longer than 1023 bytes"));
            }
            let end = h.backing_file_offset + u64::from(h.backing_file_size);
            if h.backing_file_offset < header_length as u64 {
                return Err(invalid("backing file name overlaps the header"));
            }
            // QEMU always writes it there; elsewhere, rewriting the header could not keep it.
            if end > cluster_size {
                return Err(BitmapError::Unsupported(
                    "backing file name outside the first cluster".into(),
                ));
            }
            let start = h.backing_file_offset as usize;
            h.backing_name = Some(first[start..end as usize].to_vec());
        }
        // Extensions run from the header's end to the backing file name or the cluster's end.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset as usize
        } else {
            cluster_size as usize
        };
        let mut at = header_length;
        while at < ext_end {
            if ext_end - at < 8 {
                return Err(invalid("header extension too large"));
            }
            let magic = be32(&first, at);
            let len = be32(&first, at + 4) as usize;
            at += 8;
            if len > ext_end - at {
                return Err(invalid("header extension too large"));
            }
            if magic == EXT_END {
                break;
            }
            let data = first[at..at + len].to_vec();
            at += len.div_ceil(8) * 8;
            if magic == EXT_BITMAPS {
                if h.bitmaps_slot.is_some() {
                    return Err(invalid("two bitmaps extensions"));
                }
                h.bitmaps_slot = Some(h.extensions.len());
                h.bitmaps = parse_bitmaps_ext(&data, h.autoclear, cluster_size)?;
            } else {
                h.extensions.push(RawExt { magic, data });
            }
        }
        Ok(h)
    }

    /// Refuses images whose refcounts cannot be updated safely.
    fn check_writable(&self) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(BitmapError::Unsupported(format!(
                "unknown incompatible features {unknown:#x}"
            )));
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(BitmapError::NotClean("corrupt"));
        }
        Ok(())
    }

    fn check_refcounts_clean(&self) -> Result<()> {
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(BitmapError::NotClean("dirty"));
        }
        if self.refcount_order > 6 {
            return Err(BitmapError::Unsupported(format!(
                "refcount_order {}",
                self.refcount_order
            )));
        }
        Ok(())
    }

    /// The new first cluster: the header with `autoclear`, every other extension as it was,
    /// the bitmaps extension `ext` (or none), the end marker and the backing file name.
    fn encode(&self, ext: Option<BitmapsExt>, autoclear: u64) -> Result<Vec<u8>> {
        let cs = self.cluster_size as usize;
        let mut buf = self.raw.clone();
        buf[88..96].copy_from_slice(&autoclear.to_be_bytes());
        let push_ext = |buf: &mut Vec<u8>, magic: u32, data: &[u8]| {
            buf.extend_from_slice(&magic.to_be_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
            buf.extend_from_slice(data);
            buf.resize(buf.len().div_ceil(8) * 8, 0);
        };
        let slot = self.bitmaps_slot.unwrap_or(self.extensions.len());
        for i in 0..=self.extensions.len() {
            if i == slot {
                if let Some(ext) = ext {
                    push_ext(&mut buf, EXT_BITMAPS, &ext.encode());
                }
            }
            if let Some(e) = self.extensions.get(i) {
                push_ext(&mut buf, e.magic, &e.data);
            }
        }
        push_ext(&mut buf, EXT_END, &[]);
        if let Some(name) = &self.backing_name {
            let offset = buf.len() as u64;
            buf[8..16].copy_from_slice(&offset.to_be_bytes());
            buf.extend_from_slice(name);
        }
        if buf.len() > cs {
            return Err(BitmapError::HeaderFull {
                needed: buf.len(),
                cluster_size: self.cluster_size,
            });
        }
        buf.resize(cs, 0);
        Ok(buf)
    }
}

fn parse_bitmaps_ext(data: &[u8], autoclear: u64, cluster_size: u64) -> Result<BitmapsState> {
    if data.len() != BITMAPS_EXT_LEN {
        return Err(invalid("bitmaps_ext: Invalid extension length"));
    }
    let ext = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        directory_size: be64(data, 8),
        directory_offset: be64(data, 16),
    };
    if autoclear & AUTOCLEAR_BITMAPS == 0 {
        return Ok(BitmapsState::Stale(ext));
    }
    if be32(data, 4) != 0 {
        return Err(invalid("bitmaps_ext: Reserved field is not zero"));
    }
    if ext.nb_bitmaps as usize > MAX_BITMAPS {
        return Err(invalid(format!(
            "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
            ext.nb_bitmaps
        )));
    }
    if ext.nb_bitmaps == 0 {
        return Err(invalid("found bitmaps extension with zero bitmaps"));
    }
    if ext.directory_offset % cluster_size != 0 || ext.directory_offset == 0 {
        return Err(invalid("bitmaps_ext: invalid bitmap directory offset"));
    }
    if ext.directory_size == 0 || ext.directory_size > MAX_DIRECTORY_SIZE {
        return Err(invalid(format!(
            "bitmaps_ext: bitmap directory size ({}) out of 1..={MAX_DIRECTORY_SIZE}",
            ext.directory_size
        )));
    }
    Ok(BitmapsState::Valid(ext))
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DirEntry {
    table_offset: u64,
    table_size: u32,
    flags: BitmapFlags,
    granularity_bits: u8,
    name: String,
}

impl DirEntry {
    fn encoded_len(name_len: usize) -> usize {
        (DIR_ENTRY_HEADER + name_len).div_ceil(8) * 8
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        out.push(BITMAP_TYPE_DIRTY_TRACKING);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // extra_data_size
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + Self::encoded_len(self.name.len()), 0);
    }

    /// QEMU's `check_dir_entry`.
    fn check(&self, cluster_size: u64, disk_size: u64) -> Result<()> {
        let fail = |reason: &str| BitmapError::InvalidStoredBitmap {
            name: self.name.clone(),
            reason: reason.to_owned(),
        };
        if self.table_size == 0 || self.table_offset == 0 || self.table_offset % cluster_size != 0 {
            return Err(fail("invalid bitmap table offset or size"));
        }
        if u64::from(self.table_size) > MAX_TABLE_SIZE {
            return Err(fail("bitmap table too large"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS)
            .contains(&u32::from(self.granularity_bits))
        {
            return Err(fail("granularity out of range"));
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(fail("invalid name length"));
        }
        let phys = u64::from(self.table_size) * cluster_size;
        if phys > MAX_PHYS_SIZE {
            return Err(fail("bitmap too large"));
        }
        let covered = (u128::from(phys) * 8) << self.granularity_bits;
        if !self.flags.contains(BitmapFlags::IN_USE) && u128::from(disk_size) > covered {
            return Err(fail("bitmap table too small for the disk"));
        }
        Ok(())
    }
}

/// Parses a bitmap directory (QEMU's `bitmap_list_load`): every entry's position in `dir` and
/// its fields, checked.
fn parse_directory(
    dir: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<(usize, DirEntry)>> {
    let broken = || invalid("Broken bitmap directory");
    let mut entries = Vec::new();
    let mut names = HashSet::new();
    let mut at = 0;
    while at < dir.len() {
        if dir.len() - at < DIR_ENTRY_HEADER {
            return Err(broken());
        }
        if entries.len() >= nb_bitmaps as usize {
            return Err(invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let e = &dir[at..];
        let flags = BitmapFlags(be32(e, 12));
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18) as usize;
        let extra_size = be32(e, 20) as usize;
        let len = (DIR_ENTRY_HEADER + name_size)
            .checked_add(extra_size)
            .map(|l| l.div_ceil(8) * 8)
            .ok_or_else(broken)?;
        if len > e.len() {
            return Err(broken());
        }
        let name_bytes =
            &e[DIR_ENTRY_HEADER + extra_size..DIR_ENTRY_HEADER + extra_size + name_size];
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        if extra_size != 0 {
            return Err(BitmapError::Unsupported(format!(
                "bitmap '{name}': Bitmap extra data is not supported"
            )));
        }
        let unsupported_flags = flags.0 & !BitmapFlags::SUPPORTED.0;
        if unsupported_flags != 0 {
            return Err(BitmapError::InvalidStoredBitmap {
                name,
                reason: format!("reserved flags {unsupported_flags:#x} set"),
            });
        }
        if kind != BITMAP_TYPE_DIRTY_TRACKING {
            return Err(BitmapError::InvalidStoredBitmap {
                name,
                reason: format!("unknown bitmap type {kind}"),
            });
        }
        let name = String::from_utf8(name_bytes.to_vec()).map_err(|_| {
            BitmapError::InvalidStoredBitmap {
                name: name.clone(),
                reason: "name is not UTF-8".into(),
            }
        })?;
        let entry = DirEntry {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags,
            granularity_bits,
            name,
        };
        entry.check(cluster_size, disk_size)?;
        if !names.insert(entry.name.clone()) {
            return Err(BitmapError::DuplicateName(entry.name));
        }
        entries.push((at, entry));
        at += len;
    }
    if entries.len() != nb_bitmaps as usize {
        return Err(invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(entries)
}

/// QEMU's `check_table_entry`.
fn check_table_entry(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_ENTRY_RESERVED != 0 {
        return false;
    }
    let offset = entry & TABLE_ENTRY_OFFSET;
    offset == 0 || (entry & TABLE_ENTRY_ALL_ONES == 0 && offset % cluster_size == 0)
}

fn read_table(file: &dyn ImageFile, entry: &DirEntry, cluster_size: u64) -> Result<Vec<u64>> {
    // `check` bounded table_size * cluster_size by MAX_PHYS_SIZE before this allocation.
    let raw = read_at(
        file,
        entry.table_offset,
        entry.table_size as usize * 8,
        "reading a bitmap table",
    )?;
    let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
    if let Some(bad) = table.iter().find(|&&e| !check_table_entry(e, cluster_size)) {
        return Err(BitmapError::InvalidStoredBitmap {
            name: entry.name.clone(),
            reason: format!("invalid bitmap table entry {bad:#x}"),
        });
    }
    Ok(table)
}

/// The image's bitmap directory, read and checked.
struct Directory {
    ext: BitmapsExt,
    raw: Vec<u8>,
    entries: Vec<(usize, DirEntry)>,
}

/// Reads and checks the directory `ext` points at (`ext` itself checked beforehand).
fn read_directory(file: &dyn ImageFile, h: &Header, ext: BitmapsExt) -> Result<Directory> {
    // parse_bitmaps_ext bounded directory_size by MAX_DIRECTORY_SIZE.
    let raw = read_at(
        file,
        ext.directory_offset,
        ext.directory_size as usize,
        "reading the bitmap directory",
    )?;
    let entries = parse_directory(&raw, ext.nb_bitmaps, h.cluster_size, h.size)?;
    Ok(Directory { ext, raw, entries })
}

fn warn_stale() {
    tracing::warn!(
        "a program lacking bitmap support modified this file, so all bitmaps are now \
         considered inconsistent; some clusters may be leaked"
    );
}

/// Reads every persistent bitmap of the image.
///
/// Version 2 images, images without the bitmaps extension and images whose extension is
/// stale (the autoclear bit is clear: a program unaware of bitmaps wrote the image) have none.
/// A bitmap flagged `in_use` is returned with `inconsistent: true` and all bits clear, as QEMU
/// does not load its data. Malformed directories, unknown flags, types or extra data are
/// refused, as QEMU refuses them (QEMU then fails to open the image).
pub fn load(file: &dyn ImageFile) -> Result<Vec<StoredBitmap>> {
    let h = Header::read(file)?;
    if h.version < 3 {
        return Ok(Vec::new());
    }
    let ext = match h.bitmaps {
        BitmapsState::Absent => return Ok(Vec::new()),
        BitmapsState::Stale(_) => {
            warn_stale();
            return Ok(Vec::new());
        }
        BitmapsState::Valid(ext) => ext,
    };
    let dir = read_directory(file, &h, ext)?;
    let cs = h.cluster_size;
    let mut out = Vec::with_capacity(dir.entries.len());
    for (_, e) in &dir.entries {
        let granularity = 1u32 << e.granularity_bits;
        let bad = |reason: &str| BitmapError::InvalidStoredBitmap {
            name: e.name.clone(),
            reason: reason.to_owned(),
        };
        if bitmap_bytes(h.size, granularity) > MAX_PHYS_SIZE {
            return Err(bad("bitmap too large"));
        }
        let mut bm = StoredBitmap::new(e.name.clone(), h.size, granularity, false);
        bm.enabled = e.flags.contains(BitmapFlags::AUTO);
        if e.flags.contains(BitmapFlags::IN_USE) {
            bm.inconsistent = true;
            out.push(bm);
            continue;
        }
        if u64::from(e.table_size) != table_size_for(h.size, granularity, cs) {
            return Err(bad("bitmap table size does not match the disk size"));
        }
        let table = read_table(file, e, cs)?;
        let words_per_cluster = (cs / 8) as usize;
        for (i, &entry) in table.iter().enumerate() {
            let first = i * words_per_cluster;
            let last = ((i + 1) * words_per_cluster).min(bm.bits.len());
            if first >= last {
                continue;
            }
            let offset = entry & TABLE_ENTRY_OFFSET;
            if offset == 0 {
                if entry & TABLE_ENTRY_ALL_ONES != 0 {
                    bm.bits[first..last].iter_mut().for_each(|w| *w = !0);
                }
                continue;
            }
            let data = read_at(file, offset, cs as usize, "reading bitmap data")?;
            for (w, bytes) in bm.bits[first..last].iter_mut().zip(data.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(bytes);
                *w = u64::from_le_bytes(a);
            }
        }
        if let Some(last) = bm.bits.len().checked_sub(1) {
            bm.bits[last] = bm.masked_word(last);
        }
        out.push(bm);
    }
    Ok(out)
}

/// Where the bitmaps were when [`mark_in_use`] marked them: the bitmaps extension and the
/// directory as written.
///
/// imago clears every autoclear bit when it opens an image writable, which makes the bitmaps
/// extension stale; a stale extension's clusters may have been reused by whoever cleared the
/// bit, so [`store`] must leak them. But when the extension and its directory are still
/// exactly what [`mark_in_use`] left, nobody but the daemon (which held the image alone)
/// wrote them: [`store_replacing`] and [`restore_autoclear_bit`] use this to free them, and
/// to make them count again, safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsLayout {
    ext: BitmapsExt,
    directory: Vec<u8>,
}

impl BitmapsLayout {
    /// Whether the header's (possibly stale) extension and its directory are still these.
    fn matches(&self, file: &dyn ImageFile, h: &Header) -> Result<bool> {
        let ext = match h.bitmaps {
            BitmapsState::Valid(ext) | BitmapsState::Stale(ext) => ext,
            BitmapsState::Absent => return Ok(false),
        };
        if ext != self.ext {
            return Ok(false);
        }
        let raw = read_at(
            file,
            ext.directory_offset,
            self.directory.len(),
            "reading the bitmap directory",
        )?;
        Ok(raw == self.directory)
    }
}

/// Sets `in_use` on every stored bitmap, in place, as QEMU does when it opens an image
/// writable: a crash before [`store`] then leaves the bitmaps marked inconsistent.
///
/// Follows QEMU's order: clear the autoclear bit (sync), rewrite the directory (sync), set the
/// bit again (sync); a crash in between loses the bitmaps but corrupts nothing. Unknown
/// autoclear bits are cleared, as the format asks of a writer.
///
/// Returns where the bitmaps are (`None` when the image has no valid bitmaps extension), to
/// hand to [`restore_autoclear_bit`] once imago has opened the image, and to
/// [`store_replacing`] at close.
pub fn mark_in_use(file: &dyn ImageFile) -> Result<Option<BitmapsLayout>> {
    let h = Header::read(file)?;
    if h.version < 3 {
        return Ok(None);
    }
    h.check_writable()?;
    let ext = match h.bitmaps {
        BitmapsState::Valid(ext) => ext,
        BitmapsState::Absent => return Ok(None),
        BitmapsState::Stale(_) => {
            warn_stale();
            return Ok(None);
        }
    };
    let mut dir = read_directory(file, &h, ext)?;
    let mut changed = false;
    for (at, e) in &dir.entries {
        if !e.flags.contains(BitmapFlags::IN_USE) {
            let flags = e.flags.0 | BitmapFlags::IN_USE.0;
            dir.raw[at + 12..at + 16].copy_from_slice(&flags.to_be_bytes());
            changed = true;
        }
    }
    let layout = BitmapsLayout {
        ext: dir.ext,
        directory: dir.raw,
    };
    if !changed {
        return Ok(Some(layout));
    }
    let autoclear = h.autoclear & AUTOCLEAR_KNOWN;
    write_at(
        file,
        AUTOCLEAR_OFFSET,
        &(autoclear & !AUTOCLEAR_BITMAPS).to_be_bytes(),
        "clearing the bitmaps autoclear bit",
    )?;
    sync(file)?;
    write_at(
        file,
        layout.ext.directory_offset,
        &layout.directory,
        "writing the bitmap directory",
    )?;
    sync(file)?;
    write_at(
        file,
        AUTOCLEAR_OFFSET,
        &(autoclear | AUTOCLEAR_BITMAPS).to_be_bytes(),
        "setting the bitmaps autoclear bit",
    )?;
    sync(file)?;
    Ok(Some(layout))
}

/// Sets the bitmaps autoclear bit again after imago (which clears every autoclear bit when it
/// opens an image writable) has opened the image, if the extension and directory are still
/// the ones [`mark_in_use`] left. Then a crash leaves the bitmaps visible to QEMU as `in_use`
/// (inconsistent) instead of lost with leaked clusters.
///
/// Call it right after imago's open, before any I/O: it writes the 8-byte autoclear field of
/// the header and syncs (imago writes its whole header only when it opens the image). Returns
/// whether the bit was set.
pub fn restore_autoclear_bit(file: &dyn ImageFile, layout: &BitmapsLayout) -> Result<bool> {
    let h = Header::read(file)?;
    if h.version < 3 || h.autoclear & AUTOCLEAR_BITMAPS != 0 || !layout.matches(file, &h)? {
        return Ok(false);
    }
    h.check_writable()?;
    // The directory is the one checked at mark_in_use: every bitmap is in use.
    let autoclear = (h.autoclear & AUTOCLEAR_KNOWN) | AUTOCLEAR_BITMAPS;
    write_at(
        file,
        AUTOCLEAR_OFFSET,
        &autoclear.to_be_bytes(),
        "setting the bitmaps autoclear bit",
    )?;
    sync(file)?;
    Ok(true)
}

/// The image's refcounts, loaded on demand, changed in memory and written by
/// [`Refcounts::commit`].
struct Refcounts<'f> {
    file: &'f dyn ImageFile,
    cluster_size: u64,
    order: u32,
    table_offset: u64,
    /// The refcount table; entries past its end up to `capacity` are zero.
    table: Vec<u64>,
    capacity: u64,
    blocks: BTreeMap<u64, Vec<u8>>,
    block_offsets: HashSet<u64>,
    dirty_blocks: BTreeSet<u64>,
    dirty_table: BTreeSet<u64>,
    /// First cluster that may be free.
    hint: u64,
    /// Clusters being allocated, whose refcounts are not raised yet.
    pending: std::ops::Range<u64>,
}

impl<'f> Refcounts<'f> {
    fn open(file: &'f dyn ImageFile, h: &Header) -> Result<Self> {
        h.check_refcounts_clean()?;
        let cs = h.cluster_size;
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        if bytes > MAX_REFTABLE_SIZE || bytes == 0 {
            return Err(invalid("refcount table size out of range"));
        }
        if h.refcount_table_offset % cs != 0 || h.refcount_table_offset == 0 {
            return Err(invalid("refcount table offset invalid"));
        }
        let raw = read_at(
            file,
            h.refcount_table_offset,
            bytes as usize,
            "reading the refcount table",
        )?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let mut block_offsets = HashSet::new();
        for &e in &table {
            let off = e & REFTABLE_OFFSET;
            if e & !REFTABLE_OFFSET != 0 || off % cs != 0 {
                return Err(invalid(format!("invalid refcount table entry {e:#x}")));
            }
            if off != 0 {
                block_offsets.insert(off);
            }
        }
        Ok(Refcounts {
            file,
            cluster_size: cs,
            order: h.refcount_order,
            table_offset: h.refcount_table_offset,
            capacity: table.len() as u64,
            table,
            blocks: BTreeMap::new(),
            block_offsets,
            dirty_blocks: BTreeSet::new(),
            dirty_table: BTreeSet::new(),
            hint: 0,
            pending: 0..0,
        })
    }

    fn entries_per_block(&self) -> u64 {
        (self.cluster_size * 8) >> self.order
    }

    fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// The loaded refcount block `index`, or None if it is not allocated.
    fn block(&mut self, index: u64) -> Result<Option<&mut Vec<u8>>> {
        if !self.blocks.contains_key(&index) {
            let Some(&entry) = usize::try_from(index).ok().and_then(|i| self.table.get(i)) else {
                return Ok(None);
            };
            let off = entry & REFTABLE_OFFSET;
            if off == 0 {
                return Ok(None);
            }
            let data = read_at(
                self.file,
                off,
                self.cluster_size as usize,
                "reading a refcount block",
            )?;
            self.blocks.insert(index, data);
        }
        Ok(self.blocks.get_mut(&index))
    }

    fn get(&mut self, cluster: u64) -> Result<u64> {
        let per = self.entries_per_block();
        let order = self.order;
        Ok(match self.block(cluster / per)? {
            Some(b) => get_refcount(b, order, (cluster % per) as usize),
            None => 0,
        })
    }

    fn set(&mut self, cluster: u64, value: u64) -> Result<()> {
        if value > self.max_refcount() {
            return Err(invalid(format!("refcount of cluster {cluster} overflows")));
        }
        let per = self.entries_per_block();
        let index = cluster / per;
        if self.block(index)?.is_none() {
            self.new_block(index)?;
        }
        let order = self.order;
        if let Some(b) = self.block(index)? {
            set_refcount(b, order, (cluster % per) as usize, value);
        }
        self.dirty_blocks.insert(index);
        Ok(())
    }

    /// Allocates refcount block `index` in a free cluster.
    fn new_block(&mut self, index: u64) -> Result<()> {
        let per = self.entries_per_block();
        if index >= self.capacity {
            return Err(BitmapError::RefcountTableFull(
                index.saturating_mul(per).saturating_mul(self.cluster_size),
            ));
        }
        let cluster = self.find_free(1)?;
        let offset = cluster * self.cluster_size;
        self.blocks
            .insert(index, vec![0u8; self.cluster_size as usize]);
        self.block_offsets.insert(offset);
        self.table[index as usize] = offset;
        self.dirty_table.insert(index);
        self.dirty_blocks.insert(index);
        // The block's own cluster needs a refcount: in itself, or in another block.
        self.set(cluster, 1)
    }

    fn is_free(&mut self, cluster: u64) -> Result<bool> {
        Ok(!self.pending.contains(&cluster)
            && !self.block_offsets.contains(&(cluster * self.cluster_size))
            && self.get(cluster)? == 0)
    }

    /// First run of `n` free clusters (first fit from the lowest possibly free cluster).
    fn find_free(&mut self, n: u64) -> Result<u64> {
        let mut start = self.hint;
        while !self.is_free(start)? {
            start += 1;
        }
        self.hint = start;
        let mut run = 0;
        let mut c = start;
        while run < n {
            if self.is_free(c)? {
                run += 1;
            } else {
                run = 0;
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Allocates `bytes` (rounded up to clusters) contiguously: returns the offset.
    fn alloc(&mut self, bytes: u64) -> Result<u64> {
        let n = bytes.div_ceil(self.cluster_size).max(1);
        let start = self.find_free(n)?;
        // A new refcount block needed on the way must not land in the run.
        self.pending = start..start + n;
        let raised = (start..start + n).try_for_each(|c| self.set(c, 1));
        self.pending = 0..0;
        raised?;
        Ok(start * self.cluster_size)
    }

    /// Drops one reference to each cluster of `[offset, offset + bytes)`.
    fn free(&mut self, offset: u64, bytes: u64) -> Result<()> {
        let first = offset / self.cluster_size;
        let end = (offset + bytes).div_ceil(self.cluster_size);
        for c in first..end {
            let r = self.get(c)?;
            if r == 0 {
                tracing::warn!(cluster = c, "freeing a bitmap cluster whose refcount is 0");
                continue;
            }
            self.set(c, r - 1)?;
            self.hint = self.hint.min(c);
        }
        Ok(())
    }

    /// Writes the changed refcount blocks, syncs, then the changed refcount table entries,
    /// and syncs: a new block is complete before the table points at it.
    fn commit(&mut self) -> Result<()> {
        for &index in &self.dirty_blocks {
            let off = self.table[index as usize] & REFTABLE_OFFSET;
            if let Some(b) = self.blocks.get(&index) {
                write_at(self.file, off, b, "writing a refcount block")?;
            }
        }
        self.dirty_blocks.clear();
        sync(self.file)?;
        if self.dirty_table.is_empty() {
            return Ok(());
        }
        for &index in &self.dirty_table {
            write_at(
                self.file,
                self.table_offset + index * 8,
                &self.table[index as usize].to_be_bytes(),
                "writing the refcount table",
            )?;
        }
        self.dirty_table.clear();
        sync(self.file)
    }
}

/// Refcount entry `i` of a block with `1 << order`-bit entries (big-endian from 8 bits on,
/// LSB first within a byte below).
fn get_refcount(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            u64::from((block[i / per_byte] >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[i]),
        4 => u64::from(be16(block, i * 2)),
        5 => u64::from(be32(block, i * 4)),
        _ => be64(block, i * 8),
    }
}

fn set_refcount(block: &mut [u8], order: u32, i: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let byte = &mut block[i / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[i] = value as u8,
        4 => block[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[i * 4..i * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[i * 8..i * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Checks every bitmap to store against the image, before anything is written.
fn validate(h: &Header, bitmaps: &[StoredBitmap]) -> Result<()> {
    if bitmaps.len() > MAX_BITMAPS {
        return Err(BitmapError::TooManyBitmaps);
    }
    let mut names = HashSet::new();
    let mut dir_size = 0u64;
    for bm in bitmaps {
        if !names.insert(bm.name.as_str()) {
            return Err(BitmapError::DuplicateName(bm.name.clone()));
        }
        check_constraints(&bm.name, bm.granularity, h.size, h.cluster_size)?;
        let fail = |reason: String| BitmapError::Constraint {
            name: bm.name.clone(),
            reason,
        };
        if bm.size != h.size {
            return Err(fail(format!(
                "bitmap size {} differs from the image's size {}",
                bm.size, h.size
            )));
        }
        if bm.size == 0 {
            return Err(fail("an empty disk cannot hold a bitmap".into()));
        }
        let words = StoredBitmap::words(bm.size, bm.granularity);
        if bm.bits.len() != words {
            return Err(fail(format!(
                "{} words of bits given, {words} expected",
                bm.bits.len()
            )));
        }
        dir_size += DirEntry::encoded_len(bm.name.len()) as u64;
    }
    if dir_size > MAX_DIRECTORY_SIZE {
        return Err(BitmapError::DirectoryTooLarge);
    }
    Ok(())
}

/// Every cluster range the given bitmaps occupy: the directory, the tables and their data
/// clusters. A table that cannot be read is left alone (leaked) with a warning, as QEMU does.
fn old_ranges(file: &dyn ImageFile, h: &Header, dir: &Directory) -> Vec<(u64, u64)> {
    let mut ranges = vec![(dir.ext.directory_offset, dir.ext.directory_size)];
    for (_, e) in &dir.entries {
        match read_table(file, e, h.cluster_size) {
            Ok(table) => {
                ranges.push((e.table_offset, u64::from(e.table_size) * 8));
                ranges.extend(
                    table
                        .iter()
                        .map(|t| t & TABLE_ENTRY_OFFSET)
                        .filter(|&o| o != 0)
                        .map(|o| (o, h.cluster_size)),
                );
            }
            Err(err) => tracing::warn!(
                bitmap = %e.name,
                error = %err,
                "cannot read the old bitmap table; its clusters are leaked"
            ),
        }
    }
    ranges
}

/// Writes `bitmaps` as the image's persistent bitmaps, replacing every bitmap stored before
/// (call at clean close; see the module docs for the contract and the crash-safety order).
///
/// Same as [`store_replacing`] without a layout: the clusters of a stale extension are leaked,
/// as QEMU leaks them. Use [`store_replacing`] for an image that imago had open.
#[cfg(test)]
pub fn store(file: &dyn ImageFile, bitmaps: &[StoredBitmap]) -> Result<()> {
    store_replacing(file, bitmaps, None)
}

/// Writes `bitmaps` as the image's persistent bitmaps, replacing every bitmap stored before.
///
/// Consistent bitmaps are written with `in_use` clear and `auto` as [`StoredBitmap::enabled`];
/// inconsistent ones with `in_use` set and no data (as QEMU keeps them). A cluster's worth of
/// chunks without a dirty bit gets no data cluster (table entry 0). An empty slice removes the
/// extension. Nothing is written when a bitmap breaks a constraint ([`check_constraints`], a
/// size equal to the image's, `bits` of the right length, unique names), when the header would
/// not fit, or when the current directory is malformed.
///
/// The old bitmaps' clusters are freed when the extension is valid, or stale but still
/// `previous` (what [`mark_in_use`] returned at open); otherwise they are leaked.
pub fn store_replacing(
    file: &dyn ImageFile,
    bitmaps: &[StoredBitmap],
    previous: Option<&BitmapsLayout>,
) -> Result<()> {
    let h = Header::read(file)?;
    if h.version < 3 {
        return if bitmaps.is_empty() {
            Ok(())
        } else {
            Err(BitmapError::Version2)
        };
    }
    h.check_writable()?;
    validate(&h, bitmaps)?;
    if bitmaps.is_empty()
        && h.bitmaps == BitmapsState::Absent
        && h.autoclear & AUTOCLEAR_BITMAPS == 0
    {
        return Ok(());
    }
    // The header must fit with the new extension before anything is allocated.
    let placeholder = (!bitmaps.is_empty()).then_some(BitmapsExt {
        nb_bitmaps: 0,
        directory_size: 0,
        directory_offset: 0,
    });
    h.encode(placeholder, 0)?;

    let old_dir = match h.bitmaps {
        BitmapsState::Valid(ext) => Some(read_directory(file, &h, ext)?),
        BitmapsState::Stale(ext) => match previous {
            Some(layout) if layout.matches(file, &h)? => Some(read_directory(file, &h, ext)?),
            _ => {
                warn_stale();
                None
            }
        },
        BitmapsState::Absent => None,
    };
    let old = old_dir
        .as_ref()
        .map(|d| old_ranges(file, &h, d))
        .unwrap_or_default();

    let cs = h.cluster_size;
    let mut rc = Refcounts::open(file, &h)?;
    let mut entries = Vec::with_capacity(bitmaps.len());
    let words_per_cluster = (cs / 8) as usize;
    let mut buf = vec![0u8; cs as usize];
    for bm in bitmaps {
        let granularity_bits = bm.granularity.trailing_zeros() as u8;
        let table_size = table_size_for(bm.size, bm.granularity, cs);
        let mut table = vec![0u64; table_size as usize];
        if !bm.inconsistent {
            for (i, slot) in table.iter_mut().enumerate() {
                let first = i * words_per_cluster;
                let last = ((i + 1) * words_per_cluster).min(bm.bits.len());
                if (first..last).all(|w| bm.masked_word(w) == 0) {
                    continue;
                }
                buf.iter_mut().for_each(|b| *b = 0);
                for (w, out) in (first..last).zip(buf.chunks_exact_mut(8)) {
                    out.copy_from_slice(&bm.masked_word(w).to_le_bytes());
                }
                let off = rc.alloc(cs)?;
                write_at(file, off, &buf, "writing bitmap data")?;
                *slot = off;
            }
        }
        let mut raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        raw.resize(raw.len().div_ceil(cs as usize) * cs as usize, 0);
        let table_offset = rc.alloc(raw.len() as u64)?;
        write_at(file, table_offset, &raw, "writing a bitmap table")?;
        let entry = DirEntry {
            table_offset,
            table_size: table_size as u32,
            flags: bm.flags(),
            granularity_bits,
            name: bm.name.clone(),
        };
        entry.check(cs, h.size)?;
        entries.push(entry);
    }

    let new_ext = if entries.is_empty() {
        None
    } else {
        let mut dir = Vec::new();
        for e in &entries {
            e.encode(&mut dir);
        }
        let size = dir.len() as u64;
        dir.resize(dir.len().div_ceil(cs as usize) * cs as usize, 0);
        let offset = rc.alloc(size)?;
        write_at(file, offset, &dir, "writing the bitmap directory")?;
        Some(BitmapsExt {
            nb_bitmaps: entries.len() as u32,
            directory_size: size,
            directory_offset: offset,
        })
    };
    // The new clusters' data and refcounts are durable before the header points at them.
    rc.commit()?;

    let mut autoclear = h.autoclear & AUTOCLEAR_KNOWN;
    if new_ext.is_some() {
        autoclear |= AUTOCLEAR_BITMAPS;
    } else {
        autoclear &= !AUTOCLEAR_BITMAPS;
    }
    let header = h.encode(new_ext, autoclear)?;
    write_at(file, 0, &header, "writing the qcow2 header")?;
    sync(file)?;

    // Only now that nothing points at the old clusters may they be freed.
    for (offset, bytes) in old {
        rc.free(offset, bytes)?;
    }
    rc.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..entries {
                set_refcount(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i as u64 * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // 16-bit entries are big-endian.
        let mut block = vec![0u8; 8];
        set_refcount(&mut block, 4, 1, 0x0102);
        assert_eq!(block[..4], [0, 0, 1, 2]);
        // 1-bit entries: bit 0 is the least significant.
        let mut block = vec![0u8; 1];
        set_refcount(&mut block, 0, 1, 1);
        assert_eq!(block[0], 0b10);
    }

    #[test]
    fn directory_entry_round_trip_and_layout() {
        let e = DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: BitmapFlags::AUTO,
            granularity_bits: 16,
            name: "b0".into(),
        };
        let mut raw = Vec::new();
        e.encode(&mut raw);
        #[rustfmt::skip]
        let expected = [
            0, 0, 0, 0, 0, 3, 0, 0, // bitmap_table_offset
            0, 0, 0, 1,             // bitmap_table_size
            0, 0, 0, 2,             // flags: auto
            1,                      // type: dirty tracking
            16,                     // granularity_bits
            0, 2,                   // name_size
            0, 0, 0, 0,             // extra_data_size
            b'b', b'0',             // name
            0, 0, 0, 0, 0, 0,       // padding to 8
        ];
        assert_eq!(raw, expected);
        let parsed = parse_directory(&raw, 1, 65536, 10 << 20).unwrap();
        assert_eq!(parsed, vec![(0, e)]);
    }

    fn entry_bytes(flags: u32, kind: u8, gran: u8, extra: u32) -> Vec<u8> {
        let mut raw = Vec::new();
        DirEntry {
            table_offset: 0x30000,
            table_size: 1,
            flags: BitmapFlags(flags),
            granularity_bits: gran,
            name: "x".into(),
        }
        .encode(&mut raw);
        raw[16] = kind;
        raw[20..24].copy_from_slice(&extra.to_be_bytes());
        if extra > 0 {
            raw.resize(raw.len() + (extra as usize).div_ceil(8) * 8, 0);
        }
        raw
    }

    #[test]
    fn directory_refuses_what_qemu_refuses() {
        let ok = entry_bytes(2, 1, 16, 0);
        assert!(parse_directory(&ok, 1, 65536, 1 << 20).is_ok());
        // Unknown flag (extra_data_compatible counts as reserved for QEMU).
        assert!(parse_directory(&entry_bytes(4, 1, 16, 0), 1, 65536, 1 << 20).is_err());
        // Unknown type.
        assert!(parse_directory(&entry_bytes(2, 2, 16, 0), 1, 65536, 1 << 20).is_err());
        // Granularity below 512 bytes / above 2 GiB.
        assert!(parse_directory(&entry_bytes(2, 1, 8, 0), 1, 65536, 1 << 20).is_err());
        assert!(parse_directory(&entry_bytes(2, 1, 32, 0), 1, 65536, 1 << 20).is_err());
        // Extra data.
        assert!(parse_directory(&entry_bytes(2, 1, 16, 8), 1, 65536, 1 << 20).is_err());
        // Count mismatches and truncation.
        assert!(parse_directory(&ok, 2, 65536, 1 << 20).is_err());
        assert!(parse_directory(&[ok.clone(), ok.clone()].concat(), 1, 65536, 1 << 20).is_err());
        assert!(parse_directory(&ok[..20], 1, 65536, 1 << 20).is_err());
        assert!(parse_directory(&ok[..26], 1, 65536, 1 << 20).is_err());
        // Duplicate names.
        assert!(matches!(
            parse_directory(&[ok.clone(), ok.clone()].concat(), 2, 65536, 1 << 20),
            Err(BitmapError::DuplicateName(_))
        ));
        // A table too small for the disk, unless in use.
        let disk = 65536u64 * 8 * 65536 + 1;
        assert!(parse_directory(&ok, 1, 65536, disk).is_err());
        assert!(parse_directory(&entry_bytes(3, 1, 16, 0), 1, 65536, disk).is_ok());
    }

    #[test]
    fn table_entries() {
        assert!(check_table_entry(0, 512));
        assert!(check_table_entry(1, 512));
        assert!(check_table_entry(0x10000, 65536));
        assert!(
            !check_table_entry(0x10001, 65536),
            "all-ones with an offset"
        );
        assert!(!check_table_entry(0x10200, 65536), "unaligned");
        assert!(!check_table_entry(2, 512), "reserved bit 1");
        assert!(!check_table_entry(1 << 56, 512), "reserved bit 56");
    }

    #[test]
    fn constraints_as_qemu() {
        assert!(check_constraints("a", 65536, 1 << 30, 65536).is_ok());
        let e = check_constraints("a", 256, 1 << 30, 65536).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitmap 'a' doesn't satisfy the constraints: Granularity is under minimum (512 bytes)"
        );
        assert!(check_constraints("a", 65535, 1 << 30, 65536).is_err());
        assert!(check_constraints(&"n".repeat(1024), 65536, 1 << 30, 65536).is_err());
        assert!(check_constraints(&"n".repeat(1023), 65536, 1 << 30, 65536).is_ok());
        assert!(check_constraints("", 65536, 1 << 30, 65536).is_err());
        // 2^63 bytes at 512-byte granularity: far more than 512 MiB of bitmap.
        assert!(check_constraints("a", 512, 1 << 63, 65536).is_err());
        assert!(check_constraints("a", MAX_GRANULARITY, 1 << 40, 65536).is_ok());
    }

    #[test]
    fn stored_bitmap_bits() {
        let mut bm = StoredBitmap::new("b", 130 * 512 + 1, 512, true);
        assert_eq!(bm.chunks(), 131);
        assert_eq!(bm.bits.len(), 3);
        bm.set_dirty(130);
        bm.set_dirty(131); // beyond the end: ignored
        assert!(bm.is_dirty(130));
        assert!(!bm.is_dirty(131));
        assert_eq!(bm.bits[2], 1 << 2);
        bm.bits[2] = !0;
        assert_eq!(bm.masked_word(2), 0b111);
        assert_eq!(bm.flags(), BitmapFlags::AUTO);
    }

    #[test]
    fn dirty_bitmap_conversions() {
        let size = 1_000_000;
        let node_bitmap = DirtyBitmap::new("d", size, 4096, true);
        node_bitmap.set_range(0, 1);
        node_bitmap.set_range(10_000, 20_000);
        node_bitmap.set_range(size - 1, 1);
        node_bitmap.set_enabled(false);
        let stored = StoredBitmap::from_dirty_bitmap(&node_bitmap, size);
        assert_eq!(stored.name, "d");
        assert_eq!(stored.granularity, 4096);
        assert!(!stored.enabled && !stored.inconsistent);
        let dirty: Vec<u64> = (0..stored.chunks())
            .filter(|&c| stored.is_dirty(c))
            .collect();
        // 10_000..30_000 touches chunks 2..=7; size - 1 is in chunk 244.
        assert_eq!(dirty, vec![0, 2, 3, 4, 5, 6, 7, 244]);

        let back = stored.to_dirty_bitmap();
        assert_eq!(back.count(), node_bitmap.count());
        assert!(back.persistent() && !back.enabled());
        for c in 0..stored.chunks() {
            assert_eq!(back.is_dirty(c * 4096), stored.is_dirty(c), "chunk {c}");
        }

        let mut bad = stored.clone();
        bad.inconsistent = true;
        let b = bad.to_dirty_bitmap();
        assert!(b.inconsistent());
        assert!(StoredBitmap::from_dirty_bitmap(&b, size).inconsistent);
    }

    // ---- tests against the real tools ----

    use std::path::{Path, PathBuf};
    use std::process::Command;

    use test_support::{require_runs as have, run_stdout as run};

    fn qemu_img(args: &[&str]) -> String {
        run(Command::new("qemu-img").args(args))
    }

    fn create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
        let p = dir.join(name);
        let ps = p.to_str().unwrap();
        if opts.is_empty() {
            qemu_img(&["create", "-q", "-f", "qcow2", ps, size]);
        } else {
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, size]);
        }
        p
    }

    fn open_rw(p: &Path) -> File {
        File::options().read(true).write(true).open(p).unwrap()
    }

    /// `qemu-img check --output=json`: (corruptions, leaks, check-errors).
    fn check(p: &Path) -> (u64, u64, u64) {
        let out = Command::new("qemu-img")
            .args(["check", "--output=json", p.to_str().unwrap()])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "qemu-img check gave no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        assert!(v.get("check-errors").is_some(), "{v}");
        (field("corruptions"), field("leaks"), field("check-errors"))
    }

    fn assert_clean(p: &Path) {
        assert_eq!(check(p), (0, 0, 0), "qemu-img check of {}", p.display());
    }

    /// The bitmaps `qemu-img info` lists: (name, granularity, flags), in its order.
    fn info_bitmaps(p: &Path) -> Vec<(String, u64, Vec<String>)> {
        let s = qemu_img(&["info", "-U", "--output=json", p.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let Some(list) = v["format-specific"]["data"]["bitmaps"].as_array() else {
            return Vec::new();
        };
        list.iter()
            .map(|b| {
                let flags = b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect();
                (
                    b["name"].as_str().unwrap().to_owned(),
                    b["granularity"].as_u64().unwrap(),
                    flags,
                )
            })
            .collect()
    }

    /// Ends a daemonized qemu-storage-daemon when dropped.
    struct Daemon(String);

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(&self.0).status();
        }
    }

    /// Dirty extents `(offset, length)` of bitmap `name` as QSD exports it over NBD
    /// (`nbdinfo --map=qemu:dirty-bitmap:NAME`).
    fn nbd_dirty_map(p: &Path, name: &str) -> Vec<(u64, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let pidfile = dir.path().join("pid");
        // With --daemonize, QSD exits in the foreground only once its socket listens.
        run(Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                "driver=file,filename={},node-name=f,read-only=on",
                p.display()
            ),
            "--blockdev",
            "driver=qcow2,file=f,node-name=q,read-only=on",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
            "--export",
            &format!("type=nbd,id=e,node-name=q,bitmaps.0={name}"),
            "--pidfile",
            pidfile.to_str().unwrap(),
            "--daemonize",
        ]));
        let _daemon = Daemon(std::fs::read_to_string(&pidfile).unwrap().trim().to_owned());
        let out = run(Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{name}"))
            .arg(format!("nbd+unix:///q?socket={}", sock.display())));
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 3 && f[2] == "1")
                    .then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
            })
            .collect()
    }

    /// Dirty extents of a [`StoredBitmap`], merged, clamped to the disk size.
    fn dirty_extents(bm: &StoredBitmap) -> Vec<(u64, u64)> {
        let g = u64::from(bm.granularity);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in 0..bm.chunks() {
            if !bm.is_dirty(c) {
                continue;
            }
            let start = c * g;
            let len = (start + g).min(bm.size) - start;
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => out.push((start, len)),
            }
        }
        out
    }

    fn tools(list: &[&str]) -> bool {
        list.iter().all(|t| have(t))
    }

    #[test]
    fn load_reads_the_bits_qemu_wrote() {
        if !tools(&["qemu-img", "qemu-io"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "a.qcow2", "10M", "");
        let ps = p.to_str().unwrap();
        qemu_img(&["bitmap", "--add", "--granularity", "64k", ps, "b0"]);
        qemu_img(&[
            "bitmap",
            "--add",
            "--granularity",
            "512",
            "--disable",
            ps,
            "b1",
        ]);
        // The bitmaps are loaded at open and enabled ones record qemu-io's writes.
        run(Command::new("qemu-io").args([
            "-c",
            "write 0 64k",
            "-c",
            "write 1M 4k",
            "-c",
            "write 9M 100k",
            ps,
        ]));
        let bms = load(&File::open(&p).unwrap()).unwrap();
        assert_eq!(bms.len(), 2);
        let b0 = &bms[0];
        assert_eq!(b0.name, "b0");
        assert_eq!(b0.granularity, 65536);
        assert!(b0.enabled && !b0.inconsistent);
        assert_eq!(b0.size, 10 << 20);
        let dirty: Vec<u64> = (0..b0.chunks()).filter(|&c| b0.is_dirty(c)).collect();
        // 0..64k -> chunk 0; 1M -> chunk 16; 9M..9M+100k -> chunks 144 and 145.
        assert_eq!(dirty, vec![0, 16, 144, 145]);
        let b1 = &bms[1];
        assert_eq!(
            (b1.name.as_str(), b1.granularity, b1.enabled),
            ("b1", 512, false)
        );
        assert!(b1.bits.iter().all(|&w| w == 0));
        // The same as QSD exports over NBD.
        if tools(&["qemu-storage-daemon", "nbdinfo"]) {
            assert_eq!(nbd_dirty_map(&p, "b0"), dirty_extents(b0));
        }
    }

    #[test]
    fn store_is_read_by_qemu() {
        if !tools(&["qemu-img", "qemu-storage-daemon", "nbdinfo"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "s.qcow2", "100M", "");
        let size = 100 << 20;
        let mut a = StoredBitmap::new("alpha", size, 65536, true);
        for c in [0, 1, 2, 100, 1599] {
            a.set_dirty(c);
        }
        let mut b = StoredBitmap::new("beta", size, 4096, false);
        for c in (5000..5100).chain([25599]) {
            b.set_dirty(c);
        }
        let empty = StoredBitmap::new("gamma", size, 1 << 20, true);
        store(&open_rw(&p), &[a.clone(), b.clone(), empty.clone()]).unwrap();
        assert_clean(&p);
        assert_eq!(
            info_bitmaps(&p),
            vec![
                ("alpha".into(), 65536, vec!["auto".into()]),
                ("beta".into(), 4096, vec![]),
                ("gamma".into(), 1 << 20, vec!["auto".into()]),
            ]
        );
        assert_eq!(nbd_dirty_map(&p, "alpha"), dirty_extents(&a));
        assert_eq!(nbd_dirty_map(&p, "beta"), dirty_extents(&b));
        assert_eq!(nbd_dirty_map(&p, "gamma"), vec![]);
        assert_eq!(
            load(&File::open(&p).unwrap()).unwrap(),
            vec![a.clone(), b.clone(), empty]
        );

        // Replacing: store again, fewer bitmaps, no leaks.
        let mut a2 = a.clone();
        a2.set_dirty(700);
        store(&open_rw(&p), &[b.clone(), a2.clone()]).unwrap();
        assert_clean(&p);
        assert_eq!(
            load(&File::open(&p).unwrap()).unwrap(),
            vec![b.clone(), a2.clone()]
        );

        // QEMU loads our bitmaps, records its writes in the enabled one and stores them again.
        if have("qemu-io") {
            run(Command::new("qemu-io").args(["-c", "write 64M 4k", p.to_str().unwrap()]));
            assert_clean(&p);
            let mut a3 = a2.clone();
            a3.set_dirty(1024);
            assert_eq!(load(&File::open(&p).unwrap()).unwrap(), vec![b, a3]);
        }

        // QEMU can remove a bitmap we wrote.
        qemu_img(&["bitmap", "--remove", p.to_str().unwrap(), "beta"]);
        assert_clean(&p);
        assert_eq!(info_bitmaps(&p).len(), 1);

        // Storing nothing removes the extension and frees everything.
        store(&open_rw(&p), &[]).unwrap();
        assert_clean(&p);
        assert!(info_bitmaps(&p).is_empty());
        assert!(load(&File::open(&p).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn mark_in_use_as_qemu() {
        if !tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "u.qcow2", "10M", "");
        let ps = p.to_str().unwrap();
        qemu_img(&["bitmap", "--add", ps, "b0"]);
        qemu_img(&["bitmap", "--add", "--disable", ps, "b1"]);
        mark_in_use(&open_rw(&p)).unwrap();
        assert_eq!(
            info_bitmaps(&p),
            vec![
                ("b0".into(), 65536, vec!["in-use".into(), "auto".into()]),
                ("b1".into(), 65536, vec!["in-use".into()]),
            ]
        );
        // qemu-img check accepts in-use bitmaps (their refcounts are right).
        assert_clean(&p);
        let bms = load(&File::open(&p).unwrap()).unwrap();
        assert!(bms.iter().all(|b| b.inconsistent));
        // Marking twice is a no-op; storing clears the flag (inconsistent ones stay in use).
        mark_in_use(&open_rw(&p)).unwrap();
        let mut fixed = bms.clone();
        fixed[0].inconsistent = false;
        store(&open_rw(&p), &fixed).unwrap();
        assert_clean(&p);
        assert_eq!(
            info_bitmaps(&p),
            vec![
                ("b0".into(), 65536, vec!["auto".into()]),
                ("b1".into(), 65536, vec!["in-use".into()]),
            ]
        );
        // QEMU itself refuses to use an in-use bitmap, as for its own.
        let out = Command::new("qemu-img")
            .args(["bitmap", "--clear", ps, "b1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("inconsistent"));
    }

    #[test]
    fn store_with_backing_file_and_other_refcount_widths() {
        if !tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = create(dir.path(), "base.qcow2", "4M", "");
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            let name = format!("o{bits}.qcow2");
            let opts = format!(
                "refcount_bits={bits},cluster_size=4096,backing_file={},backing_fmt=qcow2",
                base.display()
            );
            let p = create(dir.path(), &name, "4M", &opts);
            let size = 4 << 20;
            let mut bm = StoredBitmap::new("x", size, 512, true);
            for c in (0..8192).step_by(3) {
                bm.set_dirty(c);
            }
            store(&open_rw(&p), std::slice::from_ref(&bm)).unwrap();
            assert_clean(&p);
            store(&open_rw(&p), std::slice::from_ref(&bm)).unwrap();
            assert_clean(&p);
            let info: serde_json::Value =
                serde_json::from_str(&qemu_img(&["info", "--output=json", p.to_str().unwrap()]))
                    .unwrap();
            assert_eq!(info["backing-filename"].as_str(), base.to_str());
            assert_eq!(info["backing-filename-format"].as_str(), Some("qcow2"));
            assert_eq!(info["format-specific"]["data"]["refcount-bits"], bits);
            assert_eq!(load(&File::open(&p).unwrap()).unwrap(), vec![bm]);
        }
    }

    #[test]
    fn store_grows_refcount_blocks() {
        if !tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters,
        // so the bitmaps need several new refcount blocks.
        let p = create(
            dir.path(),
            "g.qcow2",
            "64M",
            "cluster_size=512,refcount_bits=64",
        );
        let size = 64 << 20;
        let bms: Vec<StoredBitmap> = (0..4)
            .map(|i| {
                let mut bm = StoredBitmap::new(format!("bm{i}"), size, 512, i % 2 == 0);
                bm.bits
                    .iter_mut()
                    .for_each(|w| *w = 0x0123_4567_89ab_cdef ^ i);
                bm
            })
            .collect();
        store(&open_rw(&p), &bms).unwrap();
        assert_clean(&p);
        assert_eq!(load(&File::open(&p).unwrap()).unwrap(), bms);
        store(&open_rw(&p), &bms[1..]).unwrap();
        assert_clean(&p);
        assert_eq!(load(&File::open(&p).unwrap()).unwrap(), bms[1..]);
    }

    #[test]
    fn refcount_table_full_is_a_clear_error() {
        if !tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 512-byte clusters with 64-bit refcounts: the one-cluster refcount table covers
        // 64 blocks of 64 clusters = 2 MiB of file; the bitmap needs far more.
        let p = create(
            dir.path(),
            "f.qcow2",
            "8G",
            "cluster_size=512,refcount_bits=64",
        );
        let mut bm = StoredBitmap::new("big", 8 << 30, 512, true);
        bm.bits.iter_mut().for_each(|w| *w = !0);
        let before = std::fs::read(&p).unwrap();
        let err = store(&open_rw(&p), &[bm]).unwrap_err();
        assert!(matches!(err, BitmapError::RefcountTableFull(_)), "{err}");
        // The header is untouched and the image still checks clean.
        let after = std::fs::read(&p).unwrap();
        assert_eq!(before[..512], after[..512]);
        assert_eq!(check(&p).0, 0);
        assert!(info_bitmaps(&p).is_empty());
    }

    #[test]
    fn stale_extension_is_ignored_and_dropped() {
        if !tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "st.qcow2", "10M", "");
        qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "old"]);
        // Clear the autoclear bit, as a program unaware of bitmaps would.
        let f = open_rw(&p);
        f.write_all_at(&0u64.to_be_bytes(), AUTOCLEAR_OFFSET)
            .unwrap();
        assert!(load(&f).unwrap().is_empty());
        let bm = StoredBitmap::new("new", 10 << 20, 65536, true);
        store(&f, std::slice::from_ref(&bm)).unwrap();
        drop(f);
        // The old clusters leak (as with QEMU), nothing is corrupt.
        let (corruptions, _leaks, errors) = check(&p);
        assert_eq!((corruptions, errors), (0, 0));
        assert_eq!(
            info_bitmaps(&p),
            vec![("new".into(), 65536, vec!["auto".into()])]
        );
    }

    #[test]
    fn invalid_input_writes_nothing() {
        if !tools(&["qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "i.qcow2", "10M", "");
        let before = std::fs::read(&p).unwrap();
        let ok = StoredBitmap::new("a", 10 << 20, 65536, true);
        let cases = [
            vec![ok.clone(), ok.clone()],
            vec![StoredBitmap::new("a", 5 << 20, 65536, true)],
            vec![StoredBitmap::new("a", 10 << 20, 256, true)],
            vec![StoredBitmap {
                bits: vec![],
                ..ok.clone()
            }],
            vec![StoredBitmap::new("", 10 << 20, 65536, true)],
        ];
        for c in cases {
            assert!(store(&open_rw(&p), &c).is_err(), "{c:?}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), before);
        let v2 = create(dir.path(), "v2.qcow2", "10M", "compat=0.10");
        assert!(load(&File::open(&v2).unwrap()).unwrap().is_empty());
        assert!(matches!(
            store(&open_rw(&v2), &[ok]),
            Err(BitmapError::Version2)
        ));
        store(&open_rw(&v2), &[]).unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            load(&File::open(&raw).unwrap()),
            Err(BitmapError::NotQcow2)
        ));
    }

    /// Clears every autoclear bit, as imago 0.2.6 does when it opens an image writable.
    fn clear_autoclear_like_imago(p: &Path) {
        open_rw(p)
            .write_all_at(&0u64.to_be_bytes(), AUTOCLEAR_OFFSET)
            .unwrap();
    }

    #[test]
    fn layout_lets_store_free_what_imago_made_stale() {
        if !tools(&["qemu-img", "qemu-io"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let size = 10 << 20;
        let mk = |name: &str| {
            let p = create(dir.path(), name, "10M", "");
            let ps = p.to_str().unwrap();
            qemu_img(&["bitmap", "--add", ps, "b0"]);
            run(Command::new("qemu-io").args(["-c", "write 0 1M", ps]));
            p
        };
        let mut next = StoredBitmap::new("b0", size, 65536, true);
        next.set_dirty(3);

        // Without the layout, the stale extension's clusters must leak (never be freed).
        let p = mk("no-layout.qcow2");
        mark_in_use(&open_rw(&p)).unwrap();
        clear_autoclear_like_imago(&p);
        store(&open_rw(&p), std::slice::from_ref(&next)).unwrap();
        let (corruptions, leaks, errors) = check(&p);
        assert_eq!((corruptions, errors), (0, 0));
        assert!(leaks > 0, "the old bitmap's clusters are leaked");

        // With it, they are freed: no leaks.
        let p = mk("layout.qcow2");
        let layout = mark_in_use(&open_rw(&p))
            .unwrap()
            .expect("a bitmap to mark");
        clear_autoclear_like_imago(&p);
        store_replacing(&open_rw(&p), std::slice::from_ref(&next), Some(&layout)).unwrap();
        assert_clean(&p);
        assert_eq!(load(&File::open(&p).unwrap()).unwrap(), vec![next.clone()]);

        // A layout that no longer matches (the directory changed) frees nothing.
        let p = mk("changed.qcow2");
        let layout = mark_in_use(&open_rw(&p)).unwrap().unwrap();
        qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "other"]);
        clear_autoclear_like_imago(&p);
        store_replacing(&open_rw(&p), std::slice::from_ref(&next), Some(&layout)).unwrap();
        let (corruptions, leaks, errors) = check(&p);
        assert_eq!((corruptions, errors), (0, 0));
        assert!(leaks > 0);

        // restore_autoclear_bit makes the in-use bitmaps count again: after a "crash" here,
        // QEMU sees them as in use and no cluster is leaked.
        let p = mk("restored.qcow2");
        let layout = mark_in_use(&open_rw(&p)).unwrap().unwrap();
        clear_autoclear_like_imago(&p);
        assert!(
            info_bitmaps(&p).is_empty(),
            "QEMU ignores a stale extension"
        );
        assert!(restore_autoclear_bit(&open_rw(&p), &layout).unwrap());
        assert!(!restore_autoclear_bit(&open_rw(&p), &layout).unwrap());
        assert_eq!(
            info_bitmaps(&p),
            vec![("b0".into(), 65536, vec!["in-use".into(), "auto".into()])]
        );
        assert_clean(&p);
    }

    /// The whole contract with the real imago: open, write through imago, close, store.
    #[cfg(feature = "qcow2")]
    #[test]
    fn session_with_imago() {
        if !tools(&["qemu-img", "qemu-io"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = create(dir.path(), "im.qcow2", "10M", "");
        let ps = p.to_str().unwrap();
        qemu_img(&["bitmap", "--add", ps, "b0"]);
        qemu_img(&["bitmap", "--add", "--disable", ps, "b1"]);
        run(Command::new("qemu-io").args(["-c", "write 0 64k", ps]));

        let file = open_rw(&p);
        let mut bitmaps = load(&file).unwrap();
        assert!(bitmaps[0].is_dirty(0));
        let layout = mark_in_use(&file).unwrap().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut q = imago::qcow2::Qcow2::<imago::file::File>::open_path(&p, true)
                .await
                .unwrap();
            q.open_implicit_dependencies().await.unwrap();
            let q = imago::FormatAccess::new(q);
            // imago cleared the autoclear bits on its writable open.
            let mut autoclear = [0u8; 8];
            file.read_exact_at(&mut autoclear, AUTOCLEAR_OFFSET)
                .unwrap();
            assert_eq!(u64::from_be_bytes(autoclear), 0);
            assert!(restore_autoclear_bit(&file, &layout).unwrap());
            // A write, recorded in the enabled bitmap as a node would.
            let buf = vec![0xa5u8; 4096];
            q.write(&buf[..], 5 << 20).await.unwrap();
            bitmaps[0].set_dirty((5 << 20) / 65536);
            q.flush().await.unwrap();
            // Mid-session, QEMU sees in-use bitmaps and a consistent image.
            assert_eq!(
                info_bitmaps(&p),
                vec![
                    ("b0".into(), 65536, vec!["in-use".into(), "auto".into()]),
                    ("b1".into(), 65536, vec!["in-use".into()]),
                ]
            );
            assert_clean(&p);
            drop(q);
        });
        store_replacing(&file, &bitmaps, Some(&layout)).unwrap();
        drop(file);
        assert_clean(&p);
        assert_eq!(load(&File::open(&p).unwrap()).unwrap(), bitmaps);
        assert_eq!(
            info_bitmaps(&p),
            vec![
                ("b0".into(), 65536, vec!["auto".into()]),
                ("b1".into(), 65536, vec![]),
            ]
        );
        // The data imago wrote is intact.
        run(Command::new("qemu-io").args(["-c", "read -P 0xa5 5M 4k", ps]));
    }

    /// The image file of a process that dies after `budget` more writes and syncs: every
    /// later write or sync fails and changes nothing.
    struct Crashing {
        file: File,
        budget: std::cell::Cell<u32>,
    }

    impl Crashing {
        fn new(p: &Path, budget: u32) -> Self {
            Crashing {
                file: open_rw(p),
                budget: std::cell::Cell::new(budget),
            }
        }

        fn spend(&self) -> io::Result<()> {
            match self.budget.get() {
                0 => Err(io::Error::other("injected crash")),
                n => {
                    self.budget.set(n - 1);
                    Ok(())
                }
            }
        }
    }

    impl ImageFile for Crashing {
        fn image_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }

        fn image_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.spend()?;
            self.file.write_all_at(buf, offset)
        }

        fn image_sync(&self) -> io::Result<()> {
            self.spend()?;
            self.file.sync_data()
        }
    }

    #[test]
    fn a_crash_at_any_step_leaves_a_consistent_image() {
        if !tools(&["qemu-img", "qemu-io"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // 512-byte clusters with 64-bit refcounts: storing needs new refcount blocks too.
        let base = create(
            dir.path(),
            "base.qcow2",
            "4M",
            "cluster_size=512,refcount_bits=64",
        );
        let bs = base.to_str().unwrap();
        qemu_img(&["bitmap", "--add", "--granularity", "512", bs, "old"]);
        run(Command::new("qemu-io").args(["-c", "write 0 1M", bs]));
        let old = load(&File::open(&base).unwrap()).unwrap();
        assert!(old[0].is_dirty(0));
        let size = 4 << 20;
        let new: Vec<StoredBitmap> = (0..3u64)
            .map(|i| {
                let mut bm = StoredBitmap::new(format!("n{i}"), size, 512, i != 1);
                bm.bits
                    .iter_mut()
                    .enumerate()
                    .for_each(|(k, w)| *w = (k as u64 + i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                bm
            })
            .collect();
        let work = dir.path().join("work.qcow2");

        let mut steps = 0;
        loop {
            std::fs::copy(&base, &work).unwrap();
            let r = store(&Crashing::new(&work, steps), &new);
            let (corruptions, _leaks, errors) = check(&work);
            assert_eq!((corruptions, errors), (0, 0), "crash after {steps} steps");
            let now = load(&File::open(&work).unwrap()).unwrap();
            assert!(
                now == old || now == new,
                "crash after {steps} steps: {now:?}"
            );
            if r.is_ok() {
                assert_eq!(now, new);
                assert_clean(&work);
                break;
            }
            steps += 1;
            assert!(steps < 1000, "store never completes");
        }
        assert!(
            steps > 5,
            "the crash points cover the whole store ({steps})"
        );

        // mark_in_use: the bitmaps are consistent, in use, or (autoclear bit clear) ignored.
        let mut in_use = old.clone();
        in_use[0].inconsistent = true;
        in_use[0].bits.iter_mut().for_each(|w| *w = 0);
        for steps in 0.. {
            std::fs::copy(&base, &work).unwrap();
            let r = mark_in_use(&Crashing::new(&work, steps));
            assert_eq!(check(&work).0, 0, "crash after {steps} steps");
            let now = load(&File::open(&work).unwrap()).unwrap();
            assert!(
                now == old || now == in_use || now.is_empty(),
                "crash after {steps} steps: {now:?}"
            );
            if r.is_ok() {
                assert_eq!(now, in_use);
                break;
            }
        }
    }

    #[test]
    fn bitmaps_extension_fixtures() {
        #[rustfmt::skip]
        let ext = [
            0, 0, 0, 2,             // nb_bitmaps
            0, 0, 0, 0,             // reserved
            0, 0, 0, 0, 0, 0, 0, 64, // bitmap_directory_size
            0, 0, 0, 0, 0, 3, 0, 0, // bitmap_directory_offset
        ];
        let valid = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 64,
            directory_offset: 0x30000,
        };
        assert_eq!(
            parse_bitmaps_ext(&ext, AUTOCLEAR_BITMAPS, 65536).unwrap(),
            BitmapsState::Valid(valid)
        );
        assert_eq!(valid.encode(), ext);
        // Autoclear bit clear: stale, whatever it says.
        let mut reserved = ext;
        reserved[7] = 1;
        assert_eq!(
            parse_bitmaps_ext(&reserved, 0, 65536).unwrap(),
            BitmapsState::Stale(valid)
        );
        assert!(parse_bitmaps_ext(&reserved, AUTOCLEAR_BITMAPS, 65536).is_err());
        assert!(parse_bitmaps_ext(&ext[..16], AUTOCLEAR_BITMAPS, 65536).is_err());
        let mut zero = ext;
        zero[3] = 0;
        assert!(parse_bitmaps_ext(&zero, AUTOCLEAR_BITMAPS, 65536).is_err());
        // Unaligned directory, and a directory over QEMU's limit.
        assert!(parse_bitmaps_ext(&ext, AUTOCLEAR_BITMAPS, 1 << 20).is_err());
        let mut big = ext;
        big[8..16].copy_from_slice(&(MAX_DIRECTORY_SIZE + 1).to_be_bytes());
        assert!(parse_bitmaps_ext(&big, AUTOCLEAR_BITMAPS, 65536).is_err());
    }

    #[test]
    fn header_rewrite_keeps_extensions_and_moves_the_backing_name() {
        let mut raw = vec![0u8; 104];
        raw[0..4].copy_from_slice(&QCOW_MAGIC.to_be_bytes());
        let h = Header {
            version: 3,
            cluster_size: 512,
            size: 1 << 20,
            backing_file_offset: 200,
            backing_file_size: 4,
            refcount_table_offset: 512,
            refcount_table_clusters: 1,
            incompatible: 0,
            autoclear: 0,
            refcount_order: 4,
            raw,
            extensions: vec![RawExt {
                magic: 0xe279_2aca,
                data: b"qcow2".to_vec(),
            }],
            bitmaps_slot: None,
            bitmaps: BitmapsState::Absent,
            backing_name: Some(b"base".to_vec()),
        };
        let ext = BitmapsExt {
            nb_bitmaps: 1,
            directory_size: 32,
            directory_offset: 4096,
        };
        let out = h.encode(Some(ext), AUTOCLEAR_BITMAPS).unwrap();
        assert_eq!(out.len(), 512);
        assert_eq!(be64(&out, 88), AUTOCLEAR_BITMAPS);
        // 104: backing format ext (8 + 5, padded to 16); 120: bitmaps ext (8 + 24);
        // 152: end marker; 160: backing name.
        assert_eq!(be32(&out, 104), 0xe279_2aca);
        assert_eq!(&out[112..117], b"qcow2");
        assert_eq!(be32(&out, 120), EXT_BITMAPS);
        assert_eq!(out[128..152], ext.encode());
        assert_eq!(be64(&out, 152), 0);
        assert_eq!(be64(&out, 8), 160);
        assert_eq!(&out[160..164], b"base");
        assert!(out[164..].iter().all(|&b| b == 0));

        // A backing name that leaves no room for the extension.
        let mut long = h.clone();
        long.backing_name = Some(vec![b'x'; 380]);
        long.backing_file_size = 380;
        assert!(long.encode(None, 0).is_ok());
        assert!(matches!(
            long.encode(Some(ext), AUTOCLEAR_BITMAPS),
            Err(BitmapError::HeaderFull { .. })
        ));
    }

    #[test]
    fn store_keeps_an_external_data_file() {
        if !tools(&["qemu-img", "qemu-io"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.raw");
        let p = create(
            dir.path(),
            "d.qcow2",
            "8M",
            &format!("data_file={}", data.display()),
        );
        let ps = p.to_str().unwrap();
        run(Command::new("qemu-io").args(["-c", "write -P 0x5a 1M 64k", ps]));
        let mut bm = StoredBitmap::new("d", 8 << 20, 65536, true);
        bm.set_dirty(16);
        store(&open_rw(&p), std::slice::from_ref(&bm)).unwrap();
        assert_clean(&p);
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", ps])).unwrap();
        assert_eq!(
            info["format-specific"]["data"]["data-file"].as_str(),
            data.to_str()
        );
        run(Command::new("qemu-io").args(["-c", "read -P 0x5a 1M 64k", ps]));
        assert_eq!(load(&File::open(&p).unwrap()).unwrap(), vec![bm]);
    }

    /// An image in memory, at most 64 MiB (so that a corrupted offset cannot exhaust memory).
    struct MemImage(std::cell::RefCell<Vec<u8>>);

    impl ImageFile for MemImage {
        fn image_read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let data = self.0.borrow();
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| data.get(start..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn image_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let end = offset.saturating_add(buf.len() as u64);
            if end > 64 << 20 {
                return Err(io::Error::other("beyond the test's limit"));
            }
            let mut data = self.0.borrow_mut();
            if data.len() < end as usize {
                data.resize(end as usize, 0);
            }
            data[offset as usize..end as usize].copy_from_slice(buf);
            Ok(())
        }

        fn image_sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// A small image with two bitmaps (one with data), made by qemu-img and this module.
        fn sample() -> Option<&'static [u8]> {
            static SAMPLE: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
            SAMPLE
                .get_or_init(|| {
                    if !have("qemu-img") {
                        return None;
                    }
                    let dir = tempfile::tempdir().unwrap();
                    let p = create(dir.path(), "f.qcow2", "1M", "cluster_size=512");
                    let mut a = StoredBitmap::new("a", 1 << 20, 512, true);
                    (0..2048).step_by(5).for_each(|c| a.set_dirty(c));
                    let b = StoredBitmap::new("b", 1 << 20, 4096, false);
                    store(&open_rw(&p), &[a, b]).unwrap();
                    Some(std::fs::read(&p).unwrap())
                })
                .as_deref()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
            /// Corrupted images are refused or read, never a panic or a runaway allocation.
            #[test]
            fn corrupted_images_never_panic(
                flips in proptest::collection::vec((0usize..8192, any::<u8>()), 1..8),
            ) {
                let Some(sample) = sample() else {
                    return Ok(());
                };
                let mut bytes = sample.to_vec();
                for (at, v) in flips {
                    if let Some(b) = bytes.get_mut(at) {
                        *b = v;
                    }
                }
                let img = MemImage(std::cell::RefCell::new(bytes));
                if let Ok(bitmaps) = load(&img) {
                    for b in &bitmaps {
                        prop_assert_eq!(b.bits.len(), StoredBitmap::words(b.size, b.granularity));
                    }
                    let _ = mark_in_use(&img);
                    let _ = store(&img, &bitmaps);
                }
            }
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// Granularity bits, enabled, inconsistent, pattern seed.
        fn shape() -> impl Strategy<Value = (u32, bool, bool, u64)> {
            (9u32..=20, any::<bool>(), any::<bool>(), any::<u64>())
        }

        /// A bitmap of the given shape with a pseudo-random pattern (sparse to dense).
        fn make(
            i: usize,
            size: u64,
            (gbits, enabled, inconsistent, seed): (u32, bool, bool, u64),
        ) -> StoredBitmap {
            let mut bm = StoredBitmap::new(format!("bm-{i}-\u{e9}"), size, 1 << gbits, enabled);
            bm.inconsistent = inconsistent;
            if !inconsistent {
                let mut x = seed | 1;
                let density = seed % 5;
                for c in 0..bm.chunks() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x % 8 < density * 2 {
                        bm.set_dirty(c);
                    }
                }
            }
            bm
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            #[test]
            fn store_load_round_trip(
                size_kib in 1u64..40_000,
                cluster_bits in 9u32..=16,
                shapes in proptest::collection::vec(shape(), 0..4),
            ) {
                if !have("qemu-img") {
                    return Ok(());
                }
                let size = size_kib * 1024;
                let dir = tempfile::tempdir().unwrap();
                let p = create(
                    dir.path(),
                    "p.qcow2",
                    &size.to_string(),
                    &format!("cluster_size={}", 1u32 << cluster_bits),
                );
                let bms: Vec<StoredBitmap> =
                    shapes.into_iter().enumerate().map(|(i, s)| make(i, size, s)).collect();
                store(&open_rw(&p), &bms).unwrap();
                prop_assert_eq!(load(&File::open(&p).unwrap()).unwrap(), bms.clone());
                prop_assert_eq!(check(&p), (0, 0, 0));
                // And again, replacing.
                let rest: Vec<StoredBitmap> = bms.iter().skip(1).cloned().collect();
                store(&open_rw(&p), &rest).unwrap();
                prop_assert_eq!(load(&File::open(&p).unwrap()).unwrap(), rest);
                prop_assert_eq!(check(&p), (0, 0, 0));
            }
        }
    }
}
