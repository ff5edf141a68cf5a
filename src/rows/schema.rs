//! The `stream_logs` table and its migrations: SQL files in `src/rows/migrations/`,
//! run in order at start and again whenever ClickHouse says the table is missing, each
//! recorded in `stream_relay_migrations` the first time. Every statement must be
//! idempotent (`IF NOT EXISTS`): they all run every time, so a table dropped by hand
//! comes back, and relays of a fleet starting together may all run them.
//!
//! Two layouts: `legacy` (the types ClickHouse 18.16 takes) and `current` (DateTime64,
//! LowCardinality, codecs, an optional TTL), chosen when the table is made, from the
//! server's version unless the configuration says, and recorded as migration 0; a table
//! that exists keeps its layout. A migration may have a file for the current layout
//! (`NNNN_name.current.sql`); without one the same SQL serves both.
//!
//! In a cluster every node gets a local table (`stream_logs_local`, the configured
//! engine) and `stream_logs`, a `Distributed` table over the local tables, which is what
//! the relay inserts into and reads. The statements run on each node the relay is
//! given, not `ON CLUSTER` (which needs ZooKeeper or Keeper behind the servers).

use clickhouse::Client;
use log::warn;

pub const TABLE: &str = "stream_logs";
pub const LOCAL_TABLE: &str = "stream_logs_local";
pub const MIGRATIONS_TABLE: &str = "stream_relay_migrations";

/// The column types of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `DateTime` plus `time_ms`, `String`, no codecs: what 18.16 takes.
    Legacy,
    /// `DateTime64(3)`, `LowCardinality`, codecs, TTL.
    Current,
}

/// The first release given the current layout (it needs EPHEMERAL columns).
const CURRENT_FROM: (u32, u32) = (22, 8);

impl Layout {
    /// The layout a new table gets on a server of this `version()`.
    pub fn for_version(version: &str) -> Layout {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        if (major, minor) >= CURRENT_FROM {
            Layout::Current
        } else {
            Layout::Legacy
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Legacy => "legacy",
            Layout::Current => "current",
        }
    }

    /// A row's milliseconds in a query (`time_ms` is not stored in the current layout).
    pub fn time_ms(self) -> &'static str {
        match self {
            Layout::Legacy => "time_ms",
            Layout::Current => "toUnixTimestamp64Milli(time)",
        }
    }
}

/// `rows.clickhouse.cluster`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// The cluster's name in the servers' `remote_servers`.
    pub name: String,
    /// The local table's engine.
    pub engine: String,
    pub sharding_key: String,
}

/// What the migrations make, and where.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub database: &'a str,
    /// The layout asked for; `None`: from the server's version.
    pub layout: Option<Layout>,
    pub cluster: Option<&'a Cluster>,
    pub ttl_days: Option<u32>,
}

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
    /// The current layout's SQL, where it differs.
    pub current: Option<&'static str>,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "stream_logs",
        sql: include_str!("migrations/0001_stream_logs.sql"),
        current: Some(include_str!("migrations/0001_stream_logs.current.sql")),
    },
    Migration {
        version: 2,
        name: "client_id_usage_unknown",
        sql: include_str!("migrations/0002_client_id_usage_unknown.sql"),
        current: None,
    },
    Migration {
        version: 3,
        name: "websocket_frames",
        sql: include_str!("migrations/0003_websocket_frames.sql"),
        current: None,
    },
    Migration {
        version: 4,
        name: "budgets",
        sql: include_str!("migrations/0004_budgets.sql"),
        current: Some(include_str!("migrations/0004_budgets.current.sql")),
    },
    Migration {
        version: 5,
        name: "cache",
        sql: include_str!("migrations/0005_cache.sql"),
        current: Some(include_str!("migrations/0005_cache.current.sql")),
    },
];

/// The table and column an `ALTER TABLE db.t ADD COLUMN c ...` statement adds; such a
/// statement runs only when the column is missing (18.16 has no `IF NOT EXISTS` there).
pub fn added_column(statement: &str) -> Option<(&str, &str)> {
    let rest = statement.strip_prefix("ALTER TABLE ")?;
    let (table, rest) = rest.split_once(' ')?;
    let column = rest
        .strip_prefix("ADD COLUMN ")?
        .split_whitespace()
        .next()?;
    let table = table.rsplit('.').next()?;
    Some((table, column))
}

