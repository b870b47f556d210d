//! Subgate's [`Store`] on PostgreSQL, for one node or several sharing one database.
//!
//! Nothing about concurrency lives in process memory. A write runs in one READ COMMITTED
//! transaction: it locks the profile row (`SELECT ... FOR UPDATE`) and the transaction rows it
//! may touch, reads the rest with fresh statements (so it sees whatever the previous lock holder
//! committed), runs the pure `decide`, and persists. What cannot be locked because it does not
//! exist yet (a new profile, a new customer user id, a new store transaction) is guarded by the
//! unique indexes instead: the losing writer gets a unique violation, rolls back and runs again,
//! and this time sees the winner's row. Serialization failures and deadlocks are retried the
//! same way; `decide` is pure, so re-running it is safe. Profile reads waiting at the same
//! moment share one statement (see `reads`).

mod reads;
mod rows;

use rows::Wanted;
mod schema;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use subgate_core::model::{AppDefinition, ProfileKey, ProfileState};
use subgate_core::store::{
    Counts, Decide, DeliveryResult, DetachedTransaction, DueExpiry, ImportedProfile, Lookup,
    Outcome, Store, StoreError, StoredEvent, WriteError,
};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// How long one database operation may take before the node answers 503 instead of hanging.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a pooled connection (or a new one) before answering 503.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Conflicts are rare (two writers racing to create the same row); a few reruns settle them.
const MAX_ATTEMPTS: u32 = 10;

#[derive(Debug, Clone)]
pub struct PgOptions {
    pub max_connections: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
        }
    }
}

pub struct PgStore {
    pool: Pool,
    /// The profile read batchers, started with the first read (they need a runtime).
    reads: OnceLock<mpsc::UnboundedSender<reads::ReadRequest>>,
}

/// Why one attempt at a write did not finish.
pub(crate) enum Failure {
    /// Lost a race to another writer: roll back and run again.
    Conflict(String),
    Rejected(subgate_core::error::ApiError),
    Store(StoreError),
    /// Refused because an earlier statement of the transaction failed (25P02): never the
    /// cause itself; see `rows::cause`.
    Aborted(String),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        let conflict = e.code().is_some_and(|code| {
            *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::UNIQUE_VIOLATION
        });
        if conflict {
            Failure::Conflict(e.to_string())
        } else if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
            Failure::Aborted(describe(&e))
        } else {
            Failure::Store(classify(e))
        }
    }
}

impl From<PoolError> for Failure {
    fn from(e: PoolError) -> Self {
        Failure::Store(pool_error(e))
    }
}

/// Errors of the connection itself (refused, reset, closed, server shutting down or out of
/// resources) are 503s; errors of a statement are 500s.
pub(crate) fn classify(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let transient = code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == SqlState::READ_ONLY_SQL_TRANSACTION.code();
            if transient {
                StoreError::Unavailable(e.to_string())
            } else {
                StoreError::Internal(describe(&e))
            }
        }
        None => {
            let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
            if e.is_closed() || io {
                StoreError::Unavailable(describe(&e))
            } else {
                // Encoding a parameter or decoding a column: a bug, not an outage.
                StoreError::Internal(describe(&e))
            }
        }
    }
}

/// tokio-postgres' Display omits the server's message; the source has it.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => classify(e),
        other => StoreError::Unavailable(format!("no database connection: {other}")),
    }
}

async fn bounded<T>(
    what: &str,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(OPERATION_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "the database did not answer {what} within {}s",
                OPERATION_TIMEOUT.as_secs()
            )))
        })
}

