-- A profile read is one row: each profile keeps its transactions (as reads list them, by
-- `position`) in its own row. Reading them from the transactions table took an index lookup
-- and a heap page per transaction, which at a million profiles were mostly outside
-- shared_buffers. The transactions table stays the truth for lookups by store id and chain;
-- every write keeps both in its own transaction.
ALTER TABLE profiles ADD COLUMN transactions json NOT NULL DEFAULT '[]'::json;

UPDATE profiles p SET transactions = attached.list
FROM (
    SELECT app_id, profile_id, json_agg(data ORDER BY position) AS list
    FROM transactions WHERE profile_id IS NOT NULL
    GROUP BY app_id, profile_id
) attached
WHERE p.app_id = attached.app_id AND p.id = attached.profile_id;
