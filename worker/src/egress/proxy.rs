//! The per-attempt HTTP proxy: hyper 1 HTTP/1.1 server answering `CONNECT host:port` with a
//! TCP tunnel when the policy allows it, and recording every request.
//!
//! Order of checks for one request (the first that fails answers and is recorded as denied):
//! method is `CONNECT` (405 `method_not_supported` otherwise: plain-HTTP forwarding is not
//! offered, clients use `CONNECT` for `https://` and `curl --proxytunnel` for `http://`) →
//! `host:port` present and well formed (400 `bad_request`) → the attempt's request count below
//! `max_connections_per_run` and its byte budget not spent (429 `connection_limit`,
//! `run_byte_limit`) → the host is in the allowlist (403 `not_allowed`) → the proxy resolves it
//! itself (static hosts, IP literal, or the system resolver; 502 `resolution_failed`) → every
//! resolved address is public or covered by an exception (403 `forbidden_address:<class>`) →
//! a TCP connection to one of exactly those addresses (no second resolution; 502
//! `connect_failed`). Then 200 and the tunnel, which ends as `closed`, `idle_timeout`,
//! `total_timeout`, `connection_byte_limit`, `run_byte_limit`, `cancelled` (the attempt ended)
//! or `error`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::EgressAttachment;
use super::config::EgressPolicy;
use super::namespace::{NamespaceError, create_run_namespace};
use super::policy::{check_addresses, host_allowed, normalize_host};

/// Size of each direction's copy buffer in a tunnel.
const TUNNEL_BUFFER_BYTES: usize = 16 * 1024;

/// How long [`EgressProxy::finish`] waits for the proxy's tasks after telling them to stop.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// Pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// One request to the proxy and what became of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionRecord {
    /// The host asked for (normalized: lower case, no trailing dot); empty when the request
    /// named none.
    pub host: String,
    /// The port asked for; 0 when the request named none.
    pub port: u16,
    /// The address connected to (allowed), or the address refused (`forbidden_address`).
    pub address: Option<IpAddr>,
    /// Bytes from the agent to the target.
    pub bytes_up: u64,
    /// Bytes from the target to the agent.
    pub bytes_down: u64,
    /// Whether the tunnel was opened.
    pub allowed: bool,
    /// Denied: why (`not_allowed`, `forbidden_address:loopback`, ... see the module
    /// documentation). Allowed: how the tunnel ended (`closed`, `idle_timeout`, ...).
    pub reason: String,
    /// From the request to the denial, or to the tunnel's end, in milliseconds.
    pub duration_ms: u64,
}

/// The records of one attempt: the first `max_records_per_attempt`, and how many more there
/// were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressReport {
    /// The records kept, in the order the connections ended.
    pub connections: Vec<ConnectionRecord>,
    /// Records beyond the limit (logged, not kept).
    pub dropped: u64,
}

/// Errors starting a proxy.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The run's namespace could not be created.
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    /// The listener could not be registered with the runtime.
    #[error("cannot register the proxy listener: {0}")]
    Listener(std::io::Error),
}

struct ProxyState {
    policy: Arc<EgressPolicy>,
    run_id: String,
    attempt: u32,
    requests: AtomicU32,
    run_bytes: AtomicU64,
    report: Mutex<EgressReport>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ProxyState {
    fn record(&self, record: ConnectionRecord) {
        let address = record.address.map(|address| address.to_string());
        tracing::info!(
            run.id = %self.run_id,
            attempt = self.attempt,
            host = %record.host,
            port = record.port,
            address = address.as_deref().unwrap_or(""),
            bytes_up = record.bytes_up,
            bytes_down = record.bytes_down,
            allowed = record.allowed,
            reason = %record.reason,
            duration_ms = record.duration_ms,
            "egress connection"
        );
        let mut report = match self.report.lock() {
            Ok(report) => report,
            Err(poisoned) => poisoned.into_inner(),
        };
        if report.connections.len() < self.policy.config.max_records_per_attempt {
            report.connections.push(record);
        } else {
            report.dropped += 1;
        }
    }
}

/// A running proxy in its own network namespace, for one attempt.
pub struct EgressProxy {
    attachment: EgressAttachment,
    state: Arc<ProxyState>,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EgressProxy")
            .field("run_id", &self.state.run_id)
            .field("attempt", &self.state.attempt)
            .field("proxy_url", &self.attachment.proxy_url)
            .finish()
    }
}

