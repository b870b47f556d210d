//! SQL for the store's operations, shared by the readers and the writer.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use std::sync::Arc;
use subgate_core::events::NewEvent;
use subgate_core::fnv::Fnv1a;
use subgate_core::model::Environment;
use subgate_core::model::{
    AppDefinition, Profile, ProfileDoc, ProfileKey, ProfileState, Transaction,
};
use subgate_core::store::{
    ChainRef, Change, Counts, Decide, DeliveryResult, DeliveryState, DetachedTransaction,
    DueExpiry, ImportedProfile, Loaded, Lookup, Outcome, StoreError, StoredEvent, WriteError,
};
use subgate_core::time::{from_micros, to_micros};
use uuid::Uuid;

use crate::codec::{self, StoredJson};

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
    doc: StoredJson,
    /// The profile's transactions, as the array reads answer with (migration 0003).
    transactions: StoredJson,
}

const PROFILE_COLUMNS: &str =
    "id, customer_user_id, version, created_at, updated_at, doc, transactions";

/// A profile row from its columns in `PROFILE_COLUMNS` order, starting at column `first`.
fn profile_row_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<ProfileRow> {
    Ok(ProfileRow {
        id: r.get(first)?,
        customer_user_id: r.get(first + 1)?,
        version: r.get(first + 2)?,
        created_at: r.get(first + 3)?,
        updated_at: r.get(first + 4)?,
        doc: r.get(first + 5)?,
        transactions: r.get(first + 6)?,
    })
}

fn profile_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ProfileRow> {
    profile_row_at(r, 0)
}

