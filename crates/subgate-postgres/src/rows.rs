//! SQL for the store's operations.

use crate::{classify, Failure};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use std::collections::HashSet;
use subgate_core::model::{
    AppDefinition, Profile, ProfileDoc, ProfileKey, ProfileState, Transaction,
};
use subgate_core::store::{ChainRef, StoreError};
use subgate_core::store::{Change, Counts, Decide, DetachedTransaction, Loaded, Lookup, Outcome};
use subgate_core::time::{from_micros, to_micros};
use tokio_postgres::types::Json;
use tokio_postgres::Row;
use uuid::Uuid;

/// PostgreSQL keeps microseconds and rounds the rest; truncating first keeps what is read back
/// equal to what SQLite (which stores microseconds) gives for the same write.
fn column_time(t: &DateTime<Utc>) -> DateTime<Utc> {
    from_micros(to_micros(t))
}

/// A profile and its transactions in one statement, so a read sees one snapshot.
const PROFILE_WITH_TRANSACTIONS: &str = "
    SELECT p.app_id, p.id, p.customer_user_id, p.version, p.created_at, p.updated_at, p.doc,
        COALESCE((SELECT json_agg(t.data ORDER BY t.position) FROM transactions t
                  WHERE t.app_id = p.app_id AND t.profile_id = p.id), '[]'::json)
    FROM profiles p";

fn profile_from(row: &Row) -> Result<Profile, StoreError> {
    let doc: Json<ProfileDoc> = get(row, 6)?;
    Ok(Profile {
        app_id: get(row, 0)?,
        id: get(row, 1)?,
        customer_user_id: get(row, 2)?,
        version: get(row, 3)?,
        created_at: get(row, 4)?,
        updated_at: get(row, 5)?,
        doc: doc.0,
    })
}

fn state_from(row: &Row) -> Result<ProfileState, StoreError> {
    let profile = profile_from(row)?;
    let Json(mut transactions): Json<Vec<Transaction>> = get(row, 7)?;
    // The column is the truth: detaching and re-attaching only rewrite it.
    for t in &mut transactions {
        t.profile_id = Some(profile.id);
    }
    Ok(ProfileState {
        profile,
        transactions,
    })
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| StoreError::Internal(format!("unreadable column {index}: {e}")))
}

pub async fn load_profile(
    client: &impl GenericClient,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<ProfileState>, StoreError> {
    let row = match key {
        ProfileKey::Id(id) => {
            let sql = format!("{PROFILE_WITH_TRANSACTIONS} WHERE p.app_id = $1 AND p.id = $2");
            let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
            client.query_opt(&stmt, &[&app_id, id]).await
        }
        ProfileKey::CustomerUserId(cuid) => {
            let sql = format!(
                "{PROFILE_WITH_TRANSACTIONS} WHERE p.app_id = $1 AND p.customer_user_id = $2"
            );
            let stmt = client.prepare_cached(&sql).await.map_err(classify)?;
            client.query_opt(&stmt, &[&app_id, cuid]).await
        }
    }
    .map_err(classify)?;
    row.as_ref().map(state_from).transpose()
}

/// Loads and locks the profile a write names. A separate statement then reads its
/// transactions: under READ COMMITTED it sees everything the previous lock holder committed.
async fn lock_profile(
    client: &impl GenericClient,
    app_id: Uuid,
    lookup: &Lookup,
) -> Result<Option<ProfileState>, Failure> {
    const COLUMNS: &str =
        "SELECT app_id, id, customer_user_id, version, created_at, updated_at, doc FROM profiles";
    let row = match (&lookup.profile_id, &lookup.customer_user_id) {
        (Some(id), _) => {
            let sql = format!("{COLUMNS} WHERE app_id = $1 AND id = $2 FOR UPDATE");
            let stmt = client.prepare_cached(&sql).await?;
            client.query_opt(&stmt, &[&app_id, id]).await?
        }
        (None, Some(cuid)) => {
            let sql = format!("{COLUMNS} WHERE app_id = $1 AND customer_user_id = $2 FOR UPDATE");
            let stmt = client.prepare_cached(&sql).await?;
            client.query_opt(&stmt, &[&app_id, cuid]).await?
        }
        (None, None) => None,
    };
    let Some(row) = row else { return Ok(None) };
    let profile = profile_from(&row)?;
    let stmt = client
        .prepare_cached(
            "SELECT data FROM transactions WHERE app_id = $1 AND profile_id = $2 ORDER BY position",
        )
        .await?;
    let mut transactions = Vec::new();
    for row in client.query(&stmt, &[&app_id, &profile.id]).await? {
        let Json(mut t): Json<Transaction> = get(&row, 0)?;
        t.profile_id = Some(profile.id);
        transactions.push(t);
    }
    Ok(Some(ProfileState {
        profile,
        transactions,
    }))
}

/// Locks and loads the transactions of a chain (and the named transaction), on any profile.
async fn lock_chain(
    client: &impl GenericClient,
    app_id: Uuid,
    chain: &ChainRef,
) -> Result<Vec<Transaction>, Failure> {
    let stmt = client
        .prepare_cached(
            "SELECT profile_id, data FROM transactions
             WHERE app_id = $1 AND store = $2
               AND (store_original_transaction_id = $3 OR store_transaction_id = $4)
             ORDER BY position
             FOR UPDATE",
        )
        .await?;
    let rows = client
        .query(
            &stmt,
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
            let Json(mut t): Json<Transaction> = get(row, 1)?;
            t.profile_id = profile_id;
            Ok(t)
        })
        .collect()
}

