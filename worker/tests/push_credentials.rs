//! Push credentials end to end, with real git: the origin is served by `git http-backend`
//! behind a small HTTP server on 127.0.0.1 that requires HTTP Basic authentication for pushes
//! (`git-receive-pack`), as a forge does. The worker's static broker mints the token, host git
//! gets it through the transient credential helper, and the test checks it was never on a
//! process command line or in a process environment during the push (scanning /proc), nor in
//! any file the attempt left (the clone's `.git/config`, the mirror, the log), and that a wrong
//! token is refused by the server.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::{git, make_origin, test_config};
use flotilla_proto::v1::{AgentSpec, FleetSpec, Lease, SandboxSpec};
use flotilla_worker::config::WorkerConfig;
use flotilla_worker::credentials::StaticToken;
use flotilla_worker::execute::execute_attempt_with_token;
use flotilla_worker::lease::LeaseDeadline;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

const BRANCH: &str = "flotilla/credentials";
const TOKEN: &str = "tok-3f9a1c7e5b2d48a6-push";
const USER: &str = "flotilla-bot";

/// Serves `root` with `git http-backend`; pushes need `Authorization: Basic user:token`.
/// Counts refused requests in `refused`.
async fn serve(listener: tokio::net::TcpListener, root: PathBuf, refused: Arc<AtomicU32>) {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{TOKEN}"))
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let root = root.clone();
        let expected = expected.clone();
        let refused = refused.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                handle(request, root.clone(), expected.clone(), refused.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn header(request: &Request<Incoming>, name: &str) -> String {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn handle(
    request: Request<Incoming>,
    root: PathBuf,
    expected: String,
    refused: Arc<AtomicU32>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let pushing = query.contains("service=git-receive-pack") || path.ends_with("/git-receive-pack");
    if pushing && header(&request, "authorization") != expected {
        refused.fetch_add(1, Ordering::SeqCst);
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header("WWW-Authenticate", "Basic realm=\"test\"")
            .body(Full::new(Bytes::from_static(b"authentication required\n")))
            .unwrap());
    }
    let method = request.method().to_string();
    let content_type = header(&request, "content-type");
    let content_encoding = header(&request, "content-encoding");
    let git_protocol = header(&request, "git-protocol");
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", &path)
        .env("REQUEST_METHOD", &method)
        .env("QUERY_STRING", &query)
        .env("CONTENT_TYPE", &content_type)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", &content_encoding)
        .env("HTTP_GIT_PROTOCOL", &git_protocol)
        .env("REMOTE_USER", USER)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = child.wait_with_output().await.unwrap();
    let _ = writer.await;
    let raw = output.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
        .unwrap_or((raw.len(), 0));
    let head = String::from_utf8_lossy(&raw[..split.0]).into_owned();
    let mut response = Response::builder();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.split(' ').next().unwrap().parse().unwrap();
            response = response.status(code);
        } else {
            response = response.header(name, value);
        }
    }
    Ok(response
        .body(Full::new(Bytes::copy_from_slice(&raw[split.0 + split.1..])))
        .unwrap())
}

/// What the /proc scanner saw while it ran.
#[derive(Default)]
struct Scan {
    /// `(pid, "cmdline" | "environ", command line)` where the token appeared.
    leaks: Vec<(String, &'static str, String)>,
    /// Whether a git HTTP transport process (`git-remote-http`) was seen at all.
    saw_transport: bool,
}

/// Scans every process's command line and environment for `TOKEN` until `stop`.
fn scan_processes(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Scan> {
    std::thread::spawn(move || {
        let mut scan = Scan::default();
        let own = std::process::id().to_string();
        while !stop.load(Ordering::SeqCst) {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                break;
            };
            for entry in entries.flatten() {
                let pid = entry.file_name().to_string_lossy().into_owned();
                if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
                    continue;
                }
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if text.contains("remote-http") {
                    scan.saw_transport = true;
                }
                if text.contains(TOKEN) {
                    scan.leaks.push((pid.clone(), "cmdline", text.clone()));
                }
                let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                if String::from_utf8_lossy(&environ).contains(TOKEN) {
                    scan.leaks.push((pid, "environ", text));
                }
            }
        }
        scan
    })
}

fn lease(repository: &str, attempt: u32) -> Lease {
    Lease {
        run_id: "fl-7-0".to_owned(),
        fleet_id: "fl-7".to_owned(),
        fleet_name: "credentials".to_owned(),
        repository: repository.to_owned(),
        attempt,
        branch: BRANCH.to_owned(),
        spec: Some(FleetSpec {
            name: "credentials".to_owned(),
            repositories: vec![repository.to_owned()],
            agent: Some(AgentSpec {
                // The credential is minted only after the agent ran: nothing of it can be in
                // the sandbox. (The scan below checks every process, the sandbox's included.)
                command: "echo changed > CHANGED.txt".to_owned(),
                ..AgentSpec::default()
            }),
            sandbox: Some(SandboxSpec {
                timeout_ms: 120_000,
                ..SandboxSpec::default()
            }),
            branch_template: BRANCH.to_owned(),
            commit_message: "Change".to_owned(),
            max_parallelism: 1,
            max_attempts: 1,
            push: true,
            ..FleetSpec::default()
        }),
        lease_ttl_ms: 60_000,
        fleet_created_at_ms: 1_700_000_000_000,
        ..Lease::default()
    }
}

