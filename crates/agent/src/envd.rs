//! The agent's client of envd, the daemon inside every guest (E2B's envd protocol on TCP
//! 49983): health, `/init`, running commands and streaming files.
//!
//! One [`EnvdClient`] per sandbox. It keeps a pool of HTTP/1.1 keep-alive connections, so a
//! command with no stdin costs one request on a warm connection (`process.Process/Start`,
//! server-streaming, binary protobuf). With stdin, the command is started with a pipe and the
//! bytes follow through `SendInput`, then `CloseStdin`.
//!
//! ```text
//!   agent ── GET  /health ───────────────────────▶ envd   204 once it serves
//!         ── POST /init (JSON) ──────────────────▶        token, env, user, workdir, time
//!         ── POST /process.Process/Start ───────▶        start, data…, end (exit code)
//!         ── POST /process.Process/SendInput ──▶        (only when stdin is given)
//!         ── GET/POST /files?path=&username= ──▶        file bytes, streamed both ways
//! ```
//!
//! Every failure is an [`EnvdError`] whose [`code`](EnvdError::code) is the Connect code the
//! agent passes on (a missing file is `not_found`, a program that does not exist is
//! `invalid_argument`, envd not answering is `unavailable`, ...).
//!
//! After a snapshot restore make a new client: pooled connections belong to the old guest.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use connectrpc::client::{CallOptions, ClientBody, ClientConfig, ClientTransport, HttpClient};
use connectrpc::{ConnectError, ErrorCode, ServerStream};
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use wrenn_proto::process::__buffa::view::StartResponseView;
use wrenn_proto::process::process_event::Event;
use wrenn_proto::process::process_event::data_event::Output;
use wrenn_proto::process::process_input::Input;
use wrenn_proto::process::process_selector::Selector;
use wrenn_proto::process::{
    CloseStdinRequest, ProcessClient, ProcessConfig, ProcessInput, ProcessSelector,
    SendInputRequest, StartRequest, StartResponse,
};

/// The body of the pool's responses (hyper's, named through connectrpc's transport).
type ResponseBody = <HttpClient as ClientTransport>::ResponseBody;

/// The header envd reads the access token from.
const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// Stdin goes to envd in pieces of this size (one `SendInput` each).
const STDIN_CHUNK: usize = 256 * 1024;
/// The most of an error body kept for the message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;
/// How long `/init` may take (it reseeds entropy and may set the clock).
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Health polling: first and largest pause between attempts.
const HEALTH_FIRST_PAUSE: Duration = Duration::from_millis(2);
const HEALTH_MAX_PAUSE: Duration = Duration::from_millis(20);
/// The first health attempt's own time limit: a SYN the guest missed while booting is sent
/// again by a new attempt rather than by the kernel's 1 s retransmission. It doubles after
/// each attempt that runs out, so a slow (emulated) guest still gets through.
const HEALTH_FIRST_ATTEMPT: Duration = Duration::from_millis(100);

/// What failed talking to envd. [`code`](Self::code) is the Connect code to pass on.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    /// No connection, or it broke: the guest is down, still booting, or its network is gone.
    #[error("envd at {address} cannot be reached ({operation}): {reason}")]
    Unreachable {
        address: SocketAddr,
        operation: &'static str,
        reason: String,
    },
    /// `/health` did not answer 204 in time.
    #[error("envd at {address} did not become healthy within {timeout:?} (last attempt: {last})")]
    NotHealthy {
        address: SocketAddr,
        timeout: Duration,
        last: String,
    },
    /// The operation's own time limit passed (for a command, envd kills it too).
    #[error("{operation} did not finish within {timeout:?}")]
    Timeout {
        operation: String,
        timeout: Duration,
    },
    /// envd holds another access token than this client: it was initialised by someone else,
    /// or the client was not told the token after a restore.
    #[error("envd refused the access token ({operation}): {message}")]
    TokenRejected {
        operation: &'static str,
        message: String,
    },
    /// The access token cannot be sent as a header (control characters, non-ASCII).
    #[error("the access token is not a valid HTTP header value")]
    InvalidToken,
    /// The guest has no such user.
    #[error("user '{user}' does not exist in the sandbox ({message})")]
    UnknownUser { user: String, message: String },
    /// The command could not be started (no such program, not executable, bad cwd).
    #[error("cannot start '{cmd}': {message}")]
    NotStarted {
        cmd: String,
        code: ErrorCode,
        message: String,
    },
    /// envd refused or failed the request; `code` says how.
    #[error("{operation}: {message}")]
    Refused {
        operation: String,
        code: ErrorCode,
        message: String,
    },
    /// The caller's upload stream failed; nothing was written (envd drops partial uploads).
    #[error("reading the data to upload to '{path}'")]
    UploadSource {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// envd answered something this client does not understand.
    #[error("unexpected answer from envd ({operation}): {message}")]
    Protocol {
        operation: &'static str,
        message: String,
    },
}

