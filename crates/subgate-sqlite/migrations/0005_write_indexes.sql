-- Each index of `transactions` costs a write a random page at a million profiles (6.5 pages a
-- write were measured, four of them these leaves). Two go:
--
-- A profile's transactions are listed in its row (migration 0003), so nothing looks them up
-- by `profile_id` any more: a deleted profile's are detached by id, and a moved one leaves its
-- former owner's row by id.
DROP INDEX transactions_profile;

-- A chain lookup finds the transaction whose own id is the chain's original id through
-- `transactions_store_id`; only the later transactions of a chain (renewals) need this index.
-- So a first purchase, and every one-time purchase, writes no entry here.
DROP INDEX transactions_chain;
CREATE INDEX transactions_chain ON transactions (app_id, store, store_original_transaction_id)
    WHERE store_original_transaction_id <> store_transaction_id;