impl PgStore {
    /// A profile's row from the read batchers, with what `wanted` names.
    async fn read_row(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
        wanted: Wanted,
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = reads::ReadRequest {
            app_id,
            key: key.clone(),
            wanted,
            reply,
        };
        self.reads
            .get_or_init(|| reads::start(self.pool.clone()))
            .send(request)
            .map_err(|_| StoreError::Internal("the profile readers have stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Internal("a profile read was dropped".into()))?
    }

    /// Connects, checks the database answers, and applies the migrations. Fails (rather than
    /// waiting forever) when the URL is wrong or the database cannot be reached.
    pub async fn connect(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        let store = Self::open(url, options)?;
        let mut client = bounded("a connection", async {
            store.pool.get().await.map_err(pool_error)
        })
        .await?;
        // Not bounded: a migration may rewrite large tables, and the other starting nodes
        // wait for it on the migration lock.
        schema::migrate(&mut client).await?;
        Ok(store)
    }

    /// Builds the pool without connecting.
    pub fn open(url: &str, options: &PgOptions) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Internal(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECTION_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("subgate");
        }
        // Every statement here is a point lookup or a single-row change whose plan does not
        // depend on its parameters. Left to choose, PostgreSQL kept planning some of them
        // afresh on each execution (custom plans): most of its CPU per write in profiles.
        let session = match config.get_options() {
            Some(given) => format!("{given} -c plan_cache_mode=force_generic_plan"),
            None => "-c plan_cache_mode=force_generic_plan".to_string(),
        };
        config.options(&session);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(CONNECTION_TIMEOUT))
            .create_timeout(Some(CONNECTION_TIMEOUT))
            .recycle_timeout(Some(CONNECTION_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
        Ok(Self {
            pool,
            reads: OnceLock::new(),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn write_once(
        &self,
        app_id: Uuid,
        lookup: &Lookup,
        decide: &Decide,
    ) -> Result<Outcome, Failure> {
        let open = OpenTransaction(Some(self.client().await?));
        let Some(client) = open.0.as_ref() else {
            return Err(Failure::Store(StoreError::Internal(
                "a write's connection went missing".into(),
            )));
        };
        // `rows::write` sends the BEGIN with its first statements, saving the round trip
        // tokio-postgres' `transaction()` spends on it alone.
        match rows::write(client, app_id, lookup, decide).await {
            Ok(outcome) => {
                open.end("COMMIT").await?;
                Ok(outcome)
            }
            Err(failure) => {
                // Failing that, `open` takes the connection out of the pool.
                let _ = open.end("ROLLBACK").await;
                Err(failure)
            }
        }
    }
}

/// A pooled connection that may be inside a transaction. Dropped before [`Self::end`]
/// succeeds (the write failed to end it, panicked, or its timeout cancelled it), it leaves
/// the pool and closes, and PostgreSQL rolls its transaction back: the pool must never hand
/// out a connection in the middle of someone's transaction.
struct OpenTransaction(Option<deadpool_postgres::Client>);

impl OpenTransaction {
    /// Ends the transaction with `sql` (`COMMIT` or `ROLLBACK`); the connection then goes back
    /// to the pool.
    async fn end(mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        if let Some(client) = &self.0 {
            client.batch_execute(sql).await?;
        }
        drop(self.0.take());
        Ok(())
    }
}

impl Drop for OpenTransaction {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn put_apps(&self, apps: &[AppDefinition]) -> Result<(), StoreError> {
        bounded("the app upsert", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(classify)?;
            rows::put_apps(&tx, apps).await?;
            tx.commit().await.map_err(classify)
        })
        .await
    }

    async fn load_rendered(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.read_row(app_id, key, Wanted::Rendered).await?;
        Ok(match row {
            Some(row) => rows::get::<Option<Vec<u8>>>(&row, 0)?,
            None => None,
        })
    }

    async fn save_rendered(
        &self,
        app_id: Uuid,
        profile_id: Uuid,
        version: i64,
        rendered: Vec<u8>,
    ) -> Result<bool, StoreError> {
        bounded("a stored answer", async {
            let client = self.client().await?;
            rows::save_rendered(&client, app_id, profile_id, version, &rendered).await
        })
        .await
    }

    async fn load_profile(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
    ) -> Result<Option<Arc<ProfileState>>, StoreError> {
        let row = self.read_row(app_id, key, Wanted::State).await?;
        Ok(row
            .as_ref()
            .map(rows::state_from)
            .transpose()?
            .map(Arc::new))
    }

    async fn write(
        &self,
        app_id: Uuid,
        lookup: Lookup,
        decide: Decide,
    ) -> Result<Outcome, WriteError> {
        let mut attempt = 1;
        loop {
            let result =
                tokio::time::timeout(OPERATION_TIMEOUT, self.write_once(app_id, &lookup, &decide))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Store(StoreError::Unavailable(format!(
                            "the database did not finish a write within {}s",
                            OPERATION_TIMEOUT.as_secs()
                        ))))
                    });
            match result {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Rejected(e)) => return Err(WriteError::Rejected(e)),
                Err(Failure::Store(e)) => return Err(WriteError::Store(e)),
                Err(Failure::Aborted(m)) => return Err(WriteError::Store(StoreError::Internal(m))),
                Err(Failure::Conflict(reason)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(attempt, %reason, "write lost a race; running it again");
                    // A little jitter keeps two losers from colliding again in lockstep.
                    let pause = 1 + u64::from(Uuid::new_v4().as_bytes()[0] % 8) * attempt as u64;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    attempt += 1;
                }
                Err(Failure::Conflict(reason)) => {
                    return Err(WriteError::Store(StoreError::Unavailable(format!(
                        "the write kept conflicting with others ({MAX_ATTEMPTS} attempts): {reason}"
                    ))))
                }
            }
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        bounded("a ping", async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(classify)
        })
        .await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        bounded("a count", async {
            let client = self.client().await?;
            rows::counts(&client).await
        })
        .await
    }

