//! Giving memory back to the system after a burst of work.
//!
//! What kept the daemon large after bursts was glibc's allocator, not our own structures
//! (measured with `malloc_stats` and `malloc_trim` from gdb on a daemon that had served them):
//!
//! - Its dynamic mmap threshold: a freed large block (an NBD read buffer of 4 MiB, a write
//!   payload) raises the threshold to that size, so from then on such blocks come from the
//!   arenas and stay there when freed. 200 NBD clients reading 4 MiB each then closing left
//!   840 MiB resident. [`tune_allocator`] fixes the threshold at 4 MiB: larger blocks are
//!   always mapped and unmapped on free; smaller ones (FUSE and pooled NBD buffers, up to
//!   2 MiB, reused while a client is busy) stay in the arenas.
//! - Small blocks freed in the middle of an arena (100,000 queued QMP replies): glibc only
//!   trims the free space at the top of an arena, and only when a large block is freed.
//!   [`spawn_trimmer`] looks once a second and, when the anonymous resident memory grew by
//!   2 MiB since the last trim while the arenas hold as much free and the memory in use has
//!   stopped moving (the burst is over), calls `malloc_trim(0)`, which releases the free
//!   pages of every arena.
//!
//! Elsewhere than glibc both are no-ops.

use std::time::Duration;

/// Blocks larger than this are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 4 << 20;
/// How often the trimmer looks at the allocator.
pub const TRIM_PERIOD: Duration = Duration::from_secs(1);
/// The trimmer acts on changes of at least this many bytes.
pub const TRIM_STEP: usize = 2 << 20;

/// One look at the process and its allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Anonymous resident memory (the process's resident set less its file pages).
    pub anon: usize,
    /// Bytes in use in the allocator's arenas.
    pub in_use: usize,
    /// Free bytes held by the allocator's arenas (resident or not).
    pub free: usize,
}

/// Decides when to trim, from successive [`Sample`]s (pure; the caller samples and trims).
#[derive(Debug, Default)]
pub struct TrimPolicy {
    /// Anonymous resident memory after the last trim (or its lowest since).
    base: usize,
    /// Memory in use at the last trim (or its highest since).
    in_use_at_trim: usize,
    last_in_use: usize,
}

impl TrimPolicy {
    /// Takes one sample; true when the arenas should be trimmed now: the resident memory
    /// grew by [`TRIM_STEP`] since the last trim, or the memory in use fell by that much
    /// since then (a trim in the middle of a steady burst, e.g. a paced monitor, saw it all
    /// in use), the arenas hold at least that much free, and the memory in use moved less
    /// than that since the previous sample (the burst is over, or at least steady).
    pub fn observe(&mut self, s: Sample) -> bool {
        let settled = s.in_use.abs_diff(self.last_in_use) < TRIM_STEP;
        self.last_in_use = s.in_use;
        self.base = self.base.min(s.anon);
        self.in_use_at_trim = self.in_use_at_trim.max(s.in_use);
        let grew = s.anon >= self.base + TRIM_STEP;
        let freed = self.in_use_at_trim >= s.in_use + TRIM_STEP;
        settled && (grew || freed) && s.free >= TRIM_STEP
    }

    /// Records the process right after a trim.
    pub fn trimmed(&mut self, after: Sample) {
        self.base = after.anon;
        self.in_use_at_trim = after.in_use;
    }
}

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] (which also stops the dynamic raising
/// of the trim threshold). Call it once, early.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let threshold = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; any value is accepted or refused.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) } != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
}

/// Samples the process and its allocator, if this allocator can tell.
fn sample() -> Option<Sample> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // "size resident shared text lib data dt", in pages; shared counts file pages.
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let mut fields = statm.split_whitespace().skip(1);
        let resident: usize = fields.next()?.parse().ok()?;
        let shared: usize = fields.next()?.parse().ok()?;
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
        let info = unsafe { libc::mallinfo2() };
        Some(Sample {
            anon: resident.saturating_sub(shared) * block_core::driver::page_size() as usize,
            in_use: info.uordblks,
            free: info.fordblks,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
        unsafe { libc::malloc_trim(0) };
    }
}

/// Starts the task that trims the allocator's arenas after bursts (see the module docs), on
/// the current tokio runtime. It runs until the runtime ends.
pub fn spawn_trimmer() {
    if sample().is_none() {
        return;
    }
    tokio::spawn(async {
        let mut policy = TrimPolicy::default();
        let mut tick = tokio::time::interval(TRIM_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(s) = sample() else {
                return;
            };
            if policy.observe(s) {
                trim();
                if let Some(after) = sample() {
                    policy.trimmed(after);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;
    /// Half a step.
    const HALF: usize = TRIM_STEP / 2;

    /// A sample, in half steps.
    fn at(anon: usize, in_use: usize, free: usize) -> Sample {
        Sample {
            anon: anon * HALF,
            in_use: in_use * HALF,
            free: free * HALF,
        }
    }

    #[test]
    fn trims_once_a_burst_has_ended() {
        let mut p = TrimPolicy::default();
        p.trimmed(at(1, 0, 0));
        // Growing: not while it grows, nor while the memory is in use.
        assert!(!p.observe(at(10, 9, 0)));
        assert!(!p.observe(at(100, 95, 1)));
        assert!(!p.observe(at(100, 95, 1)));
        // Freed: once it stops falling.
        assert!(!p.observe(at(100, 2, 97)));
        assert!(p.observe(at(100, 2, 97)));
        p.trimmed(at(3, 2, 97));
        // Trimmed: not again while nothing comes back, nor for small swings.
        assert!(!p.observe(at(3, 2, 97)));
        assert!(!p.observe(at(4, 3, 97)));
        assert!(!p.observe(at(4, 2, 97)));
        // The next burst reuses the free memory, then frees it again.
        assert!(!p.observe(at(60, 55, 40)));
        assert!(!p.observe(at(60, 2, 97)));
        assert!(p.observe(at(60, 2, 97)));
        // A trim that could not return much: the base follows.
        p.trimmed(at(50, 2, 97));
        assert!(!p.observe(at(51, 2, 97)));
        assert!(!p.observe(at(20, 2, 97)));
        assert!(p.observe(at(25, 2, 97)));
    }

    #[test]
    fn trims_after_a_steady_burst_that_was_trimmed_at_its_peak() {
        let mut p = TrimPolicy::default();
        p.trimmed(at(1, 0, 0));
        // A burst that holds its memory steady (a paced client): trimmed at the peak, with
        // everything still in use.
        assert!(!p.observe(at(30, 28, 2)));
        assert!(p.observe(at(30, 28, 2)));
        p.trimmed(at(30, 28, 2));
        assert!(!p.observe(at(30, 28, 2)));
        // The client goes: the memory is freed but stays resident, and must be trimmed.
        assert!(!p.observe(at(30, 2, 28)));
        assert!(p.observe(at(30, 2, 28)));
        p.trimmed(at(3, 2, 1));
        assert!(!p.observe(at(3, 2, 1)));
    }

    #[test]
    fn the_allocator_is_tuned_sampled_and_trimmed_without_harm() {
        tune_allocator();
        let v = vec![1u8; 8 * MIB];
        let s = sample();
        drop(v);
        trim();
        if let Some(s) = s {
            assert!(s.anon > 0 && s.in_use > 0, "{s:?}");
        }
    }
}
