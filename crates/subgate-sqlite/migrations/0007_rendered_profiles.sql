-- Each profile row may keep its answer to a read, as the server rendered it at the profile's
-- last write (ADR 0014): a read that finds it current sends it without decoding the profile.
-- Existing rows have none until their next write, and are rendered at each read until then.
ALTER TABLE profiles ADD COLUMN rendered BLOB;
