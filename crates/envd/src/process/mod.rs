//! The `process.Process` Connect service (E2B's envd semantics): start processes as a user,
//! with pipes or a PTY, stream their output, reconnect to them, feed them input, signal and
//! resize them.
//!
//! - [`spawn`]: starting a process and the task that owns it until it ends.
//! - [`output`]: each process's bounded output log, replayed to every stream.
//! - [`table`]: running and recently ended processes.
//! - [`pty`]: pseudo-terminals; [`cgroup`]: one cgroup v2 per process, and `/init` limits.
//!
//! A process belongs to envd, not to the request that started it: when the client goes
//! away the process keeps running, and `Connect` (by pid or tag) picks its output up again.
//! Only `Connect-Timeout-Ms` on `Start`, a signal, or its own exit end it.
pub mod cgroup;
pub mod output;
pub mod pty;
pub mod spawn;
pub mod table;

use std::sync::{Arc, OnceLock};

use connectrpc::codec::CodecFormat;
use connectrpc::{
    ConnectError, Encodable, InboundStream, RequestContext, Response, ServiceRequest,
};
use connectrpc::{ServiceResult, ServiceStream};
use futures::StreamExt as _;
use nix::sys::signal::Signal as NixSignal;
use tokio::io::AsyncWriteExt as _;
use wrenn_proto::process::process_event;
use wrenn_proto::process::process_input::Input as ProcessInputKind;
use wrenn_proto::process::process_selector::Selector;
use wrenn_proto::process::stream_input_request::Event as InputEvent;
use wrenn_proto::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, Process, ProcessEvent, ProcessExt as _, ProcessInfo, ProcessInput,
    ProcessSelector, SendInputRequest, SendInputResponse, SendSignalRequest, SendSignalResponse,
    Signal, StartRequest, StartResponse, StreamInputRequest, StreamInputResponse, UpdateRequest,
    UpdateResponse,
};

pub use cgroup::{CgroupError, ProcessLimits};

use crate::auth;
use crate::rpc::keepalive_interval;
use crate::state::Shared;
use output::Follower;
use table::{Input, Record, Table};

/// Adds the process service to `router`. Every app built in this process shares one process
/// table (envd may serve the same processes over TCP and vsock).
pub fn register(router: connectrpc::Router, shared: Arc<Shared>) -> connectrpc::Router {
    static TABLE: OnceLock<Arc<Table>> = OnceLock::new();
    let table = Arc::clone(TABLE.get_or_init(Arc::default));
    Arc::new(ProcessService { shared, table }).register(router)
}

/// Writes `/init`'s `processLimits` to the cgroup of all user processes. Invalid values are
/// an error; without managed cgroups (envd is not PID 1) valid ones are ignored with a
/// warning, since the host sends them whatever envd runs on.
pub fn apply_limits(shared: &Shared, limits: &ProcessLimits) -> Result<(), CgroupError> {
    limits.writes()?;
    let Some(cgroups) = cgroup::manager(shared.read(|s| s.manage_cgroups)) else {
        tracing::warn!(
            ?limits,
            "process limits ignored: envd does not manage cgroups here"
        );
        return Ok(());
    };
    cgroups.apply_limits(limits)?;
    tracing::info!(?limits, "process limits applied");
    Ok(())
}

/// The service: envd's shared state and its processes.
struct ProcessService {
    shared: Arc<Shared>,
    table: Arc<Table>,
}

/// The selector of a request, required.
fn selector(process: Option<&ProcessSelector>) -> Result<Selector, ConnectError> {
    process.and_then(|p| p.selector.clone()).ok_or_else(|| {
        ConnectError::invalid_argument("a process selector (pid or tag) is required")
    })
}

/// How long a started process may live: the request's deadline (`Connect-Timeout-Ms`), except
/// that E2B reads a timeout of 0 as "no limit" where Connect would read "already expired".
fn process_deadline(ctx: &RequestContext) -> Option<std::time::Instant> {
    let zero = ctx
        .headers()
        .get("connect-timeout-ms")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().parse::<u64>() == Ok(0));
    if zero { None } else { ctx.deadline() }
}

