-- PostgreSQL takes outbox numbers from a sequence from this version on. SQLite's
-- writers are serialised by the file's write lock, so the largest number plus one
-- stays gapless and in commit order: nothing changes here.
SELECT 1;
