//! The node's HTTP endpoint (hyper): `/metrics` (Prometheus text format), `/healthz` (JSON
//! role and Raft indexes), `/` (a small read-only dashboard of recent fleets), and the event
//! intake: `POST /hooks/<source>` (webhooks, verified by [`hooks`]) and `POST /events` (API
//! events with a bearer token), both decided by [`crate::api::event`].

pub mod hooks;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use flotilla_raft::RaftNode;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

/// Fleets shown on the dashboard.
const DASHBOARD_FLEETS: usize = 50;

/// The event intake served beside the read-only pages.
#[derive(Clone)]
pub struct Intake {
    /// Decides deliveries.
    pub events: crate::api::event::EventApi,
    /// Authenticates `POST /events`.
    pub auth: crate::api::auth::AuthLayer,
}

/// Serves HTTP on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    node: Arc<RaftNode>,
    metrics: PrometheusHandle,
    intake: Option<Intake>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "http accept failed");
                continue;
            }
        };
        let node = node.clone();
        let metrics = metrics.clone();
        let intake = intake.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let node = node.clone();
                let metrics = metrics.clone();
                let intake = intake.clone();
                async move {
                    if request.method() == Method::POST
                        && let Some(intake) = intake
                    {
                        return Ok::<_, Infallible>(post(request, &intake).await);
                    }
                    Ok::<_, Infallible>(route(&request, &node, &metrics))
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(%error, "http connection failed");
            }
        });
    }
}

fn route(
    request: &Request<Incoming>,
    node: &RaftNode,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => {
            record_raft_metrics(node);
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics.render(),
            )
        }
        "/healthz" => respond(StatusCode::OK, "application/json", health_json(node)),
        // The dashboard shows fleets: it needs a token with fleet.read (`Authorization: Bearer
        // <token>`), and lists only the fleets of the token's project (all for an admin).
        "/" => match dashboard_caller(request, node) {
            Ok(token) => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                dashboard(node, &token),
            ),
            Err(message) => {
                let mut response = respond(StatusCode::UNAUTHORIZED, "text/plain", message);
                response.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer"),
                );
                response
            }
        },
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// `POST /hooks/<source>` and `POST /events`: the body read up to `webhooks.max_body_bytes`
/// (413 beyond), then decided by [`crate::api::event`]; the answer is JSON.
async fn post(request: Request<Incoming>, intake: &Intake) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt as _;
    let path = request.uri().path().to_owned();
    let target = match path.strip_prefix("/hooks/") {
        Some(source) if !source.is_empty() && !source.contains('/') => Some(source.to_owned()),
        Some(_) => return json_response(404, r#"{"error":"POST /hooks/<source>"}"#.into()),
        None if path == "/events" => None,
        None => {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".into(),
            );
        }
    };
    let limit = intake.events.max_body_bytes();
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            let refusal = hooks::Refusal {
                status: 413,
                reason: format!(
                    "body: more than webhooks.max_body_bytes ({limit}) or unreadable ({error})"
                ),
            };
            if let Some(source) = &target {
                let headers = hook_headers(&parts.headers);
                let claimed_id = hooks::claimed_delivery_id(&headers);
                intake
                    .events
                    .record_refused(source, claimed_id, &refusal, &[]);
            }
            return json_response(
                413,
                serde_json::json!({ "error": refusal.reason }).to_string(),
            );
        }
    };
    let answer = match target {
        Some(source) => {
            let headers = hooks::HOOK_HEADERS
                .iter()
                .filter_map(|name| {
                    let value = parts.headers.get(*name)?.to_str().ok()?;
                    Some(((*name).to_owned(), value.to_owned()))
                })
                .collect();
            intake
                .events
                .accept_hook(&source, headers, &body, false)
                .await
        }
        None => {
            crate::api::event::publish_http(&intake.events, &intake.auth, &parts.headers, &body)
                .await
        }
    };
    json_response(answer.status, answer.body)
}

