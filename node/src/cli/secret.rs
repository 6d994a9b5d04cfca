//! `flotilla secret set|list|delete|rotate|keygen`.
//!
//! A value is never taken from the command line (it would show in `ps` and shell history): `set`
//! reads it from standard input (one trailing newline dropped) or from `--value-file`. No command
//! prints a value; the server never returns one.

use std::io::Read as _;
use std::path::Path;

use flotilla_proto::v1::secret_service_client::SecretServiceClient;
use flotilla_proto::v1::{self};
use flotilla_worker::client_auth::AuthChannel;
use serde_json::json;
use zeroize::Zeroizing;

use super::{CliError, Output, connect_channel, exit_code};

/// Most bytes read as a value (the server applies its own, smaller, `secrets.max_value_bytes`).
const MAX_VALUE_READ_BYTES: u64 = 1024 * 1024;

/// A client of the secrets service on the first reachable address.
///
/// # Errors
/// [`exit_code::UNAVAILABLE`] when no address answers.
pub async fn connect(addresses: &str) -> Result<SecretServiceClient<AuthChannel>, CliError> {
    Ok(SecretServiceClient::new(
        super::bearer().channel(connect_channel(addresses).await?),
    ))
}

fn info_json(info: &v1::SecretInfo) -> serde_json::Value {
    json!({
        "project": info.project,
        "name": info.name,
        "version": info.version,
        "created_at_ms": info.created_at_ms,
        "updated_at_ms": info.updated_at_ms,
        "key_id": info.key_id,
        "value_size_bytes": info.value_size_bytes,
    })
}

/// Reads the value from `file`, or from standard input when `None`; drops one trailing newline.
fn read_value(file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut value = Zeroizing::new(Vec::new());
    let read = match file {
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(MAX_VALUE_READ_BYTES).read_to_end(&mut value)),
        None => std::io::stdin()
            .lock()
            .take(MAX_VALUE_READ_BYTES)
            .read_to_end(&mut value),
    };
    read.map_err(|error| CliError {
        message: format!("cannot read the value: {error}"),
        code: exit_code::ERROR,
    })?;
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    Ok(value)
}

/// `secret set NAME`: stores the value read from `value_file` or standard input.
///
/// # Errors
/// The server's answer as a [`CliError`].
pub async fn set(
    client: &mut SecretServiceClient<AuthChannel>,
    project: &str,
    name: &str,
    value_file: Option<&Path>,
    output: Output,
) -> Result<i32, CliError> {
    let value = read_value(value_file)?;
    let info = client
        .set_secret(v1::SetSecretRequest {
            project: project.to_owned(),
            name: name.to_owned(),
            value: value.to_vec(),
        })
        .await?
        .into_inner();
    match output {
        Output::Json => super::write_stdout(&info_json(&info).to_string()),
        Output::Human => super::write_stdout(&format!(
            "secret {}/{} set: version {}, {} bytes, key {}",
            info.project, info.name, info.version, info.value_size_bytes, info.key_id
        )),
    }
    Ok(exit_code::OK)
}

/// `secret list`: names, versions, times, sizes and key ids; never values.
///
/// # Errors
/// The server's answer as a [`CliError`].
pub async fn list(
    client: &mut SecretServiceClient<AuthChannel>,
    project: &str,
    output: Output,
) -> Result<i32, CliError> {
    let secrets = client
        .list_secrets(v1::ListSecretsRequest {
            project: project.to_owned(),
        })
        .await?
        .into_inner()
        .secrets;
    match output {
        Output::Json => super::write_stdout(
            &json!({ "secrets": secrets.iter().map(info_json).collect::<Vec<_>>() }).to_string(),
        ),
        Output::Human => {
            super::write_stdout(&format!(
                "{:<32} {:>7} {:>8} {:<20} {:>15}",
                "NAME", "VERSION", "BYTES", "KEY", "UPDATED_AT_MS"
            ));
            for info in &secrets {
                super::write_stdout(&format!(
                    "{:<32} {:>7} {:>8} {:<20} {:>15}",
                    info.name, info.version, info.value_size_bytes, info.key_id, info.updated_at_ms
                ));
            }
        }
    }
    Ok(exit_code::OK)
}

/// `secret delete NAME`.
///
/// # Errors
/// The server's answer as a [`CliError`].
pub async fn delete(
    client: &mut SecretServiceClient<AuthChannel>,
    project: &str,
    name: &str,
    output: Output,
) -> Result<i32, CliError> {
    let existed = client
        .delete_secret(v1::DeleteSecretRequest {
            project: project.to_owned(),
            name: name.to_owned(),
        })
        .await?
        .into_inner()
        .existed;
    match output {
        Output::Json => super::write_stdout(&json!({ "existed": existed }).to_string()),
        Output::Human if existed => super::write_stdout(&format!("secret {name} deleted")),
        Output::Human => super::write_stdout(&format!("no secret {name}")),
    }
    Ok(exit_code::OK)
}

/// `secret rotate`: re-wraps, batch after batch, every data key not wrapped by the current key.
///
/// # Errors
/// The server's answer as a [`CliError`].
pub async fn rotate(
    client: &mut SecretServiceClient<AuthChannel>,
    batch: u32,
    output: Output,
) -> Result<i32, CliError> {
    let mut total = 0u64;
    loop {
        let response = client
            .rotate_secrets(v1::RotateSecretsRequest { max_secrets: batch })
            .await?
            .into_inner();
        total += u64::from(response.rewrapped);
        if response.remaining == 0 || response.rewrapped == 0 {
            match output {
                Output::Json => super::write_stdout(
                    &json!({
                        "rewrapped": total,
                        "remaining": response.remaining,
                        "current_key_id": response.current_key_id,
                    })
                    .to_string(),
                ),
                Output::Human => super::write_stdout(&format!(
                    "{total} secrets re-wrapped under key {}; {} remaining",
                    response.current_key_id, response.remaining
                )),
            }
            return Ok(if response.remaining == 0 {
                exit_code::OK
            } else {
                exit_code::ERROR
            });
        }
    }
}

/// `secret keygen --output FILE`: a new key-encryption key file (0600), to copy to every node.
///
/// # Errors
/// The file exists or cannot be written.
pub fn keygen(path: &Path, output: Output) -> Result<i32, CliError> {
    let key_id = crate::secrets::generate_key_file(path).map_err(|error| CliError {
        message: error.to_string(),
        code: exit_code::ERROR,
    })?;
    match output {
        Output::Json => super::write_stdout(
            &json!({ "key_file": path.display().to_string(), "key_id": key_id }).to_string(),
        ),
        Output::Human => super::write_stdout(&format!(
            "key {key_id} written to {} (mode 0600); copy it to every node and set secrets.key_file",
            path.display()
        )),
    }
    Ok(exit_code::OK)
}
