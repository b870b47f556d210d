//! Subgate's [`Store`] on an embedded SQLite file.
//!
//! Writes go to one writer thread that owns the only writing connection: it takes every write
//! queued at that moment, runs each inside its own savepoint of one `BEGIN IMMEDIATE`
//! transaction, commits once (group commit, `synchronous=FULL`) and only then answers. So
//! writes are serialized (no `SQLITE_BUSY`, no lost updates), every answered write is durable,
//! and a rejected write leaves nothing behind. Reads use a small pool of separate connections,
//! which WAL mode lets run beside the writer.
//!
//! One process owns the file (a lock file says so), which lets it keep recently read profiles
//! in memory: the writer invalidates what each commit touched before answering.

mod cache;
mod codec;
mod inline_readers;
mod page_cache;
mod random_access;
mod read_ahead;
mod rows;
mod schema;
mod wal_gather;

use async_trait::async_trait;
use cache::ProfileCache;
use chrono::{DateTime, Utc};
use inline_readers::{InlineReaders, SharedReader};
use read_ahead::IndexReadAhead;
use rusqlite::{Connection, OpenFlags};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use subgate_core::model::{AppDefinition, ProfileKey, ProfileState};
use subgate_core::store::{
    Counts, Decide, DeliveryResult, DetachedTransaction, DueExpiry, ImportedProfile, Lookup,
    Outcome, Store, StoreError, StoredEvent, WriteError,
};
use tokio::sync::oneshot;
use uuid::Uuid;

/// Writes taken into one commit at most; bounds the latency a batch adds.
const MAX_BATCH: usize = 512;
const READERS: usize = 4;

/// Sends a job's result once the batch's commit is known: a failed commit turns every
/// success of the batch into an error, since none of it was written.
type Finisher = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A job run on the writer's connection: whether it succeeded, and how to answer.
type ExecJob = Box<dyn FnOnce(&Connection) -> (bool, Finisher) + Send>;

struct WriteJob {
    app_id: Uuid,
    lookup: Lookup,
    decide: Decide,
    reply: oneshot::Sender<Result<Outcome, WriteError>>,
}

enum Job {
    Write(WriteJob),
    /// Any other write: runs in its own savepoint, rolled back if it fails.
    Exec {
        run: ExecJob,
        /// It may change any profile (a bulk import): the whole cache goes.
        changes_profiles: bool,
    },
}

/// Each store's id, so the per-thread reader connections of one store never serve another
/// (tests run many stores in one process).
static NEXT_STORE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// A reader connection per runtime thread and store: a point read runs right on the
    /// calling thread, with no hand-off to a blocking pool (which costs more than the read).
    static INLINE_READERS: RefCell<HashMap<u64, SharedReader>> = RefCell::new(HashMap::new());
}

pub struct SqliteStore {
    /// Tells the checkpoint thread to finish.
    stop: Arc<AtomicBool>,
    id: u64,
    path: PathBuf,
    /// Taken on drop, which ends the writer's loop.
    writer: Option<mpsc::Sender<Job>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    inline_readers: Arc<InlineReaders>,
    cache: Arc<ProfileCache>,
    index_read_ahead: IndexReadAhead,
    /// Held while the store is open, unless opened only for reading; see [`lock_file`].
    _lock: Option<File>,
}

