-- A profile read is one row: the profile's transactions are kept with it, in the order reads
-- list them (the transactions table's rowid), and the table gets a rowid. As WITHOUT ROWID
-- rows of that size overflowed into extra pages, and their fat interior pages (130 MB at a
-- million profiles) did not stay in a reader's page cache: a read at a million profiles made
-- about ten page reads. The transactions table stays the truth for lookups by store id and
-- chain; the writer keeps both in the same commit.
CREATE TABLE profiles_v3 (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    customer_user_id TEXT,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    doc TEXT NOT NULL,
    transactions TEXT NOT NULL
);

INSERT INTO profiles_v3
SELECT p.app_id, p.id, p.customer_user_id, p.version, p.created_at, p.updated_at, p.doc,
       (SELECT json_group_array(json(t.data) ORDER BY t.rowid)
        FROM transactions t WHERE t.app_id = p.app_id AND t.profile_id = p.id)
FROM profiles p;

DROP TABLE profiles;
ALTER TABLE profiles_v3 RENAME TO profiles;

CREATE UNIQUE INDEX profiles_id ON profiles (app_id, id);
CREATE UNIQUE INDEX profiles_customer_user_id
    ON profiles (app_id, customer_user_id) WHERE customer_user_id IS NOT NULL;
