//! The runtime threads' reader connections (one per thread and store), which keep their read
//! transaction open from one point read to the next, across the writer's commits, for as long
//! as the profiles they read were not changed.
//!
//! A read in its own transaction begins by taking the WAL's read locks (`fcntl` on the shared
//! memory file) and checking the WAL's header, and ends by releasing them: in `perf`, 12% of
//! the server's CPU under cached profile reads at 10k. And a connection that begins a read
//! after the WAL changed drops its whole page cache, so under writes every read fetched the
//! table's root and interior pages again. A read in a transaction that is still open skips
//! all of that.
//!
//! A snapshot is kept only while it is current for what is read: the writer counts its
//! commits and notes the profiles each one changed ([`InlineReaders::committed`], before any
//! answer goes out). A read in a snapshot older than the count keeps its result only when the
//! one profile it depends on was not changed since the snapshot began; otherwise it ends the
//! snapshot and reads again in a new one. A client therefore reads its own writes, and every
//! write another client saw answered, as with a transaction per read.
//!
//! An open snapshot also holds the WAL: a checkpoint cannot copy frames a snapshot does not
//! see, and a rewind waits for every reader to leave the log. So the checkpoint thread ends
//! the stale snapshots before each checkpoint ([`InlineReaders::end_stale`]), the rewinds run
//! inside [`InlineReaders::without_snapshots`], during which every read ends its transaction,
//! and a closing store closes the connections ([`InlineReaders::close`]) before its last
//! checkpoint.
//!
//! Only the file's owner keeps snapshots: a store opened beside its owner, for reading, sees
//! no count of the owner's commits, so each of its reads is its own transaction.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;
use subgate_core::store::StoreError;
use uuid::Uuid;

use crate::{store_closing, unavailable};

/// What a read's result depends on, which says how old a snapshot may answer it.
pub(crate) enum Depends {
    /// Nothing a commit could make wrong (reading pages ahead of a write).
    Nothing,
    /// This profile's row and nothing else (a profile read by its id or customer user id).
    Profile(Uuid),
    /// Anything: only a snapshot that has every commit will do (a profile not found).
    Everything,
}

/// One thread's connection, shared with the store so that other threads can end its snapshot.
pub(crate) struct InlineReader {
    /// `None` once the store closed.
    conn: Option<Connection>,
    /// While a snapshot is open: the commit count read before it began, so it holds every
    /// commit up to that count.
    snapshot_at: Option<u64>,
}

pub(crate) type SharedReader = Arc<Mutex<InlineReader>>;

/// Slots of the table of the commits that last changed the profiles hashing to them; a
/// profile sharing a slot with one changed since a snapshot only makes a read start a new one.
/// 512 KiB.
const CHANGED_SLOTS: usize = 1 << 16;

