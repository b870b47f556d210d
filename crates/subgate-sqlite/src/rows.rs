//! SQL for the store's operations, shared by the readers and the writer.

use rusqlite::{params, Connection, OptionalExtension};
use subgate_core::model::{
    AppDefinition, Profile, ProfileDoc, ProfileKey, ProfileState, Transaction,
};
use subgate_core::store::{
    Change, Counts, Decide, DetachedTransaction, Loaded, Lookup, Outcome, StoreError, WriteError,
};
use subgate_core::time::{from_micros, to_micros};
use uuid::Uuid;

fn storage(e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi::ErrorCode;
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::DiskFull
            | ErrorCode::ReadOnly,
        ) => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("unreadable {what}: {e}"))
}

struct ProfileRow {
    id: String,
    customer_user_id: Option<String>,
    version: i64,
    created_at: i64,
    updated_at: i64,
    doc: String,
}

const PROFILE_COLUMNS: &str = "id, customer_user_id, version, created_at, updated_at, doc";

fn profile_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProfileRow> {
    Ok(ProfileRow {
        id: r.get(0)?,
        customer_user_id: r.get(1)?,
        version: r.get(2)?,
        created_at: r.get(3)?,
        updated_at: r.get(4)?,
        doc: r.get(5)?,
    })
}

fn find_profile_row(
    conn: &Connection,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<ProfileRow>, StoreError> {
    let app = app_id.to_string();
    match key {
        ProfileKey::Id(id) => conn
            .prepare_cached(&format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles WHERE app_id = ?1 AND id = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![app, id.to_string()], profile_row)
                    .optional()
            }),
        ProfileKey::CustomerUserId(cuid) => conn
            .prepare_cached(&format!(
                "SELECT {PROFILE_COLUMNS} FROM profiles WHERE app_id = ?1 AND customer_user_id = ?2"
            ))
            .and_then(|mut s| s.query_row(params![app, cuid], profile_row).optional()),
    }
    .map_err(storage)
}

fn parse_transaction(profile_id: Option<String>, data: &str) -> Result<Transaction, StoreError> {
    let mut t: Transaction = serde_json::from_str(data).map_err(|e| corrupt("transaction", e))?;
    // The column is the truth: detaching and re-attaching only rewrite it.
    t.profile_id = profile_id
        .map(|id| Uuid::parse_str(&id).map_err(|e| corrupt("transaction profile id", e)))
        .transpose()?;
    Ok(t)
}

fn collect_transactions(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<Transaction>, StoreError> {
    let rows = stmt
        .query_map(params, |r| {
            Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(storage)?;
    rows.map(|row| {
        let (profile_id, data) = row.map_err(storage)?;
        parse_transaction(profile_id, &data)
    })
    .collect()
}

fn hydrate(conn: &Connection, app_id: Uuid, row: ProfileRow) -> Result<ProfileState, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT profile_id, data FROM transactions WHERE app_id = ?1 AND profile_id = ?2 ORDER BY rowid",
        )
        .map_err(storage)?;
    let transactions = collect_transactions(&mut stmt, params![app_id.to_string(), row.id])?;
    let doc: ProfileDoc = serde_json::from_str(&row.doc).map_err(|e| corrupt("profile", e))?;
    Ok(ProfileState {
        profile: Profile {
            id: Uuid::parse_str(&row.id).map_err(|e| corrupt("profile id", e))?,
            app_id,
            customer_user_id: row.customer_user_id,
            version: row.version,
            created_at: from_micros(row.created_at),
            updated_at: from_micros(row.updated_at),
            doc,
        },
        transactions,
    })
}

pub fn load_profile(
    conn: &Connection,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<ProfileState>, StoreError> {
    find_profile_row(conn, app_id, key)?
        .map(|row| hydrate(conn, app_id, row))
        .transpose()
}

fn load(conn: &Connection, app_id: Uuid, lookup: &Lookup) -> Result<Loaded, StoreError> {
    let key = match (&lookup.profile_id, &lookup.customer_user_id) {
        (Some(id), _) => Some(ProfileKey::Id(*id)),
        (None, Some(cuid)) => Some(ProfileKey::CustomerUserId(cuid.clone())),
        (None, None) => None,
    };
    let profile = match key {
        Some(key) => load_profile(conn, app_id, &key)?,
        None => None,
    };
    let customer_user_id_owner = match &lookup.customer_user_id {
        Some(cuid) => conn
            .prepare_cached("SELECT id FROM profiles WHERE app_id = ?1 AND customer_user_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![app_id.to_string(), cuid], |r| r.get::<_, String>(0))
                    .optional()
            })
            .map_err(storage)?
            .map(|id| Uuid::parse_str(&id).map_err(|e| corrupt("profile id", e)))
            .transpose()?,
        None => None,
    };
    let related = match &lookup.chain {
        Some(chain) => {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT profile_id, data FROM transactions
                     WHERE app_id = ?1 AND store = ?2
                       AND (store_original_transaction_id = ?3 OR store_transaction_id = ?4)
                     ORDER BY rowid",
                )
                .map_err(storage)?;
            collect_transactions(
                &mut stmt,
                params![
                    app_id.to_string(),
                    chain.store,
                    chain.store_original_transaction_id,
                    chain.store_transaction_id
                ],
            )?
        }
        None => Vec::new(),
    };
    Ok(Loaded {
        profile,
        customer_user_id_owner,
        related,
    })
}

