-- Migration 4 on a current ClickHouse: as 0004_budgets.sql, with LowCardinality names.
ALTER TABLE {database}.{table} ADD COLUMN budget LowCardinality(Nullable(String));
ALTER TABLE {database}.{table} ADD COLUMN budget_decision LowCardinality(Nullable(String));
ALTER TABLE {database}.{table} ADD COLUMN budget_reserved_usd Nullable(Float64);
ALTER TABLE {database}.{table} ADD COLUMN budget_settled_usd Nullable(Float64)