impl EnvdError {
    /// The Connect code for this failure, as the agent's own RPCs should report it.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unreachable { .. } | Self::NotHealthy { .. } => ErrorCode::Unavailable,
            Self::Timeout { .. } => ErrorCode::DeadlineExceeded,
            Self::UnknownUser { .. } => ErrorCode::InvalidArgument,
            Self::NotStarted { code, .. } | Self::Refused { code, .. } => *code,
            Self::TokenRejected { .. }
            | Self::InvalidToken
            | Self::UploadSource { .. }
            | Self::Protocol { .. } => ErrorCode::Internal,
        }
    }
}

/// What `/init` tells envd. The host's current time is added when it is sent.
#[derive(Debug, Clone, Default)]
pub struct InitRequest {
    /// The environment of every process (replaces what an earlier `/init` set).
    pub env_vars: BTreeMap<String, String>,
    /// The new access token; `None` keeps envd's, `Some("")` removes it.
    pub access_token: Option<String>,
    /// The user commands run as when they name none.
    pub default_user: Option<String>,
    /// Where commands start and relative paths resolve when they name no directory.
    pub default_workdir: Option<String>,
    pub sandbox_id: Option<String>,
    pub template_id: Option<String>,
}

/// A command to run.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// The program (looked up in `PATH`), not a shell line: use `sh -c` for one.
    pub cmd: String,
    pub args: Vec<String>,
    /// Added to the environment envd builds (PATH, HOME, `/init`'s variables).
    pub envs: BTreeMap<String, String>,
    /// The start directory; envd's default workdir or the user's home when `None`.
    pub cwd: Option<String>,
    /// The user to run as; envd's default user when `None`.
    pub user: Option<String>,
    /// Written to the command's stdin, which is then closed. `None`: stdin is empty and the
    /// command costs one request.
    pub stdin: Option<Bytes>,
    /// Bounds the command's life: envd kills it when this passes.
    pub timeout: Option<Duration>,
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub pid: u32,
    /// The exit code; -1 when a signal ended the command.
    pub exit_code: i32,
    pub stdout: Bytes,
    pub stderr: Bytes,
    /// Output beyond the limit was dropped (from stdout, stderr or both).
    pub truncated: bool,
}

/// One event of a running command, in the order envd saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Always first: the command runs with this pid.
    Started(u32),
    Stdout(Bytes),
    Stderr(Bytes),
    /// Always last: the exit code, -1 when a signal ended the command.
    Exit(i32),
}

/// The client of one sandbox's envd. Cheap to clone; clones share the connection pool and
/// the access token (so [`init`](Self::init) switching the token switches it for all).
#[derive(Clone)]
pub struct EnvdClient {
    address: SocketAddr,
    base: String,
    http: HttpClient,
    process: ProcessClient<HttpClient>,
    token: Arc<RwLock<Option<String>>>,
    sandbox_id: Option<Arc<str>>,
}

impl fmt::Debug for EnvdClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvdClient")
            .field("address", &self.address)
            .field("sandbox_id", &self.sandbox_id)
            .finish_non_exhaustive()
    }
}

