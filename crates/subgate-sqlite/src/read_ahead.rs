//! When reading a write's index pages ahead of it pays (see `SqliteStore::prefetch_for_write`).
//!
//! Reading them ahead spares the single writer a wait for the disk, but where they are in the
//! kernel's page cache already it only costs: a reader connection starts every read with an
//! empty page cache while the writer commits (SQLite drops it whenever the log changed), so each
//! read ahead walks the index from its root through `pread`s. At a million profiles on a warm
//! file that was about a sixth of the server's CPU per grant (ADR 0011). So once
//! [`WARM_STREAK`] read aheads in a row found every page in memory, only one write in
//! [`PROBE_EVERY`] reads ahead; one that goes to the disk makes every write read ahead again.

use std::sync::atomic::{AtomicU32, Ordering};

/// While read aheads find their pages in memory, one write in this many reads ahead.
pub const PROBE_EVERY: u32 = 64;
/// Read aheads in a row that must find every page in memory before writes skip theirs: where
/// the disk serves some of them, skipping would leave the writer to wait for those pages.
pub const WARM_STREAK: u32 = 8;

#[derive(Default)]
pub struct IndexReadAhead {
    /// Writes left to skip before the next read ahead.
    skip: AtomicU32,
    /// Read aheads in a row that read nothing from the disk.
    warm: AtomicU32,
}

impl IndexReadAhead {
    /// Whether this write should read its index pages ahead.
    pub fn due(&self) -> bool {
        self.skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_err()
    }

    /// Runs a read ahead and learns from it whether the next writes should skip theirs. Where
    /// the disk's part cannot be told, every write reads ahead.
    pub fn run<T>(&self, read: impl FnOnce() -> T) -> T {
        let before = blocks_read_by_this_thread();
        let result = read();
        let from_memory = before
            .zip(blocks_read_by_this_thread())
            .is_some_and(|(before, after)| after == before);
        if from_memory {
            if self.warm.fetch_add(1, Ordering::Relaxed) + 1 >= WARM_STREAK {
                self.skip.store(PROBE_EVERY - 1, Ordering::Relaxed);
            }
        } else {
            self.warm.store(0, Ordering::Relaxed);
            self.skip.store(0, Ordering::Relaxed);
        }
        result
    }
}

/// Blocks this thread has asked the disk for so far (the kernel counts what reads submitted,
/// so a read served by the page cache adds nothing).
#[cfg(target_os = "linux")]
pub(crate) fn blocks_read_by_this_thread() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage it is given a pointer to; it is read only on success.
    let filled = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) } == 0;
    // SAFETY: filled by the successful call above (and zeroed before it).
    filled.then(|| unsafe { usage.assume_init() }.ru_inblock)
}

/// Elsewhere the count is unknown: every write reads ahead.
#[cfg(not(target_os = "linux"))]
pub(crate) fn blocks_read_by_this_thread() -> Option<i64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Reads `n` writes' turns: how many of them read ahead (each reading from memory).
    fn read_ahead_of(ahead: &IndexReadAhead, n: u32) -> u32 {
        let mut read = 0;
        for _ in 0..n {
            if ahead.due() {
                ahead.run(|| ());
                read += 1;
            }
        }
        read
    }

    #[test]
    fn a_streak_of_reads_from_memory_leaves_one_write_in_so_many_to_read_ahead() {
        let ahead = IndexReadAhead::default();
        assert_eq!(read_ahead_of(&ahead, WARM_STREAK), WARM_STREAK);
        assert_eq!(read_ahead_of(&ahead, PROBE_EVERY - 1), 0);
        assert_eq!(read_ahead_of(&ahead, 3 * PROBE_EVERY), 3);
    }

    /// A read that the page cache cannot serve (the file is opened with O_DIRECT, which
    /// bypasses it) keeps every write reading ahead.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_read_from_the_disk_keeps_reading_ahead() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        std::fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        // Some file systems (tmpfs) refuse O_DIRECT: nothing then reaches the disk to count.
        let Ok(mut file) = direct else { return };
        let ahead = IndexReadAhead::default();
        read_ahead_of(&ahead, WARM_STREAK);
        assert!(
            !ahead.due(),
            "a streak of reads from memory skips the next write"
        );
        ahead.run(|| {
            // O_DIRECT needs an aligned buffer: a 4 KiB-aligned slice of a larger one.
            let mut buffer = vec![0u8; 3 << 12];
            let offset = buffer.as_ptr().align_offset(4096);
            let read = file.read(&mut buffer[offset..offset + 4096]);
            assert_eq!(read.unwrap(), 4096);
        });
        assert_eq!(
            read_ahead_of(&ahead, WARM_STREAK),
            WARM_STREAK,
            "after a read from the disk every write reads ahead until a new streak"
        );
    }
}
