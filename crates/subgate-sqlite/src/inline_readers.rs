//! The runtime threads' reader connections (one per thread and store), which keep their read
//! transaction open from one point read to the next while the writer commits nothing.
//!
//! A read in its own transaction begins by taking the WAL's read locks (`fcntl` on the shared
//! memory file) and checking the WAL's header, and ends by releasing them: in `perf`, 12% of
//! the server's CPU under cached profile reads at 10k. A read in a transaction that is still
//! open skips both. The transaction is one snapshot of the database, so it is kept only while
//! it is current: the writer counts its commits ([`InlineReaders::committed`], before any
//! answer goes out), and a read that finds the count moved since its snapshot began ends it.
//! A client therefore reads its own writes as before.
//!
//! Under a steady mix of writes most snapshots would end after a read or two, and beginning
//! and ending them cost more than they saved (mixed loads took 1-2 µs more per request). So a
//! connection opens one only when nothing was committed since its previous read; otherwise the
//! read is its own transaction, as before.
//!
//! An open snapshot also holds the WAL: a checkpoint cannot copy frames a snapshot does not
//! see, and a rewind waits for every reader to leave the log. So the checkpoint thread ends
//! the stale snapshots of idle connections before each checkpoint
//! ([`InlineReaders::end_stale`]), the rewinds run inside [`InlineReaders::without_snapshots`],
//! during which every read ends its transaction, and a closing store closes the connections
//! ([`InlineReaders::close`]) before its last checkpoint.
//!
//! Only the file's owner keeps snapshots: a store opened beside its owner, for reading, sees
//! no count of the owner's commits, so each of its reads is its own transaction.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;
use subgate_core::store::StoreError;

use crate::{store_closing, unavailable};

/// One thread's connection, shared with the store so that other threads can end its snapshot.
/// A snapshot is open while the connection is in a transaction (it runs nothing else), and is
/// then as old as `previous_read`: a read that finds the count moved ends it.
pub(crate) struct InlineReader {
    /// `None` once the store closed.
    conn: Option<Connection>,
    /// The commit count at its previous read.
    previous_read: Option<u64>,
}

pub(crate) type SharedReader = Arc<Mutex<InlineReader>>;

pub(crate) struct InlineReaders {
    keep_snapshots: bool,
    commits: AtomicU64,
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

impl InlineReader {
    fn end_snapshot(&self) -> Result<(), StoreError> {
        self.conn.as_ref().map_or(Ok(()), end_snapshot)
    }
}

impl InlineReaders {
    pub fn new(keep_snapshots: bool) -> Self {
        Self {
            keep_snapshots,
            commits: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            all: Mutex::new(Vec::new()),
        }
    }

    /// Takes a new connection into the set.
    pub fn register(&self, conn: Connection) -> SharedReader {
        let reader = Arc::new(Mutex::new(InlineReader {
            conn: Some(conn),
            previous_read: None,
        }));
        lock(&self.all).push(Arc::clone(&reader));
        reader
    }

    /// Called by the writer after each batch, committed or not, before it answers.
    pub fn committed(&self) {
        self.commits.fetch_add(1, Ordering::Release);
    }

    /// Runs `f` on `reader`'s connection, in a snapshot at least as new as the last commit.
    pub fn read<T>(
        &self,
        reader: &Mutex<InlineReader>,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = lock(reader);
        let reader = &mut *guard;
        let conn = reader.conn.as_ref().ok_or_else(store_closing)?;
        if !self.keep_snapshots {
            return f(conn);
        }
        let commits = self.commits.load(Ordering::Acquire);
        let quiet = reader.previous_read.replace(commits) == Some(commits);
        if !conn.is_autocommit() {
            if !quiet {
                end_snapshot(conn)?;
            }
        } else if quiet && !self.draining.load(Ordering::Acquire) {
            // Deferred: the snapshot is taken by `f`'s first read, after `commits` was loaded.
            run(conn, "BEGIN")?;
        }
        let result = f(conn);
        if result.is_err() || self.draining.load(Ordering::Acquire) {
            // An error ends the transaction too, whatever state it left it in.
            let _ = end_snapshot(conn);
        }
        result
    }

