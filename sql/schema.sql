-- varstack schema: the original's table, idempotent.
-- Used by the database image (docker-entrypoint-initdb.d) and applied by every
-- service replica at start under an advisory lock (see services/db.py).
CREATE TABLE IF NOT EXISTS public.variables (
    key   text PRIMARY KEY,
    value text NOT NULL
);
