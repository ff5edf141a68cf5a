-- A WebSocket session's frames each way (NULL for a request that is not a session).
-- As in 0002, a column the table already has is skipped by the runner.
ALTER TABLE {database}.{table} ADD COLUMN frames_from_client Nullable(UInt64);
ALTER TABLE {database}.{table} ADD COLUMN frames_from_server Nullable(UInt64)