async fn load(
    client: &impl GenericClient,
    app_id: Uuid,
    lookup: &Lookup,
) -> Result<Loaded, Failure> {
    // Always the profile first, then its chain: one lock order for every writer.
    let profile = lock_profile(client, app_id, lookup).await?;
    let customer_user_id_owner = match (&lookup.customer_user_id, &lookup.profile_id) {
        (None, _) => None,
        // Looked up by the customer user id itself: its owner is the profile just loaded.
        (Some(_), None) => profile.as_ref().map(|p| p.profile.id),
        (Some(cuid), Some(_)) => {
            let stmt = client
                .prepare_cached(
                    "SELECT id FROM profiles WHERE app_id = $1 AND customer_user_id = $2",
                )
                .await?;
            match client.query_opt(&stmt, &[&app_id, cuid]).await? {
                Some(row) => Some(get(&row, 0)?),
                None => None,
            }
        }
    };
    let related = match &lookup.chain {
        Some(chain) => lock_chain(client, app_id, chain).await?,
        None => Vec::new(),
    };
    Ok(Loaded {
        profile,
        customer_user_id_owner,
        related,
    })
}

async fn save_profile(client: &impl GenericClient, state: &ProfileState) -> Result<(), Failure> {
    let p = &state.profile;
    let doc = Json(&p.doc);
    let changed = if p.version == 1 {
        // A concurrent creator of the same id or customer user id makes this a unique
        // violation: the write is run again and then finds that profile.
        let stmt = client
            .prepare_cached(
                "INSERT INTO profiles
                     (app_id, id, customer_user_id, version, created_at, updated_at, doc)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
                    &column_time(&p.created_at),
                    &column_time(&p.updated_at),
                    &doc,
                ],
            )
            .await?
    } else {
        let stmt = client
            .prepare_cached(
                "UPDATE profiles SET customer_user_id = $3, version = $4, updated_at = $5, doc = $6
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

async fn insert_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
) -> Result<(), tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO transactions (id, app_id, profile_id, store, store_transaction_id,
                 store_original_transaction_id, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &t.id,
                &app_id,
                &t.profile_id,
                &t.store,
                &t.store_transaction_id,
                &t.store_original_transaction_id,
                &Json(t),
            ],
        )
        .await
        .map(drop)
}