fn find_profile_row(
    conn: &Connection,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<ProfileRow>, StoreError> {
    find_profile(conn, app_id, key, PROFILE_COLUMNS, profile_row)
}

/// `columns` of the profile `key` names, as `map` reads them.
fn find_profile<T>(
    conn: &Connection,
    app_id: Uuid,
    key: &ProfileKey,
    columns: &str,
    map: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>, StoreError> {
    let app = app_id.to_string();
    match key {
        ProfileKey::Id(id) => conn
            .prepare_cached(&format!(
                "SELECT {columns} FROM profiles WHERE app_id = ?1 AND id = ?2"
            ))
            .and_then(|mut s| s.query_row(params![app, id.to_string()], &map).optional()),
        ProfileKey::CustomerUserId(cuid) => {
            // First at the rowid its key names (one table lookup, no index); a profile stored
            // elsewhere (see `profile_slot`) is found through the index.
            let at_slot = conn
                .prepare_cached(&format!(
                    "SELECT {columns} FROM profiles
                     WHERE rowid = ?3 AND +app_id = ?1 AND +customer_user_id = ?2"
                ))
                .and_then(|mut s| {
                    s.query_row(params![app, cuid, profile_slot(app_id, cuid)], &map)
                        .optional()
                })
                .map_err(storage)?;
            if at_slot.is_some() {
                return Ok(at_slot);
            }
            conn.prepare_cached(&format!(
                "SELECT {columns} FROM profiles WHERE app_id = ?1 AND customer_user_id = ?2"
            ))
            .and_then(|mut s| s.query_row(params![app, cuid], &map).optional())
        }
    }
    .map_err(storage)
}

/// The rowid a profile with a customer user id gets when it is created, unless another row
/// holds it: reads by customer user id, nearly all reads, then find the row with one lookup in
/// the table instead of one in an index and one in the table (at a million profiles, the
/// index's descent was a tenth of a read's CPU). A profile elsewhere (its customer user id was
/// set after it was created, its slot was taken, or it predates migration 0004) is still
/// found, through the index, so correctness never depends on this function; it is on disk, so
/// changing it only slows reads until rows are rekeyed. FNV-1a (64-bit) of the app id's bytes
/// and the customer user id, to 63 bits, as rowids are signed.
pub(crate) fn profile_slot(app_id: Uuid, customer_user_id: &str) -> i64 {
    let mut hasher = Fnv1a::new();
    hasher.write(app_id.as_bytes());
    hasher.write(customer_user_id.as_bytes());
    let hash = hasher.finish();
    // Positive, and not 0, which SQLite never hands out.
    i64::try_from(hash >> 1).unwrap_or(i64::MAX).max(1)
}

fn parse_transaction(
    profile_id: Option<String>,
    data: &StoredJson,
) -> Result<Transaction, StoreError> {
    let mut t: Transaction = data.decode("transaction")?;
    // The column is the truth: detaching and re-attaching only rewrite it.
    t.profile_id = profile_id
        .map(|id| Uuid::parse_str(&id).map_err(|e| corrupt("transaction profile id", e)))
        .transpose()?;
    Ok(t)
}

#[cfg(debug_assertions)]
fn collect_transactions(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<Transaction>, StoreError> {
    let rows = stmt
        .query_map(params, |r| {
            Ok((r.get::<_, Option<String>>(0)?, r.get::<_, StoredJson>(1)?))
        })
        .map_err(storage)?;
    rows.map(|row| {
        let (profile_id, data) = row.map_err(storage)?;
        parse_transaction(profile_id, &data)
    })
    .collect()
}

fn hydrate(app_id: Uuid, row: ProfileRow) -> Result<ProfileState, StoreError> {
    let id = Uuid::parse_str(&row.id).map_err(|e| corrupt("profile id", e))?;
    let transactions = ProfileState::row_transactions(id, row.transactions.decode("transactions")?);
    let doc: ProfileDoc = row.doc.decode("profile")?;
    Ok(ProfileState {
        profile: Profile {
            id,
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

/// The `rendered` column of the profile `key` names.
pub fn load_rendered(
    conn: &Connection,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<Vec<u8>>, StoreError> {
    find_profile(conn, app_id, key, "rendered", |r| {
        r.get::<_, Option<Vec<u8>>>(0)
    })
    .map(Option::flatten)
}

pub fn save_rendered(
    conn: &Connection,
    app_id: Uuid,
    profile_id: Uuid,
    version: i64,
    rendered: &[u8],
) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "UPDATE profiles SET rendered = ?4 WHERE app_id = ?1 AND id = ?2 AND version = ?3",
    )
    .and_then(|mut s| {
        s.execute(params![
            app_id.to_string(),
            profile_id.to_string(),
            version,
            rendered
        ])
    })
    .map(|changed| changed == 1)
    .map_err(storage)
}

pub fn load_profile(
    conn: &Connection,
    app_id: Uuid,
    key: &ProfileKey,
) -> Result<Option<ProfileState>, StoreError> {
    find_profile_row(conn, app_id, key)?
        .map(|row| hydrate(app_id, row))
        .transpose()
}

/// A chain's transactions (original id ?3) and the store transaction ?4, by index lookups; with
/// OR, SQLite scans every transaction of the store. The chain is its later transactions (the
/// partial index `transactions_chain`) and the original itself. A row can come twice (the store
/// transaction is the original, or one of the later ones): [`chain_transactions`] keeps one of
/// each, in rowid order. Joined by `UNION` under `rowid IN (...)`, SQLite built two temporary
/// b-trees at every run; this took 20-23 µs a lookup against 26-28 µs in a microbenchmark.
pub(crate) const CHAIN_LOOKUP: &str = "SELECT rowid, profile_id, data FROM transactions
         WHERE app_id = ?1 AND store = ?2 AND store_original_transaction_id = ?3
             AND store_original_transaction_id <> store_transaction_id
     UNION ALL
     SELECT rowid, profile_id, data FROM transactions
         WHERE app_id = ?1 AND store = ?2 AND store_transaction_id = ?3
             AND store_original_transaction_id = ?3
     UNION ALL
     SELECT rowid, profile_id, data FROM transactions
         WHERE app_id = ?1 AND store = ?2 AND store_transaction_id = ?4";

/// Runs [`CHAIN_LOOKUP`] for `chain`, handing `each` every row it finds (a row may come twice).
fn for_each_chain_row(
    conn: &Connection,
    app_id: Uuid,
    chain: &ChainRef,
    mut each: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(CHAIN_LOOKUP).map_err(storage)?;
    let mut rows = stmt
        .query(params![
            app_id.to_string(),
            chain.store,
            chain.store_original_transaction_id,
            chain.store_transaction_id
        ])
        .map_err(storage)?;
    while let Some(row) = rows.next().map_err(storage)? {
        each(row).map_err(storage)?;
    }
    Ok(())
}

/// A chain's transactions and the store transaction (see [`CHAIN_LOOKUP`]), each once, in
/// rowid order (the order reads list transactions in).
fn chain_transactions(
    conn: &Connection,
    app_id: Uuid,
    chain: &ChainRef,
) -> Result<Vec<Transaction>, StoreError> {
    let mut rows: Vec<(i64, Option<String>, StoredJson)> = Vec::new();
    for_each_chain_row(conn, app_id, chain, |r| {
        rows.push((r.get(0)?, r.get(1)?, r.get(2)?));
        Ok(())
    })?;
    rows.sort_unstable_by_key(|(rowid, ..)| *rowid);
    rows.dedup_by_key(|(rowid, ..)| *rowid);
    rows.into_iter()
        .map(|(_, profile_id, data)| parse_transaction(profile_id, &data))
        .collect()
}

/// A profile as committed, if the writer may use it in place of reading the database (it is
/// cached, and no earlier job of the running batch touched it).
pub type CachedProfile<'a> = &'a dyn Fn(&ProfileKey) -> Option<Arc<ProfileState>>;

fn load(
    conn: &Connection,
    app_id: Uuid,
    lookup: &Lookup,
    cached: CachedProfile<'_>,
) -> Result<Loaded, StoreError> {
    let key = lookup.profile_key();
    let profile = match &key {
        Some(key) => match cached(key) {
            Some(state) => {
                // Every test build checks the cache against the database.
                #[cfg(debug_assertions)]
                assert_eq!(
                    load_profile(conn, app_id, key)?.as_ref(),
                    Some(&*state),
                    "a cached profile differs from the database"
                );
                Some(state)
            }
            None => load_profile(conn, app_id, key)?.map(Arc::new),
        },
        None => None,
    };
    let customer_user_id_owner = match &lookup.customer_user_id {
        // Found by that customer user id: it is the owner, or there is none.
        Some(_) if matches!(key, Some(ProfileKey::CustomerUserId(_))) => {
            profile.as_ref().map(|s| s.profile.id)
        }
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
        Some(chain) => chain_transactions(conn, app_id, chain)?,
        None => Vec::new(),
    };
    Ok(Loaded {
        profile,
        customer_user_id_owner,
        related,
    })
}

/// Reads, without decoding them, the index pages a write to this profile and chain will
/// look up and change besides the profile's own row: the chain's and the store transaction's
/// entries, and where the profile's next event goes. See `SqliteStore::prefetch_for_write`.
pub fn read_write_pages(
    conn: &Connection,
    app_id: Uuid,
    profile_id: Option<Uuid>,
    chain: Option<&ChainRef>,
) -> Result<(), StoreError> {
    let app = app_id.to_string();
    if let Some(chain) = chain {
        // Stepping through the rows reads their pages; nothing is copied out.
        for_each_chain_row(conn, app_id, chain, |_| Ok(()))?;
    }
    if let Some(id) = profile_id {
        conn.prepare_cached("SELECT max(seq) FROM events WHERE app_id = ?1 AND profile_id = ?2")
            .and_then(|mut s| s.query_row(params![app, id.to_string()], |_| Ok(())))
            .map_err(storage)?;
    }
    Ok(())
}

const INSERT_PROFILE: &str = "INSERT INTO profiles
         (app_id, id, customer_user_id, version, created_at, updated_at, doc, transactions,
          rowid, rendered)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

fn to_json(value: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Internal(e.to_string()))
}

/// A profile's columns, encoded once however many statements try them.
struct ProfileColumns<'a> {
    state: &'a ProfileState,
    app_id: String,
    id: String,
    created_at: i64,
    updated_at: i64,
    /// `None`: the same as in the row the update replaces (see [`Self::changed_from`]).
    doc: Option<Vec<u8>>,
    transactions: Option<Vec<u8>>,
    rendered: Option<&'a [u8]>,
}

impl<'a> ProfileColumns<'a> {
    /// Every column, for an insert.
    fn new(state: &'a ProfileState, rendered: Option<&'a [u8]>) -> Result<Self, StoreError> {
        Self::changed_from(state, rendered, None)
    }

    /// The columns, leaving out the documents that equal `before`'s, for an update of the row
    /// `before` was loaded from ([`ProfileState::unchanged_since`]). A grant leaves the
    /// transactions as they were, a transaction the profile's document: encoding each again
    /// (JSON, then LZ4) was about a twentieth of the writer thread's time.
    fn changed_from(
        state: &'a ProfileState,
        rendered: Option<&'a [u8]>,
        before: Option<&ProfileState>,
    ) -> Result<Self, StoreError> {
        let p = &state.profile;
        let unchanged = state.unchanged_since(before);
        let doc = (!unchanged.doc)
            .then(|| codec::encode(&p.doc))
            .transpose()?;
        let transactions = (!unchanged.transactions)
            .then(|| codec::encode(&state.transactions))
            .transpose()?;
        Ok(Self {
            state,
            app_id: p.app_id.to_string(),
            id: p.id.to_string(),
            created_at: to_micros(&p.created_at),
            updated_at: to_micros(&p.updated_at),
            doc,
            transactions,
            rendered,
        })
    }

    /// Runs `sql` with the columns as parameters ?1 to ?10, in `INSERT_PROFILE`'s order, with
    /// `rowid` as ?9; a statement binds as many of them as it numbers.
    fn execute(
        &self,
        conn: &Connection,
        sql: &str,
        rowid: Option<i64>,
    ) -> Result<usize, StoreError> {
        let p = &self.state.profile;
        conn.prepare_cached(sql)
            .and_then(|mut s| {
                let all = params![
                    self.app_id,
                    self.id,
                    p.customer_user_id,
                    p.version,
                    self.created_at,
                    self.updated_at,
                    self.doc,
                    self.transactions,
                    rowid,
                    self.rendered
                ];
                let numbered = s.parameter_count().min(all.len());
                s.execute(&all[..numbered])
            })
            .map_err(storage)
    }
}

/// The rowid a new profile row takes: its `profile_slot` if free, else SQLite's choice.
fn new_profile_rowid(conn: &Connection, state: &ProfileState) -> Result<Option<i64>, StoreError> {
    let Some(cuid) = &state.profile.customer_user_id else {
        return Ok(None);
    };
    let slot = profile_slot(state.profile.app_id, cuid);
    let taken = conn
        .prepare_cached("SELECT 1 FROM profiles WHERE rowid = ?1")
        .and_then(|mut s| s.exists([slot]))
        .map_err(storage)?;
    Ok((!taken).then_some(slot))
}

/// Inserts the profile row, or with `upsert` replaces the row of the same id (which keeps its
/// rowid).
fn insert_profile(
    conn: &Connection,
    state: &ProfileState,
    rendered: Option<&[u8]>,
    upsert: bool,
) -> Result<(), StoreError> {
    let upsert_sql;
    let sql = if upsert {
        upsert_sql = format!(
            "{INSERT_PROFILE} ON CONFLICT (app_id, id) DO UPDATE SET
                 customer_user_id = excluded.customer_user_id, version = excluded.version,
                 created_at = excluded.created_at, updated_at = excluded.updated_at,
                 doc = excluded.doc, transactions = excluded.transactions,
                 rendered = excluded.rendered"
        );
        upsert_sql.as_str()
    } else {
        INSERT_PROFILE
    };
    let rowid = new_profile_rowid(conn, state)?;
    ProfileColumns::new(state, rendered)?.execute(conn, sql, rowid)?;
    Ok(())
}

/// Saves `state` over its row, which held `before` if the write loaded it.
fn save_profile(
    conn: &Connection,
    state: &ProfileState,
    rendered: Option<&[u8]>,
    before: Option<&ProfileState>,
) -> Result<(), StoreError> {
    let p = &state.profile;
    if p.version == 1 {
        return insert_profile(conn, state, rendered, false);
    }
    let same_customer_user_id = before
        .is_some_and(|b| b.profile.id == p.id && b.profile.customer_user_id == p.customer_user_id);
    let columns = ProfileColumns::changed_from(state, rendered, before)?;
    // Most rows sit at their customer user id's slot: updating there skips a descent into the
    // `profiles_id` index (a random page read at a million profiles). A row elsewhere changes
    // nothing here, and is updated through the index below.
    if let Some(cuid) = p
        .customer_user_id
        .as_deref()
        .filter(|_| same_customer_user_id)
    {
        let at_slot = columns.execute(
            conn,
            "UPDATE profiles SET version = ?4, updated_at = ?6, doc = coalesce(?7, doc),
                 transactions = coalesce(?8, transactions), rendered = ?10
             WHERE rowid = ?9 AND +app_id = ?1 AND +id = ?2 AND version = ?4 - 1",
            Some(profile_slot(p.app_id, cuid)),
        )?;
        if at_slot == 1 {
            return Ok(());
        }
    }
    // Both keep `created_at` (?5). Setting `customer_user_id`, even to its old value, makes
    // SQLite check, delete and insert its index entry: a random page more to write at a
    // million profiles, for the many writes that keep it.
    let sql = if same_customer_user_id {
        "UPDATE profiles SET version = ?4, updated_at = ?6, doc = coalesce(?7, doc),
             transactions = coalesce(?8, transactions), rendered = ?10
         WHERE app_id = ?1 AND id = ?2 AND version = ?4 - 1"
    } else {
        "UPDATE profiles SET customer_user_id = ?3, version = ?4, updated_at = ?6,
             doc = coalesce(?7, doc), transactions = coalesce(?8, transactions), rendered = ?10
         WHERE app_id = ?1 AND id = ?2 AND version = ?4 - 1"
    };
    let changed = columns.execute(conn, sql, None)?;
    if changed != 1 {
        return Err(StoreError::Internal(format!(
            "profile {} changed under a write (version {})",
            p.id, p.version
        )));
    }
    Ok(())
}

/// Where the row of `t`'s store transaction is attached now, if it exists.
fn current_owner(
    conn: &Connection,
    app_id: Uuid,
    t: &Transaction,
) -> Result<Option<Uuid>, StoreError> {
    conn.prepare_cached(
        "SELECT profile_id FROM transactions
         WHERE app_id = ?1 AND store = ?2 AND store_transaction_id = ?3",
    )
    .and_then(|mut s| {
        s.query_row(
            params![app_id.to_string(), t.store, t.store_transaction_id],
            |r| r.get::<_, Option<String>>(0),
        )
        .optional()
    })
    .map_err(storage)?
    .flatten()
    .map(|id| Uuid::parse_str(&id).map_err(|e| corrupt("transaction profile id", e)))
    .transpose()
}

fn save_transaction(conn: &Connection, app_id: Uuid, t: &Transaction) -> Result<(), StoreError> {
    let data = codec::encode(t)?;
    conn.prepare_cached(
        "INSERT INTO transactions
             (id, app_id, profile_id, store, store_transaction_id, store_original_transaction_id,
              data, expiry_due_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (app_id, store, store_transaction_id) DO UPDATE SET
             profile_id = excluded.profile_id,
             store_original_transaction_id = excluded.store_original_transaction_id,
             data = excluded.data,
             expiry_due_at = excluded.expiry_due_at",
    )
    .and_then(|mut s| {
        s.execute(params![
            t.id.to_string(),
            app_id.to_string(),
            t.profile_id.map(|id| id.to_string()),
            t.store,
            t.store_transaction_id,
            t.store_original_transaction_id,
            data,
            t.expiry_due_at().map(|d| to_micros(&d))
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// The profile's transactions as the transactions table holds them, in rowid order. No index
/// serves this (migration 0005): test builds check the rows' copies with it.
#[cfg(debug_assertions)]
fn attached_transactions(
    conn: &Connection,
    app_id: Uuid,
    profile_id: Uuid,
) -> Result<Vec<Transaction>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT profile_id, data FROM transactions
             WHERE app_id = ?1 AND profile_id = ?2 ORDER BY rowid",
        )
        .map_err(storage)?;
    collect_transactions(
        &mut stmt,
        params![app_id.to_string(), profile_id.to_string()],
    )
}

/// Takes `moved`, which a write on another profile took, out of the transactions kept in
/// `owner`'s row, and drops the row's rendered answer, which lists them.
fn drop_moved(
    conn: &Connection,
    app_id: Uuid,
    owner: Uuid,
    moved: &[Transaction],
) -> Result<(), StoreError> {
    let Some(state) = load_profile(conn, app_id, &ProfileKey::Id(owner))? else {
        return Ok(());
    };
    let kept: Vec<&Transaction> = state
        .transactions
        .iter()
        .map(|t| &**t)
        .filter(|t| moved.iter().all(|m| m.id != t.id))
        .collect();
    let kept = codec::encode(&kept)?;
    conn.prepare_cached(
        "UPDATE profiles SET transactions = ?3, rendered = NULL WHERE app_id = ?1 AND id = ?2",
    )
    .and_then(|mut s| s.execute(params![app_id.to_string(), owner.to_string(), kept]))
    .map_err(storage)?;
    #[cfg(debug_assertions)]
    assert_eq!(
        load_profile(conn, app_id, &ProfileKey::Id(owner))?.map(|s| s.transactions),
        Some(
            attached_transactions(conn, app_id, owner)?
                .into_iter()
                .map(Arc::new)
                .collect::<Vec<_>>()
        ),
        "a former owner's row keeps transactions the table moved"
    );
    Ok(())
}

fn initial_state(e: &NewEvent) -> DeliveryState {
    if e.deliver {
        DeliveryState::Pending
    } else {
        DeliveryState::NoEndpoint
    }
}

fn insert_event(conn: &Connection, app_id: Uuid, e: &NewEvent) -> Result<(), StoreError> {
    let payload = e.payload.get();
    let at = to_micros(&e.occurred_at);
    conn.prepare_cached(
        "INSERT INTO events (id, app_id, profile_id, event_type, environment, created_at, payload,
             state, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, CASE WHEN ?8 = 'pending' THEN ?6 END)",
    )
    .and_then(|mut s| {
        s.execute(params![
            e.id.to_string(),
            app_id.to_string(),
            e.profile_id.to_string(),
            e.event_type.as_str(),
            e.environment.as_str(),
            at,
            payload,
            initial_state(e).as_str()
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
    cached: CachedProfile<'_>,
    touched: &mut Vec<Uuid>,
) -> Result<Outcome, WriteError> {
    let loaded = load(conn, app_id, lookup, cached)?;
    // Every profile a change may touch: its own, and the former owners of what it moves.
    let touch = |touched: &mut Vec<Uuid>| {
        touched.extend(loaded.profile.as_ref().map(|s| s.profile.id));
        touched.extend(loaded.customer_user_id_owner);
        touched.extend(loaded.related.iter().filter_map(|t| t.profile_id));
    };
    match decide(&loaded)? {
        Change::Keep => Ok(Outcome::Kept(loaded.profile)),
        Change::Save {
            state,
            transactions,
            events,
            rendered,
        } => {
            touch(touched);
            touched.push(state.profile.id);
            touched.extend(transactions.iter().filter_map(|t| t.profile_id));
            save_profile(conn, &state, rendered.as_deref(), loaded.profile.as_deref())?;
            for t in &transactions {
                save_transaction(conn, app_id, t)?;
            }
            // `touch` has them already, from the same lookup.
            for owner in loaded.owners_left_by(&transactions) {
                drop_moved(conn, app_id, owner, &transactions)?;
            }
            for e in &events {
                insert_event(conn, app_id, e)?;
            }
            // The writer hands this state to the cache as the profile's committed form, so it
            // must be exactly what a read returns, and the row's copy of the transactions what
            // the transactions table holds; every test build checks both.
            #[cfg(debug_assertions)]
            {
                let read = load_profile(conn, app_id, &ProfileKey::Id(state.profile.id))?;
                assert_eq!(
                    read.as_ref(),
                    Some(&state),
                    "a saved state differs from its read"
                );
                assert_eq!(
                    attached_transactions(conn, app_id, state.profile.id)?
                        .into_iter()
                        .map(Arc::new)
                        .collect::<Vec<_>>(),
                    state.transactions,
                    "a profile row's transactions differ from the transactions table"
                );
            }
            Ok(Outcome::Saved {
                state: Arc::new(state),
                rendered,
            })
        }
        Change::Delete { profile } => {
            touch(touched);
            // Its row lists its transactions: each is detached by its id. The write loaded
            // that row already, unless its decision deleted another profile.
            let reloaded;
            let attached = match &loaded.profile {
                Some(state) if state.profile.id == profile.id => &state.transactions,
                _ => {
                    reloaded = load_profile(conn, app_id, &ProfileKey::Id(profile.id))?
                        .map(|s| s.transactions)
                        .unwrap_or_default();
                    &reloaded
                }
            };
            let (app, id) = (app_id.to_string(), profile.id.to_string());
            for t in attached {
                conn.prepare_cached(
                    "UPDATE transactions SET profile_id = NULL
                     WHERE id = ?1 AND app_id = ?2 AND profile_id = ?3",
                )
                .and_then(|mut s| s.execute(params![t.id.to_string(), app, id]))
                .map_err(storage)?;
            }
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
        let definition = to_json(app)?;
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
                (SELECT count(*) FROM transactions), (SELECT count(*) FROM events)",
        [],
        |r| {
            let count = |i| r.get::<_, i64>(i).map(|n| n.max(0) as u64);
            Ok(Counts {
                apps: count(0)?,
                profiles: count(1)?,
                transactions: count(2)?,
                events: count(3)?,
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
            Ok((r.get::<_, String>(0)?, profile_row_at(r, 1)?))
        })
        .map_err(storage)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(storage)?;
    rows.into_iter()
        .map(|(app_id, row)| {
            let app_id = Uuid::parse_str(&app_id).map_err(|e| corrupt("app id", e))?;
            hydrate(app_id, row)
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
            Ok((r.get::<_, String>(0)?, r.get::<_, StoredJson>(1)?))
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
    profiles: &[ImportedProfile],
    detached: &[DetachedTransaction],
) -> Result<(), StoreError> {
    // `copy-store --overwrite` may move a transaction off another profile, whose row then
    // drops it.
    let save = |app_id: Uuid, t: &Transaction| -> Result<(), StoreError> {
        let left = current_owner(conn, app_id, t)?.filter(|&owner| Some(owner) != t.profile_id);
        save_transaction(conn, app_id, t)?;
        match left {
            Some(owner) => drop_moved(conn, app_id, owner, std::slice::from_ref(t)),
            None => Ok(()),
        }
    };
    for ImportedProfile { state, rendered } in profiles {
        insert_profile(conn, state, rendered.as_deref(), true)?;
        for t in &state.transactions {
            save(state.profile.app_id, t)?;
        }
    }
    for d in detached {
        save(d.app_id, &d.transaction)?;
    }
    Ok(())
}

pub fn due_expirations(
    conn: &Connection,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<DueExpiry>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT app_id, profile_id, store, store_transaction_id, store_original_transaction_id
             FROM transactions
             WHERE expiry_due_at <= ?1 AND profile_id IS NOT NULL
             ORDER BY expiry_due_at LIMIT ?2",
        )
        .map_err(storage)?;
    let rows = stmt
        .query_map(params![to_micros(&now), limit], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                ChainRef {
                    store: r.get(2)?,
                    store_transaction_id: r.get(3)?,
                    store_original_transaction_id: r.get(4)?,
                },
            ))
        })
        .map_err(storage)?;
    rows.map(|row| {
        let (app_id, profile_id, chain) = row.map_err(storage)?;
        Ok(DueExpiry {
            app_id: Uuid::parse_str(&app_id).map_err(|e| corrupt("app id", e))?,
            profile_id: Uuid::parse_str(&profile_id).map_err(|e| corrupt("profile id", e))?,
            chain,
        })
    })
    .collect()
}

const EVENT_COLUMNS: &str = "seq, id, app_id, profile_id, event_type, environment, created_at,
    payload, state, attempts, last_status, last_error, next_attempt_at, delivered_at";

type EventRow = (
    i64,
    String,
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    i32,
    Option<i32>,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
    ))
}

fn event_from(row: EventRow) -> Result<StoredEvent, StoreError> {
    let (seq, id, app_id, profile_id, event_type, environment, created_at, payload, state) = (
        row.0, row.1, row.2, row.3, row.4, row.5, row.6, row.7, row.8,
    );
    let uuid = |s: &str| Uuid::parse_str(s).map_err(|e| corrupt("event id", e));
    Ok(StoredEvent {
        id: uuid(&id)?,
        seq,
        app_id: uuid(&app_id)?,
        profile_id: uuid(&profile_id)?,
        event_type,
        environment: Environment::parse(&environment)
            .ok_or_else(|| corrupt("event environment", &environment))?,
        created_at: from_micros(created_at),
        payload: serde_json::from_str(&payload).map_err(|e| corrupt("event payload", e))?,
        state: DeliveryState::parse(&state).ok_or_else(|| corrupt("event state", &state))?,
        attempts: row.9,
        last_status: row.10,
        last_error: row.11,
        next_attempt_at: row.12.map(from_micros),
        delivered_at: row.13.map(from_micros),
    })
}

fn collect_events(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> Result<Vec<StoredEvent>, StoreError> {
    let rows = stmt.query_map(params, event_row).map_err(storage)?;
    rows.map(|row| event_from(row.map_err(storage)?)).collect()
}

pub fn claim_events(
    conn: &Connection,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    // One writer: no other claim can run between this SELECT's view and the UPDATE.
    let mut stmt = conn
        .prepare_cached(&format!(
            "UPDATE events SET lease_until = ?2 WHERE seq IN (
                 SELECT e.seq FROM events e
                 WHERE e.state = 'pending' AND e.next_attempt_at <= ?1
                   AND (e.lease_until IS NULL OR e.lease_until <= ?1)
                   AND NOT EXISTS (SELECT 1 FROM events p
                       WHERE p.app_id = e.app_id AND p.profile_id = e.profile_id
                         AND p.state = 'pending' AND p.seq < e.seq)
                 ORDER BY e.seq LIMIT ?3)
             RETURNING {EVENT_COLUMNS}"
        ))
        .map_err(storage)?;
    let mut events = collect_events(
        &mut stmt,
        params![to_micros(&now), to_micros(&lease_until), limit],
    )?;
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

pub fn finish_delivery(
    conn: &Connection,
    id: Uuid,
    result: &DeliveryResult,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE events SET state = ?2, attempts = attempts + ?3, last_status = ?4,
             last_error = ?5, next_attempt_at = ?6, lease_until = NULL,
             delivered_at = CASE WHEN ?2 = 'delivered' THEN ?7 ELSE delivered_at END
         WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            id.to_string(),
            result.state.as_str(),
            i32::from(result.attempted),
            result.status,
            result.error,
            result.next_attempt_at.map(|t| to_micros(&t)),
            to_micros(&result.at)
        ])
    })
    .map_err(storage)?;
    Ok(())
}

pub fn list_events(
    conn: &Connection,
    app_id: Uuid,
    profile_id: Option<Uuid>,
    after_seq: Option<i64>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE app_id = ?1 AND (?2 IS NULL OR profile_id = ?2) AND seq > ?3
             ORDER BY seq LIMIT ?4"
        ))
        .map_err(storage)?;
    collect_events(
        &mut stmt,
        params![
            app_id.to_string(),
            profile_id.map(|p| p.to_string()),
            after_seq.unwrap_or(0),
            limit
        ],
    )
}

pub fn events_after(
    conn: &Connection,
    after_seq: Option<i64>,
    limit: u32,
) -> Result<Vec<StoredEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))
        .map_err(storage)?;
    collect_events(&mut stmt, params![after_seq.unwrap_or(0), limit])
}

/// See `Store::import_events`. AUTOINCREMENT moves past the largest `seq` written.
pub fn import_events(conn: &Connection, events: &[StoredEvent]) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO events (seq, id, app_id, profile_id, event_type, environment, created_at,
                 payload, state, attempts, last_status, last_error, next_attempt_at, delivered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (id) DO UPDATE SET app_id = excluded.app_id,
                 profile_id = excluded.profile_id, event_type = excluded.event_type,
                 environment = excluded.environment, created_at = excluded.created_at,
                 payload = excluded.payload, state = excluded.state,
                 attempts = excluded.attempts, last_status = excluded.last_status,
                 last_error = excluded.last_error, next_attempt_at = excluded.next_attempt_at,
                 delivered_at = excluded.delivered_at, lease_until = NULL",
        )
        .map_err(storage)?;
    for e in events {
        stmt.execute(params![
            e.seq,
            e.id.to_string(),
            e.app_id.to_string(),
            e.profile_id.to_string(),
            e.event_type,
            e.environment.as_str(),
            to_micros(&e.created_at),
            to_json(&e.payload)?,
            e.state.as_str(),
            e.attempts,
            e.last_status,
            e.last_error,
            e.next_attempt_at.map(|t| to_micros(&t)),
            e.delivered_at.map(|t| to_micros(&t)),
        ])
        .map_err(storage)?;
    }
    Ok(())
}

pub fn delete_settled_events(
    conn: &Connection,
    before: DateTime<Utc>,
    limit: u32,
) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "DELETE FROM events WHERE seq IN (
             SELECT seq FROM events
             WHERE seq < coalesce(
                     (SELECT seq FROM events WHERE created_at >= ?1 ORDER BY seq LIMIT 1),
                     9223372036854775807)
               AND state <> 'pending'
             ORDER BY seq LIMIT ?2)",
    )
    .and_then(|mut s| s.execute(params![to_micros(&before), limit]))
    .map(|n| n as u64)
    .map_err(storage)
}

pub fn get_event(
    conn: &Connection,
    app_id: Uuid,
    id: Uuid,
) -> Result<Option<StoredEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE app_id = ?1 AND id = ?2"
        ))
        .map_err(storage)?;
    Ok(collect_events(&mut stmt, params![app_id.to_string(), id.to_string()])?.pop())
}

pub fn redeliver(
    conn: &Connection,
    app_id: Uuid,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<StoredEvent>, StoreError> {
    conn.prepare_cached(
        "UPDATE events SET state = 'pending', next_attempt_at = ?3, lease_until = NULL
         WHERE app_id = ?1 AND id = ?2",
    )
    .and_then(|mut s| s.execute(params![app_id.to_string(), id.to_string(), to_micros(&now)]))
    .map_err(storage)?;
    get_event(conn, app_id, id)
}
