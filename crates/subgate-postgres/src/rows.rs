//! SQL for the store's operations.

use crate::{classify, Failure};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use subgate_core::events::NewEvent;
use subgate_core::json::from_stored;
use subgate_core::model::{
    AppDefinition, Environment, Profile, ProfileDoc, ProfileKey, ProfileState, Transaction,
};
use subgate_core::store::{
    ChainRef, Change, Counts, Decide, DeliveryResult, DeliveryState, DetachedTransaction,
    DueExpiry, ImportedProfile, Loaded, Lookup, Outcome, StoreError, StoredEvent,
};
use subgate_core::time::{from_micros, to_micros};
use tokio_postgres::types::{FromSql, Json, Type};
use tokio_postgres::{Row, Statement};
use uuid::Uuid;

/// PostgreSQL keeps microseconds and rounds the rest; truncating first keeps what is read back
/// equal to what SQLite (which stores microseconds) gives for the same write.
fn column_time(t: &DateTime<Utc>) -> DateTime<Utc> {
    from_micros(to_micros(t))
}

/// A profile row with its transactions (migration 0004), in [`state_from`]'s column order.
const PROFILE_COLUMNS: &str =
    "app_id, id, customer_user_id, version, created_at, updated_at, doc, transactions";

fn profile_from(row: &Row) -> Result<Profile, StoreError> {
    let Stored(doc): Stored<ProfileDoc> = get(row, 6)?;
    Ok(Profile {
        app_id: get(row, 0)?,
        id: get(row, 1)?,
        customer_user_id: get(row, 2)?,
        version: get(row, 3)?,
        created_at: get(row, 4)?,
        updated_at: get(row, 5)?,
        doc,
    })
}

pub fn state_from(row: &Row) -> Result<ProfileState, StoreError> {
    let profile = profile_from(row)?;
    let Stored(transactions): Stored<Vec<Transaction>> = get(row, 7)?;
    let transactions = ProfileState::row_transactions(profile.id, transactions);
    Ok(ProfileState {
        profile,
        transactions,
    })
}

/// A `json` (or `jsonb`) column read with [`from_stored`], where `tokio_postgres`'s `Json` reads
/// with `serde_json::from_slice`.
struct Stored<T>(T);

impl<'a, T: DeserializeOwned> FromSql<'a> for Stored<T> {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = match (ty, raw) {
            // Binary `jsonb` starts with its format's version, 1.
            (&Type::JSONB, [1, text @ ..]) => text,
            (&Type::JSONB, _) => return Err("an unknown jsonb format".into()),
            (_, text) => text,
        };
        Ok(Stored(from_stored(text)?))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }
}

pub(crate) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| StoreError::Internal(format!("unreadable column {index}: {e}")))
}

/// The failure behind a pipelined group's failures. Once one statement fails, PostgreSQL
/// refuses the rest of the transaction (25P02), and such a refusal can be seen before the
/// failure that caused it; the cause decides whether the write runs again.
fn cause(failures: impl IntoIterator<Item = Failure>) -> Failure {
    let mut refusal = None;
    for failure in failures {
        match failure {
            Failure::Aborted(m) => {
                refusal.get_or_insert(m);
            }
            cause => return cause,
        }
    }
    Failure::Store(StoreError::Internal(
        refusal.unwrap_or_else(|| "a pipelined statement failed".into()),
    ))
}

/// What a read of [`load_profile_rows`] wants of each profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Its columns, for [`state_from`].
    State,
    /// Its `rendered` column alone.
    Rendered,
}

