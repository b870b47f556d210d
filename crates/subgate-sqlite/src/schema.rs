//! Migrations, applied in order and tracked in `PRAGMA user_version`. Each backend numbers its
//! own: the first two match the PostgreSQL backend's, later ones need not.

use rusqlite::Connection;
use subgate_core::store::StoreError;
use uuid::Uuid;

/// A migration's SQL, and a step in Rust run where the SQL holds `SPLIT`, for what SQL cannot
/// compute.
type RustStep = fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>;

const SPLIT: &str = "-- (split here: the rows are copied between the two parts)";

const MIGRATIONS: &[(&str, &str, Option<RustStep>)] = &[
    (
        "0001_init",
        include_str!("../migrations/0001_init.sql"),
        None,
    ),
    (
        "0002_events",
        include_str!("../migrations/0002_events.sql"),
        None,
    ),
    (
        "0003_profile_rows",
        include_str!("../migrations/0003_profile_rows.sql"),
        None,
    ),
    (
        "0004_profile_slots",
        include_str!("../migrations/0004_profile_slots.sql"),
        Some(copy_profiles_to_slots),
    ),
    (
        "0005_write_indexes",
        include_str!("../migrations/0005_write_indexes.sql"),
        None,
    ),
    (
        "0006_compressed_json",
        include_str!("../migrations/0006_compressed_json.sql"),
        None,
    ),
    (
        "0007_rendered_profiles",
        include_str!("../migrations/0007_rendered_profiles.sql"),
        None,
    ),
];

/// Copies every profile into `profiles_v4`, at its slot where it has one and no other profile
/// took it first, in rowid order so the new table is written front to back; the others get
/// rowids after the highest slot.
fn copy_profiles_to_slots(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let mut rows: Vec<(Option<i64>, i64)> = tx
        .prepare("SELECT rowid, app_id, customer_user_id FROM profiles")?
        .query_map([], |r| {
            let (rowid, app, cuid) = (
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            );
            let slot = Uuid::parse_str(&app)
                .ok()
                .zip(cuid)
                .map(|(app, cuid)| crate::rows::profile_slot(app, &cuid));
            Ok((slot, rowid))
        })?
        .collect::<rusqlite::Result<_>>()?;
    // Slots first, ascending; a slot's second claimant joins the rest.
    rows.sort_unstable_by_key(|&(slot, rowid)| (slot.is_none(), slot, rowid));
    for i in 1..rows.len() {
        if rows[i].0.is_some() && rows[i].0 == rows[i - 1].0 {
            rows[i].0 = None;
        }
    }
    rows.sort_by_key(|&(slot, _)| slot.is_none());
    let mut copy = tx.prepare(
        "INSERT INTO profiles_v4 (rowid, app_id, id, customer_user_id, version, created_at,
             updated_at, doc, transactions)
         SELECT ?1, app_id, id, customer_user_id, version, created_at, updated_at, doc,
             transactions
         FROM profiles WHERE rowid = ?2",
    )?;
    for (slot, rowid) in rows {
        copy.execute(rusqlite::params![slot, rowid])?;
    }
    Ok(())
}

pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let internal = |e: rusqlite::Error| StoreError::Internal(format!("migration failed: {e}"));
    let current: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(internal)?
        .try_into()
        .unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "the database is at schema version {current}, newer than this build knows ({}); upgrade Subgate",
            MIGRATIONS.len()
        )));
    }
    for (index, (name, sql, step)) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction().map_err(internal)?;
        match step {
            Some(step) => {
                let (before, after) = sql.split_once(SPLIT).ok_or_else(|| {
                    StoreError::Internal(format!("migration {name} has no split"))
                })?;
                tx.execute_batch(before).map_err(internal)?;
                step(&tx).map_err(internal)?;
                tx.execute_batch(after).map_err(internal)?;
            }
            None => tx.execute_batch(sql).map_err(internal)?,
        }
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        tracing::info!(migration = name, "applied");
    }
    Ok(())
}
