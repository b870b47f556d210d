//! Makes committed batches durable off the writer thread (ADR 0015).
//!
//! The writer commits with `synchronous = NORMAL`: COMMIT writes the batch's WAL frames and
//! returns without syncing them. It hands the batch's answers to the sync thread, which syncs
//! the WAL once for every batch that committed meanwhile and only then answers them, while the
//! writer already runs the next batch. A committed batch is visible to other connections before
//! its sync, so [`Gate`] makes every read that could see a batch not yet on disk wait for its
//! sync: what any caller is told, by a write's answer or by a read, is durable.

use crate::{Reply, Touched};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use subgate_core::store::StoreError;
use tokio::sync::watch;
use uuid::Uuid;

/// Where the committed frames go to disk: the WAL file, or a stand-in in tests.
pub(crate) trait SyncLog: Send {
    fn sync(&mut self) -> std::io::Result<()>;
}

/// The database's WAL. SQLite keeps that file (the same inode) while any connection is open,
/// and the writer's connection outlives the sync thread, so one handle serves throughout; a
/// sync through any handle writes back every dirty page of the file.
pub(crate) struct WalFile {
    path: PathBuf,
    file: Option<File>,
}

impl WalFile {
    pub(crate) fn of_database(database: &std::path::Path) -> Self {
        let mut path = database.as_os_str().to_owned();
        path.push("-wal");
        Self {
            path: path.into(),
            file: None,
        }
    }
}

impl SyncLog for WalFile {
    fn sync(&mut self) -> std::io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            // Opened at the first sync: by then a commit has created the file.
            empty => empty.insert(File::open(&self.path)?),
        };
        file.sync_data()
    }
}

/// What the readers may see and what is on disk, by batch number (the writer numbers its
/// commits from 1).
pub(crate) struct Gate {
    /// The last batch the writer started to commit: a read may see it.
    committing: AtomicU64,
    /// The last batch whose sync completed.
    durable: AtomicU64,
    pending: Mutex<Pending>,
    synced: watch::Sender<Synced>,
}

/// The batches committed but not yet synced, by what they touched.
#[derive(Default)]
struct Pending {
    /// Each profile touched by one of them, with the last batch that touched it.
    profiles: HashMap<Uuid, u64>,
    /// The last of them that may have changed any profile (a bulk import).
    everything: u64,
    /// Each batch with the events' highest sequence number once it committed.
    event_seqs: VecDeque<(u64, i64)>,
    durable_event_seq: i64,
}