/// Several profiles, each by id or customer user id, in one statement (one snapshot); the
/// answer lines up with `keys`. Rows come back undecoded: each caller decodes its own
/// ([`state_from`]), in parallel, while the statement's connection serves the next batch.
pub async fn load_profile_rows(
    client: &impl GenericClient,
    keys: &[(Uuid, &ProfileKey)],
    wanted: Wanted,
) -> Result<Vec<Option<Row>>, StoreError> {
    const STATES: &str = "
        SELECT p.app_id, p.id, p.customer_user_id, p.version, p.created_at, p.updated_at, p.doc,
            p.transactions, k.i
        FROM unnest($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS k(app_id, id, cuid, i)
        CROSS JOIN LATERAL (
            SELECT app_id, id, customer_user_id, version, created_at, updated_at, doc, transactions
            FROM profiles WHERE app_id = k.app_id AND id = k.id
            UNION ALL
            SELECT app_id, id, customer_user_id, version, created_at, updated_at, doc, transactions
            FROM profiles WHERE app_id = k.app_id AND customer_user_id = k.cuid
        ) p";
    const RENDERED: &str = "
        SELECT p.rendered, k.i
        FROM unnest($1::uuid[], $2::uuid[], $3::text[]) WITH ORDINALITY AS k(app_id, id, cuid, i)
        CROSS JOIN LATERAL (
            SELECT rendered FROM profiles WHERE app_id = k.app_id AND id = k.id
            UNION ALL
            SELECT rendered FROM profiles WHERE app_id = k.app_id AND customer_user_id = k.cuid
        ) p";
    let (sql, ordinal_column) = match wanted {
        Wanted::State => (STATES, 8),
        Wanted::Rendered => (RENDERED, 1),
    };
    let apps: Vec<Uuid> = keys.iter().map(|(app, _)| *app).collect();
    let ids: Vec<Option<Uuid>> = keys
        .iter()
        .map(|(_, key)| match key {
            ProfileKey::Id(id) => Some(*id),
            ProfileKey::CustomerUserId(_) => None,
        })
        .collect();
    let cuids: Vec<Option<&str>> = keys
        .iter()
        .map(|(_, key)| match key {
            ProfileKey::Id(_) => None,
            ProfileKey::CustomerUserId(cuid) => Some(cuid.as_str()),
        })
        .collect();
    let stmt = client.prepare_cached(sql).await.map_err(classify)?;
    let rows = client
        .query(&stmt, &[&apps, &ids, &cuids])
        .await
        .map_err(classify)?;
    let mut found: Vec<Option<Row>> = keys.iter().map(|_| None).collect();
    for row in rows {
        let ordinal: i64 = get(&row, ordinal_column)?;
        let slot = usize::try_from(ordinal - 1)
            .ok()
            .and_then(|i| found.get_mut(i))
            .ok_or_else(|| StoreError::Internal(format!("a read answered key {ordinal}")))?;
        *slot = Some(row);
    }
    Ok(found)
}

/// Stores a read's answer for the profile if it is still at `version`. The trigger of
/// migration 0007 leaves an update of `rendered` alone.
pub async fn save_rendered(
    client: &impl GenericClient,
    app_id: Uuid,
    profile_id: Uuid,
    version: i64,
    rendered: &[u8],
) -> Result<bool, StoreError> {
    let stmt = client
        .prepare_cached(
            "UPDATE profiles SET rendered = $4 WHERE app_id = $1 AND id = $2 AND version = $3",
        )
        .await
        .map_err(classify)?;
    client
        .execute(&stmt, &[&app_id, &profile_id, &version, &rendered])
        .await
        .map(|changed| changed == 1)
        .map_err(classify)
}

/// Locks and loads the profile with its transactions, by the statement [`prepare_load`]
/// prepared for `key`. Under READ COMMITTED a locked row is its latest committed version, so it
/// holds every transaction moved to or from it so far.
async fn lock_profile(
    client: &impl GenericClient,
    stmt: &Statement,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<ProfileState>, Failure> {
    let row = match key {
        ProfileKey::Id(id) => client.query_opt(stmt, &[&app_id, id]).await?,
        ProfileKey::CustomerUserId(cuid) => client.query_opt(stmt, &[&app_id, cuid]).await?,
    };
    Ok(row.as_ref().map(state_from).transpose()?)
}

/// A profile's transactions as the transactions table holds them, as one JSON array. With no
/// index on `profile_id` (migration 0006) this scans the table: test builds only.
#[cfg(debug_assertions)]
const ATTACHED_TRANSACTIONS: &str = "COALESCE((SELECT json_agg(t.data ORDER BY t.position)
    FROM transactions t WHERE t.app_id = $1 AND t.profile_id = $2), '[]'::json)";

/// `profile_id`'s transactions as the table holds them, in the form its row keeps them.
#[cfg(debug_assertions)]
async fn attached_transactions(
    client: &impl GenericClient,
    app_id: Uuid,
    profile_id: Uuid,
) -> Result<Vec<Transaction>, Failure> {
    let row = client
        .query_one(
            &format!("SELECT {ATTACHED_TRANSACTIONS}"),
            &[&app_id, &profile_id],
        )
        .await?;
    let Stored(mut table): Stored<Vec<Transaction>> = get(&row, 0)?;
    for t in &mut table {
        t.profile_id = Some(profile_id);
    }
    Ok(table)
}

/// Drops the transactions a write on another profile moved from the list kept in their former
/// owner's row, keeping the others in their order, and the row's rendered answer, which lists
/// them; each is named by its store and store
/// transaction id, the table's unique key. The row's list equals the table, so the table needs
/// no search by profile (migration 0006). The list is filtered in the statement, on the row
/// version the update locks: a concurrent writer of that profile has committed its list by then.
async fn drop_moved(
    client: &impl GenericClient,
    app_id: Uuid,
    owner: Uuid,
    moved: &[&Transaction],
) -> Result<(), tokio_postgres::Error> {
    let stores: Vec<&str> = moved.iter().map(|t| t.store.as_str()).collect();
    let ids: Vec<&str> = moved
        .iter()
        .map(|t| t.store_transaction_id.as_str())
        .collect();
    let stmt = client
        .prepare_cached(
            "UPDATE profiles SET rendered = NULL, transactions = COALESCE(
                 (SELECT json_agg(kept.t ORDER BY kept.n)
                  FROM json_array_elements(transactions) WITH ORDINALITY AS kept(t, n)
                  WHERE NOT EXISTS (
                      SELECT 1 FROM unnest($3::text[], $4::text[]) AS m(store, id)
                      WHERE m.store = kept.t->>'store' AND m.id = kept.t->>'store_transaction_id'
                  )),
                 '[]'::json)
             WHERE app_id = $1 AND id = $2",
        )
        .await?;
    client
        .execute(&stmt, &[&app_id, &owner, &stores, &ids])
        .await
        .map(drop)
}