    /// Ends the snapshots that a commit made stale, so a checkpoint can copy every frame.
    pub fn end_stale(&self) {
        let commits = self.commits.load(Ordering::Acquire);
        for reader in lock(&self.all).iter() {
            let reader = lock(reader);
            if reader.previous_read != Some(commits) {
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

    /// Through the crate's page cache, as every connection of the store; the first
    /// connection a test process opens decides which cache every later one gets.
    fn open(path: &std::path::Path) -> Connection {
        crate::page_cache::install();
        Connection::open(path).unwrap()
    }

    fn file_with_rows() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let writer = open(&dir.path().join("t.db"));
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE t (n INTEGER); INSERT INTO t VALUES (1);",
            )
            .unwrap();
        (dir, writer)
    }

    fn count(readers: &InlineReaders, reader: &Mutex<InlineReader>) -> i64 {
        readers
            .read(reader, |c| {
                c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .map_err(unavailable)
            })
            .unwrap()
    }

    fn insert(writer: &Connection, readers: &InlineReaders) {
        writer.execute("INSERT INTO t VALUES (2)", []).unwrap();
        readers.committed();
    }

    #[test]
    fn a_snapshot_stays_open_until_a_commit_and_reads_see_every_commit() {
        let (dir, writer) = file_with_rows();
        let readers = InlineReaders::new(true);
        let reader = readers.register(open(&dir.path().join("t.db")));
        let in_snapshot = || !lock(&reader).conn.as_ref().unwrap().is_autocommit();
        // The first read after a commit is its own transaction; the next keeps one open.
        assert_eq!(count(&readers, &reader), 1);
        assert!(!in_snapshot());
        assert_eq!(count(&readers, &reader), 1);
        assert!(in_snapshot());
        insert(&writer, &readers);
        assert_eq!(count(&readers, &reader), 2);
        assert!(!in_snapshot());
        assert_eq!(count(&readers, &reader), 2);
        assert!(in_snapshot());

        // An idle reader's stale snapshot holds the WAL until the checkpoint thread ends it.
        insert(&writer, &readers);
        let frames_copied = |w: &Connection| -> (i64, i64) {
            w.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
            .unwrap()
        };
        let (frames, copied) = frames_copied(&writer);
        assert!(copied < frames, "{copied} of {frames}");
        readers.end_stale();
        let (frames, copied) = frames_copied(&writer);
        assert_eq!(copied, frames);
        assert_eq!(count(&readers, &reader), 3);
    }

    #[test]
    fn a_rewind_finds_no_reader_in_the_log() {
        let (dir, writer) = file_with_rows();
        writer.execute_batch("PRAGMA busy_timeout = 0").unwrap();
        let readers = InlineReaders::new(true);
        let reader = readers.register(open(&dir.path().join("t.db")));
        insert(&writer, &readers);
        assert_eq!(count(&readers, &reader), 2);
        assert_eq!(count(&readers, &reader), 2);
        let truncate = || -> i64 {
            writer
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
                .unwrap()
        };
        // busy = 1: the open snapshot reads the log.
        assert_eq!(truncate(), 1);
        let busy = readers.without_snapshots(|| {
            // A read meanwhile does not keep its snapshot.
            assert_eq!(count(&readers, &reader), 2);
            truncate()
        });
        assert_eq!(busy, 0);
        assert_eq!(count(&readers, &reader), 2);
    }

    #[test]
    fn a_store_opened_for_reading_keeps_no_snapshot() {
        let (dir, _writer) = file_with_rows();
        let readers = InlineReaders::new(false);
        let reader = readers.register(open(&dir.path().join("t.db")));
        assert_eq!(count(&readers, &reader), 1);
        assert_eq!(count(&readers, &reader), 1);
        assert!(lock(&reader).conn.as_ref().unwrap().is_autocommit());
        readers.close();
        assert!(lock(&reader).conn.is_none());
    }
}