fn save_profile(conn: &Connection, state: &ProfileState) -> Result<(), StoreError> {
    let p = &state.profile;
    let doc = serde_json::to_string(&p.doc).map_err(|e| StoreError::Internal(e.to_string()))?;
    let changed = if p.version == 1 {
        conn.prepare_cached(
            "INSERT INTO profiles (app_id, id, customer_user_id, version, created_at, updated_at, doc)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .and_then(|mut s| {
            s.execute(params![
                p.app_id.to_string(),
                p.id.to_string(),
                p.customer_user_id,
                p.version,
                to_micros(&p.created_at),
                to_micros(&p.updated_at),
                doc
            ])
        })
    } else {
        conn.prepare_cached(
            "UPDATE profiles SET customer_user_id = ?3, version = ?4, updated_at = ?5, doc = ?6
             WHERE app_id = ?1 AND id = ?2 AND version = ?4 - 1",
        )
        .and_then(|mut s| {
            s.execute(params![
                p.app_id.to_string(),
                p.id.to_string(),
                p.customer_user_id,
                p.version,
                to_micros(&p.updated_at),
                doc
            ])
        })
    }
    .map_err(storage)?;
    if changed != 1 {
        return Err(StoreError::Internal(format!(
            "profile {} changed under a write (version {})",
            p.id, p.version
        )));
    }
    Ok(())
}