/// Locks the transactions of a chain (and the named transaction), on any profile: the chain's
/// later transactions (the partial index `transactions_chain`, migration 0006), its original,
/// found by its own id, and the named transaction. Each arm of the `OR` matches an index, so
/// PostgreSQL reads them as one bitmap; the first arm repeats the partial index's condition,
/// which is what lets the planner use that index.
const LOCK_CHAIN: &str = "SELECT profile_id, data FROM transactions
    WHERE app_id = $1 AND store = $2
      AND ((store_original_transaction_id = $3
            AND store_original_transaction_id <> store_transaction_id)
        OR (store_transaction_id = $3 AND store_original_transaction_id = $3)
        OR store_transaction_id = $4)
    ORDER BY position
    FOR UPDATE";

/// Locks and loads a chain's transactions by `LOCK_CHAIN`, prepared as `stmt`.
async fn lock_chain(
    client: &impl GenericClient,
    stmt: &Statement,
    app_id: Uuid,
    chain: &ChainRef,
) -> Result<Vec<Transaction>, Failure> {
    let rows = client
        .query(
            stmt,
            &[
                &app_id,
                &chain.store,
                &chain.store_original_transaction_id,
                &chain.store_transaction_id,
            ],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let profile_id: Option<Uuid> = get(row, 0)?;
            let Stored(mut t): Stored<Transaction> = get(row, 1)?;
            t.profile_id = profile_id;
            Ok(t)
        })
        .collect()
}

/// The statements a write's load runs, each with what it looks up, prepared (once per
/// connection; later from its cache, without a round trip): the profile's lock, the lookup of
/// another profile holding the customer user id, the chain's lock, each where the lookup needs
/// it.
struct LoadStatements<'a> {
    profile: Option<(Statement, ProfileKey)>,
    other_owner: Option<(Statement, &'a str)>,
    chain: Option<(Statement, &'a ChainRef)>,
}

async fn prepare_load<'a>(
    client: &impl GenericClient,
    lookup: &'a Lookup,
) -> Result<LoadStatements<'a>, tokio_postgres::Error> {
    let profile = match lookup.profile_key() {
        Some(key) => {
            let by = match key {
                ProfileKey::Id(_) => "id",
                ProfileKey::CustomerUserId(_) => "customer_user_id",
            };
            let sql = format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles WHERE app_id = $1 AND {by} = $2 FOR UPDATE"
            );
            Some((client.prepare_cached(&sql).await?, key))
        }
        None => None,
    };
    // Looked up by the customer user id itself, its owner is the profile locked.
    let other_owner = match (&lookup.customer_user_id, &profile) {
        (Some(cuid), Some((_, ProfileKey::Id(_)))) => Some((
            client
                .prepare_cached(
                    "SELECT id FROM profiles WHERE app_id = $1 AND customer_user_id = $2",
                )
                .await?,
            cuid.as_str(),
        )),
        _ => None,
    };
    let chain = match &lookup.chain {
        Some(chain) => Some((client.prepare_cached(LOCK_CHAIN).await?, chain)),
        None => None,
    };
    Ok(LoadStatements {
        profile,
        other_owner,
        chain,
    })
}

