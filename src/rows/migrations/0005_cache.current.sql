-- Migration 5 on a current ClickHouse: as 0005_cache.sql, with a LowCardinality word.
ALTER TABLE {database}.{table} ADD COLUMN cache LowCardinality(Nullable(String));
ALTER TABLE {database}.{table} ADD COLUMN cache_saved_usd Nullable(Float64)
