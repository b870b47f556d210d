//! The storage boundary. A backend offers point reads and one kind of write: load a profile
//! (and the transactions a write touches) under a lock, let a pure `decide` function compute
//! the new state, and persist it atomically. Concurrency is the backend's job (a single writer
//! on SQLite; row locks and constraints on PostgreSQL), never the caller's.

use crate::error::ApiError;
use crate::events::NewEvent;
use crate::model::{AppDefinition, Environment, Profile, ProfileKey, ProfileState, Transaction};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::sync::Arc;
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or refused to work (answered as 503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else that went wrong inside the backend (answered as 500).
    #[error("storage failure: {0}")]
    Internal(String),
}

/// What a write should load before deciding.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    /// Load the profile with this id (takes precedence over the customer user id).
    pub profile_id: Option<Uuid>,
    /// Load the profile with this customer user id, and report which profile holds it.
    pub customer_user_id: Option<String>,
    /// Also load every transaction of this chain (`store`, `store_original_transaction_id`) and
    /// the transaction `store_transaction_id` of that store, on any profile or none.
    pub chain: Option<ChainRef>,
}

impl Lookup {
    /// The key the profile is loaded by: its id when given, else its customer user id.
    pub fn profile_key(&self) -> Option<ProfileKey> {
        match (self.profile_id, &self.customer_user_id) {
            (Some(id), _) => Some(ProfileKey::Id(id)),
            (None, Some(cuid)) => Some(ProfileKey::CustomerUserId(cuid.clone())),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRef {
    pub store: String,
    pub store_transaction_id: String,
    pub store_original_transaction_id: String,
}

/// What `decide` sees.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Shared, so a backend can hand over the state it keeps (a cache) without copying it;
    /// a decision copies what it changes.
    pub profile: Option<Arc<ProfileState>>,
    /// The profile that holds the requested customer user id, if any.
    pub customer_user_id_owner: Option<Uuid>,
    /// The transactions named by [`Lookup::chain`], wherever they are attached.
    pub related: Vec<Transaction>,
}

impl Loaded {
    /// The profiles that saving `transactions` takes a transaction from (a restored chain):
    /// where each was attached when loaded, if that is another profile than its new one. Every
    /// transaction a decision saves that already existed was loaded in `related`.
    pub fn owners_left_by(&self, transactions: &[Transaction]) -> Vec<Uuid> {
        let mut owners: Vec<Uuid> = transactions
            .iter()
            .filter_map(|t| {
                self.related
                    .iter()
                    .find(|r| {
                        r.store == t.store && r.store_transaction_id == t.store_transaction_id
                    })
                    .and_then(|r| r.profile_id)
                    .filter(|&owner| Some(owner) != t.profile_id)
            })
            .collect();
        owners.sort_unstable();
        owners.dedup();
        owners
    }
}

/// What `decide` wants written.
#[derive(Debug, Clone)]
pub enum Change {
    /// Write nothing and answer with what was loaded.
    Keep,
    /// Insert or update the profile (its `version` already bumped; `version == 1` is an insert)
    /// and upsert `transactions` (keyed by app, store and store transaction id).
    Save {
        state: ProfileState,
        transactions: Vec<Transaction>,
        /// Stored in the same commit, for the webhook worker to deliver.
        events: Vec<NewEvent>,
        /// The profile's answer to a read, as [`crate::service::ProfileRenderer`] made it:
        /// kept with the profile, replacing the one before (`None` leaves none).
        rendered: Option<Vec<u8>>,
    },
    /// Delete the profile and detach its transactions.
    Delete { profile: Profile },
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Saved {
        /// Shared, so a backend can keep the committed state (a cache) without copying it.
        state: Arc<ProfileState>,
        /// The answer to a read stored with it ([`Change::Save`]'s), handed back so that the
        /// write's own response need not render the profile again.
        rendered: Option<Vec<u8>>,
    },
    Kept(Option<Arc<ProfileState>>),
    Deleted,
}

/// Pure decision run inside the backend's transaction. It may be run more than once when a
/// backend retries after a conflict, so it must not have side effects.
pub type Decide = Box<dyn Fn(&Loaded) -> Result<Change, ApiError> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Rejected(#[from] ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How much a store holds, for `copy-store`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub apps: u64,
    pub profiles: u64,
    pub transactions: u64,
    pub events: u64,
}

/// A profile as [`Store::import`] writes it.
#[derive(Debug, Clone)]
pub struct ImportedProfile {
    pub state: ProfileState,
    /// Its answer to a read, as in [`Change::Save`].
    pub rendered: Option<Vec<u8>>,
}

/// A transaction no profile holds any more (its profile was deleted), with its app.
#[derive(Debug, Clone, PartialEq)]
pub struct DetachedTransaction {
    pub app_id: Uuid,
    pub transaction: Transaction,
}

/// Where an event is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its first or next attempt.
    Pending,
    /// An endpoint answered 200-404.
    Delivered,
    /// Every retry failed; kept for the feed and a manual redelivery.
    Failed,
    /// The app has no webhook endpoint for the event's environment.
    NoEndpoint,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::NoEndpoint => "no_endpoint",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            DeliveryState::Pending,
            DeliveryState::Delivered,
            DeliveryState::Failed,
            DeliveryState::NoEndpoint,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
}

/// An event as stored, with its delivery state.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: Uuid,
    /// Order of creation across the whole store; the feed's cursor.
    pub seq: i64,
    pub app_id: Uuid,
    pub profile_id: Uuid,
    pub event_type: String,
    pub environment: Environment,
    pub created_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    pub state: DeliveryState,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// The outcome of one delivery attempt, as the worker records it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryResult {
    pub state: DeliveryState,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub at: DateTime<Utc>,
    /// Whether this was an attempt (counted) or a decision without one (no endpoint).
    pub attempted: bool,
}

