//! Profile reads, batched: the reads waiting at one moment go to PostgreSQL as one statement.
//!
//! A point read costs PostgreSQL far more in per-statement work (a round trip, bind, execute,
//! a context switch on each side) than in finding the row. A few batcher tasks each take every
//! read queued when they become free and answer them from one statement. That statement starts
//! after every one of its reads arrived and sees one snapshot, so each read still sees every
//! write answered before it was asked. A batcher hands back rows, not profiles: decoding them
//! in the batcher kept its connection idle for the whole batch's decoding.

use crate::rows::{self, Wanted};
use deadpool_postgres::Pool;
use std::sync::Arc;
use subgate_core::model::ProfileKey;
use subgate_core::store::StoreError;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::Row;
use uuid::Uuid;

/// Statements in flight at once; each holds one pooled connection while it runs.
const BATCHERS: usize = 2;
/// Reads answered by one statement at most.
const MAX_BATCH: usize = 128;

pub struct ReadRequest {
    pub app_id: Uuid,
    pub key: ProfileKey,
    pub wanted: Wanted,
    /// The profile's row, with what `wanted` names.
    pub reply: oneshot::Sender<Result<Option<Row>, StoreError>>,
}

/// Starts the batchers; they stop when the returned sender and its clones are dropped.
pub fn start(pool: Pool) -> mpsc::UnboundedSender<ReadRequest> {
    let (tx, rx) = mpsc::unbounded_channel();
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..BATCHERS {
        let (rx, pool) = (Arc::clone(&rx), pool.clone());
        tokio::spawn(async move {
            while let Some(batch) = next_batch(&rx).await {
                answer(&pool, batch).await;
            }
        });
    }
    tx
}

async fn next_batch(rx: &Mutex<mpsc::UnboundedReceiver<ReadRequest>>) -> Option<Vec<ReadRequest>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Answers a batch with one statement for each kind of read in it.
async fn answer(pool: &Pool, batch: Vec<ReadRequest>) {
    let (states, rendered): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|r| r.wanted == Wanted::State);
    for part in [states, rendered] {
        if let Some(first) = part.first() {
            let wanted = first.wanted;
            answer_alike(pool, part, wanted).await;
        }
    }
}

async fn answer_alike(pool: &Pool, batch: Vec<ReadRequest>, wanted: Wanted) {
    let keys: Vec<(Uuid, &ProfileKey)> = batch.iter().map(|r| (r.app_id, &r.key)).collect();
    let found = crate::bounded("a profile read", async {
        let client = pool.get().await.map_err(crate::pool_error)?;
        rows::load_profile_rows(&client, &keys, wanted).await
    })
    .await;
    match found {
        Ok(rows) => {
            for (request, row) in batch.into_iter().zip(rows) {
                // A caller that went away no longer needs the answer.
                let _ = request.reply.send(Ok(row));
            }
        }
        Err(e) => {
            for request in batch {
                let _ = request.reply.send(Err(e.clone()));
            }
        }
    }
}
