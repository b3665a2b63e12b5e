//! `hostagent.v1.HostAgent` over Connect: turns messages into manager calls and manager
//! errors into Connect errors (their codes and messages pass through unchanged).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connectrpc::{
    ConnectError, InboundStream, RequestContext, Response, ServiceRequest, ServiceResult,
    ServiceStream,
};
use futures::StreamExt;
use wrenn_proto::hostagent::v1::exec_event::Event as ExecEventKind;
use wrenn_proto::hostagent::v1::*;

use crate::envd::{ExecEvent as EnvdEvent, ExecSpec};
use crate::manager::{BuildRequest, CreateRequest, Manager, ManagerError};
use crate::sandbox::{self, EgressRules, Record, State};
use crate::templates::Template;

/// The agent's version, reported by Health.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The service.
#[derive(Debug, Clone)]
pub struct HostAgentService {
    manager: Arc<Manager>,
    /// How `image: "base" | "test"` and an empty kernel resolve.
    images: Arc<dyn ImageResolver>,
}

/// Finds Wrenn's kernel and images on the agent's machine (the cache in production; tests
/// may point elsewhere).
pub trait ImageResolver: std::fmt::Debug + Send + Sync {
    /// The ext4 file for an image name ("base", "test") or path.
    fn image(&self, name: &str) -> Result<PathBuf, String>;
    /// The kernel, when the request names none.
    fn kernel(&self) -> Result<PathBuf, String>;
}

/// Wrenn's image cache.
#[derive(Debug, Default)]
pub struct CacheImages;

impl ImageResolver for CacheImages {
    fn image(&self, name: &str) -> Result<PathBuf, String> {
        use wrenn_image::rootfs::{IMAGE_FILE, ImageKind};
        let kind = match name {
            "base" => ImageKind::Base,
            "test" => ImageKind::Test,
            path if path.starts_with('/') => return Ok(PathBuf::from(path)),
            other => {
                return Err(format!(
                    "unknown image {other:?}: use \"base\", \"test\" or the absolute path of an ext4 image"
                ));
            }
        };
        let cache = wrenn_image::cache::Cache::from_env();
        wrenn_image::rootfs::find(&cache, kind)
            .map(|entry| entry.file(IMAGE_FILE))
            .map_err(|e| format!("the {name} image is not built (run `wrenn guest build`): {e}"))
    }

    fn kernel(&self) -> Result<PathBuf, String> {
        let cache = wrenn_image::cache::Cache::from_env();
        wrenn_image::kernel::find(&cache)
            .map(|entry| entry.file("vmlinux"))
            .map_err(|e| format!("the guest kernel is not built (run `wrenn guest build`): {e}"))
    }
}

impl HostAgentService {
    pub fn new(manager: Arc<Manager>, images: Arc<dyn ImageResolver>) -> Self {
        HostAgentService { manager, images }
    }

    /// Adds the service to a Connect router.
    pub fn register(self, router: connectrpc::Router) -> connectrpc::Router {
        Arc::new(self).register(router)
    }
}

fn error(e: ManagerError) -> ConnectError {
    ConnectError::new(e.code, e.message)
}

fn invalid(message: impl Into<String>) -> ConnectError {
    ConnectError::invalid_argument(message.into())
}

/// A record as the wire's Sandbox.
pub fn sandbox_message(record: &Record) -> Sandbox {
    let running = record.state == State::Running;
    let host = record.host_address.as_deref().filter(|_| running);
    Sandbox {
        sandbox_id: record.sandbox_id.clone(),
        template: record.template.clone(),
        state: state_message(record.state).into(),
        vcpus: record.vcpus,
        memory_mib: record.memory_mib,
        created_at: sandbox::timestamp(record.created_at_ms).into(),
        expires_at: record.expires_at_ms.map(sandbox::timestamp).into(),
        metadata: record.metadata.clone().into_iter().collect(),
        envd_address: host
            .map(|h| format!("{h}:{}", crate::network::ENVD_PORT))
            .unwrap_or_default(),
        envd_access_token: record.access_token.clone(),
        error: record.error.clone().unwrap_or_default(),
        host_address: host.map(str::to_owned).unwrap_or_default(),
        ..Default::default()
    }
}