impl EnvdClient {
    /// A client of the envd at `address`, sending `access_token` when given.
    pub fn new(address: SocketAddr, access_token: Option<String>) -> Self {
        let base = format!("http://{address}");
        let http = HttpClient::plaintext();
        let uri = base
            .parse()
            // Infallible: a socket address is a valid URI authority.
            .unwrap_or_else(|_| http::Uri::from_static("http://127.0.0.1"));
        let process = ProcessClient::new(http.clone(), ClientConfig::new(uri));
        Self {
            address,
            base,
            http,
            process,
            token: Arc::new(RwLock::new(access_token)),
            sandbox_id: None,
        }
    }

    /// Names the sandbox in this client's log lines.
    #[must_use]
    pub fn with_sandbox_id(mut self, id: impl Into<String>) -> Self {
        self.sandbox_id = Some(Arc::from(id.into()));
        self
    }

    /// The address this client talks to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The token sent from now on (by this client and its clones).
    pub fn set_access_token(&mut self, token: Option<String>) {
        *self.token.write().unwrap_or_else(PoisonError::into_inner) = token;
    }

    fn sandbox(&self) -> &str {
        self.sandbox_id.as_deref().unwrap_or("")
    }

    fn token_header(&self) -> Result<Option<HeaderValue>, EnvdError> {
        let token = self.token.read().unwrap_or_else(PoisonError::into_inner);
        token
            .as_deref()
            .map(|token| HeaderValue::from_str(token).map_err(|_| EnvdError::InvalidToken))
            .transpose()
    }

    /// Polls `/health` until envd answers 204, for at most `timeout`; returns how long that
    /// took. Refused or reset connections are retried after 2 ms, backing off to 20 ms.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<Duration, EnvdError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut pause = HEALTH_FIRST_PAUSE;
        let mut attempt_limit = HEALTH_FIRST_ATTEMPT;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = attempt_limit.min(left);
            let last = match tokio::time::timeout(limit, self.health()).await {
                Ok(Ok(())) => {
                    let took = started.elapsed();
                    tracing::debug!(sandbox_id = %self.sandbox(), address = %self.address,
                        ?took, attempts, "envd is healthy");
                    return Ok(took);
                }
                Ok(Err(reason)) => reason,
                Err(_) => {
                    attempt_limit = attempt_limit.saturating_mul(2);
                    format!("no answer within {limit:?}")
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(EnvdError::NotHealthy {
                    address: self.address,
                    timeout,
                    last,
                });
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = pause.saturating_mul(2).min(HEALTH_MAX_PAUSE);
        }
    }