async fn load(
    client: &impl GenericClient,
    app_id: Uuid,
    lookup: &Lookup,
) -> Result<Loaded, Failure> {
    // Always the profile first, then its chain: one lock order for every writer. All three
    // statements go out at once, one round trip: PostgreSQL runs a connection's statements
    // in turn, so the chain is locked only once the profile is. The order they are sent in is
    // what makes that so: every statement is prepared first, tokio-postgres sends a prepared
    // statement's query on its future's first poll, and `join4` polls in order. (tokio's
    // `join!` rotates which future it polls first; with it, chains were sometimes locked
    // first, and writers deadlocked.)
    let statements = prepare_load(client, lookup).await?;
    // The transaction's BEGIN goes out first in the same round trip. Should it fail, the
    // statements after it ran alone (plain reads, their locks released at once), and the
    // write stops here.
    let begin = client.batch_execute("BEGIN");
    let profile = async {
        match &statements.profile {
            Some((stmt, key)) => lock_profile(client, stmt, app_id, key).await,
            None => Ok(None),
        }
    };
    let other_owner = async {
        match &statements.other_owner {
            Some((stmt, cuid)) => match client.query_opt(stmt, &[&app_id, cuid]).await? {
                Some(row) => Ok(Some(get(&row, 0)?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    };
    let related = async {
        match &statements.chain {
            Some((stmt, chain)) => lock_chain(client, stmt, app_id, chain).await,
            None => Ok(Vec::new()),
        }
    };
    let (begun, profile, other_owner, related) =
        futures_util::future::join4(begin, profile, other_owner, related).await;
    begun?;
    let (profile, other_owner, related) = match (profile, other_owner, related) {
        (Ok(profile), Ok(owner), Ok(related)) => (profile, owner, related),
        (a, b, c) => return Err(cause([a.err(), b.err(), c.err()].into_iter().flatten())),
    };
    let customer_user_id_owner = match statements.profile {
        Some((_, ProfileKey::CustomerUserId(_))) => profile.as_ref().map(|s| s.profile.id),
        _ => other_owner,
    };
    Ok(Loaded {
        profile: profile.map(Arc::new),
        customer_user_id_owner,
        related,
    })
}

const INSERT_PROFILE: &str = "INSERT INTO profiles
         (app_id, id, customer_user_id, version, created_at, updated_at, doc, transactions,
          rendered)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

/// Inserts the profile row, or with `upsert` replaces the row of the same id.
async fn insert_profile(
    client: &impl GenericClient,
    state: &ProfileState,
    rendered: Option<&[u8]>,
    upsert: bool,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = if upsert {
        client
            .prepare_cached(&format!(
                "{INSERT_PROFILE} ON CONFLICT (app_id, id) DO UPDATE SET
                     customer_user_id = excluded.customer_user_id, version = excluded.version,
                     created_at = excluded.created_at, updated_at = excluded.updated_at,
                     doc = excluded.doc, transactions = excluded.transactions,
                     rendered = excluded.rendered"
            ))
            .await?
    } else {
        client.prepare_cached(INSERT_PROFILE).await?
    };
    let p = &state.profile;
    let (created_at, updated_at) = (column_time(&p.created_at), column_time(&p.updated_at));
    client
        .execute(
            &stmt,
            &[
                &p.app_id,
                &p.id,
                &p.customer_user_id,
                &p.version,
                &created_at,
                &updated_at,
                &Json(&p.doc),
                &Json(&state.transactions),
                &rendered,
            ],
        )
        .await
}

/// Saves `state` over its row, which held `before` if the write loaded it.
async fn save_profile(
    client: &impl GenericClient,
    state: &ProfileState,
    rendered: Option<&[u8]>,
    before: Option<&ProfileState>,
) -> Result<(), Failure> {
    let p = &state.profile;
    let changed = if p.version == 1 {
        // A concurrent creator of the same id or customer user id makes this a unique
        // violation: the write is run again and then finds that profile.
        insert_profile(client, state, rendered, false).await?
    } else {
        // A document equal to the locked row's is left out (NULL keeps the column): a grant
        // leaves the transactions alone, a transaction the profile's document, and PostgreSQL
        // then neither parses nor compresses it again.
        let unchanged = state.unchanged_since(before);
        let doc = (!unchanged.doc).then_some(Json(&p.doc));
        let transactions = (!unchanged.transactions).then_some(Json(&state.transactions));
        let stmt = client
            .prepare_cached(
                "UPDATE profiles SET customer_user_id = $3, version = $4, updated_at = $5,
                     doc = coalesce($6, doc), transactions = coalesce($7, transactions),
                     rendered = $8
                 WHERE app_id = $1 AND id = $2 AND version = $4::bigint - 1",
            )
            .await?;
        client
            .execute(
                &stmt,
                &[
                    &p.app_id,
                    &p.id,
                    &p.customer_user_id,
                    &p.version,
                    &column_time(&p.updated_at),
                    &doc,
                    &transactions,
                    &rendered,
                ],
            )
            .await?
    };
    if changed != 1 {
        return Err(Failure::Conflict(format!(
            "profile {} changed under a write (version {})",
            p.id, p.version
        )));
    }
    Ok(())
}

const INSERT_TRANSACTION: &str = "INSERT INTO transactions (id, app_id, profile_id, store,
        store_transaction_id, store_original_transaction_id, data, expiry_due_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Runs `sql` with `t`'s columns as parameters $1 to $8, in `INSERT_TRANSACTION`'s order.
async fn run_with_transaction(
    client: &impl GenericClient,
    sql: &str,
    app_id: Uuid,
    t: &Transaction,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let stmt = client.prepare_cached(sql).await?;
    client
        .query(
            &stmt,
            &[
                &t.id,
                &app_id,
                &t.profile_id,
                &t.store,
                &t.store_transaction_id,
                &t.store_original_transaction_id,
                &Json(t),
                &t.expiry_due_at().map(|d| column_time(&d)),
            ],
        )
        .await
}

/// Inserts `t`; a row of the same store transaction makes it a unique violation.
async fn insert_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
) -> Result<(), tokio_postgres::Error> {
    run_with_transaction(client, INSERT_TRANSACTION, app_id, t)
        .await
        .map(drop)
}

/// Inserts `t` or replaces the row of the same store transaction. With `same_owner`, a row
/// attached to another profile is left alone; answers whether a row was written.
async fn upsert_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
    same_owner: bool,
) -> Result<bool, tokio_postgres::Error> {
    let condition = if same_owner {
        "WHERE transactions.profile_id IS NOT DISTINCT FROM excluded.profile_id"
    } else {
        ""
    };
    let sql = format!(
        "{INSERT_TRANSACTION}
         ON CONFLICT (app_id, store, store_transaction_id) DO UPDATE SET
             profile_id = excluded.profile_id,
             store_original_transaction_id = excluded.store_original_transaction_id,
             data = excluded.data,
             expiry_due_at = excluded.expiry_due_at
         {condition}
         RETURNING 1"
    );
    let rows = run_with_transaction(client, &sql, app_id, t).await?;
    Ok(!rows.is_empty())
}

/// Moves the row of `t`'s store transaction to `t`'s profile; answers the profile it left.
async fn move_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
) -> Result<Option<Uuid>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT profile_id FROM transactions
             WHERE app_id = $1 AND store = $2 AND store_transaction_id = $3 FOR UPDATE",
        )
        .await?;
    let previous = client
        .query_opt(&stmt, &[&app_id, &t.store, &t.store_transaction_id])
        .await?
        .map(|row| row.try_get::<_, Option<Uuid>>(0))
        .transpose()?
        .flatten();
    upsert_transaction(client, app_id, t, false).await?;
    Ok(previous)
}

