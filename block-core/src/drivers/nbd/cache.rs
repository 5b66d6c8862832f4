//! Ranges known to hold data, so that block status does not cost a round trip each time
//! (QEMU keeps such a cache for protocol nodes: `BdrvBlockStatusCache`).
//!
//! Only data is remembered, never holes or zeroes: another client of the server may write
//! into a hole at any time, and a hole reported where there is data would lose it (a reader
//! would get zeroes), while data reported where there is a hole costs only a transfer of
//! zeroes. So a stale entry is always safe, whatever the order of replies and writes.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// More ranges than this and the cache starts over (a fragmented image asks the server).
const MAX_RANGES: usize = 4096;

/// Disjoint, non-adjacent ranges `start -> end` known to hold data.
#[derive(Debug, Default)]
pub struct DataCache {
    ranges: Mutex<BTreeMap<u64, u64>>,
}

impl DataCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The end of the known data range that holds `offset`, if any.
    pub fn data_end(&self, offset: u64) -> Option<u64> {
        let map = self.lock();
        let (_, &end) = map.range(..=offset).next_back()?;
        (offset < end).then_some(end)
    }

    /// `[start, end)` holds data.
    pub fn insert(&self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        let mut map = self.lock();
        // Merge with every range that overlaps or touches it.
        if let Some((&s, &e)) = map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let touching: Vec<(u64, u64)> = map.range(start..=end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            map.remove(&s);
            end = end.max(e);
        }
        if map.len() >= MAX_RANGES {
            map.clear();
        }
        map.insert(start, end);
    }

    /// `[start, end)` may no longer hold data (discarded, zeroed).
    pub fn forget(&self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut map = self.lock();
        let mut pieces = Vec::new();
        if let Some((&s, &e)) = map.range(..start).next_back() {
            if e > start {
                pieces.push((s, e));
            }
        }
        pieces.extend(map.range(start..end).map(|(&s, &e)| (s, e)));
        for (s, e) in pieces {
            map.remove(&s);
            if s < start {
                map.insert(s, start);
            }
            if e > end {
                map.insert(end, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_split_and_answer() {
        let c = DataCache::default();
        c.insert(100, 200);
        c.insert(300, 400);
        assert_eq!(c.data_end(99), None);
        assert_eq!(c.data_end(100), Some(200));
        assert_eq!(c.data_end(199), Some(200));
        assert_eq!(c.data_end(200), None);
        c.insert(200, 300); // touches both: one range
        assert_eq!(c.data_end(100), Some(400));
        c.insert(50, 120);
        assert_eq!(c.data_end(50), Some(400));
        c.forget(150, 250);
        assert_eq!(c.data_end(100), Some(150));
        assert_eq!(c.data_end(150), None);
        assert_eq!(c.data_end(260), Some(400));
        c.forget(0, 1000);
        assert_eq!(c.data_end(60), None);
        assert_eq!(c.data_end(300), None);
    }

    #[test]
    fn a_model_of_bytes_agrees() {
        // Random inserts and forgets against a byte model.
        let c = DataCache::default();
        let mut model = [false; 512];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = (x % 512) as usize;
            let b = ((x >> 16) % 512) as usize;
            let (s, e) = (a.min(b), a.max(b));
            if x >> 40 & 1 == 0 {
                c.insert(s as u64, e as u64);
                model[s..e].fill(true);
            } else {
                c.forget(s as u64, e as u64);
                model[s..e].fill(false);
            }
            for (i, &data) in model.iter().enumerate() {
                let end = c.data_end(i as u64);
                assert_eq!(end.is_some(), data, "byte {i}");
                if let Some(end) = end {
                    let end = end as usize;
                    assert!(model[i..end].iter().all(|&d| d), "range to {end} from {i}");
                    assert!(end == 512 || !model[end], "ranges are maximal at {end}");
                }
            }
        }
    }
}