/// Takes `<database>.lock`, so a second process cannot open the same file: its writes would
/// bypass this one's writer and leave this one's cache stale. Several nodes share PostgreSQL,
/// not a SQLite file.
fn lock_file(path: &Path) -> Result<File, StoreError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| unavailable(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another Subgate process (it holds {}); stop it first, or use \
             PostgreSQL to run several nodes",
            path.display(),
            lock_path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(unavailable(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

/// Whether SQLite runs with this crate's page cache ([`page_cache`]): it does unless something
/// in the process opened a SQLite connection before this crate opened its first.
pub fn page_cache_in_use() -> bool {
    page_cache::in_use()
}

/// Parses `sqlite://path`, `sqlite:path` and `sqlite:///absolute/path` into a file path.
pub fn path_from_url(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let rest = rest.split('?').next().unwrap_or(rest);
    (!rest.is_empty()).then(|| PathBuf::from(rest))
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn store_closing() -> StoreError {
    StoreError::Internal("the store is closing".into())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    open_connection_via(path, None)
}

/// The writer's connection: its WAL writes are gathered into a few calls a commit
/// ([`wal_gather`]), which needs the sync `open_connection` sets.
fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    wal_gather::register().map_err(unavailable)?;
    let conn = open_connection_via(path, Some(wal_gather::NAME))?;
    wal_gather::check_synchronous_full(&conn).map_err(unavailable)?;
    Ok(conn)
}

fn open_connection_via(
    path: &Path,
    vfs: Option<&std::ffi::CStr>,
) -> Result<Connection, StoreError> {
    page_cache::install();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match vfs {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    }
    .map_err(unavailable)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA busy_timeout = 5000;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;",
    )
    .map_err(unavailable)?;
    conn.set_prepared_statement_cache_capacity(64);
    random_access::advise(path);
    Ok(conn)
}

/// How a node uses its SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Profiles kept decoded in memory (0: none).
    pub cached_profiles: usize,
    /// And their estimated size at most, in MiB: profiles that gathered many transactions or
    /// grants take more room each.
    pub cached_profiles_mib: usize,
    /// WAL pages past which the log starts over from the beginning of its file. Under a
    /// steady write load a passive checkpoint never catches up with the writer, so SQLite
    /// never rewinds the WAL on its own: it grew by 250 MB/s in the write benchmark, every
    /// commit paid the file system for extending the file, and every page lookup searched a
    /// longer WAL index. Each rewind holds writes for about 10-80 ms (up to 250 ms at a million
    /// profiles); a longer log means fewer of them. The WAL file keeps its largest size (4 KiB a page).
    pub wal_rewind_pages: u32,
    /// How often a background thread copies the WAL into the database file and syncs that
    /// file. Each copy writes every page changed since the last one, at random places in the
    /// file, and its sync waits for them on the disk the commits' WAL syncs also wait on;
    /// copying less often writes a page changed many times once, and syncs less. Every 500 ms
    /// instead of every 100 ms, in three pairs of turns (docs/bench/FINDINGS.md, SQLite
    /// writes): SQLite writes 5-23% more per `/health` request at 10k and 1M in eleven of
    /// twelve comparisons. The log grows by what is written in one interval past
    /// `wal_rewind_pages`.
    pub checkpoint_interval: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            cached_profiles: 10_000,
            cached_profiles_mib: 128,
            wal_rewind_pages: 65_536,
            checkpoint_interval: Duration::from_millis(500),
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file as its owner, the only process that
    /// writes it, migrates it and starts the writer.
    pub fn open(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self, StoreError> {
        Self::open_with(path.as_ref(), options, true)
    }

    /// Opens the file beside its owner, to read it (the source of a copy): no lock taken and
    /// nothing cached. Writing through it would leave the owner's cache stale.
    pub fn open_for_reading(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = SqliteOptions {
            cached_profiles: 0,
            ..SqliteOptions::default()
        };
        Self::open_with(path.as_ref(), &options, false)
    }

    fn open_with(path: &Path, options: &SqliteOptions, owner: bool) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let lock = if owner { Some(lock_file(&path)?) } else { None };
        let mut writer_conn = open_writer(&path)?;
        if !page_cache_in_use() {
            tracing::warn!(
                "SQLite started before Subgate could set its page cache up; writes will be slower"
            );
        }
        schema::migrate(&mut writer_conn)?;
        // The writer touches pages all over the indexes; reading them back through syscalls
        // showed in profiles. 32 MiB keeps the hot part in memory. Checkpoints (copying the
        // WAL into the database file, a tenth of the writer's time in profiles) run on their
        // own thread instead of inside the writer's commits.
        writer_conn
            .execute_batch("PRAGMA cache_size = -32768; PRAGMA wal_autocheckpoint = 0;")
            .map_err(unavailable)?;
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = open_connection(&path)?;
        let database = File::open(&path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        let stop_checkpoints = Arc::clone(&stop);
        let restart = Arc::new(AtomicBool::new(false));
        let rewind_after = i64::from(options.wal_rewind_pages);
        let checkpoint_interval = options.checkpoint_interval;
        let restart_wanted = Arc::clone(&restart);
        let inline_readers = Arc::new(InlineReaders::new(owner));
        let checkpoint_readers = Arc::clone(&inline_readers);
        std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread name: short names tell the threads apart in
            // top and perf.
            .name("sqlite-checkpt".into())
            .spawn(move || {
                checkpoint_loop(
                    checkpointer,
                    database,
                    &stop_checkpoints,
                    &restart_wanted,
                    &checkpoint_readers,
                    rewind_after,
                    checkpoint_interval,
                )
            })
            .map_err(|e| {
                StoreError::Internal(format!("cannot start the checkpoint thread: {e}"))
            })?;
        let readers = (0..READERS)
            .map(|_| open_connection(&path))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel();
        let cache = Arc::new(ProfileCache::new(
            options.cached_profiles,
            options.cached_profiles_mib.saturating_mul(1 << 20),
        ));
        let writer_cache = Arc::clone(&cache);
        let writer_readers = Arc::clone(&inline_readers);
        let writer_thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer_conn, rx, &writer_cache, &writer_readers, &restart))
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            stop,
            id: NEXT_STORE_ID.fetch_add(1, Ordering::Relaxed),
            path,
            writer: Some(tx),
            writer_thread: Some(writer_thread),
            readers: Arc::new(Mutex::new(readers)),
            inline_readers,
            cache,
            index_read_ahead: IndexReadAhead::default(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&path)?,
            };
            let result = f(&conn);
            let mut pool = readers.lock().unwrap_or_else(|e| e.into_inner());
            // Connections opened for a burst are closed again rather than kept forever.
            if pool.len() < READERS {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?
    }

    /// Runs a short read on this thread's own connection. Only for point reads: it blocks the
    /// async worker for its duration (tens of microseconds from the page cache, more where the
    /// kernel has dropped the page and it comes from the disk; see ADR 0010). The server runs
    /// more runtime threads than cores so that others answer meanwhile (ADR 0011).
    fn read_inline<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let reader = INLINE_READERS.with(|cell| {
            let mut readers = cell.borrow_mut();
            if let Some(reader) = readers.get(&self.id) {
                return Ok(Arc::clone(reader));
            }
            // Closed stores' entries: only this map still holds them.
            readers.retain(|_, reader| Arc::strong_count(reader) > 1);
            let conn = open_connection(&self.path)?;
            // The profile table's interior pages at a million profiles take about 3 MB (748
            // pages); 8 MB keeps them beside the leaves reads bring in. There is one such
            // connection per runtime thread, and a node runs more threads than cores
            // (`server.worker_threads`): with 6 threads at 1M, 8 MB each read as fast as 32 MB
            // each, and the node peaked at 135 MiB instead of 285 MiB.
            conn.execute_batch("PRAGMA cache_size = -8192")
                .map_err(unavailable)?;
            let reader = self.inline_readers.register(conn);
            readers.insert(self.id, Arc::clone(&reader));
            Ok(reader)
        })?;
        self.inline_readers.read(&reader, f)
    }

    /// Reads what a write will need on this thread before the write is queued, when its
    /// profile is not cached: then the file is likely larger than memory, and the pages the
    /// write reads (the profile's row, the store transaction's index entries, where its events
    /// go) may have to come from the disk. Read here, many requests wait for the disk at once,
    /// instead of the single writer thread waiting for each write's pages in turn. At 10k
    /// profiles, once they are all cached, this reads nothing. The index pages are read only
    /// while doing so finds some on the disk ([`IndexReadAhead`]).
    ///
    /// Only a hint: it reads outside the write's transaction, and a failure is the write's to
    /// meet and report.
    fn prefetch_for_write(&self, app_id: Uuid, lookup: &Lookup) {
        let Some(key) = lookup.profile_key() else {
            return;
        };
        if self.cache.get(app_id, &key).is_some() {
            return;
        }
        let seen = self.cache.epoch();
        let read = self.read_inline(|conn| {
            let state = rows::load_profile(conn, app_id, &key)?;
            if self.index_read_ahead.due() {
                let profile_id = state.as_ref().map(|s| s.profile.id);
                self.index_read_ahead.run(|| {
                    rows::read_write_pages(conn, app_id, profile_id, lookup.chain.as_ref())
                })?;
            }
            Ok(state)
        });
        match read {
            Ok(Some(state)) => self.cache.insert_before_write(seen, &Arc::new(state)),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading ahead of a write failed"),
        }
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.writer
            .as_ref()
            .ok_or_else(store_closing)?
            .send(job)
            .map_err(|_| StoreError::Internal("the writer thread has stopped".into()))
    }

    /// Runs `f` on the writer thread, in the next group commit, and answers once committed.
    /// `f` must leave profiles and transactions alone; see [`Self::exec_bulk`].
    async fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.exec_job(f, false).await
    }

    /// [`Self::exec`] for a job that may change any profile.
    async fn exec_bulk<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.exec_job(f, true).await
    }

    async fn exec_job<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        changes_profiles: bool,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let run: ExecJob = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let finish: Finisher = Box::new(move |commit_error| {
                let result = match (result, commit_error) {
                    (Ok(_), Some(e)) => Err(StoreError::Unavailable(e.to_string())),
                    (result, _) => result,
                };
                // A caller that went away no longer needs the answer.
                let _ = reply.send(result);
            });
            (ok, finish)
        });
        self.send(Job::Exec {
            run,
            changes_profiles,
        })?;
        rx.await.map_err(|_| {
            StoreError::Unavailable("the database could not start a transaction".into())
        })?
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn put_apps(&self, apps: &[AppDefinition]) -> Result<(), StoreError> {
        let apps = apps.to_vec();
        self.exec(move |conn| rows::put_apps(conn, &apps)).await
    }

    async fn load_rendered(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_inline(|conn| rows::load_rendered(conn, app_id, key))
    }

    async fn save_rendered(
        &self,
        app_id: Uuid,
        profile_id: Uuid,
        version: i64,
        rendered: Vec<u8>,
    ) -> Result<bool, StoreError> {
        // Not a change to the profile's state, which is all the cache holds.
        self.exec(move |conn| rows::save_rendered(conn, app_id, profile_id, version, &rendered))
            .await
    }

    async fn load_profile(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
    ) -> Result<Option<Arc<ProfileState>>, StoreError> {
        if let Some(hit) = self.cache.get(app_id, key) {
            return Ok(Some(hit));
        }
        let seen = self.cache.epoch();
        let state = self
            .read_inline(|conn| rows::load_profile(conn, app_id, key))?
            .map(Arc::new);
        if let Some(state) = &state {
            self.cache.insert(seen, state);
        }
        Ok(state)
    }

    async fn write(
        &self,
        app_id: Uuid,
        lookup: Lookup,
        decide: Decide,
    ) -> Result<Outcome, WriteError> {
        self.prefetch_for_write(app_id, &lookup);
        let (reply, rx) = oneshot::channel();
        self.send(Job::Write(WriteJob {
            app_id,
            lookup,
            decide,
            reply,
        }))?;
        rx.await
            .map_err(|_| StoreError::Internal("the writer thread dropped a write".into()))?
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.read(rows::counts).await
    }

    async fn apps(&self) -> Result<Vec<AppDefinition>, StoreError> {
        self.read(rows::apps).await
    }

    async fn profiles_after(
        &self,
        after: Option<(Uuid, Uuid)>,
        limit: u32,
    ) -> Result<Vec<ProfileState>, StoreError> {
        self.read(move |conn| rows::profiles_after(conn, after, limit))
            .await
    }

    async fn detached_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DetachedTransaction>, StoreError> {
        self.read(move |conn| rows::detached_after(conn, after, limit))
            .await
    }

    async fn import(
        &self,
        profiles: Vec<ImportedProfile>,
        detached: Vec<DetachedTransaction>,
    ) -> Result<(), StoreError> {
        self.exec_bulk(move |conn| rows::import(conn, &profiles, &detached))
            .await
    }

    async fn delete_settled_events(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.exec_job(
            move |conn| rows::delete_settled_events(conn, before, limit),
            false,
        )
        .await
    }

    async fn import_events(&self, events: Vec<StoredEvent>) -> Result<(), StoreError> {
        self.exec_job(move |conn| rows::import_events(conn, &events), false)
            .await
    }

    async fn events_after(
        &self,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |conn| rows::events_after(conn, after_seq, limit))
            .await
    }

    async fn after_bulk_load(&self) -> Result<(), StoreError> {
        // The bundled SQLite keeps STAT4 samples, and with samples present every statement
        // whose plan could depend on a bound value is compiled again on each new value: a
        // parse per profile read in profiles. The per-index row counts (stat1) are enough
        // for these point lookups, so the samples go.
        self.exec(|conn| {
            conn.execute_batch("ANALYZE; DELETE FROM sqlite_stat4; ANALYZE sqlite_schema;")
                .map_err(unavailable)
        })
        .await?;
        // A checkpoint cannot run inside the writer's transaction: a reader connection does it.
        let inline_readers = Arc::clone(&self.inline_readers);
        self.read(move |conn| {
            inline_readers
                .without_snapshots(|| checkpoint(conn, "TRUNCATE"))
                .map(drop)
                .map_err(unavailable)
        })
        .await
    }

    async fn due_expirations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueExpiry>, StoreError> {
        self.read(move |conn| rows::due_expirations(conn, now, limit))
            .await
    }

    async fn claim_events(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.exec(move |conn| rows::claim_events(conn, now, lease_until, limit))
            .await
    }

    async fn finish_deliveries(
        &self,
        results: Vec<(Uuid, DeliveryResult)>,
    ) -> Result<(), StoreError> {
        self.exec(move |conn| {
            results
                .iter()
                .try_for_each(|(id, result)| rows::finish_delivery(conn, *id, result))
        })
        .await
    }

    async fn list_events(
        &self,
        app_id: Uuid,
        profile_id: Option<Uuid>,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.read(move |conn| rows::list_events(conn, app_id, profile_id, after_seq, limit))
            .await
    }

    async fn get_event(&self, app_id: Uuid, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        self.read(move |conn| rows::get_event(conn, app_id, id))
            .await
    }

    async fn redeliver(
        &self,
        app_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<StoredEvent>, StoreError> {
        self.exec(move |conn| rows::redeliver(conn, app_id, id, now))
            .await
    }
}