pub(crate) struct InlineReaders {
    keep_snapshots: bool,
    commits: AtomicU64,
    /// For each slot, the count of the last commit that changed a profile hashing to it.
    changed: Box<[AtomicU64]>,
    /// The count of the last commit that may have changed any profile (a bulk import).
    all_changed: AtomicU64,
    /// Set while the WAL is rewound or truncated: each read ends its transaction.
    draining: AtomicBool,
    all: Mutex<Vec<SharedReader>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a read leaves the connection usable: SQLite has no half-done state to fear.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `BEGIN` or `COMMIT`, prepared once per connection.
fn run(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(drop)
        .map_err(unavailable)
}

/// Ends the open read transaction, if any.
fn end_snapshot(conn: &Connection) -> Result<(), StoreError> {
    if conn.is_autocommit() {
        return Ok(());
    }
    run(conn, "COMMIT")
}

fn slot(id: Uuid) -> usize {
    let (high, low) = id.as_u64_pair();
    let hash = (high ^ low.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // The top bits, which the multiplication mixed best.
    (hash >> (64 - CHANGED_SLOTS.trailing_zeros())) as usize
}

impl InlineReader {
    fn end_snapshot(&mut self) -> Result<(), StoreError> {
        self.snapshot_at = None;
        self.conn.as_ref().map_or(Ok(()), end_snapshot)
    }
}

impl InlineReaders {
    pub fn new(keep_snapshots: bool) -> Self {
        Self {
            keep_snapshots,
            commits: AtomicU64::new(0),
            changed: (0..CHANGED_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            all_changed: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            all: Mutex::new(Vec::new()),
        }
    }

    /// Takes a new connection into the set.
    pub fn register(&self, conn: Connection) -> SharedReader {
        let reader = Arc::new(Mutex::new(InlineReader {
            conn: Some(conn),
            snapshot_at: None,
        }));
        lock(&self.all).push(Arc::clone(&reader));
        reader
    }

    /// Called by the writer (its only caller, so the count is its own) after each batch,
    /// committed or not, before it answers, with the profiles whose rows the batch may have
    /// changed.
    pub fn committed<'a>(&self, changed: impl IntoIterator<Item = &'a Uuid>) {
        let count = self.commits.load(Ordering::Relaxed) + 1;
        for id in changed {
            // Relaxed: the count's Release store publishes them to every read that sees it.
            self.changed[slot(*id)].fetch_max(count, Ordering::Relaxed);
        }
        self.commits.store(count, Ordering::Release);
    }

    /// [`Self::committed`] for a batch that may have changed any profile.
    pub fn committed_anything(&self) {
        let count = self.commits.load(Ordering::Relaxed) + 1;
        self.all_changed.store(count, Ordering::Relaxed);
        self.commits.store(count, Ordering::Release);
    }

    /// Whether a snapshot holding every commit up to `at` still reads what `depends` names as
    /// every commit counted so far (loaded with Acquire before) wrote it.
    fn current(&self, at: u64, depends: &Depends) -> bool {
        match depends {
            Depends::Nothing => true,
            Depends::Profile(id) => {
                self.all_changed.load(Ordering::Relaxed) <= at
                    && self.changed[slot(*id)].load(Ordering::Relaxed) <= at
            }
            Depends::Everything => false,
        }
    }

    /// Runs `f` on `reader`'s connection, in a snapshot that reads what its result depends on
    /// (`depends`) as the last commit left it. `f` may run twice: once in the open snapshot,
    /// again in a new one.
    pub fn read<T>(
        &self,
        reader: &Mutex<InlineReader>,
        f: impl Fn(&Connection) -> Result<T, StoreError>,
        depends: impl Fn(&T) -> Depends,
    ) -> Result<T, StoreError> {
        let mut guard = lock(reader);
        let reader = &mut *guard;
        let conn = reader.conn.as_ref().ok_or_else(store_closing)?;
        if !self.keep_snapshots {
            return f(conn);
        }
        let commits = self.commits.load(Ordering::Acquire);
        if let Some(at) = reader.snapshot_at {
            let result = f(conn);
            let draining = self.draining.load(Ordering::Acquire);
            match result {
                Ok(value) if !draining && (at == commits || self.current(at, &depends(&value))) => {
                    return Ok(value);
                }
                Err(e) if at == commits && !draining => {
                    // An error ends the transaction too, whatever state it left it in.
                    let _ = reader.end_snapshot();
                    return Err(e);
                }
                // Read again below, in a snapshot that has every commit.
                _ => reader.end_snapshot()?,
            }
        }
        let conn = reader.conn.as_ref().ok_or_else(store_closing)?;
        if !self.draining.load(Ordering::Acquire) {
            // Deferred: the snapshot is taken by `f`'s first read, after `commits` was loaded.
            run(conn, "BEGIN")?;
            reader.snapshot_at = Some(commits);
        }
        let result = f(conn);
        if result.is_err() || self.draining.load(Ordering::Acquire) {
            // An error ends the transaction too, whatever state it left it in.
            let _ = reader.end_snapshot();
        }
        result
    }

    /// Ends the snapshots that a commit made stale, so a checkpoint can copy every frame.
    pub fn end_stale(&self) {
        let commits = self.commits.load(Ordering::Acquire);
        for reader in lock(&self.all).iter() {
            let mut reader = lock(reader);
            if reader.snapshot_at.is_some_and(|at| at != commits) {
                if let Err(e) = reader.end_snapshot() {
                    tracing::warn!(error = %e, "could not end a reader's transaction");
                }
            }
        }
    }

    /// Runs `f` (a checkpoint that must find no reader in the WAL) with every snapshot ended
    /// and none kept past a read until it returns.
    pub fn without_snapshots<T>(&self, f: impl FnOnce() -> T) -> T {
        // Set before the connections are locked: a read that takes its lock after this one
        // sees the flag, and one before it is ended here.
        self.draining.store(true, Ordering::Release);
        for reader in lock(&self.all).iter() {
            if let Err(e) = lock(reader).end_snapshot() {
                tracing::warn!(error = %e, "could not end a reader's transaction");
            }
        }
        let result = f();
        self.draining.store(false, Ordering::Release);
        result
    }

    /// Ends every snapshot and closes the connections: the store is closing.
    pub fn close(&self) {
        for reader in lock(&self.all).drain(..) {
            let mut reader = lock(&reader);
            let _ = reader.end_snapshot();
            reader.conn = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with a row per profile: `(id, n)`.
    fn file_with_rows(ids: &[Uuid]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let writer = Connection::open(dir.path().join("t.db")).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER);",
            )
            .unwrap();
        for id in ids {
            writer
                .execute("INSERT INTO t VALUES (?1, 1)", [id.to_string()])
                .unwrap();
        }
        (dir, writer)
    }

    /// Reads `id`'s `n`, as a read depending on that profile alone.
    fn n_of(readers: &InlineReaders, reader: &Mutex<InlineReader>, id: Uuid) -> i64 {
        readers
            .read(
                reader,
                |c| {
                    c.query_row("SELECT n FROM t WHERE id = ?1", [id.to_string()], |r| {
                        r.get(0)
                    })
                    .map_err(unavailable)
                },
                |_| Depends::Profile(id),
            )
            .unwrap()
    }

    /// Reads the sum of every `n`, as a read depending on `depends`.
    fn sum(readers: &InlineReaders, reader: &Mutex<InlineReader>, depends: Depends) -> i64 {
        let depends = std::cell::Cell::new(Some(depends));
        readers
            .read(
                reader,
                |c| {
                    c.query_row("SELECT sum(n) FROM t", [], |r| r.get(0))
                        .map_err(unavailable)
                },
                |_| depends.take().unwrap_or(Depends::Everything),
            )
            .unwrap()
    }

    /// Adds one to `id`'s `n` and counts the commit as the writer does.
    fn bump(writer: &Connection, readers: &InlineReaders, id: Uuid) {
        writer
            .execute("UPDATE t SET n = n + 1 WHERE id = ?1", [id.to_string()])
            .unwrap();
        readers.committed([&id]);
    }

    fn in_snapshot(reader: &Mutex<InlineReader>) -> bool {
        !lock(reader).conn.as_ref().unwrap().is_autocommit()
    }

    #[test]
    fn a_snapshot_outlives_commits_to_other_profiles_and_ends_at_one_to_its_own() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (dir, writer) = file_with_rows(&[a, b]);
        let readers = InlineReaders::new(true);
        let reader = readers.register(Connection::open(dir.path().join("t.db")).unwrap());
        assert_eq!(n_of(&readers, &reader, b), 1);
        assert!(in_snapshot(&reader));

        // A commit to `a` leaves a read of `b` in the snapshot, which still sees the old `a`.
        bump(&writer, &readers, a);
        assert_eq!(n_of(&readers, &reader, b), 1);
        assert_eq!(sum(&readers, &reader, Depends::Nothing), 2);
        // A read of `a` itself sees the commit, in a new snapshot.
        assert_eq!(n_of(&readers, &reader, a), 2);
        assert_eq!(sum(&readers, &reader, Depends::Nothing), 3);
        assert!(in_snapshot(&reader));

        // So does a read that depends on everything, and any read after a bulk change.
        bump(&writer, &readers, a);
        assert_eq!(sum(&readers, &reader, Depends::Everything), 4);
        writer.execute("UPDATE t SET n = n + 10", []).unwrap();
        readers.committed_anything();
        assert_eq!(n_of(&readers, &reader, b), 11);
        assert_eq!(sum(&readers, &reader, Depends::Nothing), 24);
    }

    #[test]
    fn the_checkpoint_thread_ends_stale_snapshots() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let (dir, writer) = file_with_rows(&[a, b]);
        let readers = InlineReaders::new(true);
        let reader = readers.register(Connection::open(dir.path().join("t.db")).unwrap());
        assert_eq!(n_of(&readers, &reader, b), 1);
        bump(&writer, &readers, a);
        assert_eq!(n_of(&readers, &reader, b), 1);

        // The reader's snapshot, older than the commit, holds the WAL until it is ended.
        let frames_copied = |w: &Connection| -> (i64, i64) {
            w.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
            .unwrap()
        };
        let (frames, copied) = frames_copied(&writer);
        assert!(copied < frames, "{copied} of {frames}");
        readers.end_stale();
        assert!(!in_snapshot(&reader));
        let (frames, copied) = frames_copied(&writer);
        assert_eq!(copied, frames);
        assert_eq!(sum(&readers, &reader, Depends::Nothing), 3);

        // A snapshot as new as the last commit is left open.
        readers.end_stale();
        assert!(in_snapshot(&reader));
    }

