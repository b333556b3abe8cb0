//! The database queue's writes on SQLite's writer thread: claims, acks and nacks made on the
//! store's own write connection (`SqliteWriter::run`), between two message commits. The
//! statements are the pooled path's, prepared once on that connection; values are encoded
//! as sqlx encodes them (UUIDs as 16-byte blobs, times as RFC 3339 text, JSON as text).

use chrono::TimeDelta;
use confab_core::domain::{EventId, Timestamp, now};
use confab_core::ports::broker::{BrokerError, Envelope};
use confab_core::ports::store::StoreError;
use rusqlite::{Connection, Row, TransactionBehavior, params};
use uuid::Uuid;

use crate::sql_store::sqlite_writer::{parse_time, sqlite_err, time, uuid};

use super::{ACK, Claimed, claimed, from_store, numbered};

fn failed(e: rusqlite::Error) -> BrokerError {
    from_store(sqlite_err(e))
}

fn undecodable(e: StoreError) -> BrokerError {
    BrokerError::Other(Box::new(e))
}

/// Runs `claim_sql` (see `claim_statement`): the claimed deliveries, each with its order.
pub(super) fn claim(
    conn: &mut Connection,
    claim_sql: &str,
    queue: &str,
    lease: TimeDelta,
    max: u32,
) -> Result<Vec<Claimed>, BrokerError> {
    let at = now();
    let token = Uuid::now_v7();
    let mut statement = conn.prepare_cached(&numbered(claim_sql)).map_err(failed)?;
    let mut rows = statement
        .query(params![
            time(at + lease),
            token.as_bytes(),
            queue,
            time(at),
            i64::from(max)
        ])
        .map_err(failed)?;
    let mut claimed = Vec::new();
    while let Some(row) = rows.next().map_err(failed)? {
        claimed.push(delivery(queue, token, row)?);
    }
    Ok(claimed)
}

/// A claimed row (the columns of `CLAIMED_COLUMNS`) as a delivery under lease `token`.
fn delivery(queue: &str, token: Uuid, row: &Row<'_>) -> Result<Claimed, BrokerError> {
    let blob = |i: usize| -> Result<Uuid, BrokerError> {
        let bytes: Vec<u8> = row.get(i).map_err(failed)?;
        uuid(&bytes).map_err(undecodable)
    };
    let at = |i: usize| -> Result<Timestamp, BrokerError> {
        let text: String = row.get(i).map_err(failed)?;
        parse_time(&text).map_err(undecodable)
    };
    let id = blob(0)?;
    let payload = row.get_ref(3).map_err(failed)?;
    let payload = payload
        .as_bytes()
        .map_err(|e| failed(e.into()))
        .and_then(|bytes| {
            serde_json::from_slice(bytes).map_err(|e| BrokerError::Other(Box::new(e)))
        })?;
    let attempt: i64 = row.get(6).map_err(failed)?;
    let envelope = Envelope {
        id: EventId(blob(1)?),
        kind: row.get(2).map_err(failed)?,
        attempt: u32::try_from(attempt).unwrap_or(0),
        created_at: at(5)?,
        trace_id: row.get(4).map_err(failed)?,
        payload,
    };
    Ok(claimed(queue, token, id, at(7)?, envelope))
}

/// Deletes the rows of `receipts` (row id, lease token), in one transaction; whether any of
/// them was no longer under that lease.
pub(super) fn ack_all(
    conn: &mut Connection,
    receipts: &[(Uuid, Uuid)],
) -> Result<bool, BrokerError> {
    let mut receipts = receipts.to_vec();
    receipts.sort_unstable();
    receipts.dedup();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    let mut deleted = 0;
    {
        let mut delete = tx.prepare_cached(&numbered(ACK)).map_err(failed)?;
        for (id, token) in &receipts {
            deleted += delete
                .execute(params![id.as_bytes(), token.as_bytes()])
                .map_err(failed)?;
        }
    }
    tx.commit().map_err(failed)?;
    Ok(deleted < receipts.len())
}

/// Runs a nack statement (`NACK_DEAD` / `NACK_RETRY`); how many rows it settled.
pub(super) fn nack(
    conn: &mut Connection,
    sql: &str,
    when: Timestamp,
    error: &str,
    id: Uuid,
    token: Uuid,
) -> Result<u64, BrokerError> {
    let mut statement = conn.prepare_cached(&numbered(sql)).map_err(failed)?;
    let settled = statement
        .execute(params![time(when), error, id.as_bytes(), token.as_bytes()])
        .map_err(failed)?;
    Ok(settled as u64)
}