// Replies live only for one batch; boxing the large variant would cost an allocation per write.
#[allow(clippy::large_enum_variant)]
enum Reply {
    Write(
        oneshot::Sender<Result<Outcome, WriteError>>,
        Result<Outcome, WriteError>,
    ),
    Exec(Finisher),
}

impl Reply {
    fn send(self, commit_error: Option<&StoreError>) {
        match self {
            Reply::Write(tx, result) => {
                let result = match (result, commit_error) {
                    (Ok(_), Some(e)) => {
                        Err(WriteError::Store(StoreError::Unavailable(e.to_string())))
                    }
                    (result, _) => result,
                };
                // A caller that went away (client disconnected) no longer needs the answer.
                let _ = tx.send(result);
            }
            Reply::Exec(finish) => finish(commit_error),
        }
    }
}

impl Drop for SqliteStore {
    /// Waits for the writer to finish its queue and empty the WAL, so a stopped node leaves
    /// no long log for the next start to copy.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Before the writer's last checkpoint, which must find no reader in the WAL.
        self.inline_readers.close();
        drop(self.writer.take());
        if let Some(writer) = self.writer_thread.take() {
            let _ = writer.join();
        }
    }
}

/// How often an idle writer wakes up to see whether the checkpoint thread wants the WAL
/// rewound.
const IDLE_WRITER_WAKE: Duration = Duration::from_millis(100);

