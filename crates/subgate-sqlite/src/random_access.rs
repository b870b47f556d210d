//! Tells the kernel that the database file is read at random places.
//!
//! Where a read misses the kernel's page cache and the pages before it are cached, Linux takes
//! the cached pages for the trace of a sequential reader and reads ahead about as many pages
//! as it found, up to the disk's `read_ahead_kb` (8 MiB on the benchmark's virtio disks). A
//! SQLite file that the machine paged out here and there is just that: a b-tree page that a
//! point read missed brought a run of its neighbours along, which the read waited for and the
//! kernel spent CPU on, and which no read was about to need (session 32: half the bytes read
//! from the disk at a million profiles). `POSIX_FADV_RANDOM` makes a miss read only the
//! pages asked for. It is a property of an open file description, so each connection's
//! descriptor of the database file gets it.
//!
//! SQLite keeps its descriptors to itself; they are found in `/proc/self/fd` by the file they
//! name. The runtime's reads are all point reads; the rare scans (migrations) only lose the
//! kernel's read ahead.

use std::path::Path;

/// Advises random access on every descriptor this process has open on `database`, and
/// answers how many took the advice. A failure is only logged: the advice changes how a miss
/// is served, never what a read returns.
#[cfg(target_os = "linux")]
pub fn advise(database: &Path) -> usize {
    let Ok(database) = database.canonicalize() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut advised = 0;
    for entry in entries.flatten() {
        // The listing's own descriptor names a directory, never the database.
        if std::fs::read_link(entry.path()).ok().as_deref() != Some(database.as_path()) {
            continue;
        }
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: posix_fadvise only reads its integer arguments. A descriptor closed since
        // the listing makes it fail with EBADF; one reopened on another file in between gets
        // advice that changes only how its misses are read.
        match unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM) } {
            0 => advised += 1,
            error => tracing::debug!(fd, error, "posix_fadvise(RANDOM) failed"),
        }
    }
    advised
}

#[cfg(not(target_os = "linux"))]
pub fn advise(_database: &Path) -> usize {
    0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    const PAGE: usize = 4096;

    #[test]
    fn every_descriptor_of_the_file_and_no_other_is_advised() {
        let dir = tempfile::tempdir().unwrap();
        let (database, other) = (dir.path().join("a.db"), dir.path().join("b.db"));
        std::fs::write(&database, b"x").unwrap();
        std::fs::write(&other, b"x").unwrap();
        let _first = File::open(&database).unwrap();
        let _second = File::open(&database).unwrap();
        let _unrelated = File::open(&other).unwrap();
        assert_eq!(advise(&database), 2);
        // Through another spelling of the same path too.
        let dotted = dir.path().join(".").join("a.db");
        assert_eq!(advise(&dotted), 2);
        assert_eq!(advise(&dir.path().join("missing.db")), 0);
    }

    /// Blocks (512 bytes) this thread had read from the disk so far.
    fn blocks_read() -> i64 {
        crate::read_ahead::blocks_read_by_this_thread().expect("getrusage on Linux")
    }

    /// Reads the page right after a cached run, from a file otherwise out of the page cache,
    /// and answers the blocks that read cost, or `None` where the file system reads no blocks
    /// (tmpfs).
    fn miss_after_cached_run(advised: bool) -> Option<i64> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages.db");
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![1u8; 512 * PAGE]).unwrap();
        file.sync_all().unwrap();
        // Clean pages leave the page cache when asked.
        // SAFETY: plain integer arguments on an open descriptor.
        assert_eq!(
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) },
            0
        );
        // The run is cached through a descriptor that reads only what it asks for, so that
        // nothing past it comes along.
        let warming = File::open(&path).unwrap();
        assert_eq!(advise(&path), 2);
        let mut page = vec![0u8; PAGE];
        for index in 0..64 {
            warming
                .read_exact_at(&mut page, (index * PAGE) as u64)
                .unwrap();
        }
        let reading = File::open(&path).unwrap();
        if advised {
            assert_eq!(advise(&path), 3);
        }
        let before = blocks_read();
        reading
            .read_exact_at(&mut page, (64 * PAGE) as u64)
            .unwrap();
        let read = blocks_read() - before;
        (before > 0).then_some(read)
    }

    /// The kernel's behaviour this module exists for, and the advice's effect on it.
    #[test]
    fn an_advised_miss_reads_only_its_page() {
        let Some(advised) = miss_after_cached_run(true) else {
            return;
        };
        assert_eq!(advised, (PAGE / 512) as i64, "one page, in 512-byte blocks");
        if let Some(unadvised) = miss_after_cached_run(false) {
            assert!(unadvised > advised, "{unadvised} blocks without the advice");
        }
    }
}