/// The headers a verifier reads ([`hooks::HOOK_HEADERS`]), by lower-case name.
fn hook_headers(headers: &hyper::HeaderMap) -> std::collections::BTreeMap<String, String> {
    hooks::HOOK_HEADERS
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect()
}

fn json_response(status: u16, body: String) -> Response<Full<Bytes>> {
    respond(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "application/json",
        body,
    )
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Raft gauges from openraft's metrics (term, last log index, applied index, leadership) and
/// the log's group commit (write-ahead log syncs and the appends they covered).
fn record_raft_metrics(node: &RaftNode) {
    let raft_metrics = node.raft.metrics().borrow().clone();
    metrics::gauge!("flotilla_raft_term").set(raft_metrics.current_term as f64);
    metrics::gauge!("flotilla_raft_last_log_index")
        .set(raft_metrics.last_log_index.unwrap_or(0) as f64);
    metrics::gauge!("flotilla_raft_applied_index")
        .set(raft_metrics.last_applied.map_or(0, |l| l.index) as f64);
    let is_leader = raft_metrics.current_leader == Some(raft_metrics.id);
    metrics::gauge!("flotilla_raft_is_leader").set(if is_leader { 1.0 } else { 0.0 });
    let (syncs, appends) = node.log_sync_counts();
    metrics::gauge!("flotilla_raft_log_syncs").set(syncs as f64);
    metrics::gauge!("flotilla_raft_log_appends").set(appends as f64);
}

/// `{"node_id":..,"state":"Leader","term":..,"leader":..,"last_log_index":..,"applied_index":..}`.
pub fn health_json(node: &RaftNode) -> String {
    let m = node.raft.metrics().borrow().clone();
    serde_json::json!({
        "node_id": m.id,
        "state": format!("{:?}", m.state),
        "term": m.current_term,
        "leader": m.current_leader,
        "last_log_index": m.last_log_index,
        "applied_index": m.last_applied.map(|l| l.index),
    })
    .to_string()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The dashboard's caller: a live token granting fleet.read, from the `Authorization` header.
fn dashboard_caller(
    request: &Request<Incoming>,
    node: &RaftNode,
) -> Result<flotilla_scheduler::Token, String> {
    let bearer = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| {
            "the dashboard needs `Authorization: Bearer <token>` with fleet.read\n".to_string()
        })?;
    let token = node
        .state
        .read(|state| {
            state
                .authenticate(bearer.trim(), crate::api::now_ms())
                .cloned()
        })
        .map_err(|error| format!("{error}\n"))?;
    if !token.role.grants(flotilla_scheduler::Permission::FleetRead) {
        return Err(format!(
            "token {} ({}) lacks fleet.read\n",
            token.accessor_id,
            token.role.as_str()
        ));
    }
    Ok(token)
}

fn dashboard(node: &RaftNode, token: &flotilla_scheduler::Token) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>Flotilla</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}</style>\
         </head><body><h1>Flotilla</h1>",
    );
    let _ = write!(html, "<p>{}</p>", escape(&health_json(node)));
    html.push_str("<table><tr><th>fleet</th><th>name</th><th>state</th><th>total</th><th>pending</th><th>running</th><th>changed</th><th>unchanged</th><th>failed</th><th>cancelled</th></tr>");
    node.state.read(|state| {
        for fleet in state
            .fleets_before(u64::MAX, usize::MAX)
            .filter(|f| {
                token.allows(
                    flotilla_scheduler::Permission::FleetRead,
                    Some(&f.spec.project),
                )
            })
            .take(DASHBOARD_FLEETS)
        {
            let c = fleet.counts;
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                fleet.id(),
                escape(&fleet.spec.name),
                fleet.state,
                c.total(),
                c.pending,
                c.running,
                c.changed,
                c.unchanged,
                c.failed,
                c.cancelled
            );
        }
    });
    html.push_str("</table></body></html>");
    html
}
