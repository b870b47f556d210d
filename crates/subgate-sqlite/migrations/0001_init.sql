-- Apps are declared in the config file and upserted here at start.
CREATE TABLE apps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- One row per profile: identity columns for lookups, everything else in `doc` (JSON).
CREATE TABLE profiles (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    customer_user_id TEXT,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (app_id, id)
) WITHOUT ROWID;

CREATE UNIQUE INDEX profiles_customer_user_id
    ON profiles (app_id, customer_user_id) WHERE customer_user_id IS NOT NULL;

-- Transactions outlive their profile (revenue history): `profile_id` is NULL once detached.
CREATE TABLE transactions (
    id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    profile_id TEXT,
    store TEXT NOT NULL,
    store_transaction_id TEXT NOT NULL,
    store_original_transaction_id TEXT NOT NULL,
    data TEXT NOT NULL
);

CREATE UNIQUE INDEX transactions_store_id ON transactions (app_id, store, store_transaction_id);
CREATE INDEX transactions_chain ON transactions (app_id, store, store_original_transaction_id);
CREATE INDEX transactions_profile ON transactions (app_id, profile_id);
