//! Bearer tokens on outgoing gRPC calls: a tonic interceptor that adds
//! `authorization: Bearer <token>` to every request, shared by the worker, the CLI and tests.
//!
//! The token sits in a shared slot, so a process can start its clients before it has a token
//! (the node's own worker gets its token once the cluster is bootstrapped) and replace it later.

use std::sync::{Arc, RwLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel whose requests carry the bearer token.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// The token is not a valid header value (it holds control characters or non-ASCII bytes).
#[derive(Debug, thiserror::Error)]
#[error("the token is not a valid HTTP header value (printable ASCII only)")]
pub struct InvalidToken;

/// The interceptor; clones share one token slot. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct BearerToken {
    value: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerToken")
            .field("set", &self.is_set())
            .finish()
    }
}

impl BearerToken {
    /// Sends `token` (empty: no `authorization` header).
    ///
    /// # Errors
    /// [`InvalidToken`] for a value that cannot be a header.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let bearer = BearerToken::default();
        bearer.set(token)?;
        Ok(bearer)
    }

    /// Replaces the token for every clone (empty: none).
    ///
    /// # Errors
    /// [`InvalidToken`] for a value that cannot be a header.
    pub fn set(&self, token: &str) -> Result<(), InvalidToken> {
        let value = if token.is_empty() {
            None
        } else {
            let mut value = format!("Bearer {token}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| InvalidToken)?;
            value.set_sensitive(true);
            Some(value)
        };
        if let Ok(mut slot) = self.value.write() {
            *slot = value;
        }
        Ok(())
    }

    /// Whether a token is set.
    pub fn is_set(&self) -> bool {
        self.value
            .read()
            .map(|slot| slot.is_some())
            .unwrap_or(false)
    }

    /// `channel` with this token on every request.
    pub fn channel(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Ok(slot) = self.value.read()
            && let Some(value) = slot.as_ref()
        {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Reads a token file: its first line, trimmed.
///
/// # Errors
/// The file cannot be read, or is empty.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds no token", path.display()),
        ));
    }
    Ok(token)
}
