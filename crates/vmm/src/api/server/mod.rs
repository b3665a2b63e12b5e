//! The API server: HTTP/1.1 on a unix socket, one thread per connection.
//!
//! ```text
//!  client ──HTTP──▶ connection thread ──ApiMessage──▶ VMM thread (event loop)
//!                    parse, route, decode   + wake_vmm     │
//!                    (400s answered here)                  │
//!         ◀──HTTP── map ApiResponse ◀──────reply channel───┘
//! ```
//!
//! An acceptor thread admits up to `max_connections` connections, each served by its own
//! thread, so a client that stalls cannot hold up the others; requests still reach the VMM
//! one at a time through its channel. A client that stops half way through a request gets
//! 408 after `request_timeout`. Idle keep-alive connections stay open (as in Firecracker)
//! until a new connection needs their slot: then the one idle the longest is closed. When
//! every slot is busy, the new connection gets 503.
//!
//! Writes to a peer that has gone away fail with `EPIPE` rather than killing the process
//! because the Rust runtime ignores `SIGPIPE`; the VMM must not restore its default action.

pub mod http;
pub mod routes;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use vmm_sys_util::eventfd::EventFd;

use self::http::{Body, HttpError, Limits, Parsed, Response, Status};
use super::{ApiMessage, ApiRequest, ApiResponse};
use crate::devices::bus::lock;

/// Tunables of the server. [`ServerConfig::default`] is what [`spawn`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    pub limits: Limits,
    /// How long a client may take to send a whole request once it has started one.
    pub request_timeout: Duration,
    /// How long a client may leave a response unread before the connection is dropped.
    pub write_timeout: Duration,
    /// Connections served at once (Firecracker allows 10).
    pub max_connections: usize,
    /// Install the API seccomp filter on the acceptor thread (connection threads inherit it).
    pub seccomp: Option<crate::seccomp::DenyAction>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 10,
            seccomp: None,
        }
    }
}

