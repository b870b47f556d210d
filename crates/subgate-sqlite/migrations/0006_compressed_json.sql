-- From this version on, the JSON columns (`profiles.doc`, `profiles.transactions`,
-- `transactions.data`) may hold LZ4-compressed BLOBs beside plain JSON TEXT (ADR 0010). Nothing
-- is rewritten here; the version alone makes builds that cannot read such values refuse the
-- file instead of failing on its rows.
SELECT 1;
