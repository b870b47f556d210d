-- Profiles move to the rowids their customer user ids name (`rows::profile_slot`), so a read
-- by customer user id is one lookup in the table. The Rust step of this migration fills
-- `profiles_v4` in rowid order from the table below, then the SQL after it swaps the tables.
CREATE TABLE profiles_v4 (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    customer_user_id TEXT,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc TEXT NOT NULL,
    transactions TEXT NOT NULL
);
-- (split here: the rows are copied between the two parts)
DROP TABLE profiles;
ALTER TABLE profiles_v4 RENAME TO profiles;

CREATE UNIQUE INDEX profiles_id ON profiles (app_id, id);
CREATE UNIQUE INDEX profiles_customer_user_id
    ON profiles (app_id, customer_user_id) WHERE customer_user_id IS NOT NULL;