/// Where a checkpoint left the WAL: the frames in it, and how many of them are copied.
struct CheckpointProgress {
    frames: i64,
    copied: i64,
}

fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<CheckpointProgress> {
    // (busy, frames in the log, frames copied)
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok(CheckpointProgress {
            frames: r.get(1)?,
            copied: r.get(2)?,
        })
    })
}

/// Copies the WAL into the database file every `interval` (a passive checkpoint, which never
/// blocks the writer or the readers: it copies what it can) and, once the log is longer than
/// `rewind_after` frames, asks the writer to rewind it (`restart`).
///
/// SQLite syncs the database file only after a checkpoint that copied the whole log, which a
/// passive checkpoint under steady writes never does: the pages it copied stayed dirty in the
/// OS, and the writer's rewind then flushed all of them while holding every write (460 ms at a
/// million profiles). So this thread syncs `database` after each checkpoint that copied pages.
fn checkpoint_loop(
    conn: Connection,
    database: File,
    stop: &AtomicBool,
    restart: &AtomicBool,
    inline_readers: &InlineReaders,
    rewind_after: i64,
    interval: Duration,
) {
    let mut copied_before = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(interval);
        if restart.load(Ordering::Acquire) {
            // The writer's rewind would wait behind a checkpoint of this thread, in SQLite's
            // busy handler (which sleeps up to 100 ms at a time).
            continue;
        }
        inline_readers.end_stale();
        let result = checkpoint(&conn, "PASSIVE").and_then(|progress| {
            if progress.copied != copied_before {
                copied_before = progress.copied;
                if let Err(e) = database.sync_data() {
                    tracing::warn!(error = %e, "could not sync the database file; will retry");
                }
            }
            if progress.frames > rewind_after {
                // Once more first, so the writer's rewind finds only the last moment's frames
                // to copy: it holds every write while it runs.
                checkpoint(&conn, "PASSIVE")?;
                restart.store(true, Ordering::Release);
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "checkpoint failed; will retry");
        }
    }
}

/// Rewinds the WAL, between two batches. A RESTART checkpoint from another connection starves:
/// the writer takes the write lock again the moment it commits. Here it only copies the few
/// frames the passive checkpoints left and waits for readers to leave the log; the next
/// commit then writes from the start of the file, over blocks already allocated.
fn restart_wal(conn: &Connection) {
    if let Err(e) = checkpoint(conn, "RESTART") {
        tracing::warn!(error = %e, "could not rewind the WAL; will retry");
    }
}