/// A stream of `follower`'s events, each wrapped as the RPC's response message.
fn event_stream<T: Send + 'static>(
    follower: Follower,
    wrap: fn(ProcessEvent) -> T,
) -> ServiceStream<Outgoing<T>> {
    Box::pin(futures::stream::unfold(
        follower,
        move |mut follower| async move {
            let event = follower.next().await?;
            let message = wrap(ProcessEvent {
                event: Some(event),
                ..Default::default()
            });
            Some((Ok(Outgoing(message)), follower))
        },
    ))
}

/// The two response messages that carry a [`ProcessEvent`].
trait CarriesEvent {
    fn event(&self) -> Option<&ProcessEvent>;
}

impl CarriesEvent for StartResponse {
    fn event(&self) -> Option<&ProcessEvent> {
        self.event.as_option()
    }
}

impl CarriesEvent for ConnectResponse {
    fn event(&self) -> Option<&ProcessEvent> {
        self.event.as_option()
    }
}

/// A stream item. Output chunks in the JSON codec (what the SDKs use) are written by hand:
/// the base64 goes straight into the buffer, where the generic path would check the string
/// for characters to escape and copy it again (a fifth of envd's CPU when streaming output).
/// Everything else, and the binary codec, takes the generic path.
struct Outgoing<M>(M);

impl<M> Encodable<M> for Outgoing<M>
where
    M: Encodable<M> + CarriesEvent,
{
    fn encode(&self, codec: CodecFormat) -> Result<bytes::Bytes, ConnectError> {
        if codec == CodecFormat::Json
            && let Some(ProcessEvent {
                event: Some(process_event::Event::Data(data)),
                ..
            }) = self.0.event()
            && let Some(output) = &data.output
        {
            return Ok(data_event_json(output));
        }
        self.0.encode(codec)
    }
}

/// `{"event":{"data":{"<stream>":"<base64>"}}}`, proto3 JSON's form of an output chunk.
fn data_event_json(output: &process_event::data_event::Output) -> bytes::Bytes {
    use base64::Engine as _;
    use process_event::data_event::Output;
    let (name, data) = match output {
        Output::Stdout(data) => ("stdout", data),
        Output::Stderr(data) => ("stderr", data),
        Output::Pty(data) => ("pty", data),
    };
    let mut json = Vec::with_capacity(data.len() / 3 * 4 + 48);
    json.extend_from_slice(b"{\"event\":{\"data\":{\"");
    json.extend_from_slice(name.as_bytes());
    json.extend_from_slice(b"\":\"");
    let start = json.len();
    json.resize(
        start + base64::encoded_len(data.len(), true).unwrap_or(0),
        0,
    );
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(data, &mut json[start..])
        .unwrap_or(0);
    json.truncate(start + written);
    json.extend_from_slice(b"\"}}}");
    json.into()
}

/// Writes `input` to `record`'s stdin or terminal, refusing the wrong kind.
async fn write_input(record: &Record, input: ProcessInput) -> Result<(), ConnectError> {
    let pid = record.pid;
    let Some(input) = input.input else {
        return Ok(());
    };
    let mut target = record.input.lock().await;
    let result = match (&mut *target, input) {
        (Input::Pipe(Some(stdin)), ProcessInputKind::Stdin(data)) => {
            match stdin.write_all(&data).await {
                Ok(()) => stdin.flush().await,
                Err(error) => Err(error),
            }
        }
        (Input::Pty(pty), ProcessInputKind::Pty(data)) => pty.write_all(&data).await,
        (Input::Pipe(None), ProcessInputKind::Stdin(_)) => {
            return Err(ConnectError::failed_precondition(format!(
                "stdin of process {pid} is closed"
            )));
        }
        (Input::Disabled, ProcessInputKind::Stdin(_)) => {
            return Err(ConnectError::failed_precondition(format!(
                "process {pid} was started without stdin"
            )));
        }
        (Input::Pty(_), ProcessInputKind::Stdin(_)) => {
            return Err(ConnectError::invalid_argument(format!(
                "process {pid} has a PTY: send input as pty bytes"
            )));
        }
        (Input::Pipe(_) | Input::Disabled, ProcessInputKind::Pty(_)) => {
            return Err(ConnectError::invalid_argument(format!(
                "process {pid} has no PTY: send input as stdin bytes"
            )));
        }
        (Input::Ended, _) => return Err(table::not_found(&Selector::Pid(pid))),
    };
    result.map_err(|error| {
        if record.exited() {
            table::not_found(&Selector::Pid(pid))
        } else {
            ConnectError::failed_precondition(format!(
                "writing to the input of process {pid}: {error}"
            ))
        }
    })
}

