//! `flotilla.v1.SecretService`: per-project secrets, and their injection into lease replies.
//!
//! Values are encrypted here, at the node edge, before anything is proposed: the Raft log and
//! the state hold only envelopes ([`flotilla_scheduler::secret`], [`crate::secrets`]). Writes
//! are made on the leader (a follower forwards the request, value included, over the cluster's
//! gRPC connection) because the envelope is bound to the secret's next version, which the
//! leader reads from its state after a linearizable barrier; the state machine's
//! compare-and-swap on the version turns a concurrent update into ABORTED. No RPC returns a
//! value: `ListSecrets` shows names, versions, times, sizes and key ids. The only place a
//! value leaves a node is the reply to the worker holding the lease of a fleet that names it.

use std::sync::Arc;

use flotilla_proto::v1::secret_service_client::SecretServiceClient;
use flotilla_proto::v1::secret_service_server::SecretService;
use flotilla_proto::v1::{self};
use flotilla_scheduler::spec::{self, DEFAULT_PROJECT};
use flotilla_scheduler::{Command, FieldError, LeaseGrant, Permission, Response};
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tracing::{info, warn};

use super::auth::{authorization, caller, forwarded};
use super::{Api, Proposal, invalid};
use crate::config::SecretsSection;
use crate::secrets::{Keyring, SecretsError, validate_value};

/// Most secrets one `RotateSecrets` call re-wraps.
pub const MAX_ROTATE_BATCH: u32 = 1000;
/// Secrets re-wrapped by a `RotateSecrets` call that names no batch size.
pub const DEFAULT_ROTATE_BATCH: u32 = 100;

/// The secrets service: the shared [`Api`], this node's keyring and the `[secrets]` limits.
#[derive(Clone)]
pub struct SecretsApi {
    api: Api,
    keyring: Arc<Keyring>,
    settings: SecretsSection,
}

/// The project a secret request is about: the one it names, else the caller's own project (a
/// project-scoped token), else [`DEFAULT_PROJECT`]; validated.
fn requested_project(who: &super::auth::Caller, named: &str) -> Result<String, Status> {
    if named.is_empty()
        && let Some(own) = &who.token.project
    {
        return Ok(own.clone());
    }
    project_of(named).map(str::to_owned)
}

/// The project named by a request (`""` is [`DEFAULT_PROJECT`]), validated.
fn project_of(project: &str) -> Result<&str, Status> {
    if project.is_empty() {
        return Ok(DEFAULT_PROJECT);
    }
    if !spec::is_valid_name(project) {
        return Err(invalid(FieldError::new(
            "project",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        )));
    }
    Ok(project)
}

fn validate_secret_name(name: &str) -> Result<(), Status> {
    if !spec::is_valid_name(name) {
        return Err(invalid(FieldError::new(
            "name",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        )));
    }
    Ok(())
}

fn keyring_status(error: &SecretsError) -> Status {
    Status::failed_precondition(error.to_string())
}

impl SecretsApi {
    /// The service over `api`, encrypting with `keyring`, limited by `settings`.
    pub fn new(api: Api, keyring: Arc<Keyring>, settings: SecretsSection) -> Self {
        SecretsApi {
            api,
            keyring,
            settings,
        }
    }

    fn client(&self, channel: Channel) -> SecretServiceClient<Channel> {
        SecretServiceClient::new(channel)
            .max_decoding_message_size(self.api.limits.max_request_bytes)
            .max_encoding_message_size(self.api.limits.max_request_bytes)
    }

    fn info(&self, project: &str, name: &str) -> Option<v1::SecretInfo> {
        self.api.node.state.read(|state| {
            state
                .secrets()
                .get(project, name)
                .map(|secret| v1::SecretInfo {
                    project: project.to_owned(),
                    name: name.to_owned(),
                    version: secret.version,
                    created_at_ms: secret.created_at_ms,
                    updated_at_ms: secret.updated_at_ms,
                    key_id: secret.envelope.key_id.clone(),
                    value_size_bytes: secret.value_size_bytes,
                })
        })
    }
}

