-- Two fewer index entries per recorded transaction, as SQLite's migration 0005 (ADR 0009).
--
-- `transactions_profile` goes: since migration 0004 each profile's row lists its transactions,
-- and every write keeps that list equal to the table in the same transaction. A deleted
-- profile's transactions are detached by the ids its row lists, and moved ones leave their
-- former owner's list by store transaction id. Its key began with a random profile id, so at
-- a million profiles nearly every insert dirtied a leaf outside shared_buffers.
--
-- `transactions_chain` keeps only later transactions of a chain: an original transaction (whose
-- original id is its own) is found by its own id in `transactions_store_id`. A first purchase
-- and every one-time purchase write no entry here.
DROP INDEX transactions_profile;
DROP INDEX transactions_chain;
CREATE INDEX transactions_chain ON transactions (app_id, store, store_original_transaction_id)
    WHERE store_original_transaction_id <> store_transaction_id;