async fn update_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE transactions SET profile_id = $4, store_original_transaction_id = $5, data = $6,
                 expiry_due_at = $7
             WHERE app_id = $1 AND store = $2 AND store_transaction_id = $3",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &app_id,
                &t.store,
                &t.store_transaction_id,
                &t.profile_id,
                &t.store_original_transaction_id,
                &Json(t),
                &t.expiry_due_at().map(|d| column_time(&d)),
            ],
        )
        .await
}

type Step<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Failure>> + Send + 'a>>;

/// Runs a write in a transaction it begins on `client`, a connection outside any; the caller
/// commits it when this answers `Ok`, and rolls it back otherwise.
pub async fn write(
    client: &impl GenericClient,
    app_id: Uuid,
    lookup: &Lookup,
    decide: &Decide,
) -> Result<Outcome, Failure> {
    let loaded = load(client, app_id, lookup).await?;
    match decide(&loaded).map_err(Failure::Rejected)? {
        Change::Keep => Ok(Outcome::Kept(loaded.profile)),
        Change::Save {
            state,
            transactions,
            events,
            rendered,
        } => {
            let known: HashSet<(&str, &str)> = loaded
                .related
                .iter()
                .chain(
                    loaded
                        .profile
                        .iter()
                        .flat_map(|p| p.transactions.iter().map(|t| &**t)),
                )
                .map(|t| (t.store.as_str(), t.store_transaction_id.as_str()))
                .collect();
            // All of the write's statements go out at once (tokio-postgres pipelines them on
            // the connection): one round trip instead of one per row.
            let mut steps: Vec<Step<'_>> = vec![Box::pin(save_profile(
                client,
                &state,
                rendered.as_deref(),
                loaded.profile.as_deref(),
            ))];
            for t in &transactions {
                if known.contains(&(t.store.as_str(), t.store_transaction_id.as_str())) {
                    steps.push(Box::pin(async move {
                        match update_transaction(client, app_id, t).await? {
                            1 => Ok(()),
                            _ => Err(Failure::Conflict(format!(
                                "transaction {} vanished under a write",
                                t.store_transaction_id
                            ))),
                        }
                    }));
                } else {
                    // Someone else recording it first makes this a unique violation: rerun.
                    steps.push(Box::pin(async move {
                        insert_transaction(client, app_id, t).await?;
                        Ok(())
                    }));
                }
            }
            for e in &events {
                steps.push(Box::pin(async move {
                    insert_event(client, app_id, e).await?;
                    Ok(())
                }));
            }
            let results = futures_util::future::join_all(steps).await;
            if results.iter().any(Result::is_err) {
                return Err(cause(results.into_iter().filter_map(Result::err)));
            }
            // Profiles that transactions left (a restored chain): their rows must drop them.
            // Their transaction rows are locked already (`lock_chain`); taking their profile
            // rows now can deadlock with a writer of that profile, and PostgreSQL then fails
            // one of the two, which runs again.
            let moved_from = loaded.owners_left_by(&transactions);
            for &owner in &moved_from {
                let left: Vec<&Transaction> = transactions
                    .iter()
                    .filter(|t| t.profile_id != Some(owner))
                    .collect();
                drop_moved(client, app_id, owner, &left).await?;
            }
            // Every test build checks the row's copy against the transactions table, for the
            // profile written and for each profile its transactions left, and that the row
            // reads back as the state saved (an update leaves unchanged documents out).
            #[cfg(debug_assertions)]
            {
                let row = client
                    .query_one(
                        &format!(
                            "SELECT {PROFILE_COLUMNS} FROM profiles WHERE app_id = $1 AND id = $2"
                        ),
                        &[&app_id, &state.profile.id],
                    )
                    .await?;
                assert_eq!(
                    state_from(&row)?,
                    state,
                    "a saved state differs from its read"
                );
                assert_eq!(
                    attached_transactions(client, app_id, state.profile.id)
                        .await?
                        .into_iter()
                        .map(Arc::new)
                        .collect::<Vec<_>>(),
                    state.transactions,
                    "a profile row's transactions differ from the transactions table"
                );
                for &owner in &moved_from {
                    let row = client
                        .query_opt(
                            "SELECT transactions FROM profiles WHERE app_id = $1 AND id = $2",
                            &[&app_id, &owner],
                        )
                        .await?;
                    if let Some(row) = row {
                        let Stored(kept): Stored<Vec<Transaction>> = get(&row, 0)?;
                        assert_eq!(
                            kept,
                            attached_transactions(client, app_id, owner).await?,
                            "a former owner's row keeps transactions the table moved"
                        );
                    }
                }
            }
            Ok(Outcome::Saved {
                state: Arc::new(state),
                rendered,
            })
        }
        Change::Delete { profile } => {
            // The row lists its transactions (the table has no index by profile): each is
            // detached by its id, from the list the delete itself returns. The profile's row is
            // locked before its transactions, the order every write of that profile takes.
            let stmt = client
                .prepare_cached(
                    "WITH gone AS (
                         DELETE FROM profiles WHERE app_id = $1 AND id = $2 RETURNING transactions
                     )
                     UPDATE transactions SET profile_id = NULL
                     WHERE app_id = $1 AND profile_id = $2 AND id IN (
                         SELECT (t->>'id')::uuid FROM gone, json_array_elements(gone.transactions) t
                     )",
                )
                .await?;
            client.execute(&stmt, &[&app_id, &profile.id]).await?;
            Ok(Outcome::Deleted)
        }
    }
}

