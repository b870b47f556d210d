-- The documents are written and read whole by Subgate, never searched inside by PostgreSQL.
-- As jsonb, each read turned them back into text (escape_json was PostgreSQL's top function
-- under profile reads) and each write parsed them into jsonb; json keeps the text as written.
-- JSON operators still work on them.
ALTER TABLE profiles ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE transactions ALTER COLUMN data TYPE json USING data::json;
ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json;