/// Why a connection ended without a clean close from the client.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("bad request")]
    Http(#[from] HttpError),
    #[error("client closed the connection in the middle of a request")]
    ClosedMidRequest,
    #[error("socket I/O failed")]
    Io(#[from] io::Error),
}

/// Starts serving the API on `listener` with the default [`ServerConfig`].
///
/// Every well-formed request is sent to `to_vmm` as an [`ApiMessage`], then `wake_vmm` is
/// written so the VMM's event loop picks it up; the connection waits for the reply before
/// reading its next request. The returned thread runs for the life of the process.
pub fn spawn(
    listener: UnixListener,
    to_vmm: mpsc::Sender<ApiMessage>,
    wake_vmm: EventFd,
) -> io::Result<JoinHandle<()>> {
    spawn_with_config(listener, to_vmm, wake_vmm, ServerConfig::default())
}

/// [`spawn`] with explicit limits and timeouts (for `--http-api-max-payload-size`, and for
/// tests).
pub fn spawn_with_config(
    listener: UnixListener,
    to_vmm: mpsc::Sender<ApiMessage>,
    wake_vmm: EventFd,
    config: ServerConfig,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(false)?;
    let vmm = VmmLink {
        to_vmm,
        wake: Arc::new(wake_vmm),
    };
    // Log lines from API threads carry the caller's span (the VM's id).
    let span = tracing::Span::current();
    thread::Builder::new()
        .name("wrenn-api".into())
        .spawn(move || {
            let _span = span.enter();
            if let Some(action) = config.seccomp
                && let Err(e) = crate::seccomp::apply_with(crate::seccomp::ThreadKind::Api, action)
            {
                // An API thread that cannot be confined must not serve; the VMM cannot run
                // without it.
                tracing::error!("API thread: {e}");
                std::process::exit(1);
            }
            accept_loop(&listener, &vmm, config);
        })
}

/// Routes and decodes one framed request: the pure half of request handling.
pub fn decode(request: &http::Request) -> Result<ApiRequest, routes::RouteError> {
    routes::route(&request.method, &request.target, &request.body)
}

/// Maps the VMM's answer to HTTP.
pub fn response_for(answer: ApiResponse) -> Response {
    match answer {
        ApiResponse::NoContent => Response::new(Status::NoContent, Body::Empty),
        ApiResponse::Json(value) => match serde_json::to_vec(&value) {
            Ok(body) => Response::new(Status::Ok, Body::Json(body)),
            Err(err) => {
                error!("cannot encode the VMM's JSON answer: {err}");
                Response::fault(Status::InternalServerError, "Cannot encode the response.")
            }
        },
        ApiResponse::Bytes(bytes) => Response::new(Status::Ok, Body::Bytes(bytes)),
        ApiResponse::Fault(message) => Response::fault(Status::BadRequest, &message),
    }
}

/// The API thread's side of the VMM channel.
#[derive(Debug, Clone)]
struct VmmLink {
    to_vmm: mpsc::Sender<ApiMessage>,
    wake: Arc<EventFd>,
}

impl VmmLink {
    fn call(&self, request: ApiRequest) -> Response {
        let (reply, answer) = mpsc::channel();
        if self.to_vmm.send(ApiMessage { request, reply }).is_err() {
            error!("API request dropped: the VMM thread is gone");
            return Response::fault(Status::InternalServerError, "The VMM is not running.");
        }
        // The counter cannot realistically overflow; if the write fails anyway the message is
        // still queued and goes out with the next wake-up.
        if let Err(err) = self.wake.write(1) {
            warn!("cannot wake the VMM thread: {err}");
        }
        match answer.recv() {
            Ok(answer) => response_for(answer),
            Err(_) => {
                error!("the VMM thread dropped an API request without answering");
                Response::fault(
                    Status::InternalServerError,
                    "The VMM did not answer the request.",
                )
            }
        }
    }
}

fn accept_loop(listener: &UnixListener, vmm: &VmmLink, config: ServerConfig) {
    let table = Arc::new(Mutex::new(ConnectionTable::default()));
    for incoming in listener.incoming() {
        let stream = match incoming {
            Ok(stream) => stream,
            Err(err) => {
                warn!("API accept failed: {err}");
                // Out of descriptors or memory: back off instead of spinning on the error.
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        let Some(id) = admit(&table, &stream, config.max_connections) else {
            warn!("API connection refused: every slot is busy");
            refuse(stream, config.write_timeout);
            continue;
        };
        let registration = Registration {
            table: Arc::clone(&table),
            id,
        };
        let vmm = vmm.clone();
        let span = tracing::Span::current();
        let spawned = thread::Builder::new()
            .name("wrenn-api-conn".into())
            .spawn(move || {
                let _span = span.enter();
                let mut connection = Connection {
                    stream,
                    buffered: Vec::new(),
                    registration,
                    config,
                };
                connection.serve(&vmm);
            });
        if let Err(err) = spawned {
            // The closure (and with it the stream and the table entry) is dropped.
            error!("cannot start an API connection thread: {err}");
        }
    }
}

/// Answers a connection there is no room for, without blocking the acceptor.
fn refuse(mut stream: UnixStream, write_timeout: Duration) {
    let _ = stream.set_write_timeout(Some(write_timeout));
    let wire = HttpError::TooManyConnections.response().encode();
    if let Err(err) = stream.write_all(&wire) {
        debug!("cannot send 503 to a refused API client: {err}");
    }
}

/// The open connections, so that an idle one can be closed to make room.
#[derive(Debug, Default)]
struct ConnectionTable {
    next_id: u64,
    open: HashMap<u64, OpenConnection>,
}

#[derive(Debug)]
struct OpenConnection {
    /// A second handle on the socket, to shut it down from the acceptor.
    handle: UnixStream,
    /// Set while the connection waits for a new request.
    idle_since: Option<Instant>,
}

/// Registers `stream`, closing the longest-idle connection if the table is full. `None` when
/// every slot is in the middle of a request.
fn admit(table: &Mutex<ConnectionTable>, stream: &UnixStream, max: usize) -> Option<u64> {
    let mut table = lock(table);
    if table.open.len() >= max.max(1) {
        let oldest_idle = table
            .open
            .iter()
            .filter_map(|(id, open)| open.idle_since.map(|since| (since, *id)))
            .min()
            .map(|(_, id)| id)?;
        if let Some(evicted) = table.open.remove(&oldest_idle) {
            debug!("closing an idle API connection to make room");
            // Its thread sees end-of-file and exits.
            let _ = evicted.handle.shutdown(Shutdown::Both);
        }
    }
    let handle = match stream.try_clone() {
        Ok(handle) => handle,
        Err(err) => {
            warn!("cannot track an API connection: {err}");
            return None;
        }
    };
    let id = table.next_id;
    table.next_id = table.next_id.wrapping_add(1);
    table.open.insert(
        id,
        OpenConnection {
            handle,
            idle_since: Some(Instant::now()),
        },
    );
    Some(id)
}

/// A connection's entry in the table; removed when the connection ends.
#[derive(Debug)]
struct Registration {
    table: Arc<Mutex<ConnectionTable>>,
    id: u64,
}

impl Registration {
    fn set_idle(&self, idle: bool) {
        if let Some(open) = lock(&self.table).open.get_mut(&self.id) {
            open.idle_since = idle.then(Instant::now);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.table).open.remove(&self.id);
    }
}

struct Connection {
    stream: UnixStream,
    /// Bytes received and not yet consumed by a request.
    buffered: Vec<u8>,
    registration: Registration,
    config: ServerConfig,
}

/// After an error response, how long and how much to keep reading so the client can finish
/// sending and then read the response, instead of getting `EPIPE` on its write.
const LINGER_TIME: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

impl Connection {
    fn serve(&mut self, vmm: &VmmLink) {
        if let Err(err) = self.stream.set_nonblocking(false) {
            warn!("API connection unusable: {err}");
            return;
        }
        if let Err(err) = self
            .stream
            .set_write_timeout(Some(self.config.write_timeout))
        {
            warn!("API connection unusable: {err}");
            return;
        }
        loop {
            let request = match self.next_request() {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(ConnectionError::Http(err)) => {
                    warn!("bad API request: {err}");
                    if self.send(&err.response()).is_ok() {
                        self.linger();
                    }
                    return;
                }
                Err(ConnectionError::Io(err)) => {
                    debug!("API connection dropped: socket I/O failed: {err}");
                    return;
                }
                Err(err) => {
                    debug!("API connection dropped: {err}");
                    return;
                }
            };
            let mut response = match decode(&request) {
                Ok(api_request) => {
                    debug!("API request {} {}", request.method, request.target);
                    vmm.call(api_request)
                }
                Err(err) => {
                    debug!(
                        "API request {} {} refused: {err}",
                        request.method, request.target
                    );
                    Response::fault(Status::BadRequest, &err.to_string())
                }
            };
            // A HEAD client would not read our body and lose the framing: close after it.
            response.close = !request.keep_alive || request.method == "HEAD";
            if let Err(err) = self.send(&response) {
                debug!("cannot send an API response: {err}");
                return;
            }
            if response.close {
                return;
            }
        }
    }

    /// Reads until one request is complete. `Ok(None)` when the client closed cleanly
    /// between requests.
    fn next_request(&mut self) -> Result<Option<http::Request>, ConnectionError> {
        let mut deadline: Option<Instant> = None;
        let mut continue_sent = false;
        let mut chunk = [0u8; 4096];
        loop {
            if !self.buffered.is_empty() {
                match http::parse_request(&self.buffered, &self.config.limits)? {
                    Parsed::Complete { request, consumed } => {
                        self.buffered.drain(..consumed);
                        return Ok(Some(request));
                    }
                    Parsed::Incomplete { awaiting_continue } => {
                        if awaiting_continue && !continue_sent {
                            self.stream.write_all(http::CONTINUE)?;
                            continue_sent = true;
                        }
                    }
                }
            }

            let idle = self.buffered.is_empty();
            if idle {
                // Waiting between requests has no time limit; eviction ends it if needed.
                self.registration.set_idle(true);
                self.stream.set_read_timeout(None)?;
            } else {
                let deadline =
                    *deadline.get_or_insert_with(|| Instant::now() + self.config.request_timeout);
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(HttpError::Timeout.into());
                }
                self.stream.set_read_timeout(Some(remaining))?;
            }

            let read = self.stream.read(&mut chunk);
            if idle {
                self.registration.set_idle(false);
            }
            let count = match read {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err)
                    if !idle
                        && matches!(
                            err.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                {
                    return Err(HttpError::Timeout.into());
                }
                Err(err) => return Err(err.into()),
            };
            if count == 0 {
                return if idle {
                    Ok(None)
                } else {
                    Err(ConnectionError::ClosedMidRequest)
                };
            }
            self.buffered
                .extend_from_slice(chunk.get(..count).unwrap_or_default());
        }
    }

    fn send(&mut self, response: &Response) -> io::Result<()> {
        self.stream.write_all(&response.encode())?;
        self.stream.flush()
    }

    /// Closes our side for writing, then drains what the client still sends for a short
    /// while, so it reads the error response instead of failing on its own write.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER_TIME;
        let mut drained = 0usize;
        let mut chunk = [0u8; 4096];
        while drained < LINGER_BYTES {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || self.stream.set_read_timeout(Some(remaining)).is_err() {
                return;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(count) => drained = drained.saturating_add(count),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}