#[derive(Clone, Default)]
struct Synced {
    batch: u64,
    /// Set once a sync failed: from then on nothing committed can be called durable.
    failure: Option<Arc<str>>,
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gate {
    /// A gate over a database whose contents are all durable, with events up to `event_seq`.
    pub(crate) fn new(event_seq: i64) -> Self {
        Self {
            committing: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            pending: Mutex::new(Pending {
                durable_event_seq: event_seq,
                ..Pending::default()
            }),
            synced: watch::Sender::new(Synced::default()),
        }
    }

    /// Called by the writer right before it commits a batch: from here on readers may see
    /// it. Returns the batch's number.
    pub(crate) fn announce(&self, touched: &Touched, event_seq: i64) -> u64 {
        let mut pending = lock(&self.pending);
        let batch = self.committing.load(Ordering::Relaxed) + 1;
        match touched {
            Touched::Profiles { ids, .. } => {
                for id in ids {
                    pending.profiles.insert(*id, batch);
                }
            }
            Touched::Everything => pending.everything = batch,
        }
        if pending
            .event_seqs
            .back()
            .map_or(pending.durable_event_seq, |b| b.1)
            < event_seq
        {
            pending.event_seqs.push_back((batch, event_seq));
        }
        // Before the commit makes anything visible, under the lock readers take after reading.
        self.committing.store(batch, Ordering::Release);
        batch
    }

    /// The last batch announced so far.
    pub(crate) fn last_announced(&self) -> u64 {
        self.committing.load(Ordering::Acquire)
    }

    /// Called by the sync thread once every batch up to `batch` is on disk.
    fn settled(&self, batch: u64) {
        {
            let mut pending = lock(&self.pending);
            pending.profiles.retain(|_, b| *b > batch);
            if pending.everything <= batch {
                pending.everything = 0;
            }
            while let Some(&(b, seq)) = pending.event_seqs.front() {
                if b > batch {
                    break;
                }
                pending.durable_event_seq = seq;
                pending.event_seqs.pop_front();
            }
            self.durable.store(batch, Ordering::Release);
        }
        self.synced.send_modify(|s| s.batch = s.batch.max(batch));
    }

    fn fail(&self, reason: &str) {
        self.synced
            .send_modify(|s| s.failure = Some(s.failure.clone().unwrap_or_else(|| reason.into())));
    }

    /// Why the store can no longer make writes durable, if a sync failed.
    pub(crate) fn failure(&self) -> Option<StoreError> {
        self.synced.borrow().failure.as_deref().map(lost)
    }

    /// Nothing is waiting for a sync.
    fn all_durable(&self) -> bool {
        self.durable.load(Ordering::Acquire) >= self.committing.load(Ordering::Acquire)
    }

    /// Waits until a read that found the profile `id` (or, with `None`, found no profile)
    /// shows only what is on disk. A read that found nothing may have missed a profile a
    /// pending batch deleted, or moved to another customer user id: it waits for them all.
    pub(crate) async fn profile_read(&self, id: Option<Uuid>) -> Result<(), StoreError> {
        if self.all_durable() {
            return Ok(());
        }
        let target = match id {
            None => self.committing.load(Ordering::Acquire),
            Some(id) => {
                let pending = lock(&self.pending);
                pending
                    .profiles
                    .get(&id)
                    .copied()
                    .unwrap_or(0)
                    .max(pending.everything)
            }
        };
        self.wait(target).await
    }

    /// Waits until a read that found events up to sequence number `max_seq` shows only what
    /// is on disk.
    pub(crate) async fn events_read(&self, max_seq: Option<i64>) -> Result<(), StoreError> {
        let Some(max_seq) = max_seq else {
            return Ok(());
        };
        if self.all_durable() {
            return Ok(());
        }
        let target = {
            let pending = lock(&self.pending);
            if max_seq <= pending.durable_event_seq {
                0
            } else {
                pending
                    .event_seqs
                    .iter()
                    .find(|(_, seq)| *seq >= max_seq)
                    .map_or_else(|| self.committing.load(Ordering::Acquire), |(b, _)| *b)
            }
        };
        self.wait(target).await
    }

    /// Waits until everything committed before now is on disk: for reads that may see any row.
    pub(crate) async fn any_read(&self) -> Result<(), StoreError> {
        if self.all_durable() {
            return Ok(());
        }
        self.wait(self.committing.load(Ordering::Acquire)).await
    }

    async fn wait(&self, batch: u64) -> Result<(), StoreError> {
        if self.durable.load(Ordering::Acquire) >= batch {
            return Ok(());
        }
        let mut synced = self.synced.subscribe();
        let state = synced
            .wait_for(|s| s.batch >= batch || s.failure.is_some())
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?;
        match &state.failure {
            Some(reason) if state.batch < batch => Err(lost(reason)),
            _ => Ok(()),
        }
    }
}

fn lost(reason: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "the database file could not be synced ({reason}); restart the node to recover from its log"
    ))
}

/// A batch handed to the sync thread: its number and answers, and its commit's failure.
pub(crate) struct Committed {
    pub batch: u64,
    pub replies: Vec<Reply>,
    pub commit_error: Option<StoreError>,
}

/// The sync thread: syncs once for all batches committed since its last sync, marks them
/// durable, then answers them. A failed sync answers its batches with an error and leaves the
/// store refusing writes: the kernel may have dropped the pages it could not write, so nothing
/// after them is known to be on disk (PostgreSQL stops for the same reason).
pub(crate) fn sync_loop(
    mut log: Box<dyn SyncLog>,
    batches: mpsc::Receiver<Committed>,
    gate: &Gate,
) {
    while let Ok(first) = batches.recv() {
        let mut waiting = vec![first];
        waiting.extend(batches.try_iter());
        let last = waiting.iter().map(|c| c.batch).max().unwrap_or(0);
        let sync_error = match gate.failure() {
            Some(error) => Some(error),
            None => match log.sync() {
                Ok(()) => {
                    gate.settled(last);
                    None
                }
                Err(e) => {
                    tracing::error!(error = %e, "syncing the WAL failed; the store now refuses writes");
                    gate.fail(&e.to_string());
                    gate.failure()
                }
            },
        };
        for committed in waiting {
            let error = committed.commit_error.or_else(|| sync_error.clone());
            for reply in committed.replies {
                reply.send(error.as_ref());
            }
        }
    }
}

/// The sending side, owned by the writer thread.
pub(crate) type SyncQueue = mpsc::Sender<Committed>;
