//! What the invalidation log and its NOTIFY payloads say: a row of `openfhir_invalidation_log`
//! and the compact JSON a trigger (or a node's deferred notifier) sends for it.

use serde::Deserialize;

use crate::cache::Change;

/// The NOTIFY channel the triggers use.
pub const CHANNEL: &str = "openfhir_invalidation";

/// A row of `openfhir_invalidation_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    /// Log position (assigned at insert).
    pub position: i64,
    /// Writing transaction.
    pub xid: u64,
    /// Cache group (`opt`, `context`, `model`, `tenant`, or an application's group).
    pub group: String,
    /// Tenant, `None` for a TRUNCATE.
    pub tenant: Option<String>,
    /// Key, `None` for a TRUNCATE or a tenant row.
    pub key: Option<String>,
    /// INSERT, UPDATE, DELETE, TRUNCATE, or EVICT (an operator's eviction, written by a node).
    pub operation: String,
    /// The node that wrote it, if a node did.
    pub origin: Option<String>,
    /// When the row was written (the database's clock, milliseconds since the Unix epoch), if
    /// known: a NOTIFY payload of schema version 5 or older does not say.
    pub created_unix_ms: Option<u64>,
}

impl LogRow {
    /// What this row invalidates.
    pub fn change(&self) -> Change {
        Change::from_log(
            &self.group,
            self.tenant.as_deref(),
            self.key.as_deref(),
            &self.operation,
        )
    }
}

/// A NOTIFY payload as the triggers send it (short field names keep it far below 8000 bytes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    p: i64,
    x: String,
    g: String,
    #[serde(default)]
    t: Option<String>,
    #[serde(default)]
    k: Option<String>,
    o: String,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    truncated: bool,
    /// The row's `created`, in milliseconds since the Unix epoch (schema version 6 and later).
    #[serde(default)]
    c: Option<u64>,
}

/// What a NOTIFY payload said, or that it must be read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A complete row.
    Row(LogRow),
    /// The key was too long for the payload: read position `.0` from the log (catch-up).
    ReadLog(i64),
}

/// Parses a NOTIFY payload: one row's object (as the trigger sends it) or an array of them (as a
/// node's deferred notifications are packed, schema version 9), in log order. The error names
/// what is wrong; one bad element refuses the whole payload, so the caller catches up instead.
pub fn parse_payload(payload: &str) -> std::result::Result<Vec<Notification>, String> {
    if payload.len() > 8000 {
        return Err(format!(
            "payload of {} bytes exceeds NOTIFY's 8000-byte limit",
            payload.len()
        ));
    }
    if payload.trim_start().starts_with('[') {
        let all: Vec<Payload> = serde_json::from_str(payload)
            .map_err(|e| format!("not an array of invalidation payloads: {e}"))?;
        if all.is_empty() {
            return Err("an empty array of invalidation payloads".into());
        }
        return all
            .into_iter()
            .enumerate()
            .map(|(i, p)| notification(p).map_err(|e| format!("element {i}: {e}")))
            .collect();
    }
    let p: Payload =
        serde_json::from_str(payload).map_err(|e| format!("not an invalidation payload: {e}"))?;
    Ok(vec![notification(p)?])
}

fn notification(p: Payload) -> std::result::Result<Notification, String> {
    let xid =
        p.x.parse::<u64>()
            .map_err(|_| format!("xid {:?} is not a transaction id", p.x))?;
    if !matches!(
        p.o.as_str(),
        "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE" | crate::cache::EVICT_OPERATION
    ) {
        return Err(format!("unknown operation {:?}", p.o));
    }
    if p.truncated {
        return Ok(Notification::ReadLog(p.p));
    }
    Ok(Notification::Row(LogRow {
        position: p.p,
        xid,
        group: p.g,
        tenant: p.t,
        key: p.k,
        operation: p.o,
        origin: p.n,
        created_unix_ms: p.c,
    }))
}

/// Reads a row of `SELECT position, xid::text, cache_group, tenant, key, operation, origin`,
/// optionally followed by the row's `created` in milliseconds since the Unix epoch (bigint).
pub(crate) fn log_row(row: &tokio_postgres::Row) -> std::result::Result<LogRow, String> {
    let position: i64 = row.try_get(0).map_err(|e| e.to_string())?;
    let bad = |what: String| format!("log row {position}: {what}");
    let xid: String = row.try_get(1).map_err(|e| bad(e.to_string()))?;
    Ok(LogRow {
        position,
        xid: xid
            .parse()
            .map_err(|_| bad(format!("xid {xid:?} is not a transaction id")))?,
        group: row.try_get(2).map_err(|e| bad(e.to_string()))?,
        tenant: row.try_get(3).map_err(|e| bad(e.to_string()))?,
        key: row.try_get(4).map_err(|e| bad(e.to_string()))?,
        operation: row.try_get(5).map_err(|e| bad(e.to_string()))?,
        origin: row.try_get(6).map_err(|e| bad(e.to_string()))?,
        created_unix_ms: if row.len() > 7 {
            let ms: Option<i64> = row.try_get(7).map_err(|e| bad(e.to_string()))?;
            // A clock before 1970 says nothing useful.
            ms.and_then(|ms| u64::try_from(ms).ok())
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn payloads() {
        let ok =
            r#"{"p":7,"x":"812","g":"opt","t":"default","k":"growth_chart","o":"UPDATE","n":null}"#;
        let [Notification::Row(r)] = &parse_payload(ok).unwrap()[..] else {
            panic!()
        };
        assert_eq!(
            (r.position, r.xid, r.key.as_deref(), r.created_unix_ms),
            (7, 812, Some("growth_chart"), None)
        );
        let stamped = r#"{"p":7,"x":"812","g":"opt","o":"UPDATE","c":1765000000123}"#;
        let [Notification::Row(r)] = &parse_payload(stamped).unwrap()[..] else {
            panic!()
        };
        assert_eq!(r.created_unix_ms, Some(1_765_000_000_123));
        let cut = r#"{"p":8,"x":"813","g":"opt","o":"UPDATE","truncated":true}"#;
        assert_eq!(parse_payload(cut).unwrap(), vec![Notification::ReadLog(8)]);
        // A packed payload: its rows in order, a truncated one among them.
        let packed = format!("[{ok},{cut}, {stamped}]");
        let rows = parse_payload(&packed).unwrap();
        assert_eq!(rows.len(), 3);
        assert!(
            matches!(&rows[0], Notification::Row(r) if r.key.as_deref() == Some("growth_chart"))
        );
        assert_eq!(rows[1], Notification::ReadLog(8));
        assert!(matches!(&rows[2], Notification::Row(r) if r.created_unix_ms.is_some()));
        for bad in [
            "",
            "{",
            "[]",
            r#"{"p":1}"#,
            r#"{"p":1,"x":"abc","g":"opt","o":"UPDATE"}"#,
            r#"{"p":1,"x":"1","g":"opt","o":"MERGE"}"#,
            r#"{"p":1,"x":"1","g":"opt","o":"UPDATE","zz":1}"#,
            r#"{"p":1,"x":"1","g":"opt","o":"UPDATE","c":-5}"#,
            "[1]",
            r#"[{"p":1,"x":"1","g":"opt","o":"UPDATE"},{"p":2,"x":"1","g":"opt","o":"MERGE"}]"#,
            r#"[{"p":1,"x":"1","g":"opt","o":"UPDATE"}"#,
        ] {
            assert!(parse_payload(bad).is_err(), "{bad}");
        }
        assert!(parse_payload(&"x".repeat(9000)).is_err());
    }
}