// The handlers return their concrete message types, which the trait's `impl Encodable`
// allows; the service is private, so nothing outside relies on the refinement.
#[allow(refining_impl_trait)]
impl Process for ProcessService {
    async fn list(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, ListRequest>,
    ) -> ServiceResult<ListResponse> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let processes = self
            .table
            .list()
            .into_iter()
            .map(|record| ProcessInfo {
                config: record.config.clone().into(),
                pid: record.pid,
                tag: record.tag.clone(),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(ListResponse {
            processes,
            ..Default::default()
        }))
    }

    async fn connect(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ConnectRequest>,
    ) -> ServiceResult<ServiceStream<Outgoing<ConnectResponse>>> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        let record = self
            .table
            .find(&selector)
            .ok_or_else(|| table::not_found(&selector))?;
        let follower = record
            .log
            .follow(record.pid, keepalive_interval(ctx.headers()), false);
        Ok(Response::new(event_stream(follower, |event| {
            ConnectResponse {
                event: event.into(),
                ..Default::default()
            }
        })))
    }

    async fn start(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StartRequest>,
    ) -> ServiceResult<ServiceStream<Outgoing<StartResponse>>> {
        let user = auth::rpc_user(&self.shared, ctx.headers())?;
        let request = request.to_owned_message();
        let deadline = process_deadline(&ctx);
        let record = spawn::start(&self.shared, &self.table, request, &user, deadline)?;
        // The starter's stream is the primary reader: the output waits for it.
        let follower = record
            .log
            .follow(record.pid, keepalive_interval(ctx.headers()), true);
        Ok(Response::new(event_stream(follower, |event| {
            StartResponse {
                event: event.into(),
                ..Default::default()
            }
        })))
    }

    async fn update(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, UpdateRequest>,
    ) -> ServiceResult<UpdateResponse> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        let record = self.table.running(&selector)?;
        let Some(size) = request.pty.as_option().and_then(|pty| pty.size.as_option()) else {
            return Err(ConnectError::invalid_argument("update needs a pty size"));
        };
        let Some(pty) = record.pty() else {
            return Err(ConnectError::invalid_argument(format!(
                "process {} has no PTY to resize",
                record.pid
            )));
        };
        pty.resize(size.cols, size.rows).map_err(|error| {
            ConnectError::internal(format!("resizing the PTY of {}: {error}", record.pid))
        })?;
        Ok(Response::new(UpdateResponse::default()))
    }

    async fn stream_input(
        &self,
        ctx: RequestContext,
        mut requests: InboundStream<StreamInputRequest>,
    ) -> ServiceResult<StreamInputResponse> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let mut record: Option<Arc<Record>> = None;
        while let Some(message) = requests.next().await {
            let message = message?.to_owned_message();
            match message.event {
                Some(InputEvent::Start(start)) => {
                    let selector = selector(start.process.as_option())?;
                    record = Some(self.table.running(&selector)?);
                }
                Some(InputEvent::Data(data)) => {
                    let Some(record) = &record else {
                        return Err(ConnectError::invalid_argument(
                            "the first StreamInput message must be start{process}",
                        ));
                    };
                    if let Some(input) = data.input.into_option() {
                        write_input(record, input).await?;
                    }
                }
                Some(InputEvent::Keepalive(_)) | None => {}
            }
        }
        Ok(Response::new(StreamInputResponse::default()))
    }

    async fn send_input(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, SendInputRequest>,
    ) -> ServiceResult<SendInputResponse> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        let record = self.table.running(&selector)?;
        if let Some(input) = request.input.into_option() {
            write_input(&record, input).await?;
        }
        Ok(Response::new(SendInputResponse::default()))
    }

    async fn send_signal(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, SendSignalRequest>,
    ) -> ServiceResult<SendSignalResponse> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let request = request.to_owned_message();
        let signal = match request.signal.as_known() {
            Some(Signal::SIGNAL_SIGKILL) => NixSignal::SIGKILL,
            Some(Signal::SIGNAL_SIGTERM) => NixSignal::SIGTERM,
            _ => {
                return Err(ConnectError::invalid_argument(format!(
                    "unsupported signal {}",
                    request.signal.to_i32()
                )));
            }
        };
        let selector = selector(request.process.as_option())?;
        let record = self.table.running(&selector)?;
        tracing::info!(pid = record.pid, %signal, "signalling process tree");
        record.signal_tree(signal);
        Ok(Response::new(SendSignalResponse::default()))
    }

    async fn close_stdin(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, CloseStdinRequest>,
    ) -> ServiceResult<CloseStdinResponse> {
        auth::rpc_user(&self.shared, ctx.headers())?;
        let request = request.to_owned_message();
        let selector = selector(request.process.as_option())?;
        let record = self.table.running(&selector)?;
        let mut input = record.input.lock().await;
        match &mut *input {
            Input::Pipe(stdin) => {
                // Dropping the write end is what the child sees as end of input.
                if let Some(mut stdin) = stdin.take() {
                    let _ = stdin.shutdown().await;
                }
            }
            Input::Pty(_) => {
                return Err(ConnectError::invalid_argument(format!(
                    "process {} has a PTY: send Ctrl+D (0x04) instead of closing stdin",
                    record.pid
                )));
            }
            Input::Disabled => {
                return Err(ConnectError::failed_precondition(format!(
                    "process {} was started without stdin",
                    record.pid
                )));
            }
            Input::Ended => return Err(table::not_found(&selector)),
        }
        Ok(Response::new(CloseStdinResponse::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use process_event::data_event::Output;

    fn data(output: Output) -> StartResponse {
        StartResponse {
            event: ProcessEvent {
                event: Some(process_event::Event::Data(Box::new(
                    process_event::DataEvent {
                        output: Some(output),
                        ..Default::default()
                    },
                ))),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn test_hand_written_data_events_match_the_generic_json() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(32 * 1024 + 7).collect();
        for len in [0, 1, 2, 3, 4, 100, bytes.len()] {
            let chunk = bytes[..len].to_vec();
            for output in [
                Output::Stdout(chunk.clone()),
                Output::Stderr(chunk.clone()),
                Output::Pty(chunk.clone()),
            ] {
                let message = data(output);
                let generic = message.encode(CodecFormat::Json).unwrap();
                let fast = Outgoing(message.clone()).encode(CodecFormat::Json).unwrap();
                let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
                assert_eq!(parse(&fast), parse(&generic), "len {len}");
                // The binary codec is untouched.
                assert_eq!(
                    Outgoing(message.clone())
                        .encode(CodecFormat::Proto)
                        .unwrap(),
                    message.encode(CodecFormat::Proto).unwrap()
                );
            }
        }
        // Other events take the generic path.
        let start = StartResponse {
            event: ProcessEvent {
                event: Some(process_event::Event::Start(Box::new(
                    process_event::StartEvent {
                        pid: 7,
                        ..Default::default()
                    },
                ))),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        assert_eq!(
            Outgoing(start.clone()).encode(CodecFormat::Json).unwrap(),
            start.encode(CodecFormat::Json).unwrap()
        );
    }
}
