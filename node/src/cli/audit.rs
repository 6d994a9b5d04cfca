//! `flotilla audit list|verify|export`: the replicated audit log (admin).
//!
//! `verify` fetches every kept record and recomputes the hash chain from the anchor the cluster
//! reports (the hash of the newest dropped record), so a changed, removed or reordered record is
//! found; `export` writes every kept record as one JSON object per line, to keep them before
//! the cluster drops the oldest (`audit::MAX_AUDIT_RECORDS_KEPT`).

use flotilla_proto::v1;
use flotilla_proto::v1::audit_service_client::AuditServiceClient;
use flotilla_scheduler::audit::{HashedFields, chain_hash};
use flotilla_worker::client_auth::AuthChannel;
use serde_json::json;

use super::{CliError, Output, bearer, connect_channel, exit_code};

/// Records fetched per request.
const PAGE_RECORDS: u32 = 1_000;

/// Audit subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AuditCommands {
    /// Prints records, oldest first.
    List {
        /// Only records with a sequence number above this.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most records printed.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Recomputes the hash chain of every kept record; exit 1 when it does not verify.
    Verify,
    /// Prints every kept record above `--after` as JSON lines (for archiving).
    Export {
        /// Only records with a sequence number above this (resume an earlier export).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

/// JSON form of a record.
pub fn record_json(record: &v1::AuditRecord) -> serde_json::Value {
    json!({
        "sequence": record.sequence,
        "log_index": record.log_index,
        "time_ms": record.time_ms,
        "principal": record.principal,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "reason": record.reason,
        "previous_hash": record.previous_hash,
        "hash": record.hash,
    })
}

/// The hash `record` should carry, recomputed from its fields.
pub fn recompute_hash(record: &v1::AuditRecord) -> String {
    chain_hash(&HashedFields {
        sequence: record.sequence,
        log_index: record.log_index,
        time_ms: record.time_ms,
        principal: &record.principal,
        action: &record.action,
        target: &record.target,
        outcome: &record.outcome,
        reason: &record.reason,
        previous_hash: &record.previous_hash,
    })
}

/// Checks `records` (oldest first) chain from `anchor_hash`; returns how many verified.
///
/// # Errors
/// A message naming the first record that does not verify.
pub fn verify_chain(anchor_hash: &str, records: &[v1::AuditRecord]) -> Result<u64, String> {
    let mut previous = anchor_hash.to_string();
    let mut expected: Option<u64> = None;
    for record in records {
        if let Some(expected) = expected
            && record.sequence != expected
        {
            return Err(format!(
                "record {}: expected sequence {expected} (a record is missing or repeated)",
                record.sequence
            ));
        }
        if record.previous_hash != previous {
            return Err(format!(
                "record {}: previous_hash does not match the record before it",
                record.sequence
            ));
        }
        if recompute_hash(record) != record.hash {
            return Err(format!(
                "record {}: hash does not match its contents (the record was altered)",
                record.sequence
            ));
        }
        previous = record.hash.clone();
        expected = Some(record.sequence + 1);
    }
    Ok(records.len() as u64)
}

async fn fetch_all(
    client: &mut AuditServiceClient<AuthChannel>,
    after: u64,
) -> Result<(v1::ListAuditRecordsResponse, Vec<v1::AuditRecord>), CliError> {
    let mut records = Vec::new();
    let mut cursor = after;
    loop {
        let page = client
            .list_audit_records(v1::ListAuditRecordsRequest {
                after_sequence: cursor,
                page_size: PAGE_RECORDS,
            })
            .await?
            .into_inner();
        let last = page.records.last().map(|r| r.sequence);
        let done = page.records.len() < PAGE_RECORDS as usize;
        records.extend(page.records.iter().cloned());
        match last {
            Some(last) if !done => cursor = last,
            _ => return Ok((page, records)),
        }
    }
}

/// Runs an audit command against the first reachable of `address`.
///
/// # Errors
/// Unreachable cluster, refused or failed RPC.
pub async fn run(address: &str, command: AuditCommands, output: Output) -> Result<i32, CliError> {
    let mut client = AuditServiceClient::new(bearer().channel(connect_channel(address).await?))
        .max_decoding_message_size(64 * 1024 * 1024);
    match command {
        AuditCommands::List { after, limit } => {
            let page = client
                .list_audit_records(v1::ListAuditRecordsRequest {
                    after_sequence: after,
                    page_size: limit.clamp(1, 10_000),
                })
                .await?
                .into_inner();
            if output == Output::Json {
                let records: Vec<_> = page.records.iter().map(record_json).collect();
                outln!(
                    "{}",
                    json!({
                        "records": records,
                        "anchor_hash": page.anchor_hash,
                        "dropped": page.dropped,
                        "head_hash": page.head_hash,
                        "last_sequence": page.last_sequence,
                    })
                );
            } else {
                for r in &page.records {
                    outln!(
                        "{:>6} idx={:<6} t={} {} {} {} {}{}",
                        r.sequence,
                        r.log_index,
                        r.time_ms,
                        r.principal,
                        r.action,
                        r.target,
                        r.outcome,
                        if r.reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.reason)
                        }
                    );
                }
            }
            Ok(exit_code::OK)
        }
        AuditCommands::Verify => {
            let (page, records) = fetch_all(&mut client, 0).await?;
            // The oldest kept record chains from the anchor; a fetch that started after
            // records were dropped meanwhile starts from that record's own link.
            let anchor = records
                .first()
                .filter(|first| first.sequence != page.dropped + 1)
                .map_or(page.anchor_hash.clone(), |first| {
                    first.previous_hash.clone()
                });
            match verify_chain(&anchor, &records) {
                Ok(count) => {
                    if output == Output::Json {
                        outln!(
                            "{}",
                            json!({"verified": true, "records": count, "anchor_hash": anchor, "head_hash": records.last().map_or(anchor.clone(), |r| r.hash.clone())})
                        );
                    } else {
                        outln!(
                            "audit chain verified: {count} records ({} dropped earlier), anchor {anchor}",
                            page.dropped
                        );
                    }
                    Ok(exit_code::OK)
                }
                Err(message) => Err(CliError {
                    message: format!("audit chain does not verify: {message}"),
                    code: exit_code::ERROR,
                }),
            }
        }
        AuditCommands::Export { after } => {
            let (_, records) = fetch_all(&mut client, after).await?;
            for record in &records {
                outln!("{}", record_json(record));
            }
            Ok(exit_code::OK)
        }
    }
}
