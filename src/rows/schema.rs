//! The `stream_logs` table and its migrations: SQL files in `src/rows/migrations/`,
//! run in order at start and again whenever ClickHouse says the table is missing, each
//! recorded in `stream_relay_migrations` the first time. Every statement must be
//! idempotent (`IF NOT EXISTS`): they all run every time, so a table dropped by hand
//! comes back, and relays of a fleet starting together may all run them.

use clickhouse::Client;

pub const TABLE: &str = "stream_logs";
pub const MIGRATIONS_TABLE: &str = "stream_relay_migrations";

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "stream_logs",
        sql: include_str!("migrations/0001_stream_logs.sql"),
    },
    Migration {
        version: 2,
        name: "client_id_usage_unknown",
        sql: include_str!("migrations/0002_client_id_usage_unknown.sql"),
    },
    Migration {
        version: 3,
        name: "websocket_frames",
        sql: include_str!("migrations/0003_websocket_frames.sql"),
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

/// A migration's statements for `database`: comment lines dropped, split at `;`.
pub fn statements(sql: &str, database: &str) -> Vec<String> {
    let text: String = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("{database}", database))
        .collect()
}

/// Creates the database and runs every migration. Returns the versions recorded for the
/// first time. `client` has no default database (it may not exist yet).
pub async fn migrate(
    client: &Client,
    database: &str,
) -> Result<Vec<u32>, clickhouse::error::Error> {
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
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        for statement in statements(m.sql, database) {
            let Some((table, column)) = added_column(&statement) else {
                client.query(&statement).execute().await?;
                continue;
            };
            if has_column(client, database, table, column).await? {
                continue;
            }
            if let Err(e) = client.query(&statement).execute().await {
                // Another relay of the fleet may have added it in between.
                if !has_column(client, database, table, column).await? {
                    return Err(e);
                }
            }
        }
        if done.contains(&m.version) {
            continue;
        }
        client
            .query(&format!(
                "INSERT INTO {database}.{MIGRATIONS_TABLE} (version, name, applied_at) \
                 VALUES ({}, '{}', now())",
                m.version, m.name
            ))
            .execute()
            .await?;
        applied.push(m.version);
    }
    Ok(applied)
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

    #[test]
    fn migrations_are_numbered_in_order_and_idempotent() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            for s in statements(m.sql, "db") {
                assert!(
                    s.contains("IF NOT EXISTS") || added_column(&s).is_some(),
                    "not idempotent: {s}"
                );
                assert!(!s.contains("{database}"));
            }
        }
    }

    #[test]
    fn the_table_has_every_row_column() {
        let sql: String = MIGRATIONS
            .iter()
            .flat_map(|m| statements(m.sql, "db"))
            .collect::<Vec<_>>()
            .join("\n");
        let row = serde_json::to_value(crate::record::tests::sample_row()).unwrap();
        for column in row.as_object().unwrap().keys() {
            let column = if column == "time_ms" { "time" } else { column };
            assert!(
                sql.contains(&format!("    {column} "))
                    || sql.contains(&format!("ADD COLUMN {column} ")),
                "no column {column}"
            );
        }
        assert!(sql.contains("    batch_id String"));
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