    async fn apps(&self) -> Result<Vec<AppDefinition>, StoreError> {
        bounded("an app list", async {
            let client = self.client().await?;
            rows::apps(&client).await
        })
        .await
    }

    async fn profiles_after(
        &self,
        after: Option<(Uuid, Uuid)>,
        limit: u32,
    ) -> Result<Vec<ProfileState>, StoreError> {
        bounded("a profile page", async {
            let client = self.client().await?;
            rows::profiles_after(&client, after, limit).await
        })
        .await
    }

    async fn detached_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DetachedTransaction>, StoreError> {
        bounded("a transaction page", async {
            let client = self.client().await?;
            rows::detached_after(&client, after, limit).await
        })
        .await
    }

    async fn after_bulk_load(&self) -> Result<(), StoreError> {
        // Without fresh statistics the planner may take a million-row table for an empty one
        // and scan it on every read (seen in the benchmark: 261 reads/s instead of thousands).
        // VACUUM too: otherwise autovacuum starts on the freshly inserted rows while the new
        // store serves (a p99 of 190 ms in one benchmark run).
        let client = self.client().await?;
        client
            .batch_execute("VACUUM (ANALYZE) apps, profiles, transactions, events")
            .await
            .map_err(classify)
    }

    async fn due_expirations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueExpiry>, StoreError> {
        bounded("an expiry scan", async {
            let client = self.client().await?;
            rows::due_expirations(&client, now, limit).await
        })
        .await
    }

    async fn claim_events(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        bounded("an event claim", async {
            let client = self.client().await?;
            rows::claim_events(&client, now, lease_until, limit).await
        })
        .await
    }

    async fn finish_deliveries(
        &self,
        results: Vec<(Uuid, DeliveryResult)>,
    ) -> Result<(), StoreError> {
        bounded("a delivery update", async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(classify)?;
            // Sent together: tokio-postgres pipelines queries polled at once.
            futures_util::future::try_join_all(
                results
                    .iter()
                    .map(|(id, result)| rows::finish_delivery(&tx, *id, result)),
            )
            .await?;
            tx.commit().await.map_err(classify)
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
        bounded("an event list", async {
            let client = self.client().await?;
            rows::list_events(&client, app_id, profile_id, after_seq, limit).await
        })
        .await
    }

    async fn get_event(&self, app_id: Uuid, id: Uuid) -> Result<Option<StoredEvent>, StoreError> {
        bounded("an event read", async {
            let client = self.client().await?;
            rows::get_event(&client, app_id, id).await
        })
        .await
    }

    async fn redeliver(
        &self,
        app_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<StoredEvent>, StoreError> {
        bounded("a redelivery", async {
            let client = self.client().await?;
            rows::redeliver(&client, app_id, id, now).await
        })
        .await
    }

    async fn import(
        &self,
        profiles: Vec<ImportedProfile>,
        detached: Vec<DetachedTransaction>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(classify)?;
        rows::import(&tx, &profiles, &detached).await?;
        tx.commit().await.map_err(classify)
    }

    async fn events_after(
        &self,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        bounded("an event list", async {
            let client = self.client().await?;
            rows::events_after(&client, after_seq, limit).await
        })
        .await
    }

    async fn delete_settled_events(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        bounded("deleting old events", async {
            let client = self.client().await?;
            rows::delete_settled_events(&client, before, limit).await
        })
        .await
    }

    async fn import_events(&self, events: Vec<StoredEvent>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(classify)?;
        rows::import_events(&tx, &events).await?;
        tx.commit().await.map_err(classify)
    }
}