fn save_transaction(conn: &Connection, app_id: Uuid, t: &Transaction) -> Result<(), StoreError> {
    let data = serde_json::to_string(t).map_err(|e| StoreError::Internal(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO transactions
             (id, app_id, profile_id, store, store_transaction_id, store_original_transaction_id, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (app_id, store, store_transaction_id) DO UPDATE SET
             profile_id = excluded.profile_id,
             store_original_transaction_id = excluded.store_original_transaction_id,
             data = excluded.data",
    )
    .and_then(|mut s| {
        s.execute(params![
            t.id.to_string(),
            app_id.to_string(),
            t.profile_id.map(|id| id.to_string()),
            t.store,
            t.store_transaction_id,
            t.store_original_transaction_id,
            data
        ])
    })
    .map_err(storage)?;
    Ok(())
}

pub fn write(
    conn: &Connection,
    app_id: Uuid,
    lookup: &Lookup,
    decide: &Decide,
) -> Result<Outcome, WriteError> {
    let loaded = load(conn, app_id, lookup)?;
    match decide(&loaded)? {
        Change::Keep => Ok(Outcome::Kept(loaded.profile)),
        Change::Save {
            state,
            transactions,
        } => {
            save_profile(conn, &state)?;
            for t in &transactions {
                save_transaction(conn, app_id, t)?;
            }
            Ok(Outcome::Saved(state))
        }
        Change::Delete { profile } => {
            let (app, id) = (app_id.to_string(), profile.id.to_string());
            conn.prepare_cached(
                "UPDATE transactions SET profile_id = NULL WHERE app_id = ?1 AND profile_id = ?2",
            )
            .and_then(|mut s| s.execute(params![app, id]))
            .map_err(storage)?;
            conn.prepare_cached("DELETE FROM profiles WHERE app_id = ?1 AND id = ?2")
                .and_then(|mut s| s.execute(params![app, id]))
                .map_err(storage)?;
            Ok(Outcome::Deleted)
        }
    }
}

pub fn put_apps(conn: &Connection, apps: &[AppDefinition]) -> Result<(), StoreError> {
    let now = to_micros(&chrono::Utc::now());
    for app in apps {
        let definition =
            serde_json::to_string(app).map_err(|e| StoreError::Internal(e.to_string()))?;
        conn.prepare_cached(
            "INSERT INTO apps (id, name, definition, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, definition = excluded.definition,
                 updated_at = excluded.updated_at",
        )
        .and_then(|mut s| s.execute(params![app.id.to_string(), app.name, definition, now]))
        .map_err(storage)?;
    }
    Ok(())
}

pub fn counts(conn: &Connection) -> Result<Counts, StoreError> {
    conn.query_row(
        "SELECT (SELECT count(*) FROM apps), (SELECT count(*) FROM profiles),
                (SELECT count(*) FROM transactions)",
        [],
        |r| {
            let count = |i| r.get::<_, i64>(i).map(|n| n.max(0) as u64);
            Ok(Counts {
                apps: count(0)?,
                profiles: count(1)?,
                transactions: count(2)?,
            })
        },
    )
    .map_err(storage)
}

pub fn apps(conn: &Connection) -> Result<Vec<AppDefinition>, StoreError> {
    let mut stmt = conn
        .prepare("SELECT definition FROM apps ORDER BY id")
        .map_err(storage)?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(storage)?;
    rows.map(|row| {
        let text = row.map_err(storage)?;
        serde_json::from_str(&text).map_err(|e| corrupt("app", e))
    })
    .collect()
}

pub fn profiles_after(
    conn: &Connection,
    after: Option<(Uuid, Uuid)>,
    limit: u32,
) -> Result<Vec<ProfileState>, StoreError> {
    let (app, id) = after.map(|(a, i)| (a.to_string(), i.to_string())).unzip();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT app_id, {PROFILE_COLUMNS} FROM profiles
             WHERE ?1 IS NULL OR (app_id, id) > (?1, ?2)
             ORDER BY app_id, id LIMIT ?3"
        ))
        .map_err(storage)?;
    let rows = stmt
        .query_map(params![app, id, limit], |r| {
            let app_id: String = r.get(0)?;
            let row = ProfileRow {
                id: r.get(1)?,
                customer_user_id: r.get(2)?,
                version: r.get(3)?,
                created_at: r.get(4)?,
                updated_at: r.get(5)?,
                doc: r.get(6)?,
            };
            Ok((app_id, row))
        })
        .map_err(storage)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(storage)?;
    rows.into_iter()
        .map(|(app_id, row)| {
            let app_id = Uuid::parse_str(&app_id).map_err(|e| corrupt("app id", e))?;
            hydrate(conn, app_id, row)
        })
        .collect()
}

pub fn detached_after(
    conn: &Connection,
    after: Option<Uuid>,
    limit: u32,
) -> Result<Vec<DetachedTransaction>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT app_id, data FROM transactions
             WHERE profile_id IS NULL AND (?1 IS NULL OR id > ?1)
             ORDER BY id LIMIT ?2",
        )
        .map_err(storage)?;
    let rows = stmt
        .query_map(params![after.map(|id| id.to_string()), limit], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map_err(storage)?;
    rows.map(|row| {
        let (app_id, data) = row.map_err(storage)?;
        Ok(DetachedTransaction {
            app_id: Uuid::parse_str(&app_id).map_err(|e| corrupt("app id", e))?,
            transaction: parse_transaction(None, &data)?,
        })
    })
    .collect()
}

pub fn import(
    conn: &Connection,
    profiles: &[ProfileState],
    detached: &[DetachedTransaction],
) -> Result<(), StoreError> {
    for state in profiles {
        let p = &state.profile;
        let doc = serde_json::to_string(&p.doc).map_err(|e| StoreError::Internal(e.to_string()))?;
        conn.prepare_cached(
            "INSERT INTO profiles (app_id, id, customer_user_id, version, created_at, updated_at, doc)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (app_id, id) DO UPDATE SET
                 customer_user_id = excluded.customer_user_id, version = excluded.version,
                 created_at = excluded.created_at, updated_at = excluded.updated_at,
                 doc = excluded.doc",
        )
        .and_then(|mut s| {
            s.execute(params![
                p.app_id.to_string(),
                p.id.to_string(),
                p.customer_user_id,
                p.version,
                to_micros(&p.created_at),
                to_micros(&p.updated_at),
                doc
            ])
        })
        .map_err(storage)?;
        for t in &state.transactions {
            save_transaction(conn, p.app_id, t)?;
        }
    }
    for d in detached {
        save_transaction(conn, d.app_id, &d.transaction)?;
    }
    Ok(())
}
