-- When the expiry worker should look at a transaction (see Transaction::expiry_due_at).
ALTER TABLE transactions ADD COLUMN expiry_due_at timestamptz;
CREATE INDEX transactions_expiry_due ON transactions (expiry_due_at) WHERE expiry_due_at IS NOT NULL;

-- The outbox: each event is written in the same commit as the change that caused it.
CREATE TABLE events (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    app_id uuid NOT NULL,
    profile_id uuid NOT NULL,
    event_type text NOT NULL,
    environment text NOT NULL,
    created_at timestamptz NOT NULL,
    payload jsonb NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    last_status integer,
    last_error text,
    next_attempt_at timestamptz,
    delivered_at timestamptz,
    lease_until timestamptz
);

-- Few indexes: every one is written for every event. Delivery searches pending events in
-- order (a small partial index) and a profile's earlier events; the feed lists by profile, or
-- by app along the primary key.
CREATE INDEX events_pending ON events (seq) WHERE state = 'pending';
CREATE INDEX events_profile ON events (app_id, profile_id, seq);