fn writer_loop(
    mut conn: Connection,
    jobs: mpsc::Receiver<Job>,
    cache: &ProfileCache,
    inline_readers: &InlineReaders,
    restart: &AtomicBool,
) {
    loop {
        // Waking up without work too, so an idle writer still rewinds a WAL it was asked to:
        // the checkpoint thread waits for that.
        let first = match jobs.recv_timeout(IDLE_WRITER_WAKE) {
            Ok(job) => Some(job),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if restart.load(Ordering::Acquire) {
            inline_readers.without_snapshots(|| restart_wal(&conn));
            restart.store(false, Ordering::Release);
        }
        let Some(first) = first else { continue };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (replies, commit_error, touched) = run_batch(&mut conn, batch, cache);
        // Before any answer, so a client never reads its own write's old state back.
        inline_readers.committed();
        match touched {
            Touched::Profiles { ids, saved } if commit_error.is_none() => {
                cache.committed(&ids, saved)
            }
            Touched::Profiles { ids, .. } => cache.committed(&ids, Vec::new()),
            Touched::Everything => cache.clear(),
        }
        for reply in replies {
            reply.send(commit_error.as_ref());
        }
    }
    // The store was dropped: a last full checkpoint, so a stopped node leaves a short WAL.
    // (`SqliteStore::drop` closed the reader connections before ending this loop.)
    if let Err(e) = checkpoint(&conn, "TRUNCATE") {
        tracing::warn!(error = %e, "the last checkpoint failed; the next start copies the WAL");
    }
}

/// The profiles a batch may have changed, whether or not it committed, and the states it
/// saved that no later job of the batch touched again.
enum Touched {
    Profiles {
        ids: Vec<Uuid>,
        saved: Vec<Arc<ProfileState>>,
    },
    Everything,
}

/// What a batch's transaction did: each job's answer, the commit's failure, what it touched.
type BatchResult = (Vec<Reply>, Option<StoreError>, Touched);

type WriteResult = Result<Outcome, WriteError>;

fn run_batch(conn: &mut Connection, batch: Vec<Job>, cache: &ProfileCache) -> BatchResult {
    if !batch.iter().all(|job| matches!(job, Job::Write(_))) {
        // Other jobs run once (they are FnOnce), so they cannot be replayed.
        return run_in_savepoints(conn, batch, cache);
    }
    let writes: Vec<WriteJob> = batch
        .into_iter()
        .filter_map(|job| match job {
            Job::Write(write) => Some(write),
            Job::Exec { .. } => None,
        })
        .collect();
    match run_writes(conn, &writes, cache) {
        Some((results, commit_error, touched)) => {
            let replies = writes
                .into_iter()
                .zip(results)
                .map(|(write, result)| Reply::Write(write.reply, result))
                .collect();
            (replies, commit_error, touched)
        }
        None => run_in_savepoints(conn, writes.into_iter().map(Job::Write).collect(), cache),
    }
}

/// What a batch's jobs touched so far: which profiles its later jobs must load from the
/// database (their new state is not committed yet), and what the cache learns at commit.
#[derive(Default)]
struct BatchTouches {
    ids: Vec<Uuid>,
    /// Each touched profile's state as last saved in the batch (`None`: changed otherwise).
    latest: HashMap<Uuid, Option<Arc<ProfileState>>>,
    /// A job that may change any profile ran: the cache cannot be used nor updated.
    everything: bool,
}

impl BatchTouches {
    /// Runs one write on `conn`, loading from the cache what the batch did not touch yet.
    fn write(
        &mut self,
        conn: &Connection,
        cache: &ProfileCache,
        job: (Uuid, &Lookup, &Decide),
    ) -> WriteResult {
        let (app_id, lookup, decide) = job;
        let (latest, everything) = (&self.latest, self.everything);
        let cached = |key: &ProfileKey| {
            cache
                .get(app_id, key)
                .filter(|s| !everything && !latest.contains_key(&s.profile.id))
        };
        rows::write(conn, app_id, lookup, decide, &cached, &mut self.ids)
    }

    /// Notes what the write that started when `from` ids were touched did.
    fn note(&mut self, from: usize, result: &WriteResult) {
        for id in &self.ids[from..] {
            self.latest.insert(*id, None);
        }
        if let Ok(Outcome::Saved { state, .. }) = result {
            self.latest
                .insert(state.profile.id, Some(Arc::clone(state)));
        }
    }

    fn finish(self) -> Touched {
        if self.everything {
            Touched::Everything
        } else {
            Touched::Profiles {
                ids: self.ids,
                saved: self.latest.into_values().flatten().collect(),
            }
        }
    }
}

/// Commits a batch; a failure is logged here and answered to every job of the batch.
fn commit(tx: rusqlite::Transaction<'_>) -> Option<StoreError> {
    tx.commit().err().map(|e| {
        let error = unavailable(e);
        tracing::error!(%error, "commit failed; the whole batch is rolled back");
        error
    })
}

/// Runs `f`, turning a panic into the failed write it is.
fn unpanicked<T>(f: impl FnOnce() -> Result<T, WriteError>) -> Result<T, WriteError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(StoreError::Internal("a write panicked".into()).into()))
}

/// Runs a batch of writes straight in one transaction, without a savepoint each (SAVEPOINT,
/// RELEASE and the page copies a savepoint keeps were a tenth of the writer's time). A write
/// refused by its decision changed nothing: it fails alone. A write that failed in the
/// database may have changed rows already: then the transaction is rolled back and `None`
/// says to run the batch again, each write in its own savepoint (decisions may run twice).
fn run_writes(
    conn: &mut Connection,
    writes: &[WriteJob],
    cache: &ProfileCache,
) -> Option<(Vec<WriteResult>, Option<StoreError>, Touched)> {
    // A transaction that cannot begin is answered by the savepoint path, which reports it.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .ok()?;
    let mut results = Vec::with_capacity(writes.len());
    let mut touches = BatchTouches::default();
    for write in writes {
        let from = touches.ids.len();
        let job = (write.app_id, &write.lookup, &write.decide);
        let result = unpanicked(|| touches.write(&tx, cache, job));
        if matches!(result, Err(WriteError::Store(_))) {
            // Dropping the transaction rolls it back.
            return None;
        }
        touches.note(from, &result);
        results.push(result);
    }
    let touched = touches.finish();
    Some((results, commit(tx), touched))
}

/// Runs a batch with one savepoint per job: a job's failure rolls back only its own changes.
fn run_in_savepoints(conn: &mut Connection, batch: Vec<Job>, cache: &ProfileCache) -> BatchResult {
    let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let error = unavailable(e);
            let replies = batch
                .into_iter()
                .map(|job| run_unbegun(job, &error))
                .collect();
            let nothing = BatchTouches::default().finish();
            return (replies, Some(error), nothing);
        }
    };
    let mut replies = Vec::with_capacity(batch.len());
    let mut touches = BatchTouches::default();
    for job in batch {
        match job {
            Job::Write(WriteJob {
                app_id,
                lookup,
                decide,
                reply,
            }) => {
                let from = touches.ids.len();
                let result = in_savepoint(&mut tx, |sp| {
                    touches.write(sp, cache, (app_id, &lookup, &decide))
                });
                touches.note(from, &result);
                replies.push(Reply::Write(reply, result));
            }
            Job::Exec {
                run: f,
                changes_profiles,
            } => {
                touches.everything |= changes_profiles;
                let mut finish = None;
                let _ = in_savepoint(&mut tx, |sp| {
                    let (ok, f) = f(sp);
                    finish = Some(f);
                    if ok {
                        Ok(())
                    } else {
                        Err(WriteError::Store(StoreError::Internal("job failed".into())))
                    }
                });
                let finish =
                    finish.unwrap_or_else(|| Box::new(|_: Option<&StoreError>| {}) as Finisher);
                replies.push(Reply::Exec(finish));
            }
        }
    }
    let touched = touches.finish();
    (replies, commit(tx), touched)
}

/// A job of a batch whose transaction could not even begin.
fn run_unbegun(job: Job, error: &StoreError) -> Reply {
    match job {
        Job::Write(WriteJob { reply, .. }) => Reply::Write(
            reply,
            Err(WriteError::Store(StoreError::Unavailable(
                error.to_string(),
            ))),
        ),
        // Never run: dropping it drops its reply channel, which its caller reads as a 503.
        Job::Exec { .. } => Reply::Exec(Box::new(|_| {})),
    }
}

