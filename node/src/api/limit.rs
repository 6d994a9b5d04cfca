//! `flotilla.v1.LimitService`: the cluster's rate and concurrency limits
//! ([`flotilla_scheduler::limit`]). They are operator policy: creating and deleting need
//! `cluster.manage`, reading needs `cluster.read`, and they apply to every run of the projects
//! they name whatever its fleet asks.

use flotilla_proto::v1::limit_service_client::LimitServiceClient;
use flotilla_proto::v1::limit_service_server::LimitService;
use flotilla_proto::v1::{self};
use flotilla_scheduler::{Command, FieldError, Response, spec::is_valid_name};
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tracing::info;

use super::auth::{authorization, caller, forwarded};
use super::{Api, Proposal, invalid};
use crate::convert::flow::{limit_spec_from_wire, limit_to_wire};

/// Most keys of one limit `GetLimit` lists.
pub const MAX_LISTED_KEYS: usize = 1_000;

/// The limit service over the shared [`Api`].
#[derive(Clone)]
pub struct LimitApi {
    api: Api,
}

impl LimitApi {
    /// The service over `api`.
    pub fn new(api: Api) -> Self {
        LimitApi { api }
    }

    fn client(&self, channel: Channel) -> LimitServiceClient<Channel> {
        LimitServiceClient::new(channel)
            .max_decoding_message_size(self.api.limits.max_request_bytes)
            .max_encoding_message_size(self.api.limits.max_request_bytes)
    }

    fn limit(&self, name: &str, max_keys: usize) -> Result<v1::Limit, Status> {
        self.api
            .node
            .state
            .read(|state| {
                state
                    .limits()
                    .find(|limit| limit.spec.name == name)
                    .map(|limit| {
                        limit_to_wire(
                            limit,
                            &state.limit_keys(name, max_keys),
                            &state.waiting_runs(name, max_keys),
                        )
                    })
            })
            .ok_or_else(|| Status::not_found(format!("name: no limit {name:?}")))
    }
}

fn validate_name(name: &str) -> Result<(), Status> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(invalid(FieldError::new(
            "name",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        )))
    }
}

#[tonic::async_trait]
impl LimitService for LimitApi {
    async fn create_limit(
        &self,
        request: GrpcRequest<v1::CreateLimitRequest>,
    ) -> Result<GrpcResponse<v1::Limit>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let spec = limit_spec_from_wire(original.spec.clone()).map_err(invalid)?;
        let command = Command::CreateLimit {
            spec: spec.clone(),
            max_limits: self.api.limits.max_limits,
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .create_limit(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::LimitCreated { name }) => {
                info!(limit = %name, description = %spec.describe(), "limit created");
                self.limit(&name, 0).map(GrpcResponse::new)
            }
            Proposal::Applied(Response::Rejected { reason }) if reason.contains("exists") => {
                Err(Status::already_exists(reason))
            }
            Proposal::Applied(Response::Rejected { reason }) if reason.contains("max_limits") => {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::invalid_argument(reason))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }

    async fn list_limits(
        &self,
        request: GrpcRequest<v1::ListLimitsRequest>,
    ) -> Result<GrpcResponse<v1::ListLimitsResponse>, Status> {
        let auth = authorization(&request);
        let original = request.into_inner();
        if let Some(leader) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(leader).list_limits(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let limits = self
            .api
            .node
            .state
            .read(|state| state.limits().map(|l| limit_to_wire(l, &[], &[])).collect());
        Ok(GrpcResponse::new(v1::ListLimitsResponse { limits }))
    }

    async fn get_limit(
        &self,
        request: GrpcRequest<v1::GetLimitRequest>,
    ) -> Result<GrpcResponse<v1::Limit>, Status> {
        let auth = authorization(&request);
        let original = request.into_inner();
        validate_name(&original.name)?;
        if let Some(leader) = self.api.read_barrier().await? {
            return self
                .api
                .forward(self.client(leader).get_limit(forwarded(original, &auth)), 0)
                .await;
        }
        self.limit(&original.name, MAX_LISTED_KEYS)
            .map(GrpcResponse::new)
    }

    async fn delete_limit(
        &self,
        request: GrpcRequest<v1::DeleteLimitRequest>,
    ) -> Result<GrpcResponse<v1::DeleteLimitResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        validate_name(&original.name)?;
        let command = Command::DeleteLimit {
            name: original.name.clone(),
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .delete_limit(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::LimitDeleted { name }) => {
                info!(limit = %name, "limit deleted");
                Ok(GrpcResponse::new(v1::DeleteLimitResponse {}))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::not_found(format!("name: {reason}")))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }
}
