-- Each profile row may keep its answer to a read, as the server rendered it at the profile's
-- last write (ADR 0014): a read that finds it current sends it without decoding the profile.
-- Existing rows have none until their next write, and are rendered at each read until then.
ALTER TABLE profiles ADD COLUMN rendered bytea;

-- Nodes of an earlier version, still running during a rolling upgrade, update profiles without
-- knowing the column: an update that changes the profile without setting a new answer drops
-- the old one, whoever runs it. (`json` has no equality; its text is the value as stored.)
CREATE FUNCTION profiles_drop_stale_rendered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.customer_user_id, NEW.version, NEW.doc::text, NEW.transactions::text)
        IS DISTINCT FROM (OLD.customer_user_id, OLD.version, OLD.doc::text, OLD.transactions::text)
    THEN
        NEW.rendered := NULL;
    END IF;
    RETURN NEW;
END
$$;

-- The condition is checked before the function is called: this version's writes, which set a
-- new answer (or NULL), never call it.
CREATE TRIGGER profiles_drop_stale_rendered
    BEFORE UPDATE OF customer_user_id, version, doc, transactions ON profiles
    FOR EACH ROW WHEN (NEW.rendered IS NOT DISTINCT FROM OLD.rendered)
    EXECUTE FUNCTION profiles_drop_stale_rendered();
