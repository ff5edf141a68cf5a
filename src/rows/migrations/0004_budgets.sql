-- Budgets: the budget that decided a request, its decision (ok, refused, audit_over,
-- cut, unpriced), and the dollars reserved and settled; NULL when no budget applied.
-- As in 0002, a column the table already has is skipped by the runner.
ALTER TABLE {database}.{table} ADD COLUMN budget Nullable(String);
ALTER TABLE {database}.{table} ADD COLUMN budget_decision Nullable(String);
ALTER TABLE {database}.{table} ADD COLUMN budget_reserved_usd Nullable(Float64);
ALTER TABLE {database}.{table} ADD COLUMN budget_settled_usd Nullable(Float64)
