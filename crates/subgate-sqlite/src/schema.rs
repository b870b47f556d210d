//! Migrations, applied in order and tracked in `PRAGMA user_version`. Each backend numbers its
//! own: the first two match the PostgreSQL backend's, later ones need not.

use rusqlite::Connection;
use subgate_core::store::StoreError;

const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../migrations/0001_init.sql")),
    ("0002_events", include_str!("../migrations/0002_events.sql")),
    (
        "0003_profile_rows",
        include_str!("../migrations/0003_profile_rows.sql"),
    ),
];

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
    for (index, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction().map_err(internal)?;
        tx.execute_batch(sql).map_err(internal)?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(internal)?;
        tx.commit().map_err(internal)?;
        tracing::info!(migration = name, "applied");
    }
    Ok(())
}