    /// One `/health` request; the reason it was not a 204.
    async fn health(&self) -> Result<(), String> {
        let request = Request::get(format!("{}/health", self.base))
            .body(connectrpc::client::full_body(Bytes::new()))
            .map_err(|error| error.to_string())?;
        let response = self
            .http
            .send(request)
            .await
            .map_err(|error| connect_message(&error))?;
        let status = response.status();
        // Drain the (empty) body so the connection goes back to the pool.
        let _ = response.into_body().collect().await;
        if status == StatusCode::NO_CONTENT {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }

    /// `POST /init`: the settings in `init` and the host's time now (RFC 3339), which a
    /// restored guest sets its clock from. When `init` carries a token, this client sends
    /// that token from then on.
    pub async fn init(&self, init: &InitRequest) -> Result<(), EnvdError> {
        const OPERATION: &str = "/init";
        let mut body = serde_json::json!({
            "envVars": init.env_vars,
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        });
        let fields = [
            ("accessToken", &init.access_token),
            ("defaultUser", &init.default_user),
            ("defaultWorkdir", &init.default_workdir),
            ("sandboxId", &init.sandbox_id),
            ("templateId", &init.template_id),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                body[name] = serde_json::Value::String(value.clone());
            }
        }
        let body = serde_json::to_vec(&body).map_err(|error| EnvdError::Protocol {
            operation: OPERATION,
            message: error.to_string(),
        })?;
        let mut request = Request::post(format!("{}/init", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = self.token_header()? {
            request = request.header(ACCESS_TOKEN_HEADER, token);
        }
        let request = request
            .body(connectrpc::client::full_body(Bytes::from(body)))
            .map_err(|error| EnvdError::Protocol {
                operation: OPERATION,
                message: error.to_string(),
            })?;
        let response = tokio::time::timeout(INIT_TIMEOUT, self.send(OPERATION, request))
            .await
            .map_err(|_| EnvdError::Timeout {
                operation: OPERATION.to_owned(),
                timeout: INIT_TIMEOUT,
            })??;
        let status = response.status();
        if !status.is_success() {
            let message = error_message(response).await;
            return Err(match status {
                StatusCode::UNAUTHORIZED => EnvdError::TokenRejected {
                    operation: OPERATION,
                    message,
                },
                StatusCode::BAD_REQUEST => EnvdError::Refused {
                    operation: OPERATION.to_owned(),
                    code: ErrorCode::InvalidArgument,
                    message,
                },
                _ => EnvdError::Refused {
                    operation: OPERATION.to_owned(),
                    code: ErrorCode::Internal,
                    message: format!("status {status}: {message}"),
                },
            });
        }
        let _ = response.into_body().collect().await;
        if let Some(token) = &init.access_token {
            *self.token.write().unwrap_or_else(PoisonError::into_inner) =
                (!token.is_empty()).then(|| token.clone());
        }
        tracing::debug!(sandbox_id = %self.sandbox(), "envd initialised");
        Ok(())
    }

    /// Runs a command to its end. stdout and stderr are kept up to `limit` bytes each; the
    /// rest is dropped and `truncated` set. A command that cannot start is an error
    /// ([`EnvdError::NotStarted`]), not exit code 127.
    pub async fn exec(&self, spec: &ExecSpec, limit: usize) -> Result<ExecOutput, EnvdError> {
        let events = self.exec_stream(spec).await?;
        futures::pin_mut!(events);
        let mut stdout = BytesMut::new();
        let mut stderr = BytesMut::new();
        let mut truncated = false;
        let mut pid = 0;
        while let Some(event) = events.next().await {
            match event? {
                ExecEvent::Started(started) => pid = started,
                ExecEvent::Stdout(data) => truncated |= keep(&mut stdout, &data, limit),
                ExecEvent::Stderr(data) => truncated |= keep(&mut stderr, &data, limit),
                ExecEvent::Exit(exit_code) => {
                    return Ok(ExecOutput {
                        pid,
                        exit_code,
                        stdout: stdout.freeze(),
                        stderr: stderr.freeze(),
                        truncated,
                    });
                }
            }
        }
        Err(EnvdError::Protocol {
            operation: "process.Process/Start",
            message: format!("the stream of '{}' ended without an exit code", spec.cmd),
        })
    }

    /// Starts a command and streams its events as they come: `Started(pid)` first, then
    /// output, then `Exit(code)`. Returns only once the command runs, so a command that
    /// cannot start is this call's error. Dropping the stream does not stop the command
    /// (its `timeout` does).
    pub async fn exec_stream(
        &self,
        spec: &ExecSpec,
    ) -> Result<impl Stream<Item = Result<ExecEvent, EnvdError>> + Send + use<>, EnvdError> {
        let request = StartRequest {
            process: ProcessConfig {
                cmd: spec.cmd.clone(),
                args: spec.args.clone(),
                envs: spec
                    .envs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                cwd: spec.cwd.clone(),
                ..Default::default()
            }
            .into(),
            stdin: Some(spec.stdin.is_some()),
            ..Default::default()
        };
        let options = self.call_options(spec.user.as_deref(), spec.timeout)?;
        let started_at = Instant::now();
        let mut stream = self
            .process
            .start_with_options(request, options.clone())
            .await
            .map_err(|error| start_error(spec, &error, self.address))?;
        // The first event says the process runs (or the stream carries why it does not).
        let pid = loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    let response: StartResponse = message.to_owned_message();
                    match response.event.into_option().and_then(|e| e.event) {
                        Some(Event::Start(start)) => break start.pid,
                        Some(Event::Keepalive(_)) | None => {}
                        Some(other) => {
                            return Err(EnvdError::Protocol {
                                operation: "process.Process/Start",
                                message: format!("first event was not start: {other:?}"),
                            });
                        }
                    }
                }
                Ok(None) => {
                    return Err(EnvdError::Protocol {
                        operation: "process.Process/Start",
                        message: format!("the stream of '{}' ended before it started", spec.cmd),
                    });
                }
                Err(error) => return Err(start_error(spec, &error, self.address)),
            }
        };
        tracing::debug!(sandbox_id = %self.sandbox(), pid, cmd = %spec.cmd,
            took = ?started_at.elapsed(), "command started");
        let stdin = spec.stdin.clone().map(|data| {
            let client = self.clone();
            let (done, outcome) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(async move {
                let result = client.write_stdin(pid, data, options).await;
                let _ = done.send(result);
            });
            StdinWriter {
                task: AbortOnDrop(task),
                outcome,
            }
        });
        let state = ExecState {
            stream,
            pending: Some(ExecEvent::Started(pid)),
            stdin,
            cmd: spec.cmd.clone(),
            timeout: spec.timeout,
            started_at,
            address: self.address,
            done: false,
        };
        Ok(futures::stream::unfold(state, ExecState::next))
    }

    /// Headers of an RPC: the token, and the user as HTTP Basic; the command's time limit.
    fn call_options(
        &self,
        user: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<CallOptions, EnvdError> {
        let mut options = CallOptions::default();
        if let Some(token) = self.token_header()? {
            options = options.with_header(ACCESS_TOKEN_HEADER, token);
        }
        if let Some(user) = user.filter(|user| !user.is_empty()) {
            let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            let value = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
                EnvdError::UnknownUser {
                    user: user.to_owned(),
                    message: "not a valid user name".to_owned(),
                }
            })?;
            options = options.with_header(header::AUTHORIZATION, value);
        }
        if let Some(timeout) = timeout {
            options = options.with_timeout(timeout);
        }
        Ok(options)
    }

    /// Sends `data` to the stdin of `pid` in pieces, then closes it.
    async fn write_stdin(
        &self,
        pid: u32,
        data: Bytes,
        options: CallOptions,
    ) -> Result<(), ConnectError> {
        let selector = || {
            ProcessSelector {
                selector: Some(Selector::Pid(pid)),
                ..Default::default()
            }
            .into()
        };
        for piece in data.chunks(STDIN_CHUNK) {
            let request = SendInputRequest {
                process: selector(),
                input: ProcessInput {
                    input: Some(Input::Stdin(piece.to_vec())),
                    ..Default::default()
                }
                .into(),
                ..Default::default()
            };
            self.process
                .send_input_with_options(request, options.clone())
                .await?;
        }
        let request = CloseStdinRequest {
            process: selector(),
            ..Default::default()
        };
        self.process
            .close_stdin_with_options(request, options)
            .await?;
        Ok(())
    }

    /// Streams `body` into the file at `path` (as `user`, else envd's default user); returns
    /// the bytes sent. envd writes beside the file and renames at the end, so a failed upload
    /// leaves the old file as it was.
    pub async fn write_file(
        &self,
        path: &str,
        user: Option<&str>,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<u64, EnvdError> {
        const OPERATION: &str = "upload";
        let upload = UploadBody::new(body);
        let (sent, failure) = (upload.sent.clone(), upload.failure.clone());
        let body: ClientBody = BodyExt::boxed(upload);
        let mut request = Request::post(self.files_uri(path, user))
            .header(header::CONTENT_TYPE, "application/octet-stream");
        if let Some(token) = self.token_header()? {
            request = request.header(ACCESS_TOKEN_HEADER, token);
        }
        let request = request.body(body).map_err(|error| EnvdError::Protocol {
            operation: OPERATION,
            message: error.to_string(),
        })?;
        let source_failed = || {
            failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .map(|source| EnvdError::UploadSource {
                    path: path.to_owned(),
                    source,
                })
        };
        let response = match self.send(OPERATION, request).await {
            Ok(response) => response,
            Err(error) => return Err(source_failed().unwrap_or(error)),
        };
        if let Some(error) = source_failed() {
            return Err(error);
        }
        if !response.status().is_success() {
            return Err(files_error(OPERATION, path, user, response).await);
        }
        let _ = response.into_body().collect().await;
        let sent = sent.load(Ordering::Relaxed);
        tracing::debug!(sandbox_id = %self.sandbox(), path, bytes = sent, "file written");
        Ok(sent)
    }

    /// Streams the file at `path` out in chunks (read as `user`, else envd's default user).
    pub async fn read_file(
        &self,
        path: &str,
        user: Option<&str>,
    ) -> Result<impl Stream<Item = Result<Bytes, EnvdError>> + Send + use<>, EnvdError> {
        const OPERATION: &str = "download";
        let mut request = Request::get(self.files_uri(path, user));
        if let Some(token) = self.token_header()? {
            request = request.header(ACCESS_TOKEN_HEADER, token);
        }
        let request = request
            .body(connectrpc::client::full_body(Bytes::new()))
            .map_err(|error| EnvdError::Protocol {
                operation: OPERATION,
                message: error.to_string(),
            })?;
        let response = self.send(OPERATION, request).await?;
        if !response.status().is_success() {
            return Err(files_error(OPERATION, path, user, response).await);
        }
        let address = self.address;
        Ok(response
            .into_body()
            .into_data_stream()
            .map_err(move |error| EnvdError::Unreachable {
                address,
                operation: OPERATION,
                reason: format!("the download broke off: {error}"),
            }))
    }

    fn files_uri(&self, path: &str, user: Option<&str>) -> String {
        let mut uri = format!("{}/files?path={}", self.base, query_escape(path));
        if let Some(user) = user.filter(|user| !user.is_empty()) {
            uri.push_str("&username=");
            uri.push_str(&query_escape(user));
        }
        uri
    }

    /// Sends one plain HTTP request on the pool.
    async fn send(
        &self,
        operation: &'static str,
        request: Request<ClientBody>,
    ) -> Result<http::Response<ResponseBody>, EnvdError> {
        self.http
            .send(request)
            .await
            .map_err(|error| EnvdError::Unreachable {
                address: self.address,
                operation,
                reason: connect_message(&error),
            })
    }
}

