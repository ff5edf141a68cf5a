-- One row per request the relay handled. Types that ClickHouse 18.16 and current
-- releases both accept: DateTime plus a millisecond column instead of DateTime64, String
-- instead of LowCardinality, UInt8 for flags, Nullable where a value can be unknown
-- (a token count the provider did not give is NULL, never 0).
-- Partitioned by day (retention: ALTER TABLE ... DROP PARTITION yyyymmdd), ordered by
-- time so that "the last 10 minutes" and "today" read only their own granules.
CREATE TABLE IF NOT EXISTS {database}.{table}
(
    time DateTime,
    time_ms UInt64,
    request_id String,
    batch_id String,
    instance String,
    tenant Nullable(String),
    route Nullable(String),
    provider Nullable(String),
    model Nullable(String),
    stream UInt8,
    status UInt16,
    upstream_status Nullable(UInt16),
    outcome String,
    error Nullable(String),
    attempts UInt32,
    ttfb_ms Nullable(Float64),
    ttft_ms Nullable(Float64),
    ttfa_ms Nullable(Float64),
    max_gap_ms Nullable(Float64),
    duration_ms Float64,
    tokens_in Nullable(UInt64),
    tokens_out Nullable(UInt64),
    tokens_cached Nullable(UInt64),
    tokens_reasoning Nullable(UInt64),
    cost_usd Nullable(Float64),
    request_bytes UInt64,
    response_bytes UInt64,
    finish_reason Nullable(String),
    client_addr Nullable(String),
    user_agent Nullable(String),
    request_body Nullable(String),
    response_body Nullable(String)
)
ENGINE = {engine}
PARTITION BY toYYYYMMDD(time)
ORDER BY (time, instance, request_id)
SETTINGS index_granularity = 8192;