#[tonic::async_trait]
impl SecretService for SecretsApi {
    async fn set_secret(
        &self,
        request: GrpcRequest<v1::SetSecretRequest>,
    ) -> Result<GrpcResponse<v1::SecretInfo>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let project = requested_project(&who, &original.project)?;
        who.require(Permission::ProjectSettings, &project)?;
        validate_secret_name(&original.name)?;
        validate_value(&original.value, self.settings.max_value_bytes)
            .map_err(|message| invalid(FieldError::new("value", message)))?;
        if let Some(channel) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(channel).set_secret(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let name = original.name.clone();
        let version = self.api.node.state.read(|state| {
            state
                .secrets()
                .get(&project, &name)
                .map_or(1, |secret| secret.version.saturating_add(1))
        });
        let envelope = self
            .keyring
            .seal(&project, &name, version, &original.value)
            .map_err(|error| keyring_status(&error))?;
        let command = Command::SetSecret {
            project: project.clone(),
            name: name.clone(),
            version,
            value_size_bytes: original.value.len() as u64,
            envelope,
            max_secrets_per_project: self.settings.max_secrets_per_project,
            max_secrets_total: self.settings.max_secrets_total,
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel).set_secret(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::SecretSet { version }) => {
                info!(secret.project = %project, secret.name = %name, version, "secret set");
                self.info(&project, &name)
                    .map(GrpcResponse::new)
                    .ok_or_else(|| Status::aborted("the secret was deleted meanwhile; retry"))
            }
            Proposal::Applied(Response::Rejected { reason }) if reason.contains("limits.") => {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(Response::Rejected { reason }) => Err(Status::aborted(reason)),
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }

    async fn list_secrets(
        &self,
        request: GrpcRequest<v1::ListSecretsRequest>,
    ) -> Result<GrpcResponse<v1::ListSecretsResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let project = requested_project(&who, &original.project)?;
        who.require(Permission::ProjectSettings, &project)?;
        if let Some(channel) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(channel)
                        .list_secrets(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let secrets = self.api.node.state.read(|state| {
            state
                .secrets()
                .of_project(&project)
                .map(|(name, secret)| v1::SecretInfo {
                    project: project.clone(),
                    name: name.clone(),
                    version: secret.version,
                    created_at_ms: secret.created_at_ms,
                    updated_at_ms: secret.updated_at_ms,
                    key_id: secret.envelope.key_id.clone(),
                    value_size_bytes: secret.value_size_bytes,
                })
                .collect()
        });
        Ok(GrpcResponse::new(v1::ListSecretsResponse { secrets }))
    }

    async fn delete_secret(
        &self,
        request: GrpcRequest<v1::DeleteSecretRequest>,
    ) -> Result<GrpcResponse<v1::DeleteSecretResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let project = requested_project(&who, &original.project)?;
        who.require(Permission::ProjectSettings, &project)?;
        validate_secret_name(&original.name)?;
        let command = Command::DeleteSecret {
            project: project.clone(),
            name: original.name.clone(),
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .delete_secret(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::SecretDeleted { existed }) => {
                info!(secret.project = %project, secret.name = %original.name, existed, "secret deleted");
                Ok(GrpcResponse::new(v1::DeleteSecretResponse { existed }))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }

    async fn rotate_secrets(
        &self,
        request: GrpcRequest<v1::RotateSecretsRequest>,
    ) -> Result<GrpcResponse<v1::RotateSecretsResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        who.require(Permission::ClusterManage, DEFAULT_PROJECT)?;
        if original.max_secrets > MAX_ROTATE_BATCH {
            return Err(invalid(FieldError::new(
                "max_secrets",
                format!("must be at most {MAX_ROTATE_BATCH}"),
            )));
        }
        let batch = if original.max_secrets == 0 {
            DEFAULT_ROTATE_BATCH
        } else {
            original.max_secrets
        };
        if let Some(channel) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(channel)
                        .rotate_secrets(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let current = self
            .keyring
            .current_key_id()
            .ok_or_else(|| keyring_status(&SecretsError::Disabled))?
            .to_owned();
        let stale = |state: &flotilla_scheduler::State| {
            state
                .secrets()
                .all()
                .filter(|(_, _, secret)| secret.envelope.key_id != current)
                .map(|(project, name, secret)| {
                    (
                        project.clone(),
                        name.clone(),
                        secret.version,
                        secret.envelope.clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let candidates = self.api.node.state.read(stale);
        let mut rewrapped = 0u32;
        for (project, name, version, envelope) in candidates.into_iter().take(batch as usize) {
            let (key_id, wrapped_data_key) = self
                .keyring
                .rewrap(&project, &name, version, &envelope)
                .map_err(|error| {
                    Status::failed_precondition(format!("secret {project}/{name}: {error}"))
                })?;
            let command = Command::RewrapSecret {
                project: project.clone(),
                name: name.clone(),
                version,
                key_id,
                wrapped_data_key,
            };
            match self.api.propose(command, who.principal()).await? {
                Proposal::Applied(Response::SecretRewrapped) => rewrapped += 1,
                // Updated or deleted meanwhile: a new version is sealed under the current key.
                Proposal::Applied(Response::Rejected { reason }) => {
                    warn!(secret.project = %project, secret.name = %name, %reason, "secret not re-wrapped");
                }
                Proposal::Forward(_) => {
                    return Err(Status::unavailable(
                        "leadership changed during rotation; retry (rotation resumes)",
                    ));
                }
                Proposal::Applied(other) => {
                    return Err(Status::internal(format!("unexpected response {other:?}")));
                }
            }
        }
        let remaining = self.api.node.state.read(stale).len() as u32;
        info!(rewrapped, remaining, key_id = %current, "secrets re-wrapped");
        Ok(GrpcResponse::new(v1::RotateSecretsResponse {
            rewrapped,
            remaining,
            current_key_id: current,
        }))
    }
}

/// Fills `lease.secrets` with the decrypted values of the fleet's `agent.secrets`, read from
/// this node's state (the leader's, which just applied the grant), or sets
/// `lease.secrets_error` naming the first that cannot be provided: deleted since the
/// submission (final) or not decryptable with this node's keys (retryable, e.g. a node whose
/// key file is missing).
pub fn inject_secrets(api: &Api, grant: &LeaseGrant, lease: &mut v1::Lease) {
    let wanted = &grant.spec.agent.secrets;
    if wanted.is_empty() {
        return;
    }
    let project = spec::fleet_project(&grant.spec);
    let keyring = api.keyring.clone();
    let opened = api.node.state.read(|state| {
        let mut values = Vec::with_capacity(wanted.len());
        for (variable, name) in wanted {
            let Some(secret) = state.secrets().get(project, name) else {
                return Err((
                    format!(
                        "agent.secrets.{variable}: secret {name:?} of project {project:?} no longer exists"
                    ),
                    false,
                ));
            };
            match keyring.open(project, name, secret.version, &secret.envelope) {
                Ok(value) => values.push(v1::InjectedSecret {
                    env_name: variable.clone(),
                    secret_name: name.clone(),
                    value: value.as_str().to_owned(),
                }),
                Err(error) => {
                    return Err((
                        format!("agent.secrets.{variable}: secret {name:?}: {error}"),
                        true,
                    ));
                }
            }
        }
        Ok(values)
    });
    match opened {
        Ok(values) => lease.secrets = values,
        Err((message, retryable)) => {
            warn!(run.id = %grant.run_id, attempt = grant.attempt, %message, "lease without its secrets");
            lease.secrets_error = message;
            lease.secrets_error_retryable = retryable;
        }
    }
}
