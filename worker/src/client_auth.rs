//! Bearer tokens on outgoing gRPC calls: a tonic interceptor that adds
//! `authorization: Bearer <token>` to every request, shared by the worker, the CLI and tests.
//!
//! The token sits in a shared slot, so a process can start its clients before it has a token
//! (the node's own worker gets its token once the cluster is bootstrapped) and replace it later.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

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
#[derive(Clone)]
pub struct BearerToken {
    value: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
    /// Whether a token is set, for [`BearerToken::wait_until_set`].
    set: Arc<watch::Sender<bool>>,
}

impl Default for BearerToken {
    fn default() -> Self {
        BearerToken {
            value: Arc::default(),
            set: Arc::new(watch::Sender::new(false)),
        }
    }
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
        let is_set = value.is_some();
        if let Ok(mut slot) = self.value.write() {
            *slot = value;
        }
        self.set.send_replace(is_set);
        Ok(())
    }

    /// Returns once a token is set (at once if one is), so a client that starts before its
    /// token exists waits for it instead of sending unauthenticated requests and backing off.
    pub async fn wait_until_set(&self) {
        let mut receiver = self.set.subscribe();
        // The sender lives as long as `self`, so this ends only when a token is set.
        let _ = receiver.wait_for(|set| *set).await;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::BearerToken;

    #[tokio::test]
    async fn a_wait_for_the_token_ends_when_a_clone_sets_it() {
        let token = BearerToken::default();
        let waiter = tokio::spawn({
            let token = token.clone();
            async move { token.wait_until_set().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "no token yet");
        token.set("secret").unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the wait ends once the token is set")
            .unwrap();
        // Already set: at once.
        tokio::time::timeout(Duration::from_secs(5), token.wait_until_set())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn clearing_the_token_makes_waiters_wait_again() {
        let token = BearerToken::new("secret").unwrap();
        token.set("").unwrap();
        assert!(!token.is_set());
        let waited = tokio::time::timeout(Duration::from_millis(50), token.wait_until_set()).await;
        assert!(waited.is_err(), "cleared: waits");
    }
}