/// A migration's statements as written: comment lines dropped, split at `;`.
fn split(sql: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A migration's statements for `target` in `layout`, in the order they run: in a
/// cluster, each statement on the local table, then the same on the `Distributed` one.
pub fn statements(m: &Migration, target: &Target<'_>, layout: Layout) -> Vec<String> {
    let sql = match (layout, m.current) {
        (Layout::Current, Some(current)) => current,
        _ => m.sql,
    };
    let ttl = match (layout, target.ttl_days) {
        (Layout::Current, Some(days)) => format!("TTL toDateTime(time) + INTERVAL {days} DAY"),
        _ => String::new(),
    };
    let db = target.database;
    let mut out = Vec::new();
    for statement in split(sql) {
        let statement = statement.replace("{database}", db).replace("{ttl}", &ttl);
        let Some(cluster) = target.cluster else {
            out.push(
                statement
                    .replace("{table}", TABLE)
                    .replace("{engine}", "MergeTree"),
            );
            continue;
        };
        let local = statement
            .replace("{table}", LOCAL_TABLE)
            .replace("{engine}", &cluster.engine);
        out.push(local);
        if statement.starts_with("CREATE TABLE") {
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {db}.{TABLE} AS {db}.{LOCAL_TABLE} \
                 ENGINE = Distributed('{}', '{db}', '{LOCAL_TABLE}', {})",
                cluster.name, cluster.sharding_key
            ));
        } else {
            out.push(statement.replace("{table}", TABLE));
        }
    }
    out
}

/// What [`migrate`] found and did.
#[derive(Debug)]
pub struct Migrated {
    pub layout: Layout,
    /// Versions recorded for the first time.
    pub applied: Vec<u32>,
    pub server_version: String,
}

/// Creates the database and runs every migration on one server. `client` has no
/// default database (it may not exist yet).
pub async fn migrate(
    client: &Client,
    target: &Target<'_>,
) -> Result<Migrated, clickhouse::error::Error> {
    let database = target.database;
    client
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {database}.{MIGRATIONS_TABLE} \
             (version UInt32, name String, applied_at DateTime) \
             ENGINE = MergeTree ORDER BY version"
        ))
        .execute()
        .await?;
    let done: Vec<u32> = client
        .query(&format!(
            "SELECT DISTINCT version FROM {database}.{MIGRATIONS_TABLE}"
        ))
        .fetch_all()
        .await?;
    let server_version: String = client.query("SELECT version()").fetch_one().await?;
    let layout = choose_layout(client, target, &server_version).await?;
    let mut applied = Vec::new();
    if !done.contains(&0) {
        let name = format!("layout {} (ClickHouse {server_version})", layout.name());
        record(client, database, 0, &name).await?;
    }
    for m in MIGRATIONS {
        for statement in statements(m, target, layout) {
            run_once(client, database, &statement).await?;
        }
        if !done.contains(&m.version) {
            record(client, database, m.version, m.name).await?;
            applied.push(m.version);
        }
    }
    Ok(Migrated {
        layout,
        applied,
        server_version,
    })
}

/// The layout of the table that exists (it stays), else the one asked for, else the
/// server's. In a cluster, `stream_logs` must be the `Distributed` table.
async fn choose_layout(
    client: &Client,
    target: &Target<'_>,
    server_version: &str,
) -> Result<Layout, clickhouse::error::Error> {
    let database = target.database;
    let data_table = if target.cluster.is_some() {
        LOCAL_TABLE
    } else {
        TABLE
    };
    if target.cluster.is_some() {
        let engines: Vec<String> = client
            .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
            .bind(database)
            .bind(TABLE)
            .fetch_all()
            .await?;
        if let Some(engine) = engines.first().filter(|e| *e != "Distributed") {
            return Err(clickhouse::error::Error::Custom(format!(
                "rows.clickhouse.cluster is set, but {database}.{TABLE} is a {engine} table, \
                 not Distributed: rename it (for example to {LOCAL_TABLE} on each node) and \
                 start again"
            )));
        }
    }
    let types: Vec<String> = client
        .query("SELECT type FROM system.columns WHERE database = ? AND table = ? AND name = 'time'")
        .bind(database)
        .bind(data_table)
        .fetch_all()
        .await?;
    let chosen = target
        .layout
        .unwrap_or_else(|| Layout::for_version(server_version));
    let Some(existing) = types.first() else {
        if chosen == Layout::Legacy && target.ttl_days.is_some() {
            warn!("rows.clickhouse.ttl_days is set, but the legacy layout has no TTL: old rows stay (drop partitions to remove them)");
        }
        return Ok(chosen);
    };
    let layout = if existing.starts_with("DateTime64") {
        Layout::Current
    } else {
        Layout::Legacy
    };
    if target.layout.is_some_and(|asked| asked != layout) {
        warn!(
            "rows.clickhouse.layout is {}, but {database}.{data_table} exists in the {} layout; it stays so",
            chosen.name(),
            layout.name()
        );
    }
    Ok(layout)
}

async fn record(
    client: &Client,
    database: &str,
    version: u32,
    name: &str,
) -> Result<(), clickhouse::error::Error> {
    client
        .query(&format!(
            "INSERT INTO {database}.{MIGRATIONS_TABLE} (version, name, applied_at) \
             SELECT ?, ?, now()"
        ))
        .bind(version)
        .bind(name)
        .execute()
        .await
}

/// Runs a statement; an `ADD COLUMN` only when the column is missing.
async fn run_once(
    client: &Client,
    database: &str,
    statement: &str,
) -> Result<(), clickhouse::error::Error> {
    let Some((table, column)) = added_column(statement) else {
        return client.query(statement).execute().await;
    };
    if has_column(client, database, table, column).await? {
        return Ok(());
    }
    if let Err(e) = client.query(statement).execute().await {
        // Another relay of the fleet may have added it in between.
        if !has_column(client, database, table, column).await? {
            return Err(e);
        }
    }
    Ok(())
}