fn state_message(state: State) -> SandboxState {
    match state {
        State::Creating => SandboxState::SANDBOX_STATE_CREATING,
        State::Running => SandboxState::SANDBOX_STATE_RUNNING,
        State::Pausing => SandboxState::SANDBOX_STATE_PAUSING,
        State::Paused => SandboxState::SANDBOX_STATE_PAUSED,
        State::Resuming => SandboxState::SANDBOX_STATE_RESUMING,
        State::Stopping => SandboxState::SANDBOX_STATE_STOPPING,
        State::Stopped => SandboxState::SANDBOX_STATE_STOPPED,
        State::Error => SandboxState::SANDBOX_STATE_ERROR,
    }
}

/// A template as the wire's Snapshot.
pub fn snapshot_message(template: &Template, store_root: &std::path::Path) -> Snapshot {
    let size_bytes = std::fs::read_dir(store_root.join(&template.build_id))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    Snapshot {
        name: template.name.clone(),
        build_id: template.build_id.clone(),
        vcpus: template.vcpus,
        memory_mib: template.memory_mib,
        created_at: sandbox::timestamp(template.created_at_ms).into(),
        source_sandbox_id: template.source_sandbox_id.clone().unwrap_or_default(),
        size_bytes,
        ..Default::default()
    }
}

fn exec_spec(request: &ExecRequest) -> Result<ExecSpec, ConnectError> {
    if request.cmd.is_empty() {
        return Err(invalid("cmd is empty: name the program to run"));
    }
    Ok(ExecSpec {
        cmd: request.cmd.clone(),
        args: request.args.clone(),
        envs: request
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cwd: (!request.cwd.is_empty()).then(|| request.cwd.clone()),
        user: (!request.user.is_empty()).then(|| request.user.clone()),
        stdin: (!request.stdin.is_empty()).then(|| Bytes::from(request.stdin.clone())),
        timeout: (request.timeout_seconds > 0)
            .then(|| Duration::from_secs(u64::from(request.timeout_seconds))),
    })
}

fn required<'a>(value: &'a str, name: &str) -> Result<&'a str, ConnectError> {
    if value.is_empty() {
        Err(invalid(format!("{name} is required")))
    } else {
        Ok(value)
    }
}