/// A subscription period that has ended and whose expiry has not been dealt with.
#[derive(Debug, Clone, PartialEq)]
pub struct DueExpiry {
    pub app_id: Uuid,
    pub profile_id: Uuid,
    pub chain: ChainRef,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Upserts the configured apps (config as code) at start.
    async fn put_apps(&self, apps: &[AppDefinition]) -> Result<(), StoreError>;

    /// The profile's rendered answer to a read, as its last write stored it; `None` when there
    /// is no such profile or it has none.
    async fn load_rendered(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores `rendered` as the profile's answer if the profile is still at `version`: a read
    /// rendered it because the stored one no longer held. Answers whether it was stored.
    async fn save_rendered(
        &self,
        app_id: Uuid,
        profile_id: Uuid,
        version: i64,
        rendered: Vec<u8>,
    ) -> Result<bool, StoreError>;

    /// Shared, so a store may hand out a profile it keeps in memory without copying it.
    async fn load_profile(
        &self,
        app_id: Uuid,
        key: &ProfileKey,
    ) -> Result<Option<Arc<ProfileState>>, StoreError>;

    /// Loads what `lookup` names, runs `decide`, and applies its change in one transaction.
    async fn write(
        &self,
        app_id: Uuid,
        lookup: Lookup,
        decide: Decide,
    ) -> Result<Outcome, WriteError>;

    /// Cheap liveness check of the database, for `/ready`.
    async fn ping(&self) -> Result<(), StoreError>;

    // Bulk access for `copy-store`: every row, in pages of a stable order.

    async fn counts(&self) -> Result<Counts, StoreError>;

    async fn apps(&self) -> Result<Vec<AppDefinition>, StoreError>;

    /// Profiles (with their transactions) ordered by (app id, profile id), after `after`.
    async fn profiles_after(
        &self,
        after: Option<(Uuid, Uuid)>,
        limit: u32,
    ) -> Result<Vec<ProfileState>, StoreError>;

    /// Detached transactions ordered by id, after `after`.
    async fn detached_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<DetachedTransaction>, StoreError>;

    /// Every app's events ordered by `seq`, after `after_seq`.
    async fn events_after(
        &self,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    // The event outbox and the expiry schedule, for the webhook worker and the event feed.

    /// Transactions whose period ended at or before `now` and is not dealt with yet.
    async fn due_expirations(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<DueExpiry>, StoreError>;

    /// Leases up to `limit` pending events due at `now` until `lease_until`, at most one per
    /// profile and never one while an earlier event of its profile is still pending (so a
    /// profile's events go out in order). Several nodes never lease the same event.
    async fn claim_events(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Records attempts' outcomes and releases their leases, in one transaction.
    async fn finish_deliveries(
        &self,
        results: Vec<(Uuid, DeliveryResult)>,
    ) -> Result<(), StoreError>;

    /// An app's events (one profile's, if given), oldest first, after the cursor `after_seq`.
    async fn list_events(
        &self,
        app_id: Uuid,
        profile_id: Option<Uuid>,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    async fn get_event(&self, app_id: Uuid, id: Uuid) -> Result<Option<StoredEvent>, StoreError>;

    /// Puts an event back to pending, due at `now`; `None` if the app has no such event.
    async fn redeliver(
        &self,
        app_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<StoredEvent>, StoreError>;

    /// Deletes up to `limit` of the oldest settled events (delivered, failed or without an
    /// endpoint; never a pending one) created before `before`; answers how many it deleted.
    /// It stops at the first event, in `seq` order, created at or after `before`, so a sweep
    /// reads the old events it deletes and little else.
    async fn delete_settled_events(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// After a bulk import: refresh the planner's statistics (and, on SQLite, fold the
    /// write-ahead log into the database), so the first requests do not pay for it.
    async fn after_bulk_load(&self) -> Result<(), StoreError>;

    /// Writes the rows exactly as given (ids, versions, timestamps and order kept) in one
    /// transaction, replacing rows with the same keys.
    async fn import(
        &self,
        profiles: Vec<ImportedProfile>,
        detached: Vec<DetachedTransaction>,
    ) -> Result<(), StoreError>;

    /// Writes events exactly as given, `seq` and delivery state included (a feed's cursor
    /// stays valid, a pending webhook is still sent), in one transaction, replacing events
    /// with the same id. A worker's lease on an event is not carried over.
    async fn import_events(&self, events: Vec<StoredEvent>) -> Result<(), StoreError>;
}