async fn has_column(
    client: &Client,
    database: &str,
    table: &str,
    column: &str,
) -> Result<bool, clickhouse::error::Error> {
    let n: u64 = client
        .query("SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?")
        .bind(database)
        .bind(table)
        .bind(column)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// A database name that needs no quoting.
pub fn valid_database(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: Target<'static> = Target {
        database: "db",
        layout: None,
        cluster: None,
        ttl_days: Some(30),
    };

    fn all(target: &Target<'_>, layout: Layout) -> Vec<String> {
        MIGRATIONS
            .iter()
            .flat_map(|m| statements(m, target, layout))
            .collect()
    }

    #[test]
    fn migrations_are_numbered_in_order_and_idempotent() {
        let cluster = Cluster {
            name: "c".into(),
            engine: "ReplicatedMergeTree('/t/{shard}/x', '{replica}')".into(),
            sharding_key: "rand()".into(),
        };
        let clustered = Target {
            cluster: Some(&cluster),
            ..ONE
        };
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
        }
        for target in [&ONE, &clustered] {
            for layout in [Layout::Legacy, Layout::Current] {
                for s in all(target, layout) {
                    assert!(
                        s.contains("IF NOT EXISTS") || added_column(&s).is_some(),
                        "not idempotent: {s}"
                    );
                    for placeholder in ["{database}", "{table}", "{engine}", "{ttl}"] {
                        assert!(!s.contains(placeholder), "{placeholder} left in {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_table_has_every_row_column_in_both_layouts() {
        let row = serde_json::to_value(crate::record::tests::sample_row()).unwrap();
        for layout in [Layout::Legacy, Layout::Current] {
            let sql = all(&ONE, layout).join("\n");
            for column in row.as_object().unwrap().keys() {
                let column = if column == "time_ms" { "time" } else { column };
                assert!(
                    sql.contains(&format!("    {column} "))
                        || sql.contains(&format!("ADD COLUMN {column} ")),
                    "no column {column} in the {layout:?} layout"
                );
            }
            assert!(sql.contains("    batch_id String"));
            assert!(sql.contains("    time_ms UInt64"));
        }
        let current = all(&ONE, Layout::Current).join("\n");
        assert!(current.contains("time DateTime64(3)"));
        assert!(current.contains("tenant LowCardinality(Nullable(String))"));
        assert!(current.contains("TTL toDateTime(time) + INTERVAL 30 DAY"));
        assert!(!all(&ONE, Layout::Legacy).join("\n").contains("TTL"));
    }

    #[test]
    fn a_cluster_gets_a_local_table_and_a_distributed_one_over_it() {
        let cluster = Cluster {
            name: "relay".into(),
            engine: "ReplicatedMergeTree('/t/{shard}/x', '{replica}')".into(),
            sharding_key: "cityHash64(request_id)".into(),
        };
        let target = Target {
            cluster: Some(&cluster),
            ..ONE
        };
        let s = all(&target, Layout::Legacy);
        assert!(s[0].starts_with("CREATE TABLE IF NOT EXISTS db.stream_logs_local"));
        assert!(s[0].contains("ENGINE = ReplicatedMergeTree('/t/{shard}/x', '{replica}')"));
        assert_eq!(
            s[1],
            "CREATE TABLE IF NOT EXISTS db.stream_logs AS db.stream_logs_local \
             ENGINE = Distributed('relay', 'db', 'stream_logs_local', cityHash64(request_id))"
        );
        // Every column added to the local table is added to the Distributed one after it.
        let adds: Vec<_> = s.iter().filter_map(|x| added_column(x)).collect();
        assert_eq!(adds.len() % 2, 0);
        for pair in adds.chunks(2) {
            assert_eq!(pair[0].0, "stream_logs_local");
            assert_eq!((pair[1].0, pair[1].1), ("stream_logs", pair[0].1));
        }
    }

    #[test]
    fn the_layout_follows_the_servers_version() {
        assert_eq!(Layout::for_version("18.16.1"), Layout::Legacy);
        assert_eq!(Layout::for_version("22.3.2.1"), Layout::Legacy);
        assert_eq!(Layout::for_version("22.8.1"), Layout::Current);
        assert_eq!(Layout::for_version("26.9.2.1"), Layout::Current);
        assert_eq!(Layout::for_version("garbage"), Layout::Legacy);
    }

    #[test]
    fn added_columns_are_found() {
        assert_eq!(
            added_column("ALTER TABLE db.stream_logs ADD COLUMN usage_unknown UInt8 DEFAULT 0"),
            Some(("stream_logs", "usage_unknown"))
        );
        assert_eq!(
            added_column("CREATE TABLE IF NOT EXISTS db.x (a UInt8)"),
            None
        );
    }

    #[test]
    fn database_names() {
        assert!(valid_database("stream_relay"));
        assert!(!valid_database("a;b") && !valid_database("") && !valid_database("1x"));
    }
}
