-- When the expiry worker should look at a transaction (see Transaction::expiry_due_at).
ALTER TABLE transactions ADD COLUMN expiry_due_at INTEGER;
CREATE INDEX transactions_expiry_due ON transactions (expiry_due_at) WHERE expiry_due_at IS NOT NULL;

-- The outbox: each event is written in the same commit as the change that caused it.
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    environment TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    next_attempt_at INTEGER,
    delivered_at INTEGER,
    lease_until INTEGER
);

-- Few indexes: every one is written for every event. Delivery searches pending events in
-- order (a small partial index) and a profile's earlier events; the feed lists by profile, or
-- by app along the primary key.
CREATE INDEX events_pending ON events (seq) WHERE state = 'pending';
CREATE INDEX events_profile ON events (app_id, profile_id, seq);