impl EgressProxy {
    /// Creates the attempt's network namespace with the proxy listening on
    /// `127.0.0.1:<proxy_port>` inside, and starts serving. Must be called within a tokio
    /// runtime; the proxy's outgoing connections use the host's network.
    ///
    /// Errors: [`EgressError`] when the namespace or listener cannot be set up.
    pub fn start(
        policy: Arc<EgressPolicy>,
        run_id: &str,
        attempt: u32,
    ) -> Result<EgressProxy, EgressError> {
        let port = policy.config.proxy_port;
        let namespace = create_run_namespace(port)?;
        let listener =
            tokio::net::TcpListener::from_std(namespace.listener).map_err(EgressError::Listener)?;
        let max_concurrent = usize::try_from(policy.config.max_concurrent_connections)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let state = Arc::new(ProxyState {
            policy,
            run_id: run_id.to_owned(),
            attempt,
            requests: AtomicU32::new(0),
            run_bytes: AtomicU64::new(0),
            report: Mutex::new(EgressReport::default()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        state.tasks.spawn(accept_loop(
            state.clone(),
            listener,
            Arc::new(Semaphore::new(max_concurrent)),
        ));
        Ok(EgressProxy {
            attachment: EgressAttachment {
                namespace: Arc::new(namespace.namespace),
                proxy_url: format!("http://127.0.0.1:{port}"),
            },
            state,
        })
    }

    /// What a sandbox needs to join the namespace and find the proxy.
    pub fn attachment(&self) -> EgressAttachment {
        self.attachment.clone()
    }

    /// The namespace's descriptor (for `setns`).
    pub fn namespace(&self) -> &Arc<OwnedFd> {
        &self.attachment.namespace
    }

    /// The records so far (tunnels still open are not in it yet).
    pub fn report_so_far(&self) -> EgressReport {
        match self.state.report.lock() {
            Ok(report) => report.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Stops the proxy: closes the listener and every open tunnel (recorded as `cancelled`),
    /// waits up to 5 s for them, and returns the attempt's records. The namespace goes away
    /// with the last descriptor of it (sandboxes hold one while they run).
    pub async fn finish(self) -> EgressReport {
        self.state.shutdown.cancel();
        self.state.tasks.close();
        if tokio::time::timeout(FINISH_WAIT, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(run.id = %self.state.run_id, attempt = self.state.attempt, "egress proxy tasks did not stop in time");
        }
        let mut report = match self.state.report.lock() {
            Ok(report) => report,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::take(&mut *report)
    }
}

async fn accept_loop(
    state: Arc<ProxyState>,
    listener: tokio::net::TcpListener,
    semaphore: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            () = state.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(permit) = semaphore.clone().try_acquire_owned() else {
                    drop(stream);
                    state.record(ConnectionRecord {
                        host: String::new(),
                        port: 0,
                        address: None,
                        bytes_up: 0,
                        bytes_down: 0,
                        allowed: false,
                        reason: "concurrent_connection_limit".to_owned(),
                        duration_ms: 0,
                    });
                    continue;
                };
                state
                    .tasks
                    .spawn(serve_client(state.clone(), stream, Arc::new(permit)));
            }
            Err(error) => {
                tracing::warn!(%error, "egress proxy: accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn serve_client(
    state: Arc<ProxyState>,
    stream: TcpStream,
    permit: Arc<OwnedSemaphorePermit>,
) {
    let config = &state.policy.config;
    let service_state = state.clone();
    let service = service_fn(move |request| handle(service_state.clone(), permit.clone(), request));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .max_buf_size(config.max_header_bytes)
        .keep_alive(false);
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, "egress proxy: client connection ended with an error");
            }
        }
        () = state.shutdown.cancelled() => {}
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn answer(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    response
}

struct Denial {
    status: StatusCode,
    reason: String,
    address: Option<IpAddr>,
}

fn denial(status: StatusCode, reason: impl Into<String>) -> Denial {
    Denial {
        status,
        reason: reason.into(),
        address: None,
    }
}

async fn handle(
    state: Arc<ProxyState>,
    permit: Arc<OwnedSemaphorePermit>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let authority = request.uri().authority().cloned();
    let host = authority
        .as_ref()
        .and_then(|authority| normalize_host(authority.host()).ok())
        .unwrap_or_default();
    let port = authority
        .as_ref()
        .and_then(|authority| authority.port_u16())
        .unwrap_or(0);
    match open_tunnel(&state, &request, &host, port).await {
        Err(denied) => {
            let text = format!("flotilla egress proxy: denied: {}\n", denied.reason);
            state.record(ConnectionRecord {
                host,
                port,
                address: denied.address,
                bytes_up: 0,
                bytes_down: 0,
                allowed: false,
                reason: denied.reason,
                duration_ms: elapsed_ms(started),
            });
            Ok(answer(denied.status, text))
        }
        Ok((upstream, address)) => {
            let tunnel_state = state.clone();
            state.tasks.spawn(async move {
                let upgraded = tokio::select! {
                    upgraded = hyper::upgrade::on(request) => upgraded,
                    () = tunnel_state.shutdown.cancelled() => {
                        tunnel_state.record(ConnectionRecord {
                            host, port, address: Some(address.ip()), bytes_up: 0, bytes_down: 0,
                            allowed: true, reason: "cancelled".to_owned(), duration_ms: elapsed_ms(started),
                        });
                        return;
                    }
                };
                let (bytes_up, bytes_down, reason) = match upgraded {
                    Ok(upgraded) => tunnel(&tunnel_state, TokioIo::new(upgraded), upstream).await,
                    Err(error) => {
                        tracing::debug!(%error, "egress proxy: upgrade failed");
                        (0, 0, "error")
                    }
                };
                drop(permit);
                tunnel_state.record(ConnectionRecord {
                    host,
                    port,
                    address: Some(address.ip()),
                    bytes_up,
                    bytes_down,
                    allowed: true,
                    reason: reason.to_owned(),
                    duration_ms: elapsed_ms(started),
                });
            });
            Ok(Response::new(Full::new(Bytes::new())))
        }
    }
}

/// The checks of the module documentation, then the connection to the target.
async fn open_tunnel(
    state: &ProxyState,
    request: &Request<Incoming>,
    host: &str,
    port: u16,
) -> Result<(TcpStream, SocketAddr), Denial> {
    let policy = &state.policy;
    let config = &policy.config;
    if request.method() != Method::CONNECT {
        return Err(denial(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_supported",
        ));
    }
    if host.is_empty() || port == 0 {
        return Err(denial(StatusCode::BAD_REQUEST, "bad_request"));
    }
    let count = state
        .requests
        .fetch_add(1, Ordering::Relaxed)
        .saturating_add(1);
    if count > config.max_connections_per_run {
        return Err(denial(StatusCode::TOO_MANY_REQUESTS, "connection_limit"));
    }
    if state.run_bytes.load(Ordering::Relaxed) >= config.max_bytes_per_run {
        return Err(denial(StatusCode::TOO_MANY_REQUESTS, "run_byte_limit"));
    }
    if !host_allowed(&policy.rules, host, port) {
        return Err(denial(StatusCode::FORBIDDEN, "not_allowed"));
    }
    let addresses = resolve(policy, host, port)
        .await
        .map_err(|()| denial(StatusCode::BAD_GATEWAY, "resolution_failed"))?;
    if let Err((address, class)) = check_addresses(&addresses, &policy.exceptions) {
        return Err(Denial {
            status: StatusCode::FORBIDDEN,
            reason: format!("forbidden_address:{}", class.as_str()),
            address: Some(address),
        });
    }
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    for address in addresses {
        let target = SocketAddr::new(address, port);
        match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => return Ok((stream, target)),
            Ok(Err(error)) => {
                tracing::debug!(%target, %error, "egress proxy: connect failed");
            }
            Err(_elapsed) => tracing::debug!(%target, "egress proxy: connect timed out"),
        }
    }
    Err(denial(StatusCode::BAD_GATEWAY, "connect_failed"))
}

/// The addresses of `host`: itself when it is an IP literal, the operator's static entry, or
/// the system resolver's answer (within `resolve_timeout_ms`), without duplicates.
async fn resolve(policy: &EgressPolicy, host: &str, port: u16) -> Result<Vec<IpAddr>, ()> {
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(vec![address]);
    }
    if let Some(address) = policy.static_hosts.get(host) {
        return Ok(vec![*address]);
    }
    let timeout = Duration::from_millis(policy.config.resolve_timeout_ms);
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => {
            let mut addresses: Vec<IpAddr> = Vec::new();
            for address in found {
                if !addresses.contains(&address.ip()) {
                    addresses.push(address.ip());
                }
            }
            if addresses.is_empty() {
                Err(())
            } else {
                Ok(addresses)
            }
        }
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

/// Why one direction of a tunnel stopped early.
#[derive(Clone, Copy, Debug)]
enum Stop {
    ConnectionByteLimit,
    RunByteLimit,
    Error,
}

impl Stop {
    fn as_str(self) -> &'static str {
        match self {
            Stop::ConnectionByteLimit => "connection_byte_limit",
            Stop::RunByteLimit => "run_byte_limit",
            Stop::Error => "error",
        }
    }
}

struct Counters<'a> {
    state: &'a ProxyState,
    connection_bytes: AtomicU64,
    last_activity_ms: AtomicU64,
    started: Instant,
}

/// Copies `reader` to `writer` until end of file (then shuts `writer` down), counting into
/// `direction` and the connection's and run's totals and stopping at their limits.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    direction: &AtomicU64,
    counters: &Counters<'_>,
) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &counters.state.policy.config;
    let mut buffer = vec![0_u8; TUNNEL_BUFFER_BYTES];
    loop {
        let count = reader.read(&mut buffer).await.map_err(|_| Stop::Error)?;
        if count == 0 {
            // The other side may already be gone; nothing to record.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        let bytes = count as u64;
        let connection = counters
            .connection_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        if connection > config.max_bytes_per_connection {
            return Err(Stop::ConnectionByteLimit);
        }
        let run = counters.state.run_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if run > config.max_bytes_per_run {
            return Err(Stop::RunByteLimit);
        }
        writer
            .write_all(&buffer[..count])
            .await
            .map_err(|_| Stop::Error)?;
        direction.fetch_add(bytes, Ordering::Relaxed);
        counters
            .last_activity_ms
            .store(elapsed_ms(counters.started), Ordering::Relaxed);
    }
}

/// Tunnels between the agent and the target until both sides close, a limit or timeout is
/// reached, or the proxy stops. Returns bytes up, bytes down and how it ended.
async fn tunnel<C>(state: &ProxyState, client: C, upstream: TcpStream) -> (u64, u64, &'static str)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let config = &state.policy.config;
    let counters = Counters {
        state,
        connection_bytes: AtomicU64::new(0),
        last_activity_ms: AtomicU64::new(0),
        started: Instant::now(),
    };
    let bytes_up = AtomicU64::new(0);
    let bytes_down = AtomicU64::new(0);
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = upstream.into_split();
    let copy = async {
        tokio::try_join!(
            pump(client_read, upstream_write, &bytes_up, &counters),
            pump(upstream_read, client_write, &bytes_down, &counters),
        )
    };
    let idle_timeout_ms = config.idle_timeout_ms;
    let idle = async {
        loop {
            let last = counters.last_activity_ms.load(Ordering::Relaxed);
            let now = elapsed_ms(counters.started);
            let idle_for = now.saturating_sub(last);
            if idle_for >= idle_timeout_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_timeout_ms - idle_for)).await;
        }
    };
    let reason = tokio::select! {
        result = copy => match result {
            Ok(_) => "closed",
            Err(stop) => stop.as_str(),
        },
        () = idle => "idle_timeout",
        () = tokio::time::sleep(Duration::from_millis(config.connection_timeout_ms)) => "total_timeout",
        () = state.shutdown.cancelled() => "cancelled",
    };
    (
        bytes_up.load(Ordering::Relaxed),
        bytes_down.load(Ordering::Relaxed),
        reason,
    )
}