/// Runs one job in a savepoint: its failure rolls back only its own changes.
fn in_savepoint<T>(
    tx: &mut rusqlite::Transaction<'_>,
    f: impl FnOnce(&rusqlite::Savepoint<'_>) -> Result<T, WriteError>,
) -> Result<T, WriteError> {
    let sp = tx
        .savepoint()
        .map_err(|e| WriteError::Store(unavailable(e)))?;
    match unpanicked(|| f(&sp)) {
        Ok(value) => {
            sp.commit().map_err(|e| WriteError::Store(unavailable(e)))?;
            Ok(value)
        }
        // Dropping the savepoint rolls it back.
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use subgate_core::events::{EventType, NewEvent};
    use subgate_core::model::{AttributeValue, Environment, Profile, Transaction};
    use subgate_core::store::{Change, Store};

    /// Creates the profile `cuid` under `id`, whatever the lookup found, with one event.
    fn create_as(app_id: Uuid, id: Uuid, cuid: &str, event_id: Uuid) -> Decide {
        let cuid = cuid.to_string();
        Box::new(move |_| {
            // The database keeps microseconds.
            let now = subgate_core::time::from_micros(subgate_core::time::to_micros(&Utc::now()));
            let event = NewEvent {
                id: event_id,
                event_type: EventType::AccessLevelUpdated,
                profile_id: id,
                environment: Environment::Production,
                occurred_at: now,
                payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
                deliver: false,
            };
            Ok(Change::Save {
                state: ProfileState {
                    profile: Profile {
                        id,
                        app_id,
                        customer_user_id: Some(cuid.clone()),
                        version: 1,
                        created_at: now,
                        updated_at: now,
                        doc: Default::default(),
                    },
                    transactions: Vec::new(),
                },
                transactions: Vec::new(),
                events: vec![event],
                rendered: None,
            })
        })
    }

    /// Creates the profile `cuid` as `id` through the writer, which must save it.
    async fn create(store: &SqliteStore, app: Uuid, id: Uuid, cuid: &str) {
        let created = store
            .write(
                app,
                by_customer_user_id(cuid),
                create_as(app, id, cuid, Uuid::now_v7()),
            )
            .await;
        assert!(matches!(created, Ok(Outcome::Saved { .. })), "{created:?}");
    }

    fn by_customer_user_id(cuid: &str) -> Lookup {
        Lookup {
            customer_user_id: Some(cuid.into()),
            ..Lookup::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failing_in_the_database_fails_alone_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = Arc::new(SqliteStore::open(&path, &SqliteOptions::default()).unwrap());
        let app = Uuid::now_v7();
        let taken_event_id = Uuid::now_v7();
        let first = create_as(app, Uuid::now_v7(), "first", taken_event_id);
        let first = store.write(app, by_customer_user_id("first"), first).await;
        assert!(matches!(first, Ok(Outcome::Saved { .. })));

        // Sent at once, so the writer takes many of them in one batch. Number 20 stores its
        // profile, then an event under an id already taken: it fails in the database after
        // changing a row, and that row must not stay.
        const WRITES: usize = 40;
        let writes: Vec<_> = (0..WRITES)
            .map(|i| {
                let store = Arc::clone(&store);
                let cuid = format!("u{i}");
                let event_id = if i == 20 {
                    taken_event_id
                } else {
                    Uuid::now_v7()
                };
                let decide = create_as(app, Uuid::now_v7(), &cuid, event_id);
                tokio::spawn(
                    async move { store.write(app, by_customer_user_id(&cuid), decide).await },
                )
            })
            .collect();
        for (i, write) in writes.into_iter().enumerate() {
            let result = write.await.unwrap();
            if i == 20 {
                assert!(matches!(result, Err(WriteError::Store(_))), "{result:?}");
            } else {
                assert!(
                    matches!(result, Ok(Outcome::Saved { .. })),
                    "{i}: {result:?}"
                );
            }
        }
        assert_eq!(store.counts().await.unwrap().profiles, WRITES as u64);
        assert!(store
            .load_profile(app, &ProfileKey::CustomerUserId("u20".into()))
            .await
            .unwrap()
            .is_none());
    }

    /// On one runtime thread, whose reader connection keeps its snapshot between reads.
    #[tokio::test(flavor = "current_thread")]
    async fn a_read_after_a_commit_sees_it_on_a_connection_that_kept_its_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("t.db"), &SqliteOptions::default()).unwrap();
        let (app, id) = (Uuid::now_v7(), Uuid::now_v7());
        create(&store, app, id, "u").await;
        let key = ProfileKey::CustomerUserId("u".into());
        // The second read keeps its snapshot (the first after a commit does not).
        for _ in 0..2 {
            assert_eq!(store.load_rendered(app, &key).await.unwrap(), None);
        }
        let saved = store.save_rendered(app, id, 1, b"answer".to_vec()).await;
        assert!(saved.unwrap());
        let rendered = store.load_rendered(app, &key).await.unwrap();
        assert_eq!(rendered.as_deref(), Some(&b"answer"[..]));
    }

    /// The writer's WAL writes are gathered, many to a call, and yet every answered write is
    /// in the files when it is answered: a copy of the database and its WAL taken then, as a
    /// crash would leave them, holds it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answered_writes_are_in_the_wal_file_though_its_writes_are_gathered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        // No checkpoint copies the commits into the database file meanwhile.
        let options = SqliteOptions {
            checkpoint_interval: Duration::from_secs(3600),
            ..SqliteOptions::default()
        };
        let store = Arc::new(SqliteStore::open(&path, &options).unwrap());
        let app = Uuid::now_v7();
        let counts = || {
            (
                wal_gather::WRITTEN_OUT.load(Ordering::Relaxed),
                wal_gather::GATHERED.load(Ordering::Relaxed),
            )
        };
        let (calls_before, writes_before) = counts();
        const WRITES: usize = 30;
        let writes: Vec<_> = (0..WRITES)
            .map(|i| {
                let store = Arc::clone(&store);
                let cuid = format!("u{i}");
                let decide = create_as(app, Uuid::now_v7(), &cuid, Uuid::now_v7());
                tokio::spawn(
                    async move { store.write(app, by_customer_user_id(&cuid), decide).await },
                )
            })
            .collect();
        for write in writes {
            let result = write.await.unwrap();
            assert!(matches!(result, Ok(Outcome::Saved { .. })), "{result:?}");
        }
        // Other tests write meanwhile; every one of their calls gathers two writes or more
        // too (a frame is two), so the ratio holds over all of them.
        let (calls, writes) = counts();
        let (calls, writes) = (calls - calls_before, writes - writes_before);
        assert!(calls > 0, "the WAL was written");
        assert!(
            writes >= 2 * calls,
            "{writes} WAL writes went out in {calls} calls"
        );

        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(&path, copy.path().join("t.db")).unwrap();
        std::fs::copy(dir.path().join("t.db-wal"), copy.path().join("t.db-wal")).unwrap();
        let conn = Connection::open(copy.path().join("t.db")).unwrap();
        let profiles: i64 = conn
            .query_row("SELECT count(*) FROM profiles", [], |r| r.get(0))
            .unwrap();
        assert_eq!(profiles, WRITES as i64);
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_store_leaves_an_empty_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let wal = dir.path().join("t.db-wal");
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let app = Uuid::now_v7();
        let decide = create_as(app, Uuid::now_v7(), "u", Uuid::now_v7());
        let written = store.write(app, by_customer_user_id("u"), decide).await;
        assert!(matches!(written, Ok(Outcome::Saved { .. })));
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        // A reader connection now holds a snapshot in the WAL, which the drop must end.
        let key = ProfileKey::CustomerUserId("u".into());
        for _ in 0..2 {
            assert_eq!(store.load_rendered(app, &key).await.unwrap(), None);
        }
        drop(store);
        assert_eq!(std::fs::metadata(&wal).map_or(0, |m| m.len()), 0);
        // And what was written is in the database file.
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        assert_eq!(store.counts().await.unwrap().profiles, 1);
    }

    /// A transaction as version-2 databases stored it, attached to `profile_id` in the JSON.
    fn old_transaction(id: &str, profile_id: Uuid) -> Transaction {
        serde_json::from_value(serde_json::json!({
            "id": Uuid::now_v7(),
            "profile_id": profile_id,
            "seq": 1,
            "purchase_type": "one_time_purchase",
            "store": "app_store",
            "environment": "Production",
            "store_product_id": "coins",
            "store_transaction_id": id,
            "store_original_transaction_id": id,
            "is_family_shared": false,
            "price": {"country": "US", "currency": "USD", "value_micros": 990000, "usd_micros": 990000},
            "purchased_at": "2026-11-01T10:00:00Z",
            "created_at": "2026-11-01T10:00:00Z",
            "updated_at": "2026-11-01T10:00:00Z",
            "expiry_handled": false
        }))
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_2_database_keeps_every_transaction_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (app, owner, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // The stored JSON of `second` still names `other`: the column says where it is now.
        let (first, second, gone) = (
            old_transaction("first", owner),
            old_transaction("second", other),
            old_transaction("gone", other),
        );
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(include_str!("../migrations/0001_init.sql"))
                .unwrap();
            conn.execute_batch(include_str!("../migrations/0002_events.sql"))
                .unwrap();
            conn.execute_batch("PRAGMA user_version = 2").unwrap();
            for id in [owner, other] {
                conn.execute(
                    "INSERT INTO profiles VALUES (?1, ?2, ?3, 2, 1, 2, '{\"attributes\":{\"plan\":\"gold\"}}')",
                    rusqlite::params![app.to_string(), id.to_string(), format!("user-{id}")],
                )
                .unwrap();
            }
            // Inserted second first: reads list a profile's transactions in rowid order.
            for (t, attached_to) in [(&second, Some(owner)), (&first, Some(owner)), (&gone, None)] {
                conn.execute(
                    "INSERT INTO transactions (id, app_id, profile_id, store, store_transaction_id,
                         store_original_transaction_id, data)
                     VALUES (?1, ?2, ?3, 'app_store', ?4, ?4, ?5)",
                    rusqlite::params![
                        t.id.to_string(),
                        app.to_string(),
                        attached_to.map(|id| id.to_string()),
                        t.store_transaction_id,
                        serde_json::to_string(t).unwrap()
                    ],
                )
                .unwrap();
            }
        }

        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let read = |id| {
            let store = &store;
            async move {
                store
                    .load_profile(app, &ProfileKey::Id(id))
                    .await
                    .unwrap()
                    .unwrap()
            }
        };
        let owned = read(owner).await;
        let ids: Vec<_> = owned.transactions.iter().map(|t| t.id).collect();
        assert_eq!(ids, [second.id, first.id]);
        assert!(owned
            .transactions
            .iter()
            .all(|t| t.profile_id == Some(owner)));
        assert_eq!(owned.profile.version, 2);
        assert_eq!(
            owned.profile.customer_user_id,
            Some(format!("user-{owner}"))
        );
        assert!(owned.profile.doc.attributes.contains_key("plan"));
        assert!(read(other).await.transactions.is_empty());
        let by_cuid = store
            .load_profile(app, &ProfileKey::CustomerUserId(format!("user-{other}")))
            .await
            .unwrap();
        assert_eq!(by_cuid.map(|s| s.profile.id), Some(other));
        let detached = store.detached_after(None, 10).await.unwrap();
        assert_eq!(
            detached
                .iter()
                .map(|d| d.transaction.id)
                .collect::<Vec<_>>(),
            [gone.id]
        );
        let counts = store.counts().await.unwrap();
        assert_eq!((counts.profiles, counts.transactions), (2, 3));
        // Migration 0004 moved both rows to the rowids their customer user ids name.
        drop(store);
        let conn = Connection::open(&path).unwrap();
        for id in [owner, other] {
            let rowid: i64 = conn
                .query_row(
                    "SELECT rowid FROM profiles WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(rowid, rows::profile_slot(app, &format!("user-{id}")));
        }
    }

    /// A new file as the store creates it, and a plain connection to it, the store closed.
    fn fresh_file() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path, &SqliteOptions::default()).unwrap());
        let conn = Connection::open(&path).unwrap();
        (dir, path, conn)
    }

    /// A write's chain lookup must stay index lookups on a table of millions, whatever the
    /// partial index's condition and the query's terms drift to, and build no temporary
    /// b-tree.
    #[test]
    fn the_chain_lookup_searches_indexes_and_never_scans() {
        let (_dir, _, conn) = fresh_file();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", rows::CHAIN_LOOKUP))
            .unwrap()
            .query_map(["a", "app_store", "o", "t"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let uses = |index: &str| plan.iter().any(|step| step.contains(index));
        assert!(uses("INDEX transactions_chain"), "{plan:#?}");
        assert!(uses("INDEX transactions_store_id"), "{plan:#?}");
        assert!(
            !plan
                .iter()
                .any(|step| step.starts_with("SCAN") || step.contains("TEMP B-TREE")),
            "{plan:#?}"
        );
    }

    #[test]
    fn a_profile_slot_stays_what_migrated_databases_hold() {
        let app = Uuid::parse_str("6a0c2f5e-1b7d-4c3e-9f21-0d5b8e7a4c11").unwrap();
        assert_eq!(rows::profile_slot(app, "user-1"), 7_544_916_430_666_834_867);
    }

    /// A build that cannot read compressed values (before migration 0006) or stored answers
    /// (0007) refuses the file; so does this one a file from a later build.
    #[test]
    fn a_file_from_a_newer_build_is_refused() {
        let (_dir, path, conn) = fresh_file();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 7, "0007_rendered_profiles is the latest migration");
        conn.execute_batch("PRAGMA user_version = 8").unwrap();
        drop(conn);
        match SqliteStore::open(&path, &SqliteOptions::default()) {
            Err(StoreError::Internal(message)) => {
                assert!(message.contains("upgrade Subgate"), "{message}")
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a newer file was opened"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_are_stored_compressed_and_plain_json_rows_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let app = Uuid::now_v7();
        let id = Uuid::now_v7();
        let stored_types = |conn: &Connection| -> (String, String, u8) {
            conn.query_row(
                "SELECT typeof(doc), typeof(transactions), substr(doc, 1, 1) FROM profiles",
                [],
                |r| {
                    let tag: Vec<u8> = r.get(2)?;
                    Ok((r.get(0)?, r.get(1)?, tag[0]))
                },
            )
            .unwrap()
        };
        {
            let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
            create(&store, app, id, "alpha").await;
        }
        let conn = Connection::open(&path).unwrap();
        assert_eq!(stored_types(&conn), ("blob".into(), "blob".into(), 1));

        // As versions before the compressed format wrote them.
        let transaction = old_transaction("t-1", id);
        conn.execute(
            "UPDATE profiles SET doc = ?1, transactions = ?2",
            [
                r#"{"attributes":{"plan":"gold"}}"#.to_string(),
                serde_json::to_string(&[&transaction]).unwrap(),
            ],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO transactions (id, app_id, profile_id, store, store_transaction_id,
                 store_original_transaction_id, data)
             VALUES (?1, ?2, ?3, 'app_store', 't-1', 't-1', ?4)",
            [
                transaction.id.to_string(),
                app.to_string(),
                id.to_string(),
                serde_json::to_string(&transaction).unwrap(),
            ],
        )
        .unwrap();
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let key = ProfileKey::CustomerUserId("alpha".into());
        let read = store.load_profile(app, &key).await.unwrap().unwrap();
        assert_eq!(
            read.profile.doc.attributes.get("plan"),
            Some(&AttributeValue::Text("gold".into()))
        );
        assert_eq!(read.transactions[0].store_transaction_id, "t-1");

        // A write that changes the document but not the transactions: only the column it
        // changes is written again, in the compressed format.
        let bump: Decide = Box::new(|loaded| {
            let mut state =
                ProfileState::clone(loaded.profile.as_ref().expect("the profile exists"));
            state.profile.version += 1;
            state
                .profile
                .doc
                .attributes
                .insert("plan".into(), AttributeValue::Text("platinum".into()));
            Ok(Change::Save {
                state,
                transactions: Vec::new(),
                events: Vec::new(),
                rendered: None,
            })
        });
        let saved = store.write(app, by_customer_user_id("alpha"), bump).await;
        assert!(matches!(saved, Ok(Outcome::Saved { .. })), "{saved:?}");
        assert_eq!(stored_types(&conn), ("blob".into(), "text".into(), 1));
        drop(store);
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let reread = store.load_profile(app, &key).await.unwrap().unwrap();
        assert_eq!(
            reread.profile.doc.attributes.get("plan"),
            Some(&AttributeValue::Text("platinum".into()))
        );
        assert_eq!(reread.transactions, read.transactions);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_profile_is_found_by_customer_user_id_wherever_its_row_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path, &SqliteOptions::default()).unwrap();
        let app = Uuid::now_v7();
        let rowid_of = |conn: &Connection, cuid: &str| -> i64 {
            conn.query_row(
                "SELECT rowid FROM profiles WHERE customer_user_id = ?1",
                [cuid],
                |r| r.get(0),
            )
            .unwrap()
        };
        create(&store, app, Uuid::now_v7(), "alpha").await;
        let conn = Connection::open(&path).unwrap();
        assert_eq!(rowid_of(&conn, "alpha"), rows::profile_slot(app, "alpha"));

        // Another profile holds the slot of `beta`, which therefore goes elsewhere.
        let squatter = Uuid::now_v7();
        conn.execute(
            "INSERT INTO profiles (rowid, app_id, id, customer_user_id, version, created_at,
                 updated_at, doc, transactions)
             VALUES (?1, ?2, ?3, 'squatter', 1, 1, 1, '{}', '[]')",
            rusqlite::params![
                rows::profile_slot(app, "beta"),
                app.to_string(),
                squatter.to_string()
            ],
        )
        .unwrap();
        let beta = Uuid::now_v7();
        create(&store, app, beta, "beta").await;
        assert_ne!(rowid_of(&conn, "beta"), rows::profile_slot(app, "beta"));

        for (cuid, id) in [
            ("beta", Some(beta)),
            ("squatter", Some(squatter)),
            ("gamma", None),
        ] {
            let found = store
                .load_profile(app, &ProfileKey::CustomerUserId(cuid.into()))
                .await
                .unwrap();
            assert_eq!(found.map(|s| s.profile.id), id, "{cuid}");
        }
        // The same customer user id in another app is another profile, in another slot.
        let elsewhere = store
            .load_profile(Uuid::now_v7(), &ProfileKey::CustomerUserId("alpha".into()))
            .await
            .unwrap();
        assert!(elsewhere.is_none());
    }
}
