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

-- Only pending events are ever searched for delivery, in order, and per profile for ordering.
CREATE INDEX events_pending ON events (seq) WHERE state = 'pending';
CREATE INDEX events_pending_profile ON events (app_id, profile_id, seq) WHERE state = 'pending';
CREATE INDEX events_profile ON events (app_id, profile_id, seq);
CREATE INDEX events_app ON events (app_id, seq);