pub async fn put_apps(
    client: &impl GenericClient,
    apps: &[AppDefinition],
) -> Result<(), StoreError> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO apps (id, name, definition, updated_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (id) DO UPDATE SET name = excluded.name,
                 definition = excluded.definition, updated_at = excluded.updated_at",
        )
        .await
        .map_err(classify)?;
    for app in apps {
        client
            .execute(&stmt, &[&app.id, &app.name, &Json(app)])
            .await
            .map_err(classify)?;
    }
    Ok(())
}

pub async fn counts(client: &impl GenericClient) -> Result<Counts, StoreError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM apps), (SELECT count(*) FROM profiles),
                    (SELECT count(*) FROM transactions), (SELECT count(*) FROM events)",
            &[],
        )
        .await
        .map_err(classify)?;
    let count = |i| get::<i64>(&row, i).map(|n| n.max(0) as u64);
    Ok(Counts {
        apps: count(0)?,
        profiles: count(1)?,
        transactions: count(2)?,
        events: count(3)?,
    })
}

pub async fn apps(client: &impl GenericClient) -> Result<Vec<AppDefinition>, StoreError> {
    let rows = client
        .query("SELECT definition FROM apps ORDER BY id", &[])
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|row| get::<Stored<AppDefinition>>(row, 0).map(|Stored(app)| app))
        .collect()
}

pub async fn profiles_after(
    client: &impl GenericClient,
    after: Option<(Uuid, Uuid)>,
    limit: u32,
) -> Result<Vec<ProfileState>, StoreError> {
    let (app_id, id) = after.unzip();
    let sql = format!(
        "SELECT {PROFILE_COLUMNS} FROM profiles
         WHERE $1::uuid IS NULL OR (app_id, id) > ($1, $2)
         ORDER BY app_id, id LIMIT $3"
    );
    let rows = client
        .query(&sql, &[&app_id, &id, &i64::from(limit)])
        .await
        .map_err(classify)?;
    rows.iter().map(state_from).collect()
}

pub async fn detached_after(
    client: &impl GenericClient,
    after: Option<Uuid>,
    limit: u32,
) -> Result<Vec<DetachedTransaction>, StoreError> {
    let rows = client
        .query(
            "SELECT app_id, data FROM transactions
             WHERE profile_id IS NULL AND ($1::uuid IS NULL OR id > $1)
             ORDER BY id LIMIT $2",
            &[&after, &i64::from(limit)],
        )
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|row| {
            let Stored(mut transaction): Stored<Transaction> = get(row, 1)?;
            transaction.profile_id = None;
            Ok(DetachedTransaction {
                app_id: get(row, 0)?,
                transaction,
            })
        })
        .collect()
}

pub async fn import(
    client: &impl GenericClient,
    profiles: &[ImportedProfile],
    detached: &[DetachedTransaction],
) -> Result<(), StoreError> {
    // Every statement of the batch is put in flight at once: tokio-postgres pipelines them on
    // the connection, in order, so a batch costs a few round trips instead of one per row.
    let profile_rows = profiles.iter().map(|p| async move {
        insert_profile(client, &p.state, p.rendered.as_deref(), true)
            .await
            .map_err(classify)
            .map(drop)
    });
    futures_util::future::try_join_all(profile_rows).await?;
    let transactions: Vec<(Uuid, &Transaction)> = profiles
        .iter()
        .map(|p| &p.state)
        .flat_map(|state| {
            state
                .transactions
                .iter()
                .map(|t| (state.profile.app_id, &**t))
        })
        .chain(detached.iter().map(|d| (d.app_id, &d.transaction)))
        .collect();
    // The common case (a new row, or one on the same profile) is one pipelined upsert each.
    // A row on another profile (`copy-store --overwrite`) is left by it and moved after, and
    // the profile it leaves gets its row rebuilt.
    let upserts = transactions.iter().map(|&(app_id, t)| async move {
        let written = upsert_transaction(client, app_id, t, true)
            .await
            .map_err(classify)?;
        Ok::<_, StoreError>((!written).then_some((app_id, t)))
    });
    let to_move: Vec<(Uuid, &Transaction)> = futures_util::future::try_join_all(upserts)
        .await?
        .into_iter()
        .flatten()
        .collect();
    // Each former owner, with the transactions that left it.
    let mut moved_from: HashMap<(Uuid, Uuid), Vec<&Transaction>> = HashMap::new();
    for (app_id, t) in to_move {
        let previous = move_transaction(client, app_id, t)
            .await
            .map_err(classify)?;
        if let Some(owner) = previous {
            moved_from.entry((app_id, owner)).or_default().push(t);
        }
    }
    for ((app_id, owner), moved) in moved_from {
        drop_moved(client, app_id, owner, &moved)
            .await
            .map_err(classify)?;
    }
    Ok(())
}

async fn insert_event(
    client: &impl GenericClient,
    app_id: Uuid,
    e: &NewEvent,
) -> Result<(), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO events (id, app_id, profile_id, event_type, environment, created_at,
                 payload, state, next_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $8 = 'pending' THEN $6::timestamptz END)",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &e.id,
                &app_id,
                &e.profile_id,
                &e.event_type.as_str(),
                &e.environment.as_str(),
                &column_time(&e.occurred_at),
                &Json(&e.payload),
                &if e.deliver {
                    DeliveryState::Pending
                } else {
                    DeliveryState::NoEndpoint
                }
                .as_str(),
            ],
        )
        .await
        .map(drop)
}

