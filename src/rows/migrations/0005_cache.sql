-- The response cache: what it did for a request (hit, miss, store, refresh, bypass) and,
-- for a hit, what the original answer cost; NULL when the route does not cache.
ALTER TABLE {database}.{table} ADD COLUMN cache Nullable(String);
ALTER TABLE {database}.{table} ADD COLUMN cache_saved_usd Nullable(Float64)
