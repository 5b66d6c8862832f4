//! The order in which QEMU iterates a `QDict` (its JSON object type).
//!
//! A `QDict` is a hash table of 512 buckets keyed by `tdb_hash()`, and QEMU walks the
//! buckets in order, within a bucket the most recently inserted key first. Where QEMU
//! reports the first of several problems, or prints an object, the order decides what
//! is reported or printed first.

use serde_json::{Map, Value};

/// Number of buckets of QEMU's `QDict` hash table (`QDICT_BUCKET_MAX`).
pub const BUCKETS: u32 = 512;

/// QEMU's `tdb_hash()` (from gdbm via tdb), used by `QDict`.
pub fn tdb_hash(name: &[u8]) -> u32 {
    // strlen() is a size_t; the product is truncated to unsigned int.
    let mut value = 0x238F_13AF_u32.wrapping_mul(name.len() as u32);
    for (i, &c) in name.iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243_u32.wrapping_mul(value).wrapping_add(12345)
}

/// The bucket of `key` in a `QDict`.
pub fn bucket(key: &str) -> u32 {
    tdb_hash(key.as_bytes()) % BUCKETS
}

/// The members of an object in QEMU's iteration order. Within a bucket QEMU shows the
/// last-inserted key first; a `Map` does not know insertion order, so such keys are
/// sorted by name instead.
pub fn order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut v: Vec<_> = map.iter().collect();
    v.sort_by(|a, b| bucket(a.0).cmp(&bucket(b.0)).then_with(|| a.0.cmp(b.0)));
    v
}

/// The keys of an object in QEMU's iteration order (see [`order`]).
pub fn keys(map: &Map<String, Value>) -> impl Iterator<Item = &String> {
    order(map).into_iter().map(|(k, _)| k)
}