pub async fn due_expirations(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<DueExpiry>, StoreError> {
    let stmt = client
        .prepare_cached(
            "SELECT app_id, profile_id, store, store_transaction_id, store_original_transaction_id
             FROM transactions
             WHERE expiry_due_at <= $1 AND profile_id IS NOT NULL
             ORDER BY expiry_due_at LIMIT $2",
        )
        .await
        .map_err(classify)?;
    let rows = client
        .query(&stmt, &[&now, &i64::from(limit)])
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|row| {
            Ok(DueExpiry {
                app_id: get(row, 0)?,
                profile_id: get(row, 1)?,
                chain: ChainRef {
                    store: get(row, 2)?,
                    store_transaction_id: get(row, 3)?,
                    store_original_transaction_id: get(row, 4)?,
                },
            })
        })
        .collect()
}

const EVENT_COLUMNS: &str = "seq, id, app_id, profile_id, event_type, environment, created_at,
    payload, state, attempts, last_status, last_error, next_attempt_at, delivered_at";

fn event_from(row: &Row) -> Result<StoredEvent, StoreError> {
    let environment: String = get(row, 5)?;
    let state: String = get(row, 8)?;
    let Stored(payload): Stored<serde_json::Value> = get(row, 7)?;
    Ok(StoredEvent {
        seq: get(row, 0)?,
        id: get(row, 1)?,
        app_id: get(row, 2)?,
        profile_id: get(row, 3)?,
        event_type: get(row, 4)?,
        environment: Environment::parse(&environment).ok_or_else(|| {
            StoreError::Internal(format!("unreadable event environment {environment}"))
        })?,
        created_at: get(row, 6)?,
        payload,
        state: DeliveryState::parse(&state)
            .ok_or_else(|| StoreError::Internal(format!("unreadable event state {state}")))?,
        attempts: get(row, 9)?,
        last_status: get(row, 10)?,
        last_error: get(row, 11)?,
        next_attempt_at: get(row, 12)?,
        delivered_at: get(row, 13)?,
    })
}

pub async fn claim_events(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    // SKIP LOCKED: nodes claiming at once take different events. An event whose profile has
    // an earlier pending one waits for it, whoever holds that one.
    let sql = format!(
        "UPDATE events SET lease_until = $2 WHERE seq IN (
             SELECT e.seq FROM events e
             WHERE e.state = 'pending' AND e.next_attempt_at <= $1
               AND (e.lease_until IS NULL OR e.lease_until <= $1)
               AND NOT EXISTS (SELECT 1 FROM events p
                   WHERE p.app_id = e.app_id AND p.profile_id = e.profile_id
                     AND p.state = 'pending' AND p.seq < e.seq)
             ORDER BY e.seq LIMIT $3
             FOR UPDATE SKIP LOCKED)
         RETURNING {EVENT_COLUMNS}"
    );
    let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
    let rows = client
        .query(&stmt, &[&now, &lease_until, &i64::from(limit)])
        .await
        .map_err(classify)?;
    let mut events = rows.iter().map(event_from).collect::<Result<Vec<_>, _>>()?;
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

pub async fn finish_delivery(
    client: &impl GenericClient,
    id: Uuid,
    result: &DeliveryResult,
) -> Result<(), StoreError> {
    let stmt = client
        .prepare_cached(
            "UPDATE events SET state = $2, attempts = attempts + $3, last_status = $4,
                 last_error = $5, next_attempt_at = $6, lease_until = NULL,
                 delivered_at = CASE WHEN $2 = 'delivered' THEN $7 ELSE delivered_at END
             WHERE id = $1",
        )
        .await
        .map_err(classify)?;
    client
        .execute(
            &stmt,
            &[
                &id,
                &result.state.as_str(),
                &i32::from(result.attempted),
                &result.status,
                &result.error,
                &result.next_attempt_at,
                &result.at,
            ],
        )
        .await
        .map_err(classify)?;
    Ok(())
}

pub async fn list_events(
    client: &impl GenericClient,
    app_id: Uuid,
    profile_id: Option<Uuid>,
    after_seq: Option<i64>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE app_id = $1 AND ($2::uuid IS NULL OR profile_id = $2) AND seq > $3
         ORDER BY seq LIMIT $4"
    );
    let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
    let rows = client
        .query(
            &stmt,
            &[
                &app_id,
                &profile_id,
                &after_seq.unwrap_or(0),
                &i64::from(limit),
            ],
        )
        .await
        .map_err(classify)?;
    rows.iter().map(event_from).collect()
}

pub async fn events_after(
    client: &impl GenericClient,
    after_seq: Option<i64>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2");
    let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
    let rows = client
        .query(&stmt, &[&after_seq.unwrap_or(0), &i64::from(limit)])
        .await
        .map_err(classify)?;
    rows.iter().map(event_from).collect()
}

