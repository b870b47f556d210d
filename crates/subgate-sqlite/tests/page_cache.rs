//! Its own test binary, so its own process: the store is the first to open SQLite here, as in
//! the server, and whether the page cache wrapper took depends on the order the store's first
//! connections set SQLite up in, which a shared test process would have decided already.

use subgate_sqlite::{SqliteOptions, SqliteStore};

#[test]
fn the_store_runs_sqlite_with_its_page_cache() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(dir.path().join("subgate.db"), &SqliteOptions::default())
        .expect("the store opens");
    assert!(
        subgate_sqlite::page_cache_in_use(),
        "SQLite initialized before the page cache wrapper was installed"
    );
    drop(store);
}
