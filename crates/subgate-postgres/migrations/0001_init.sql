-- Apps are declared in the config file and upserted here at start.
CREATE TABLE apps (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    definition jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);

-- One row per profile: identity columns for lookups, everything else in `doc`. The row is the
-- lock every write to the profile takes (SELECT ... FOR UPDATE), and `version` is checked on
-- update as a second guard.
CREATE TABLE profiles (
    app_id uuid NOT NULL,
    id uuid NOT NULL,
    customer_user_id text,
    version bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    doc jsonb NOT NULL,
    PRIMARY KEY (app_id, id)
);

CREATE UNIQUE INDEX profiles_customer_user_id
    ON profiles (app_id, customer_user_id) WHERE customer_user_id IS NOT NULL;

-- Transactions outlive their profile (revenue history): `profile_id` is NULL once detached.
-- `position` keeps the order they were first recorded in, as SQLite's rowid does.
CREATE TABLE transactions (
    id uuid PRIMARY KEY,
    position bigint GENERATED ALWAYS AS IDENTITY,
    app_id uuid NOT NULL,
    profile_id uuid,
    store text NOT NULL,
    store_transaction_id text NOT NULL,
    store_original_transaction_id text NOT NULL,
    data jsonb NOT NULL
);

CREATE UNIQUE INDEX transactions_store_id ON transactions (app_id, store, store_transaction_id);
CREATE INDEX transactions_chain ON transactions (app_id, store, store_original_transaction_id);
CREATE INDEX transactions_profile ON transactions (app_id, profile_id, position);
