//! `flotilla token create|list|revoke|whoami`: API tokens (admin, except `whoami`).
//!
//! `create` prints the bearer token once; the cluster keeps only its hash and cannot show it
//! again.

use std::io::Write as _;

use flotilla_proto::v1;
use flotilla_proto::v1::token_service_client::TokenServiceClient;
use serde_json::json;

use super::{CliError, Output, bearer, connect_channel, exit_code};

/// Token subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCommands {
    /// Creates a token and prints it once (the cluster keeps only its hash).
    Create {
        /// Name, 1-64 characters of [A-Za-z0-9._-] (e.g. ci-frontend).
        #[arg(long)]
        name: String,
        /// viewer, submitter, operator, admin or worker.
        #[arg(long)]
        role: String,
        /// Project of a viewer, submitter or operator token.
        #[arg(long, default_value = "")]
        project: String,
        /// Worker id of a worker token.
        #[arg(long, default_value = "")]
        worker_id: String,
        /// Lifetime in milliseconds; 0: never expires.
        #[arg(long, default_value_t = 0)]
        ttl_ms: u64,
    },
    /// Lists every token (accessor ids, never secrets).
    List,
    /// Revokes a token (final).
    Revoke {
        /// The token's accessor id (16 hex characters).
        accessor_id: String,
    },
    /// Shows the token this command runs with.
    Whoami,
}

fn info_json(token: &v1::TokenInfo) -> serde_json::Value {
    json!({
        "accessor_id": token.accessor_id,
        "name": token.name,
        "role": token.role,
        "project": if token.project.is_empty() { "*" } else { token.project.as_str() },
        "worker_id": token.worker_id,
        "created_ms": token.created_ms,
        "expires_ms": token.expires_ms,
        "revoked": token.revoked,
        "created_by": token.created_by,
    })
}

fn info_line(token: &v1::TokenInfo) -> String {
    format!(
        "{}  {:<24} {:<9} project={:<16} worker={:<16} expires_ms={} {}",
        token.accessor_id,
        token.name,
        token.role,
        if token.project.is_empty() {
            "*"
        } else {
            &token.project
        },
        if token.worker_id.is_empty() {
            "-"
        } else {
            &token.worker_id
        },
        token.expires_ms,
        if token.revoked { "REVOKED" } else { "" }
    )
}

/// Runs a token command against the first reachable of `address`.
///
/// # Errors
/// Unreachable cluster, refused or failed RPC.
pub async fn run(address: &str, command: TokenCommands, output: Output) -> Result<i32, CliError> {
    let mut client = TokenServiceClient::new(bearer().channel(connect_channel(address).await?));
    match command {
        TokenCommands::Create {
            name,
            role,
            project,
            worker_id,
            ttl_ms,
        } => {
            let response = client
                .create_token(v1::CreateTokenRequest {
                    name,
                    role,
                    project,
                    worker_id,
                    ttl_ms,
                })
                .await?
                .into_inner();
            let info = response.token.unwrap_or_default();
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"token": info_json(&info), "secret_token": response.secret_token})
                );
            } else {
                outln!("{}", response.secret_token);
                errln!(
                    "created token {} ({}); the line above is its secret, shown only now",
                    info.accessor_id,
                    info.role
                );
            }
        }
        TokenCommands::List => {
            let tokens = client
                .list_tokens(v1::ListTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            if output == Output::Json {
                let list: Vec<_> = tokens.iter().map(info_json).collect();
                outln!("{}", json!({ "tokens": list }));
            } else {
                for token in &tokens {
                    outln!("{}", info_line(token));
                }
            }
        }
        TokenCommands::Revoke { accessor_id } => {
            let info = client
                .revoke_token(v1::RevokeTokenRequest { accessor_id })
                .await?
                .into_inner();
            if output == Output::Json {
                outln!("{}", info_json(&info));
            } else {
                outln!("revoked {}", info_line(&info));
            }
        }
        TokenCommands::Whoami => {
            let info = client.who_am_i(v1::WhoAmIRequest {}).await?.into_inner();
            if output == Output::Json {
                outln!("{}", info_json(&info));
            } else {
                outln!("{}", info_line(&info));
            }
        }
    }
    Ok(exit_code::OK)
}