fn config(work: &Path, token_file: &Path, url_prefix: &str) -> WorkerConfig {
    WorkerConfig {
        keep_attempt_directories: true,
        static_push_tokens: vec![StaticToken {
            url_prefix: url_prefix.to_owned(),
            token_file: token_file.to_path_buf(),
            username: USER.to_owned(),
        }],
        ..test_config(work)
    }
}

fn write_token(path: &Path, token: &str) {
    std::fs::write(path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn a_push_gets_the_brokers_token_through_the_helper_and_nowhere_else() {
    let root = tempfile::tempdir().unwrap();
    let served = root.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let origin = make_origin(&served);
    assert!(origin.ends_with("origin.git"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicU32::new(0));
    let server = tokio::spawn(serve(listener, served.clone(), refused.clone()));
    let prefix = format!("http://{address}/");
    let url = format!("{prefix}origin.git");
    let deadline = || LeaseDeadline::fixed(tokio::time::Instant::now() + Duration::from_secs(3600));

    // A wrong token: the server refuses the push.
    let wrong_token = root.path().join("wrong.token");
    write_token(&wrong_token, "not-the-token-at-all");
    let wrong = config(&root.path().join("work-wrong"), &wrong_token, &prefix);
    let result = execute_attempt_with_token(
        &wrong,
        &lease(&url, 1),
        CancellationToken::new(),
        deadline(),
    )
    .await;
    assert_eq!(
        result.outcome(),
        AttemptOutcome::Infrastructure,
        "{result:?}"
    );
    assert!(result.error.contains("push"), "{}", result.error);
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the server never refused"
    );
    assert!(!result.error.contains("not-the-token-at-all"));
    let kinds: Vec<&str> = result
        .credential_events
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, ["mint", "revoke"], "{:?}", result.credential_events);

    // The right token, with every process scanned during the attempt.
    let token_file = root.path().join("push.token");
    write_token(&token_file, TOKEN);
    let work = root.path().join("work");
    let right = config(&work, &token_file, &prefix);
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = scan_processes(stop.clone());
    let result = execute_attempt_with_token(
        &right,
        &lease(&url, 2),
        CancellationToken::new(),
        deadline(),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let scan = scanner.join().unwrap();
    assert_eq!(result.outcome(), AttemptOutcome::Changed, "{result:?}");
    assert!(result.pushed);
    let pushed = git(
        &served,
        &[
            "--git-dir",
            origin.to_str().unwrap(),
            "rev-parse",
            &format!("refs/heads/{BRANCH}"),
        ],
    );
    assert_eq!(pushed, result.commit);

    assert!(
        scan.saw_transport,
        "the scanner never saw git's HTTP transport run"
    );
    assert!(
        scan.leaks.is_empty(),
        "token in a process: {:?}",
        scan.leaks
    );
    let leaked = common::files::files_containing(&work, TOKEN.as_bytes());
    assert!(leaked.is_empty(), "token in files: {leaked:?}");
    assert!(
        std::fs::read_dir(right.credentials_directory())
            .unwrap()
            .next()
            .is_none(),
        "the credential helper's directory was not removed"
    );
    // The clone's .git/config never holds the token. With the disk quota the attempt's volume
    // is unmounted when the attempt ends, so the clone is gone (and the scan above saw every
    // file that remains); without it the file is still there to read.
    let clone_config_path =
        flotilla_worker::execute::attempt_directory(&right, "fl-7-0", 2).join("repo/.git/config");
    match std::fs::read_to_string(&clone_config_path) {
        Ok(clone_config) => assert!(
            !clone_config.contains(TOKEN) && !clone_config.contains("credential"),
            "{clone_config}"
        ),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}"),
    }

    assert_eq!(
        result.credential_events.len(),
        2,
        "{:?}",
        result.credential_events
    );
    let (mint, revoke) = (&result.credential_events[0], &result.credential_events[1]);
    assert_eq!(
        (mint.kind.as_str(), revoke.kind.as_str()),
        ("mint", "revoke")
    );
    assert_eq!(mint.broker, "static");
    assert_eq!(mint.repository, url);
    assert!(mint.time_ms > 0 && revoke.time_ms >= mint.time_ms);
    assert!(!format!("{:?}", result).contains(TOKEN));
    server.abort();
}