async fn update_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
) -> Result<u64, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "UPDATE transactions SET profile_id = $4, store_original_transaction_id = $5, data = $6
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
            ],
        )
        .await
}

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
        } => {
            save_profile(client, &state).await?;
            let known: HashSet<(&str, &str)> = loaded
                .related
                .iter()
                .chain(loaded.profile.iter().flat_map(|p| &p.transactions))
                .map(|t| (t.store.as_str(), t.store_transaction_id.as_str()))
                .collect();
            for t in &transactions {
                if known.contains(&(t.store.as_str(), t.store_transaction_id.as_str())) {
                    if update_transaction(client, app_id, t).await? != 1 {
                        return Err(Failure::Conflict(format!(
                            "transaction {} vanished under a write",
                            t.store_transaction_id
                        )));
                    }
                } else {
                    // Someone else recording it first makes this a unique violation: rerun.
                    insert_transaction(client, app_id, t).await?;
                }
            }
            Ok(Outcome::Saved(state))
        }
        Change::Delete { profile } => {
            let stmt = client
                .prepare_cached(
                    "UPDATE transactions SET profile_id = NULL WHERE app_id = $1 AND profile_id = $2",
                )
                .await?;
            client.execute(&stmt, &[&app_id, &profile.id]).await?;
            let stmt = client
                .prepare_cached("DELETE FROM profiles WHERE app_id = $1 AND id = $2")
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
                    (SELECT count(*) FROM transactions)",
            &[],
        )
        .await
        .map_err(classify)?;
    let count = |i| get::<i64>(&row, i).map(|n| n.max(0) as u64);
    Ok(Counts {
        apps: count(0)?,
        profiles: count(1)?,
        transactions: count(2)?,
    })
}

pub async fn apps(client: &impl GenericClient) -> Result<Vec<AppDefinition>, StoreError> {
    let rows = client
        .query("SELECT definition FROM apps ORDER BY id", &[])
        .await
        .map_err(classify)?;
    rows.iter()
        .map(|row| get::<Json<AppDefinition>>(row, 0).map(|j| j.0))
        .collect()
}

pub async fn profiles_after(
    client: &impl GenericClient,
    after: Option<(Uuid, Uuid)>,
    limit: u32,
) -> Result<Vec<ProfileState>, StoreError> {
    let (app_id, id) = after.unzip();
    let sql = format!(
        "{PROFILE_WITH_TRANSACTIONS}
         WHERE $1::uuid IS NULL OR (p.app_id, p.id) > ($1, $2)
         ORDER BY p.app_id, p.id LIMIT $3"
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
            let Json(mut transaction): Json<Transaction> = get(row, 1)?;
            transaction.profile_id = None;
            Ok(DetachedTransaction {
                app_id: get(row, 0)?,
                transaction,
            })
        })
        .collect()
}

async fn upsert_transaction(
    client: &impl GenericClient,
    app_id: Uuid,
    t: &Transaction,
) -> Result<(), StoreError> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO transactions (id, app_id, profile_id, store, store_transaction_id,
                 store_original_transaction_id, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (app_id, store, store_transaction_id) DO UPDATE SET
                 profile_id = excluded.profile_id,
                 store_original_transaction_id = excluded.store_original_transaction_id,
                 data = excluded.data",
        )
        .await
        .map_err(classify)?;
    client
        .execute(
            &stmt,
            &[
                &t.id,
                &app_id,
                &t.profile_id,
                &t.store,
                &t.store_transaction_id,
                &t.store_original_transaction_id,
                &Json(t),
            ],
        )
        .await
        .map_err(classify)?;
    Ok(())
}

pub async fn import(
    client: &impl GenericClient,
    profiles: &[ProfileState],
    detached: &[DetachedTransaction],
) -> Result<(), StoreError> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO profiles (app_id, id, customer_user_id, version, created_at, updated_at, doc)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (app_id, id) DO UPDATE SET
                 customer_user_id = excluded.customer_user_id, version = excluded.version,
                 created_at = excluded.created_at, updated_at = excluded.updated_at,
                 doc = excluded.doc",
        )
        .await
        .map_err(classify)?;
    for state in profiles {
        let p = &state.profile;
        client
            .execute(
                &stmt,
                &[
                    &p.app_id,
                    &p.id,
                    &p.customer_user_id,
                    &p.version,
                    &column_time(&p.created_at),
                    &column_time(&p.updated_at),
                    &Json(&p.doc),
                ],
            )
            .await
            .map_err(classify)?;
        for t in &state.transactions {
            upsert_transaction(client, p.app_id, t).await?;
        }
    }
    for d in detached {
        upsert_transaction(client, d.app_id, &d.transaction).await?;
    }
    Ok(())
}
