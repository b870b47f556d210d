//! Migrations, applied in order and recorded in `subgate_migrations`. The first two match the
//! SQLite backend's files; later ones may exist on one side only. Nodes starting together take
//! an advisory lock, so one of them migrates and the others find the work done.

use crate::classify;
use subgate_core::store::StoreError;

pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "0001_init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "0002_events",
        include_str!("../migrations/0002_events.sql"),
    ),
    (
        3,
        "0003_json_columns",
        include_str!("../migrations/0003_json_columns.sql"),
    ),
    (
        4,
        "0004_profile_transactions",
        include_str!("../migrations/0004_profile_transactions.sql"),
    ),
    (
        5,
        "0005_lz4_documents",
        include_str!("../migrations/0005_lz4_documents.sql"),
    ),
    (
        6,
        "0006_write_indexes",
        include_str!("../migrations/0006_write_indexes.sql"),
    ),
    (
        7,
        "0007_rendered_profiles",
        include_str!("../migrations/0007_rendered_profiles.sql"),
    ),
    (
        8,
        "0008_customer_user_id_hash",
        include_str!("../migrations/0008_customer_user_id_hash.sql"),
    ),
];

/// Any fixed number works; it only has to be the same on every node ("subgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_7562_6761_7465;

pub async fn migrate(client: &mut deadpool_postgres::Client) -> Result<(), StoreError> {
    let failed = |e: tokio_postgres::Error| match classify(e) {
        StoreError::Internal(msg) => StoreError::Internal(format!("migration failed: {msg}")),
        unavailable => unavailable,
    };
    let tx = client.transaction().await.map_err(failed)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(failed)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS subgate_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(failed)?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM subgate_migrations",
            &[],
        )
        .await
        .map_err(failed)?
        .get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > known {
        return Err(StoreError::Internal(format!(
            "the database is at schema version {current}, newer than this build knows ({known}); upgrade Subgate"
        )));
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tracing::info!(
            migration = name,
            "migrating (rewriting a large table can take minutes)"
        );
        tx.batch_execute(sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO subgate_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(failed)?;
        tracing::info!(migration = name, "applied");
    }
    tx.commit().await.map_err(failed)
}