// The handlers return concrete message types, which the trait's `impl Encodable` allows.
#[allow(refining_impl_trait)]
impl HostAgent for HostAgentService {
    async fn create_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, CreateSandboxRequest>,
    ) -> ServiceResult<CreateSandboxResponse> {
        let request = request.to_owned_message();
        required(&request.sandbox_id, "sandbox_id")?;
        required(&request.template, "template")?;
        let egress = request.egress.as_option().cloned().unwrap_or_default();
        let record = self
            .manager
            .create(CreateRequest {
                sandbox_id: request.sandbox_id,
                template: request.template,
                vcpus: request.vcpus,
                memory_mib: request.memory_mib,
                timeout_seconds: request.timeout_seconds,
                env_vars: request.env_vars.into_iter().collect::<BTreeMap<_, _>>(),
                metadata: request.metadata.into_iter().collect::<BTreeMap<_, _>>(),
                access_token: Some(request.envd_access_token).filter(|t| !t.is_empty()),
                egress: EgressRules {
                    allow: egress.allow,
                    deny: egress.deny,
                },
            })
            .await
            .map_err(error)?;
        Ok(Response::new(CreateSandboxResponse {
            sandbox: sandbox_message(&record).into(),
            ..Default::default()
        }))
    }

    async fn destroy_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, DestroySandboxRequest>,
    ) -> ServiceResult<DestroySandboxResponse> {
        let id = required(request.sandbox_id, "sandbox_id")?.to_owned();
        self.manager.destroy(&id).await.map_err(error)?;
        Ok(Response::new(DestroySandboxResponse::default()))
    }

    async fn list_sandboxes(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, ListSandboxesRequest>,
    ) -> ServiceResult<ListSandboxesResponse> {
        let sandboxes = self.manager.list().iter().map(sandbox_message).collect();
        Ok(Response::new(ListSandboxesResponse {
            sandboxes,
            ..Default::default()
        }))
    }

    async fn get_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, GetSandboxRequest>,
    ) -> ServiceResult<GetSandboxResponse> {
        let record = self
            .manager
            .get(required(request.sandbox_id, "sandbox_id")?)
            .map_err(error)?;
        Ok(Response::new(GetSandboxResponse {
            sandbox: sandbox_message(&record).into(),
            ..Default::default()
        }))
    }

    async fn pause_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, PauseSandboxRequest>,
    ) -> ServiceResult<PauseSandboxResponse> {
        let id = required(request.sandbox_id, "sandbox_id")?.to_owned();
        let (record, bytes_written) = self.manager.pause(&id).await.map_err(error)?;
        Ok(Response::new(PauseSandboxResponse {
            sandbox: sandbox_message(&record).into(),
            bytes_written,
            ..Default::default()
        }))
    }

    async fn resume_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, ResumeSandboxRequest>,
    ) -> ServiceResult<ResumeSandboxResponse> {
        let id = required(request.sandbox_id, "sandbox_id")?.to_owned();
        let record = self
            .manager
            .resume(&id, request.timeout_seconds)
            .await
            .map_err(error)?;
        Ok(Response::new(ResumeSandboxResponse {
            sandbox: sandbox_message(&record).into(),
            ..Default::default()
        }))
    }

    async fn set_timeout(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SetTimeoutRequest>,
    ) -> ServiceResult<SetTimeoutResponse> {
        let record = self
            .manager
            .set_timeout(
                required(request.sandbox_id, "sandbox_id")?,
                request.timeout_seconds,
            )
            .map_err(error)?;
        Ok(Response::new(SetTimeoutResponse {
            sandbox: sandbox_message(&record).into(),
            ..Default::default()
        }))
    }

    async fn exec(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, ExecRequest>,
    ) -> ServiceResult<ExecResponse> {
        let request = request.to_owned_message();
        let spec = exec_spec(&request)?;
        let out = self
            .manager
            .exec(required(&request.sandbox_id, "sandbox_id")?, &spec)
            .await
            .map_err(error)?;
        Ok(Response::new(ExecResponse {
            stdout: out.stdout.to_vec(),
            stderr: out.stderr.to_vec(),
            exit_code: out.exit_code,
            truncated: out.truncated,
            pid: out.pid,
            ..Default::default()
        }))
    }

    async fn exec_stream(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, ExecRequest>,
    ) -> ServiceResult<ServiceStream<ExecEvent>> {
        let request = request.to_owned_message();
        let spec = exec_spec(&request)?;
        let events = self
            .manager
            .exec_stream(required(&request.sandbox_id, "sandbox_id")?, &spec)
            .await
            .map_err(error)?;
        let stream = events.map(|event| {
            let kind = match event.map_err(error)? {
                EnvdEvent::Started(pid) => ExecEventKind::StartedPid(pid),
                EnvdEvent::Stdout(data) => ExecEventKind::Stdout(data.to_vec()),
                EnvdEvent::Stderr(data) => ExecEventKind::Stderr(data.to_vec()),
                EnvdEvent::Exit(code) => ExecEventKind::ExitCode(code),
            };
            Ok(ExecEvent {
                event: Some(kind),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(stream) as ServiceStream<ExecEvent>))
    }

    async fn write_file(
        &self,
        _ctx: RequestContext,
        mut requests: InboundStream<WriteFileRequest>,
    ) -> ServiceResult<WriteFileResponse> {
        let Some(first) = requests.next().await else {
            return Err(invalid(
                "WriteFile needs a first message naming sandbox_id and path",
            ));
        };
        let first = first?.to_owned_message();
        let id = required(&first.sandbox_id, "sandbox_id")?.to_owned();
        let path = required(&first.path, "path")?.to_owned();
        let user = (!first.user.is_empty()).then_some(first.user);
        let head = futures::stream::iter(
            (!first.data.is_empty()).then(|| Ok::<Bytes, std::io::Error>(Bytes::from(first.data))),
        );
        let rest = requests.map(|message| match message {
            Ok(message) => Ok(Bytes::from(message.to_owned_message().data)),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        });
        let bytes_written = self
            .manager
            .write_file(&id, &path, user.as_deref(), head.chain(rest))
            .await
            .map_err(error)?;
        Ok(Response::new(WriteFileResponse {
            bytes_written,
            ..Default::default()
        }))
    }

    async fn read_file(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, ReadFileRequest>,
    ) -> ServiceResult<ServiceStream<ReadFileResponse>> {
        let request = request.to_owned_message();
        let id = required(&request.sandbox_id, "sandbox_id")?;
        let path = required(&request.path, "path")?;
        let user = (!request.user.is_empty()).then_some(request.user.as_str());
        let chunks = self
            .manager
            .read_file(id, path, user)
            .await
            .map_err(error)?;
        let stream = chunks.map(|chunk| {
            Ok(ReadFileResponse {
                data: chunk.map_err(error)?.to_vec(),
                ..Default::default()
            })
        });
        Ok(Response::new(
            Box::pin(stream) as ServiceStream<ReadFileResponse>
        ))
    }

    async fn create_snapshot(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, CreateSnapshotRequest>,
    ) -> ServiceResult<CreateSnapshotResponse> {
        let template = self
            .manager
            .create_snapshot(
                required(request.sandbox_id, "sandbox_id")?,
                required(request.name, "name")?,
            )
            .await
            .map_err(error)?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: snapshot_message(&template, &self.manager.store_root()).into(),
            ..Default::default()
        }))
    }

    async fn delete_snapshot(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, DeleteSnapshotRequest>,
    ) -> ServiceResult<DeleteSnapshotResponse> {
        self.manager
            .delete_snapshot(required(request.name, "name")?)
            .await
            .map_err(error)?;
        Ok(Response::new(DeleteSnapshotResponse::default()))
    }

    async fn list_snapshots(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, ListSnapshotsRequest>,
    ) -> ServiceResult<ListSnapshotsResponse> {
        let root = self.manager.store_root();
        let snapshots = self
            .manager
            .templates()
            .iter()
            .map(|t| snapshot_message(t, &root))
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            snapshots,
            ..Default::default()
        }))
    }

    async fn build_template(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, BuildTemplateRequest>,
    ) -> ServiceResult<BuildTemplateResponse> {
        let request = request.to_owned_message();
        let name = required(&request.name, "name")?.to_owned();
        let image_name = if request.image.is_empty() {
            "base"
        } else {
            &request.image
        };
        let image = self.images.image(image_name).map_err(invalid)?;
        let kernel = if request.kernel_path.is_empty() {
            self.images
                .kernel()
                .map_err(ConnectError::failed_precondition)?
        } else {
            PathBuf::from(&request.kernel_path)
        };
        let built = self
            .manager
            .build_template(BuildRequest {
                name,
                image,
                kernel,
                vcpus: if request.vcpus == 0 { 1 } else { request.vcpus },
                memory_mib: if request.memory_mib == 0 {
                    512
                } else {
                    request.memory_mib
                },
                replace: request.replace,
            })
            .await
            .map_err(error)?;
        Ok(Response::new(BuildTemplateResponse {
            snapshot: snapshot_message(&built.template, &self.manager.store_root()).into(),
            boot_ms: u64::try_from(built.boot.as_millis()).unwrap_or(u64::MAX),
            prefetch_pages: u64::try_from(built.prefetch_pages).unwrap_or(u64::MAX),
            ..Default::default()
        }))
    }

    async fn health(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, HealthRequest>,
    ) -> ServiceResult<HealthResponse> {
        let records = self.manager.list();
        let count = |state| {
            u32::try_from(records.iter().filter(|r| r.state == state).count()).unwrap_or(u32::MAX)
        };
        let (vcpus_used, memory_mib_used) = self.manager.used();
        let config = self.manager.config();
        Ok(Response::new(HealthResponse {
            version: VERSION.into(),
            sandboxes_running: count(State::Running),
            sandboxes_paused: count(State::Paused),
            slots_free: u32::try_from(self.manager.slots_free()).unwrap_or(u32::MAX),
            vcpus_total: config.vcpus_total,
            memory_mib_total: config.memory_mib_total,
            vcpus_used,
            memory_mib_used,
            started_at: sandbox::timestamp(self.manager.started_at_ms).into(),
            ..Default::default()
        }))
    }
}
