//! The CQL schema (`deploy/scylla/schema.cql`, compiled in), applied by `leadex migrate` and
//! checked by `serve` before it takes traffic. Applying is idempotent: `IF NOT EXISTS` only.

use std::collections::HashSet;

use scylla::client::session::Session;

use super::{backend, connect};
use crate::config::StorageConfig;
use crate::storage::StorageError;

/// The schema file as shipped, with `leadex` as keyspace name.
pub const SCHEMA_CQL: &str = include_str!("../../../deploy/scylla/schema.cql");

/// Every table the store reads or writes.
pub const TABLES: [&str; 7] = [
    "leads",
    "auction_log",
    "leads_by_supplier_day",
    "pending_leads",
    "pending_buckets",
    "idempotency",
    "state",
];

/// The keyspace's replication map from `[storage]`, as a CQL literal.
pub fn replication(config: &StorageConfig) -> Result<String, StorageError> {
    if !config.datacenters.is_empty() {
        let dcs: Vec<String> = config
            .datacenters
            .iter()
            .map(|(dc, n)| format!("'{}': {n}", dc.replace('\'', "''")))
            .collect();
        return Ok(format!(
            "{{'class': 'NetworkTopologyStrategy', {}}}",
            dcs.join(", ")
        ));
    }
    match config.replication_factor {
        Some(n) => Ok(format!(
            "{{'class': 'SimpleStrategy', 'replication_factor': {n}}}"
        )),
        None => Err(StorageError::Backend(
            "storage: migrate needs replication_factor (one datacenter) or datacenters = { dc = N }"
                .to_owned(),
        )),
    }
}

/// The statements `migrate` runs, in order: the keyspace with the configured replication, then
/// the tables in `keyspace`.
pub fn statements(keyspace: &str, replication: &str) -> Vec<String> {
    let without_comments: String = SCHEMA_CQL
        .lines()
        .map(|line| match line.find("--") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|statement| {
            if statement.starts_with("CREATE KEYSPACE") {
                format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}")
            } else {
                statement.replace("leadex.", &format!("{keyspace}."))
            }
        })
        .collect()
}

/// Creates the keyspace and every table that is missing; returns how many statements ran.
pub async fn migrate(config: &StorageConfig) -> Result<usize, StorageError> {
    let replication = replication(config)?;
    let session = connect(config).await?;
    let statements = statements(&config.keyspace, &replication);
    for statement in &statements {
        session
            .query_unpaged(statement.as_str(), ())
            .await
            .map_err(|e| StorageError::Backend(format!("migrate: {e}\n  in: {statement}")))?;
    }
    check(&session, &config.keyspace).await?;
    Ok(statements.len())
}

/// Fails with the names of the missing tables when the schema has not been applied.
pub async fn check(session: &Session, keyspace: &str) -> Result<(), StorageError> {
    let rows = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (keyspace,),
        )
        .await
        .map_err(backend)?
        .into_rows_result()
        .map_err(backend)?;
    let present: HashSet<String> = rows
        .rows::<(String,)>()
        .map_err(backend)?
        .map(|row| row.map(|(name,)| name))
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    let missing: Vec<&str> = TABLES
        .iter()
        .copied()
        .filter(|t| !present.contains(*t))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(StorageError::SchemaMissing(format!(
            "the ScyllaDB schema is missing in keyspace `{keyspace}` (no table {}): run `leadex migrate --config FILE` first",
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_take_the_configured_keyspace_and_replication() {
        let statements = statements(
            "ks_test",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        );
        assert_eq!(statements.len(), 1 + TABLES.len());
        assert_eq!(
            statements[0],
            "CREATE KEYSPACE IF NOT EXISTS ks_test WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        for (statement, table) in statements[1..].iter().zip(TABLES) {
            assert!(
                statement.starts_with(&format!("CREATE TABLE IF NOT EXISTS ks_test.{table} (")),
                "{statement}"
            );
            assert!(!statement.contains("--") && !statement.contains("leadex."));
        }
    }

    #[test]
    fn replication_is_a_datacenter_map_or_a_factor() {
        let mut config = StorageConfig {
            replication_factor: Some(3),
            ..StorageConfig::default()
        };
        assert_eq!(
            replication(&config).unwrap(),
            "{'class': 'SimpleStrategy', 'replication_factor': 3}"
        );
        config.replication_factor = None;
        config.datacenters.insert("eu".into(), 3);
        config.datacenters.insert("us".into(), 2);
        assert_eq!(
            replication(&config).unwrap(),
            "{'class': 'NetworkTopologyStrategy', 'eu': 3, 'us': 2}"
        );
        config.datacenters.clear();
        assert!(replication(&config).is_err());
    }
}
