-- Migration 1 on a current ClickHouse (22.8 and later): the same columns as the legacy
-- layout, with the types a current server knows. `time` carries the milliseconds;
-- `time_ms` is EPHEMERAL (the writer sends it, nothing is stored; in queries use
-- toUnixTimestamp64Milli(time)). Strings with few distinct values are LowCardinality;
-- bodies and ids get ZSTD, times Delta. {ttl} is the retention TTL when
-- rows.clickhouse.ttl_days is set.
CREATE TABLE IF NOT EXISTS {database}.{table}
(
    time DateTime64(3) CODEC(Delta, ZSTD(1)),
    time_ms UInt64 EPHEMERAL,
    request_id String CODEC(ZSTD(1)),
    batch_id String CODEC(ZSTD(1)),
    instance LowCardinality(String),
    tenant LowCardinality(Nullable(String)),
    route LowCardinality(Nullable(String)),
    provider LowCardinality(Nullable(String)),
    model LowCardinality(Nullable(String)),
    stream UInt8,
    status UInt16,
    upstream_status Nullable(UInt16),
    outcome LowCardinality(String),
    error LowCardinality(Nullable(String)),
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
    finish_reason LowCardinality(Nullable(String)),
    client_addr Nullable(String) CODEC(ZSTD(1)),
    user_agent LowCardinality(Nullable(String)),
    request_body Nullable(String) CODEC(ZSTD(3)),
    response_body Nullable(String) CODEC(ZSTD(3)),
    client_request_id Nullable(String) CODEC(ZSTD(1)),
    usage_unknown UInt8 DEFAULT 0,
    frames_from_client Nullable(UInt64),
    frames_from_server Nullable(UInt64)
)
ENGINE = {engine}
PARTITION BY toYYYYMMDD(time)
ORDER BY (time, instance, request_id)
{ttl}
SETTINGS index_granularity = 8192
