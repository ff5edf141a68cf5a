-- The client's own x-request-id in its own column (request_id is the relay's, never the
-- client's), and a flag for a model request whose usage the provider never told (its
-- tokens are NULL; the tenant's token limit kept the estimate).
-- ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: the runner skips a column the table
-- already has.
ALTER TABLE {database}.{table} ADD COLUMN client_request_id Nullable(String);
ALTER TABLE {database}.{table} ADD COLUMN usage_unknown UInt8 DEFAULT 0
