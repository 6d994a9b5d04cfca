//! `flotilla.v1.AuditService`: the replicated, hash-chained audit log (admin).

use flotilla_proto::v1;
use flotilla_proto::v1::audit_service_client::AuditServiceClient;
use flotilla_proto::v1::audit_service_server::AuditService;
use flotilla_scheduler::audit::AuditRecord;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};

use super::auth::{authorization, forwarded};
use super::{Api, invalid};

/// Most records in one page.
pub const MAX_AUDIT_PAGE_RECORDS: usize = 10_000;
/// Records in a page when the request says 0.
pub const DEFAULT_AUDIT_PAGE_RECORDS: usize = 1000;

/// A record in wire form.
pub fn record_to_wire(record: &AuditRecord) -> v1::AuditRecord {
    v1::AuditRecord {
        sequence: record.sequence,
        log_index: record.log_index,
        time_ms: record.time_ms,
        principal: record.principal.describe(),
        action: record.action.clone(),
        target: record.target.clone(),
        outcome: record.outcome.as_str().into(),
        reason: record.reason.clone(),
        previous_hash: record.previous_hash.clone(),
        hash: record.hash.clone(),
    }
}

#[tonic::async_trait]
impl AuditService for Api {
    async fn list_audit_records(
        &self,
        request: GrpcRequest<v1::ListAuditRecordsRequest>,
    ) -> Result<GrpcResponse<v1::ListAuditRecordsResponse>, Status> {
        let auth = authorization(&request);
        let original = request.into_inner();
        let page_size = crate::convert::page_size(
            original.page_size,
            DEFAULT_AUDIT_PAGE_RECORDS,
            MAX_AUDIT_PAGE_RECORDS,
        )
        .map_err(invalid)?;
        if let Some(leader) = self.read_barrier().await? {
            return self
                .forward(
                    AuditServiceClient::new(leader)
                        .max_decoding_message_size(self.limits.max_request_bytes)
                        .list_audit_records(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let response = self.node.state.read(|state| {
            let audit = state.audit();
            v1::ListAuditRecordsResponse {
                records: audit
                    .records_after(original.after_sequence, page_size)
                    .iter()
                    .map(record_to_wire)
                    .collect(),
                anchor_hash: audit.anchor_hash().to_string(),
                dropped: audit.dropped(),
                head_hash: audit.head_hash().to_string(),
                last_sequence: audit.records().back().map_or(0, |r| r.sequence),
            }
        });
        Ok(GrpcResponse::new(response))
    }
}