/// The caller's stream of bytes to upload.
type UploadStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// An upload's request body: the caller's stream, counted, with its failure kept for the
/// error (the HTTP client only sees that the body broke off).
struct UploadBody {
    /// Behind a lock because boxed client bodies must be `Sync`; only one poller uses it.
    stream: Mutex<UploadStream>,
    sent: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<std::io::Error>>>,
}

impl UploadBody {
    fn new(stream: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static) -> Self {
        Self {
            stream: Mutex::new(Box::pin(stream)),
            sent: Arc::default(),
            failure: Arc::default(),
        }
    }
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = ConnectError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, ConnectError>>> {
        let this = self.get_mut();
        let stream = this
            .stream
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        match stream.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(piece))) => {
                this.sent.fetch_add(len_u64(piece.len()), Ordering::Relaxed);
                Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
            }
            Poll::Ready(Some(Err(error))) => {
                let message = error.to_string();
                *this.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
                Poll::Ready(Some(Err(ConnectError::aborted(message))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The stdin writer of a running command and how it ended.
struct StdinWriter {
    task: AbortOnDrop,
    outcome: tokio::sync::oneshot::Receiver<Result<(), ConnectError>>,
}

/// Stops a task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The state behind [`EnvdClient::exec_stream`]'s stream.
struct ExecState {
    stream: ServerStream<ResponseBody, StartResponseView<'static>>,
    /// An event to hand out before reading more.
    pending: Option<ExecEvent>,
    stdin: Option<StdinWriter>,
    cmd: String,
    timeout: Option<Duration>,
    /// When the Start request went out (the time limit counts from there).
    started_at: Instant,
    address: SocketAddr,
    done: bool,
}

impl ExecState {
    async fn next(mut self) -> Option<(Result<ExecEvent, EnvdError>, Self)> {
        if let Some(event) = self.pending.take() {
            return Some((Ok(event), self));
        }
        if self.done {
            return None;
        }
        loop {
            let message = match self.stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => {
                    self.done = true;
                    let error = EnvdError::Protocol {
                        operation: "process.Process/Start",
                        message: format!("the stream of '{}' ended without an exit code", self.cmd),
                    };
                    return Some((Err(error), self));
                }
                Err(error) => {
                    self.done = true;
                    let error = self.running_error(&error);
                    return Some((Err(error), self));
                }
            };
            let response: StartResponse = message.to_owned_message();
            let Some(event) = response.event.into_option().and_then(|e| e.event) else {
                continue;
            };
            match event {
                Event::Data(data) => match data.output {
                    Some(Output::Stdout(bytes)) => {
                        return Some((Ok(ExecEvent::Stdout(Bytes::from(bytes))), self));
                    }
                    Some(Output::Stderr(bytes)) => {
                        return Some((Ok(ExecEvent::Stderr(Bytes::from(bytes))), self));
                    }
                    Some(Output::Pty(_)) | None => {}
                },
                Event::End(end) => {
                    self.done = true;
                    // Read to the end-of-stream envelope, which follows at once: a response
                    // left unread closes its connection instead of returning it to the pool.
                    while let Ok(Some(_)) = self.stream.message().await {}
                    if let Some(error) = self.stdin_failure().await {
                        return Some((Err(error), self));
                    }
                    // envd's kill at the time limit can beat our own deadline to the end.
                    if !end.exited
                        && let Some(timeout) = self.timeout
                        && self.started_at.elapsed() >= timeout
                    {
                        let error = EnvdError::Timeout {
                            operation: format!("command '{}'", self.cmd),
                            timeout,
                        };
                        return Some((Err(error), self));
                    }
                    return Some((Ok(ExecEvent::Exit(end.exit_code)), self));
                }
                Event::Start(_) | Event::Keepalive(_) => {}
            }
        }
    }

    /// The stdin writer's error, unless it only failed because the command had stopped
    /// reading (exited, or closed its stdin), which a pipe allows.
    async fn stdin_failure(&mut self) -> Option<EnvdError> {
        let writer = self.stdin.take()?;
        let outcome = writer.outcome.await;
        drop(writer.task);
        match outcome {
            Ok(Err(error))
                if !matches!(
                    error.code,
                    ErrorCode::NotFound | ErrorCode::FailedPrecondition
                ) =>
            {
                Some(rpc_error("writing stdin", &self.cmd, &error, self.address))
            }
            _ => None,
        }
    }

    fn running_error(&self, error: &ConnectError) -> EnvdError {
        if error.code == ErrorCode::DeadlineExceeded
            && let Some(timeout) = self.timeout
        {
            return EnvdError::Timeout {
                operation: format!("command '{}'", self.cmd),
                timeout,
            };
        }
        rpc_error("running", &self.cmd, error, self.address)
    }
}

/// Appends what fits of `data` under `limit`; whether some was dropped.
fn keep(buffer: &mut BytesMut, data: &[u8], limit: usize) -> bool {
    let room = limit.saturating_sub(buffer.len());
    let take = room.min(data.len());
    buffer.extend_from_slice(&data[..take]);
    take < data.len()
}

/// The error for a command envd did not start.
fn start_error(spec: &ExecSpec, error: &ConnectError, address: SocketAddr) -> EnvdError {
    let message = connect_message(error);
    match error.code {
        // Envd's not_found and permission_denied here are about the program; for the
        // caller, asking for a program that is not there is a bad argument.
        ErrorCode::NotFound | ErrorCode::InvalidArgument => EnvdError::NotStarted {
            cmd: spec.cmd.clone(),
            code: ErrorCode::InvalidArgument,
            message,
        },
        ErrorCode::PermissionDenied => EnvdError::NotStarted {
            cmd: spec.cmd.clone(),
            code: ErrorCode::PermissionDenied,
            message,
        },
        ErrorCode::DeadlineExceeded => EnvdError::Timeout {
            operation: format!("starting '{}'", spec.cmd),
            timeout: spec.timeout.unwrap_or_default(),
        },
        _ => rpc_error("starting", &spec.cmd, error, address),
    }
}

/// The error for a failed RPC about command `cmd`.
fn rpc_error(doing: &str, cmd: &str, error: &ConnectError, address: SocketAddr) -> EnvdError {
    let message = connect_message(error);
    match error.code {
        ErrorCode::Unavailable => EnvdError::Unreachable {
            address,
            operation: "process.Process",
            reason: message,
        },
        ErrorCode::Unauthenticated if message.contains("invalid username") => {
            EnvdError::UnknownUser {
                user: user_in(&message),
                message,
            }
        }
        ErrorCode::Unauthenticated => EnvdError::TokenRejected {
            operation: "process.Process",
            message,
        },
        code => EnvdError::Refused {
            operation: format!("{doing} '{cmd}'"),
            code: match code {
                ErrorCode::NotFound
                | ErrorCode::PermissionDenied
                | ErrorCode::InvalidArgument
                | ErrorCode::DeadlineExceeded
                | ErrorCode::ResourceExhausted
                | ErrorCode::FailedPrecondition => code,
                _ => ErrorCode::Internal,
            },
            message,
        },
    }
}

/// The user named in envd's "invalid username: 'name'" message.
fn user_in(message: &str) -> String {
    message
        .split('\'')
        .nth(1)
        .map_or_else(String::new, str::to_owned)
}

/// A Connect error's message (its code when it has none), with the causes it does not
/// already spell out (a transport error's "connection refused").
fn connect_message(error: &ConnectError) -> String {
    let mut message = match &error.message {
        Some(message) if !message.is_empty() => message.clone(),
        _ => error.code.as_str().to_owned(),
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The error for a failed `/files` request, from its status and E2B's JSON body.
async fn files_error(
    operation: &'static str,
    path: &str,
    user: Option<&str>,
    response: http::Response<ResponseBody>,
) -> EnvdError {
    let status = response.status();
    let message = error_message(response).await;
    let code = match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::FORBIDDEN => ErrorCode::PermissionDenied,
        StatusCode::BAD_REQUEST => ErrorCode::InvalidArgument,
        StatusCode::INSUFFICIENT_STORAGE => ErrorCode::ResourceExhausted,
        StatusCode::UNAUTHORIZED if message.contains("looking up user") => {
            return EnvdError::UnknownUser {
                user: user.unwrap_or_default().to_owned(),
                message,
            };
        }
        StatusCode::UNAUTHORIZED => {
            return EnvdError::TokenRejected { operation, message };
        }
        _ => ErrorCode::Internal,
    };
    EnvdError::Refused {
        operation: format!("{operation} '{path}'"),
        code,
        message: if code == ErrorCode::Internal {
            format!("status {status}: {message}")
        } else {
            message
        },
    }
}

/// The `message` of envd's JSON error body, else the body's text (bounded).
async fn error_message(response: http::Response<ResponseBody>) -> String {
    let mut body = Vec::new();
    let mut stream = response.into_body().into_data_stream();
    while let Some(Ok(piece)) = stream.next().await {
        let room = ERROR_BODY_LIMIT.saturating_sub(body.len());
        body.extend_from_slice(&piece[..room.min(piece.len())]);
        if body.len() >= ERROR_BODY_LIMIT {
            break;
        }
    }
    serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned())
}

/// Percent-encodes `text` for a query value (all but RFC 3986's unreserved and `/`).
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keep_over_limit_truncates() {
        let mut buffer = BytesMut::new();
        assert!(!keep(&mut buffer, b"abc", 5));
        assert!(keep(&mut buffer, b"defg", 5));
        assert_eq!(&buffer[..], b"abcde");
        assert!(keep(&mut buffer, b"x", 5));
        assert!(!keep(&mut buffer, b"", 5));
    }

    #[test]
    fn test_query_escape_reserved_encoded() {
        assert_eq!(query_escape("/a b/c&d=é"), "/a%20b/c%26d%3D%C3%A9");
    }

    #[test]
    fn test_user_in_envd_message_found() {
        assert_eq!(user_in("invalid username: 'nobody'"), "nobody");
    }

    #[test]
    fn test_start_error_missing_program_invalid_argument() {
        let spec = ExecSpec {
            cmd: "nope".into(),
            ..Default::default()
        };
        let address = SocketAddr::from(([127, 0, 0, 1], 1));
        let error = start_error(&spec, &ConnectError::not_found("no such file"), address);
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
        let error = rpc_error(
            "running",
            "x",
            &ConnectError::unauthenticated("invalid username: 'bob'"),
            address,
        );
        assert!(matches!(error, EnvdError::UnknownUser { ref user, .. } if user == "bob"));
        assert_eq!(error.code(), ErrorCode::InvalidArgument);
    }
}