    #[test]
    fn a_rewind_finds_no_reader_in_the_log() {
        let a = Uuid::now_v7();
        let (dir, writer) = file_with_rows(&[a]);
        writer.execute_batch("PRAGMA busy_timeout = 0").unwrap();
        let readers = InlineReaders::new(true);
        let reader = readers.register(Connection::open(dir.path().join("t.db")).unwrap());
        bump(&writer, &readers, a);
        assert_eq!(n_of(&readers, &reader, a), 2);
        let truncate = || -> i64 {
            writer
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .unwrap()
        };
        // busy = 1: the open snapshot reads the log.
        assert_eq!(truncate(), 1);
        let busy = readers.without_snapshots(|| {
            // A read meanwhile does not keep its snapshot.
            assert_eq!(n_of(&readers, &reader, a), 2);
            assert!(!in_snapshot(&reader));
            truncate()
        });
        assert_eq!(busy, 0);
        assert_eq!(n_of(&readers, &reader, a), 2);
    }

    #[test]
    fn a_store_opened_for_reading_keeps_no_snapshot() {
        let a = Uuid::now_v7();
        let (dir, _writer) = file_with_rows(&[a]);
        let readers = InlineReaders::new(false);
        let reader = readers.register(Connection::open(dir.path().join("t.db")).unwrap());
        assert_eq!(n_of(&readers, &reader, a), 1);
        assert_eq!(n_of(&readers, &reader, a), 1);
        assert!(!in_snapshot(&reader));
        readers.close();
        assert!(lock(&reader).conn.is_none());
    }

    #[test]
    fn profiles_spread_over_the_slots() {
        let mut used = std::collections::HashSet::new();
        for _ in 0..1000 {
            used.insert(slot(Uuid::now_v7()));
        }
        // About 992 of 1,000 would land apart in 65,536 slots by chance.
        assert!(used.len() > 980, "{}", used.len());
    }
}