/// See `Store::import_events`; `seq` is an identity column, which the insert overrides and
/// whose sequence then moves past the largest `seq` written.
pub async fn import_events(
    client: &impl GenericClient,
    events: &[StoredEvent],
) -> Result<(), StoreError> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO events (seq, id, app_id, profile_id, event_type, environment, created_at,
                 payload, state, attempts, last_status, last_error, next_attempt_at, delivered_at)
             OVERRIDING SYSTEM VALUE
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO UPDATE SET app_id = excluded.app_id,
                 profile_id = excluded.profile_id, event_type = excluded.event_type,
                 environment = excluded.environment, created_at = excluded.created_at,
                 payload = excluded.payload, state = excluded.state,
                 attempts = excluded.attempts, last_status = excluded.last_status,
                 last_error = excluded.last_error, next_attempt_at = excluded.next_attempt_at,
                 delivered_at = excluded.delivered_at, lease_until = NULL",
        )
        .await
        .map_err(classify)?;
    // Pipelined, as `import` does: a page of events costs a few round trips, not one each.
    let inserts = events.iter().map(|e| {
        let stmt = &stmt;
        async move {
            client
                .execute(
                    stmt,
                    &[
                        &e.seq,
                        &e.id,
                        &e.app_id,
                        &e.profile_id,
                        &e.event_type,
                        &e.environment.as_str(),
                        &e.created_at,
                        &Json(&e.payload),
                        &e.state.as_str(),
                        &e.attempts,
                        &e.last_status,
                        &e.last_error,
                        &e.next_attempt_at,
                        &e.delivered_at,
                    ],
                )
                .await
                .map_err(classify)
        }
    });
    futures_util::future::try_join_all(inserts).await?;
    client
        .execute(
            "SELECT setval(pg_get_serial_sequence('events', 'seq'), max(seq)) FROM events",
            &[],
        )
        .await
        .map_err(classify)?;
    Ok(())
}

pub async fn delete_settled_events(
    client: &impl GenericClient,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    // SKIP LOCKED: nodes sweeping at once delete different events, without waiting.
    let stmt = client
        .prepare_cached(
            "DELETE FROM events WHERE seq IN (
                 SELECT seq FROM events
                 WHERE seq < coalesce(
                         (SELECT seq FROM events WHERE created_at >= $1 ORDER BY seq LIMIT 1),
                         9223372036854775807)
                   AND state <> 'pending'
                 ORDER BY seq LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
        )
        .await
        .map_err(classify)?;
    client
        .execute(&stmt, &[&before, &i64::from(limit)])
        .await
        .map_err(classify)
}

pub async fn get_event(
    client: &impl GenericClient,
    app_id: Uuid,
    id: Uuid,
) -> Result<Option<StoredEvent>, StoreError> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE app_id = $1 AND id = $2");
    let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
    let row = client
        .query_opt(&stmt, &[&app_id, &id])
        .await
        .map_err(classify)?;
    row.as_ref().map(event_from).transpose()
}

pub async fn redeliver(
    client: &impl GenericClient,
    app_id: Uuid,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<StoredEvent>, StoreError> {
    let sql = format!(
        "UPDATE events SET state = 'pending', next_attempt_at = $3, lease_until = NULL
         WHERE app_id = $1 AND id = $2
         RETURNING {EVENT_COLUMNS}"
    );
    let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
    let row = client
        .query_opt(&stmt, &[&app_id, &id, &now])
        .await
        .map_err(classify)?;
    row.as_ref().map(event_from).transpose()
}

#[cfg(test)]
mod tests {
    use super::LOCK_CHAIN;
    use crate::schema::MIGRATIONS;

    /// The plan PostgreSQL keeps for a prepared statement once it stops planning it per call.
    async fn generic_plan(client: &tokio_postgres::Client, sql: &str, args: &str) -> String {
        client
            .batch_execute(&format!(
                "SET plan_cache_mode = force_generic_plan; PREPARE probe AS {sql}"
            ))
            .await
            .expect("prepare");
        let rows = client
            .query(&format!("EXPLAIN EXECUTE probe({args})"), &[])
            .await
            .expect("explain");
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Migration 0006 left the chain with a partial index: the lock must still find every row
    /// through indexes. With sequential scans priced out, a plan that cannot prove the partial
    /// index's condition would scan the table.
    #[tokio::test]
    async fn the_chain_lock_searches_indexes_and_never_scans() {
        let url = std::env::var("SUBGATE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("the PostgreSQL tests need a server at {url}: {e}"));
        tokio::spawn(connection);
        let schema = format!("subgate_plan_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema}"
            ))
            .await
            .expect("schema");
        for (_, _, sql) in MIGRATIONS {
            client.batch_execute(sql).await.expect("migration");
        }
        // Statistics like a real install's (one app, one store, a renewal in ten rows): on an
        // empty table the planner finds any plan as cheap, and this one scanned the app's
        // whole store through `transactions_store_id`.
        client
            .batch_execute(
                "INSERT INTO transactions (id, app_id, store, store_transaction_id,
                     store_original_transaction_id, data)
                 SELECT gen_random_uuid(), '6a0c2f5e-1b7d-4c3e-9f21-0d5b8e7a4c11', 'app_store',
                     't-' || n, CASE WHEN n % 10 = 0 THEN 't-' || (n - 1) ELSE 't-' || n END,
                     '{}'::json
                 FROM generate_series(1, 20000) n;
                 ANALYZE transactions;
                 SET enable_seqscan = off",
            )
            .await
            .expect("rows");
        let plan = generic_plan(
            &client,
            LOCK_CHAIN,
            "'6a0c2f5e-1b7d-4c3e-9f21-0d5b8e7a4c11', 'app_store', 'orig-1', 'renewal-2'",
        )
        .await;
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .expect("drop");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        assert!(plan.contains("transactions_chain"), "{plan}");
        assert!(plan.contains("transactions_store_id"), "{plan}");
    }
}
