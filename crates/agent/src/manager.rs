//! The sandbox manager: everything the agent's RPCs do.
//!
//! Each sandbox is an [`Entry`]: its record (cheap to read, for lists) and, behind a per-sandbox
//! async lock, what it holds while it runs (its VMM, network slot, page-server handle and envd
//! client). An operation takes that lock for as long as it changes the sandbox's state, so two
//! operations on one sandbox run one after the other while different sandboxes change state in
//! parallel. VMMs are separate processes in their own sessions: nothing ties them to the request
//! that started them, or to the agent's own life (see `recover`).
//!
//! Files (all paths derived from the sandbox id; nothing else names them):
//! ```text
//! <data>/store/<build>/...            snapshot builds (templates', pauses')
//! <data>/templates/<name>.json        templates
//! <data>/images/<name>                images templates were built from (hard links or copies)
//! <data>/sandboxes/<id>/sandbox.json  the record
//! <data>/sandboxes/<id>/rootfs.overlay  the running VM's disk writes since its last snapshot
//! <run>/<id>/{api.sock,vsock.sock,uffd.sock,vmm.log}  one VMM's sockets and log
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use connectrpc::ErrorCode;
use wrenn_snapshot::id::BuildId;
use wrenn_snapshot::store::{DriveId, Store};

use crate::envd::{EnvdClient, ExecOutput, ExecSpec, InitRequest};
use crate::metrics::Metrics;
use crate::network::{Egress, Slot, SlotPool, SlotPoolConfig};
use crate::pages::Pages;
use crate::sandbox::{self, EgressRules, Record, State};
use crate::storage::{RecordKind, Remote, Storage};
use crate::templates::{self, Template, TemplateStore};
use crate::vmm::{
    BootSpec, DriveSource, DriveSpec, MemorySource, NetSpec, RestoreSpec, SnapshotKind,
    SnapshotSpec, Vmm, VmmConfig,
};

/// The one drive every sandbox has.
pub const ROOT_DRIVE: &str = "rootfs";
/// The one network interface (on the slot's tap).
const NET_IFACE: &str = "eth0";
/// The guest's vsock context id (the agent talks to envd over the slot; vsock is there for
/// envd's restore signal).
const GUEST_CID: u32 = 3;
/// The guest's serial console, in the VMM's directory.
const CONSOLE_FILE: &str = "console.log";
/// Kernel parameters of every sandbox: serial console, a reset ends the VM, no PCI probing,
/// envd as PID 1 (it mounts, configures eth0 from `ip=` and reaps).
const KERNEL_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet i8042.noaux \
                           i8042.nomux i8042.dumbkbd init=/usr/bin/envd";
/// How long a booting template's envd may take to answer (a boot in the host VM takes ~4 s).
const BOOT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a restored envd may take to answer.
const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VMM waits for its page server to come back (an agent restart).
const PAGE_SERVER_GRACE: Duration = Duration::from_secs(60);
/// SIGTERM to SIGKILL for a VMM that is being stopped.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Templates, snapshot builds, sandbox records and overlays.
    pub data_dir: PathBuf,
    /// VMM sockets and logs.
    pub run_dir: PathBuf,
    /// The `wrenn-vmm` binary.
    pub vmm_binary: PathBuf,
    pub slots: SlotPoolConfig,
    /// What sandboxes may use in total: vCPUs (may exceed the host's: they are threads) and
    /// memory (restored lazily, so it may exceed the host's too).
    pub vcpus_total: u32,
    pub memory_mib_total: u64,
    /// The host's own, for refusing one sandbox bigger than the machine.
    pub host_vcpus: u32,
    pub host_memory_mib: u64,
    /// Bytes of stdout (and of stderr) a unary Exec returns.
    pub exec_output_limit: usize,
    /// How often the reaper looks for expired sandboxes.
    pub reap_interval: Duration,
    /// An object store that templates and paused sandboxes are shared through (so another
    /// host can start or resume them); `Remote::None` keeps everything on this host.
    pub remote: Remote,
}

impl AgentConfig {
    /// Defaults under `data_dir` and `run_dir`, with this machine's size.
    pub fn new(data_dir: PathBuf, run_dir: PathBuf, vmm_binary: PathBuf) -> AgentConfig {
        let host_vcpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let host_memory_mib = host_memory_mib().unwrap_or(1024);
        AgentConfig {
            data_dir,
            run_dir,
            vmm_binary,
            slots: SlotPoolConfig::default(),
            vcpus_total: host_vcpus.saturating_mul(16),
            memory_mib_total: host_memory_mib.saturating_mul(8),
            host_vcpus,
            host_memory_mib,
            exec_output_limit: 16 << 20,
            reap_interval: Duration::from_secs(1),
            remote: Remote::None,
        }
    }
}

/// MemTotal of /proc/meminfo in MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// A failed operation: a Connect code and a message a person can act on.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ManagerError {
    pub code: ErrorCode,
    pub message: String,
}

impl ManagerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ManagerError {
            code,
            message: message.into(),
        }
    }

    fn not_found(id: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            format!("no sandbox {id:?} on this host"),
        )
    }

    fn internal(what: &str, error: &dyn std::error::Error) -> Self {
        Self::new(ErrorCode::Internal, format!("{what}: {}", chain(error)))
    }
}

/// An error and its sources on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl From<templates::TemplateError> for ManagerError {
    fn from(e: templates::TemplateError) -> Self {
        use templates::TemplateError as T;
        let code = match &e {
            T::InvalidName(_) => ErrorCode::InvalidArgument,
            T::NotFound(_) => ErrorCode::NotFound,
            T::Exists(_) => ErrorCode::AlreadyExists,
            T::Io { .. } | T::Damaged { .. } => ErrorCode::Internal,
        };
        Self::new(code, chain(&e))
    }
}

impl From<sandbox::RecordError> for ManagerError {
    fn from(e: sandbox::RecordError) -> Self {
        let code = match &e {
            sandbox::RecordError::InvalidId(_) => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        };
        Self::new(code, chain(&e))
    }
}

/// What CreateSandbox asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub sandbox_id: String,
    pub template: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub timeout_seconds: u32,
    pub env_vars: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub access_token: Option<String>,
    pub egress: EgressRules,
}

/// What BuildTemplate asks for.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub name: String,
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub replace: bool,
}

/// What BuildTemplate did.
#[derive(Debug, Clone)]
pub struct Built {
    pub template: Template,
    pub boot: Duration,
    pub prefetch_pages: usize,
}

/// A sandbox's running parts.
#[derive(Debug)]
struct Running {
    vmm: Vmm,
    slot: Slot,
    pages: Option<wrenn_pager::VmHandle>,
    envd: EnvdClient,
}

/// One sandbox.
#[derive(Debug)]
struct Entry {
    record: Mutex<Record>,
    live: tokio::sync::Mutex<Option<Running>>,
}

impl Entry {
    fn record(&self) -> Record {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, change: impl FnOnce(&mut Record)) -> Record {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut record);
        record.clone()
    }
}

/// The manager.
#[derive(Debug)]
pub struct Manager {
    config: AgentConfig,
    store: Store,
    templates: TemplateStore,
    storage: Storage,
    slots: SlotPool,
    pages: Pages,
    sandboxes: RwLock<HashMap<String, Arc<Entry>>>,
    /// Builds being written, which the collector must not take.
    pending_builds: Mutex<HashSet<BuildId>>,
    /// One collection at a time.
    collecting: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    pub started_at_ms: u64,
}

impl Manager {
    /// Opens the data directory, takes back what an earlier agent left (see `recover`) and
    /// makes the slot pool.
    pub async fn start(config: AgentConfig) -> Result<Arc<Manager>, ManagerError> {
        let dirs = [
            config.data_dir.join("store"),
            config.data_dir.join("sandboxes"),
            config.data_dir.join("images"),
            config.run_dir.clone(),
        ];
        for dir in &dirs {
            std::fs::create_dir_all(dir)
                .map_err(|e| ManagerError::internal(&format!("creating {}", dir.display()), &e))?;
        }
        let store = Store::new(config.data_dir.join("store"));
        let storage = Storage::new(&config.remote, store.root())
            .map_err(|e| ManagerError::new(ErrorCode::InvalidArgument, chain(&e)))?;
        let templates = TemplateStore::open(&config.data_dir.join("templates"))?;
        let records = load_records(&config.data_dir.join("sandboxes"));
        let in_use: Vec<u32> = records
            .iter()
            .filter(|r| r.state == State::Running)
            .filter_map(|r| r.slot)
            .collect();
        let (slots, report) = SlotPool::recover(config.slots.clone(), &in_use)
            .await
            .map_err(|e| ManagerError::internal("setting up network slots", &e))?;
        tracing::info!(%report, "network slots ready");
        let adopted_slots: HashMap<u32, Slot> = report
            .adopted
            .into_iter()
            .map(|slot| (slot.index(), slot))
            .collect();
        let manager = Arc::new(Manager {
            pages: Pages::new(store.root()),
            store,
            storage,
            templates,
            slots,
            sandboxes: RwLock::new(HashMap::new()),
            pending_builds: Mutex::new(HashSet::new()),
            collecting: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
            started_at_ms: sandbox::now_ms(),
            config,
        });
        manager.recover(records, adopted_slots).await;
        Ok(manager)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    pub fn store_root(&self) -> PathBuf {
        self.store.root().to_owned()
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("sandboxes").join(id)
    }

    fn vmm_dir(&self, id: &str) -> PathBuf {
        self.config.run_dir.join(id)
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>, ManagerError> {
        self.sandboxes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| ManagerError::not_found(id))
    }

    fn entries(&self) -> Vec<Arc<Entry>> {
        self.sandboxes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn save(&self, record: &Record) {
        if let Err(e) = record.save(&self.sandbox_dir(&record.sandbox_id)) {
            tracing::error!(sandbox_id = %record.sandbox_id, error = %chain(&e), "cannot save the sandbox record");
        }
    }

    // ---- queries ---------------------------------------------------------------------------

    pub fn list(&self) -> Vec<Record> {
        let mut records: Vec<Record> = self.entries().iter().map(|e| e.record()).collect();
        records.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        records
    }

    pub fn get(&self, id: &str) -> Result<Record, ManagerError> {
        Ok(self.entry(id)?.record())
    }

    pub fn templates(&self) -> Vec<Template> {
        self.templates.list()
    }

    pub fn slots_free(&self) -> usize {
        self.slots.free()
    }

    /// vCPUs and memory held by sandboxes that run (or are being started).
    pub fn used(&self) -> (u32, u64) {
        self.entries()
            .iter()
            .map(|e| e.record())
            .filter(|r| matches!(r.state, State::Creating | State::Running | State::Resuming))
            .fold((0, 0), |(c, m), r| {
                (c + r.vcpus, m + u64::from(r.memory_mib))
            })
    }

    pub fn pager_totals(&self) -> wrenn_pager::CounterStats {
        self.pages.totals()
    }

    // ---- create ----------------------------------------------------------------------------

    /// Starts a sandbox from a template.
    pub async fn create(&self, request: CreateRequest) -> Result<Record, ManagerError> {
        let started = Instant::now();
        sandbox::validate_id(&request.sandbox_id)?;
        let template = self.template(&request.template).await?;
        for (asked, baked, what) in [
            (request.vcpus, template.vcpus, "vCPUs"),
            (request.memory_mib, template.memory_mib, "MiB of memory"),
        ] {
            if asked != 0 && asked != baked {
                return Err(ManagerError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "template {:?} has {baked} {what} baked into its snapshot; ask for {baked} (or 0), not {asked}",
                        template.name
                    ),
                ));
            }
        }
        let egress = Egress {
            allow: request.egress.allow.clone(),
            deny: request.egress.deny.clone(),
        };
        egress
            .validate()
            .map_err(|e| ManagerError::new(ErrorCode::InvalidArgument, chain(&e)))?;
        let access_token = match request.access_token.filter(|t| !t.is_empty()) {
            Some(token) => token,
            None => new_token()?,
        };
        let record = Record {
            sandbox_id: request.sandbox_id.clone(),
            template: template.name.clone(),
            state: State::Creating,
            vcpus: template.vcpus,
            memory_mib: template.memory_mib,
            created_at_ms: sandbox::now_ms(),
            expires_at_ms: sandbox::expiry(request.timeout_seconds),
            timeout_seconds: request.timeout_seconds,
            metadata: request.metadata,
            env_vars: request.env_vars,
            access_token,
            egress: request.egress,
            build_id: template.build_id.clone(),
            own_builds: Vec::new(),
            slot: None,
            host_address: None,
            vmm_pid: None,
            error: None,
        };
        let entry = self.insert_new(record)?;
        let mut live = entry.live.lock().await;
        let record = entry.record();
        let result = match self.fetch(&record.build_id).await {
            Ok(()) => {
                self.start_vm(&record, &egress, template.envd_access_token.as_deref())
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(running) => {
                let record = entry.update(|r| {
                    r.state = State::Running;
                    r.slot = Some(running.slot.index());
                    r.host_address = Some(running.slot.host_address().to_string());
                    r.vmm_pid = Some(running.vmm.pid());
                });
                self.save(&record);
                *live = Some(running);
                self.metrics.created(started.elapsed());
                tracing::info!(sandbox_id = %record.sandbox_id, template = %record.template,
                    took_ms = started.elapsed().as_millis(), "sandbox created");
                Ok(record)
            }
            Err(e) => {
                drop(live);
                self.forget(&record.sandbox_id);
                let _ = std::fs::remove_dir_all(self.sandbox_dir(&record.sandbox_id));
                tracing::warn!(sandbox_id = %record.sandbox_id, error = %e, "sandbox create failed");
                Err(e)
            }
        }
    }

    /// Adds a new entry, refusing a taken id or a machine that is full.
    fn insert_new(&self, record: Record) -> Result<Arc<Entry>, ManagerError> {
        let mut sandboxes = self
            .sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if sandboxes.contains_key(&record.sandbox_id) {
            return Err(ManagerError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "sandbox {:?} exists already on this host; pick another id or destroy it first",
                    record.sandbox_id
                ),
            ));
        }
        self.check_capacity(&sandboxes, record.vcpus, record.memory_mib)?;
        std::fs::create_dir_all(self.sandbox_dir(&record.sandbox_id))
            .map_err(|e| ManagerError::internal("creating the sandbox directory", &e))?;
        self.save(&record);
        let entry = Arc::new(Entry {
            record: Mutex::new(record.clone()),
            live: tokio::sync::Mutex::new(None),
        });
        sandboxes.insert(record.sandbox_id, entry.clone());
        Ok(entry)
    }

    fn check_capacity(
        &self,
        sandboxes: &HashMap<String, Arc<Entry>>,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<(), ManagerError> {
        let config = &self.config;
        if vcpus > config.host_vcpus || u64::from(memory_mib) > config.host_memory_mib {
            return Err(ManagerError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "a sandbox of {vcpus} vCPUs and {memory_mib} MiB does not fit this host ({} vCPUs, {} MiB)",
                    config.host_vcpus, config.host_memory_mib
                ),
            ));
        }
        let (used_vcpus, used_mib) = sandboxes
            .values()
            .map(|e| e.record())
            .filter(|r| matches!(r.state, State::Creating | State::Running | State::Resuming))
            .fold((0u32, 0u64), |(c, m), r| {
                (c + r.vcpus, m + u64::from(r.memory_mib))
            });
        if used_vcpus + vcpus > config.vcpus_total
            || used_mib + u64::from(memory_mib) > config.memory_mib_total
        {
            return Err(ManagerError::new(
                ErrorCode::ResourceExhausted,
                format!(
                    "this host is full: {used_vcpus} of {} vCPUs and {used_mib} of {} MiB are taken; pause or destroy a sandbox",
                    config.vcpus_total, config.memory_mib_total
                ),
            ));
        }
        Ok(())
    }

    fn forget(&self, id: &str) {
        self.sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Restores `record.build_id` lazily on a free slot and hands envd the sandbox's settings.
    /// `current_token` is the token the frozen envd holds (none for a fresh template).
    async fn start_vm(
        &self,
        record: &Record,
        egress: &Egress,
        current_token: Option<&str>,
    ) -> Result<Running, ManagerError> {
        let id = &record.sandbox_id;
        let build = parse_build(&record.build_id)?;
        let mut starting = self.begin(id).await?;
        match self
            .restore_into(record, build, egress, current_token, &mut starting)
            .await
        {
            Ok(envd) => Ok(Running {
                vmm: starting.vmm.take().expect("set by restore_into"),
                slot: starting.slot.take().expect("set above"),
                pages: starting.pages.take(),
                envd,
            }),
            Err(e) => {
                starting.abort(&self.slots).await;
                let _ = std::fs::remove_dir_all(self.vmm_dir(id));
                Err(e)
            }
        }
    }

    async fn restore_into(
        &self,
        record: &Record,
        build: BuildId,
        egress: &Egress,
        current_token: Option<&str>,
        starting: &mut Starting,
    ) -> Result<EnvdClient, ManagerError> {
        let id = &record.sandbox_id;
        let slot = starting.slot.as_ref().expect("begin takes a slot");
        let vmm_dir = self.vmm_dir(id);
        let overlay = self.sandbox_dir(id).join("rootfs.overlay");
        let _ = std::fs::remove_file(&overlay);
        // Before the guest runs a single instruction. A slot comes fresh from the pool,
        // allowing everything: only a policy costs a call (an `nft` run, slow on a busy host).
        if !egress.allow.is_empty() || !egress.deny.is_empty() {
            slot.set_egress(egress)
                .await
                .map_err(|e| ManagerError::internal("applying the egress policy", &e))?;
        }
        let uffd_socket = vmm_dir.join("uffd.sock");
        starting.pages = Some(
            self.pages
                .serve(id, &uffd_socket, build, false)
                .map_err(|e| ManagerError::internal("serving the snapshot's memory", &e))?,
        );
        let vmm = Vmm::spawn(self.vmm_config(id, slot)).await.map_err(|e| {
            ManagerError::new(
                ErrorCode::Internal,
                format!("starting wrenn-vmm: {}", chain(&e)),
            )
        })?;
        let vmm = starting.vmm.insert(vmm);
        let restore = RestoreSpec {
            store: self.store.root().to_owned(),
            build_id: build.to_string(),
            memory: MemorySource::Uffd(uffd_socket),
            taps: vec![(NET_IFACE.to_owned(), slot.tap_name().to_owned())],
            drives: vec![(ROOT_DRIVE.to_owned(), overlay)],
            resume: true,
            track_dirty_pages: true,
            console: Some(vmm_dir.join(CONSOLE_FILE)),
        };
        vmm.restore(&restore).await.map_err(|e| {
            ManagerError::new(
                ErrorCode::Internal,
                format!("restoring build {build}: {}", chain(&e)),
            )
        })?;
        let mut envd = EnvdClient::new(slot.envd_address(), current_token.map(str::to_owned))
            .with_sandbox_id(id.clone());
        wait_ready(vmm, &envd, RESTORE_READY_TIMEOUT)
            .await
            .map_err(|e| {
                ManagerError::new(
                    ErrorCode::Unavailable,
                    format!("sandbox {id:?} did not come up after the restore: {e}"),
                )
            })?;
        let init = InitRequest {
            env_vars: record.env_vars.clone(),
            access_token: Some(record.access_token.clone()),
            sandbox_id: Some(id.clone()),
            template_id: Some(record.template.clone()),
            ..InitRequest::default()
        };
        envd.init(&init).await.map_err(|e| {
            ManagerError::new(
                ErrorCode::Unavailable,
                format!("envd in sandbox {id:?} refused /init: {}", chain(&e)),
            )
        })?;
        envd.set_access_token(Some(record.access_token.clone()));
        Ok(envd)
    }

    fn vmm_config(&self, id: &str, slot: &Slot) -> VmmConfig {
        VmmConfig {
            binary: self.config.vmm_binary.clone(),
            sandbox_id: id.to_owned(),
            run_dir: self.vmm_dir(id),
            netns: Some(slot.netns_path()),
            // Snapshots write into the store by path; everything else is opened before the
            // jail closes.
            keep: vec![self.store.root().to_owned()],
            // A restarted agent serves memory again on the same socket within this.
            page_server_grace: Some(PAGE_SERVER_GRACE),
        }
    }

    // ---- exec and files --------------------------------------------------------------------

    /// envd of a running sandbox.
    async fn envd(&self, id: &str) -> Result<EnvdClient, ManagerError> {
        let entry = self.entry(id)?;
        let live = entry.live.lock().await;
        match live.as_ref() {
            Some(running) => Ok(running.envd.clone()),
            None => Err(not_running(&entry.record())),
        }
    }

    pub async fn exec(&self, id: &str, spec: &ExecSpec) -> Result<ExecOutput, ManagerError> {
        let envd = self.envd(id).await?;
        let started = Instant::now();
        let out = envd
            .exec(spec, self.config.exec_output_limit)
            .await
            .map_err(envd_error)?;
        self.metrics.exec(started.elapsed());
        Ok(out)
    }

    pub async fn exec_stream(
        &self,
        id: &str,
        spec: &ExecSpec,
    ) -> Result<
        impl futures::Stream<Item = Result<crate::envd::ExecEvent, ManagerError>> + Send + 'static,
        ManagerError,
    > {
        use futures::StreamExt;
        let envd = self.envd(id).await?;
        let stream = envd.exec_stream(spec).await.map_err(envd_error)?;
        Ok(stream.map(|event| event.map_err(envd_error)))
    }

    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        body: impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<u64, ManagerError> {
        let envd = self.envd(id).await?;
        envd.write_file(path, user, body).await.map_err(envd_error)
    }

    pub async fn read_file(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<
        impl futures::Stream<Item = Result<Bytes, ManagerError>> + Send + 'static,
        ManagerError,
    > {
        use futures::StreamExt;
        let envd = self.envd(id).await?;
        let stream = envd.read_file(path, user).await.map_err(envd_error)?;
        Ok(stream.map(|chunk| chunk.map_err(envd_error)))
    }

    // ---- pause, resume, snapshot -----------------------------------------------------------

    /// Writes what the sandbox changed since its last snapshot, then frees its VMM, slot and
    /// memory. Returns the record and the bytes written.
    pub async fn pause(&self, id: &str) -> Result<(Record, u64), ManagerError> {
        let started = Instant::now();
        let entry = self.entry(id)?;
        let mut live = entry.live.lock().await;
        let Some(mut running) = live.take() else {
            return Err(not_running(&entry.record()));
        };
        entry.update(|r| r.state = State::Pausing);
        let build = match self.snapshot_running(&mut running, id).await {
            Ok(build) => build,
            Err(e) => {
                // The VM is still there: let it go on.
                let _ = running.vmm.resume().await;
                *live = Some(running);
                entry.update(|r| r.state = State::Running);
                return Err(e);
            }
        };
        self.release(id, running).await;
        let written = build_bytes(&self.store, build);
        let record = entry.update(|r| {
            r.state = State::Paused;
            r.build_id = build.to_string();
            r.own_builds.push(build.to_string());
            r.slot = None;
            r.host_address = None;
            r.vmm_pid = None;
        });
        self.save(&record);
        self.share_sandbox(&record, build).await;
        self.unpend(build);
        self.metrics.paused(started.elapsed(), written);
        tracing::info!(sandbox_id = %id, %build, written, took_ms = started.elapsed().as_millis(), "sandbox paused");
        Ok((record, written))
    }

    /// Pauses the VM and writes a Diff snapshot into a new build (marked pending: the caller
    /// records it, then calls `unpend`). The VM stays paused.
    async fn snapshot_running(
        &self,
        running: &mut Running,
        id: &str,
    ) -> Result<BuildId, ManagerError> {
        let build =
            BuildId::random().map_err(|e| ManagerError::internal("making a build id", &e))?;
        self.pend(build);
        let result = async {
            running.vmm.pause().await?;
            running
                .vmm
                .snapshot(&SnapshotSpec {
                    kind: SnapshotKind::Diff,
                    store: self.store.root().to_owned(),
                    build_id: build.to_string(),
                })
                .await
        }
        .await;
        if let Err(e) = result {
            self.unpend(build);
            let _ = std::fs::remove_dir_all(self.store.build_dir(build));
            return Err(ManagerError::new(
                ErrorCode::Internal,
                format!("snapshotting sandbox {id:?}: {}", chain(&e)),
            ));
        }
        Ok(build)
    }

    /// Stops a running sandbox's VMM and gives back its slot, memory and files.
    async fn release(&self, id: &str, mut running: Running) {
        if let Err(e) = running.vmm.stop(STOP_GRACE).await {
            tracing::warn!(sandbox_id = %id, error = %chain(&e), "stopping the VMM");
        }
        if let Some(mut pages) = running.pages.take() {
            let _ = tokio::task::spawn_blocking(move || pages.stop()).await;
        }
        self.slots.release(running.slot).await;
        let _ = std::fs::remove_file(self.sandbox_dir(id).join("rootfs.overlay"));
        let _ = std::fs::remove_dir_all(self.vmm_dir(id));
    }

    /// Restores a paused sandbox on a free slot.
    pub async fn resume(&self, id: &str, timeout_seconds: u32) -> Result<Record, ManagerError> {
        let started = Instant::now();
        let entry = match self.entry(id) {
            Ok(entry) => entry,
            Err(e) => self.paused_elsewhere(id).await?.ok_or(e)?,
        };
        let mut live = entry.live.lock().await;
        let record = entry.record();
        if record.state != State::Paused {
            return Err(ManagerError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "sandbox {id:?} is {}, not paused: only a paused sandbox can be resumed",
                    record.state.name()
                ),
            ));
        }
        {
            let sandboxes = self
                .sandboxes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.check_capacity(&sandboxes, record.vcpus, record.memory_mib)?;
        }
        self.fetch(&record.build_id).await?;
        entry.update(|r| r.state = State::Resuming);
        let egress = Egress {
            allow: record.egress.allow.clone(),
            deny: record.egress.deny.clone(),
        };
        match self
            .start_vm(&record, &egress, Some(&record.access_token))
            .await
        {
            Ok(running) => {
                let timeout = if timeout_seconds > 0 {
                    timeout_seconds
                } else {
                    record.timeout_seconds
                };
                let record = entry.update(|r| {
                    r.state = State::Running;
                    r.slot = Some(running.slot.index());
                    r.host_address = Some(running.slot.host_address().to_string());
                    r.vmm_pid = Some(running.vmm.pid());
                    r.timeout_seconds = timeout;
                    r.expires_at_ms = sandbox::expiry(timeout);
                });
                self.save(&record);
                *live = Some(running);
                self.metrics.resumed(started.elapsed());
                tracing::info!(sandbox_id = %id, took_ms = started.elapsed().as_millis(), "sandbox resumed");
                Ok(record)
            }
            Err(e) => {
                entry.update(|r| r.state = State::Paused);
                Err(e)
            }
        }
    }

    /// Sets when the sandbox is reaped, from now.
    pub fn set_timeout(&self, id: &str, timeout_seconds: u32) -> Result<Record, ManagerError> {
        let entry = self.entry(id)?;
        let record = entry.update(|r| {
            r.timeout_seconds = timeout_seconds;
            r.expires_at_ms = sandbox::expiry(timeout_seconds);
        });
        self.save(&record);
        Ok(record)
    }

    /// Names the sandbox's current state as a template. A running sandbox is paused for the
    /// snapshot and goes on; a paused one's last build is named as it is.
    pub async fn create_snapshot(&self, id: &str, name: &str) -> Result<Template, ManagerError> {
        templates::validate_name(name)?;
        if self.templates.get(name).is_ok() {
            return Err(templates::TemplateError::Exists(name.to_owned()).into());
        }
        let entry = self.entry(id)?;
        let mut live = entry.live.lock().await;
        let build = match live.as_mut() {
            Some(running) => {
                let build = self.snapshot_running(running, id).await;
                let resumed = running.vmm.resume().await;
                let build = build?;
                if let Err(e) = resumed {
                    tracing::error!(sandbox_id = %id, error = %chain(&e), "the sandbox did not resume after its snapshot");
                }
                let record = entry.update(|r| r.own_builds.push(build.to_string()));
                self.save(&record);
                build
            }
            None => {
                let record = entry.record();
                if record.state != State::Paused {
                    return Err(not_running(&record));
                }
                parse_build(&record.build_id)?
            }
        };
        let record = entry.record();
        let template = Template {
            name: name.to_owned(),
            build_id: build.to_string(),
            vcpus: record.vcpus,
            memory_mib: record.memory_mib,
            created_at_ms: sandbox::now_ms(),
            source_sandbox_id: Some(id.to_owned()),
            envd_access_token: Some(record.access_token.clone()),
        };
        let inserted = self.templates.insert(template.clone(), false);
        if inserted.is_ok() {
            self.share_template(&template).await;
        }
        self.unpend(build);
        inserted?;
        tracing::info!(sandbox_id = %id, template = %name, %build, "snapshot named as a template");
        Ok(template)
    }

    /// Forgets a template; its files go once nothing uses them.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), ManagerError> {
        self.templates.remove(name)?;
        if let Err(e) = self.storage.delete_record(RecordKind::Template, name).await {
            tracing::warn!(template = %name, error = %chain(&e), "the shared template record stays");
        }
        self.collect_garbage().await;
        Ok(())
    }

    // ---- destroy ---------------------------------------------------------------------------

    /// Stops the sandbox, whatever its state, and removes everything it had.
    pub async fn destroy(&self, id: &str) -> Result<(), ManagerError> {
        let entry = self.entry(id)?;
        let mut live = entry.live.lock().await;
        entry.update(|r| r.state = State::Stopping);
        if let Some(running) = live.take() {
            self.release(id, running).await;
        }
        entry.update(|r| r.state = State::Stopped);
        self.forget(id);
        let _ = std::fs::remove_dir_all(self.sandbox_dir(id));
        let _ = std::fs::remove_dir_all(self.vmm_dir(id));
        drop(live);
        if let Err(e) = self.storage.delete_record(RecordKind::Sandbox, id).await {
            tracing::warn!(sandbox_id = %id, error = %chain(&e), "the shared sandbox record stays");
        }
        self.metrics.destroyed();
        tracing::info!(sandbox_id = %id, "sandbox destroyed");
        self.collect_garbage().await;
        Ok(())
    }

    /// Destroys every running sandbox whose time is up.
    pub async fn reap(&self) -> usize {
        let now = sandbox::now_ms();
        let expired: Vec<String> = self
            .entries()
            .iter()
            .map(|e| e.record())
            .filter(|r| r.state == State::Running && r.expires_at_ms.is_some_and(|t| t <= now))
            .map(|r| r.sandbox_id)
            .collect();
        let mut reaped = 0;
        for id in expired {
            // Extended meanwhile?
            if self
                .get(&id)
                .is_ok_and(|r| r.expires_at_ms.is_none_or(|t| t > sandbox::now_ms()))
            {
                continue;
            }
            tracing::info!(sandbox_id = %id, "timeout reached; reaping the sandbox");
            if self.destroy(&id).await.is_ok() {
                reaped += 1;
                self.metrics.reaped();
            }
        }
        reaped
    }

    /// Finds running sandboxes whose VMM exited behind the agent's back (killed, crashed): each
    /// is marked stopped with the reason and the VMM log's last lines, and its slot, memory and
    /// files are given back. The record stays (ListSandboxes shows it stopped) until it is
    /// destroyed. A sandbox busy with a request is looked at next time.
    pub async fn check_vms(&self) -> usize {
        let mut found = 0;
        for entry in self.entries() {
            if entry.record().state != State::Running {
                continue;
            }
            let Ok(mut live) = entry.live.try_lock() else {
                continue;
            };
            if live.as_ref().is_none_or(|running| running.vmm.is_running()) {
                continue;
            }
            let Some(running) = live.take() else {
                continue;
            };
            let id = entry.record().sandbox_id;
            let why = format!(
                "its VMM exited unexpectedly; the VMM log ends with:\n{}",
                tail(&running.vmm.log_path(), 5)
            );
            tracing::warn!(sandbox_id = %id, reason = %why, "a running sandbox's VMM is gone; stopping it");
            self.release(&id, running).await;
            let record = entry.update(|r| {
                r.state = State::Stopped;
                r.error = Some(why);
                r.slot = None;
                r.host_address = None;
                r.vmm_pid = None;
                r.expires_at_ms = None;
            });
            self.save(&record);
            self.metrics.vmm_exited();
            found += 1;
        }
        found
    }

    /// Runs the reaper until the manager is dropped.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let interval = self.config.reap_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(manager) = weak.upgrade() else {
                    return;
                };
                manager.reap().await;
                manager.check_vms().await;
            }
        });
    }

    /// Stops every running sandbox's VMM and forgets them, for a clean shutdown of tests:
    /// records stay on disk as they are.
    pub async fn shutdown(&self, destroy: bool) {
        for entry in self.entries() {
            let id = entry.record().sandbox_id;
            if destroy {
                let _ = self.destroy(&id).await;
            }
        }
        if destroy && let Err(e) = self.slots.destroy_all().await {
            tracing::warn!(error = %chain(&e), "removing network slots");
        }
    }

    // ---- templates -------------------------------------------------------------------------

    /// Boots an image, waits for envd, takes a Full snapshot as generation 0, then restores it
    /// once to record the pages a restore touches (the template's prefetch set).
    pub async fn build_template(&self, request: BuildRequest) -> Result<Built, ManagerError> {
        templates::validate_name(&request.name)?;
        if !request.replace && self.templates.get(&request.name).is_ok() {
            return Err(templates::TemplateError::Exists(request.name.clone()).into());
        }
        for (path, what) in [(&request.image, "image"), (&request.kernel, "kernel")] {
            if !path.is_file() {
                return Err(ManagerError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "the {what} {} is not a file on the agent's machine",
                        path.display()
                    ),
                ));
            }
        }
        if request.vcpus == 0 || request.memory_mib < 64 {
            return Err(ManagerError::new(
                ErrorCode::InvalidArgument,
                "a template needs at least 1 vCPU and 64 MiB of memory",
            ));
        }
        {
            let sandboxes = self
                .sandboxes
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.check_capacity(&sandboxes, request.vcpus, request.memory_mib)?;
        }
        let image = self.keep_image(&request.image).await?;
        let drive = DriveId::new(ROOT_DRIVE).expect("a valid drive id");
        let image_build = self
            .store
            .import_disk_image(&image, &drive)
            .map_err(|e| ManagerError::internal("importing the image", &e))?;
        self.pend(image_build);
        let build =
            BuildId::random().map_err(|e| ManagerError::internal("making a build id", &e))?;
        self.pend(build);
        let work_id = format!("template-{}", &build.to_string()[..12]);
        let result = self
            .boot_and_snapshot(&request, &work_id, image_build, build)
            .await;
        let boot = match result {
            Ok(boot) => boot,
            Err(e) => {
                self.unpend(build);
                self.unpend(image_build);
                let _ = std::fs::remove_dir_all(self.store.build_dir(build));
                self.collect_garbage().await;
                return Err(e);
            }
        };
        let prefetch_pages = match self.record_prefetch(&work_id, build).await {
            Ok(pages) => pages,
            Err(e) => {
                tracing::warn!(template = %request.name, error = %e, "no prefetch set recorded");
                0
            }
        };
        let template = Template {
            name: request.name.clone(),
            build_id: build.to_string(),
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            created_at_ms: sandbox::now_ms(),
            source_sandbox_id: None,
            envd_access_token: None,
        };
        let replaced = self.templates.insert(template.clone(), request.replace);
        if replaced.is_ok() {
            self.share_template(&template).await;
        }
        self.unpend(build);
        self.unpend(image_build);
        replaced?;
        self.collect_garbage().await;
        tracing::info!(template = %template.name, %build, boot_ms = boot.as_millis(), prefetch_pages, "template built");
        Ok(Built {
            template,
            boot,
            prefetch_pages,
        })
    }

    /// A hard link to (or, across file systems, a copy of) the image in the agent's data
    /// directory: the template's disk reads it for as long as the template lives, whatever
    /// happens to the original (a cache may prune it).
    async fn keep_image(&self, image: &Path) -> Result<PathBuf, ManagerError> {
        let id = BuildId::random().map_err(|e| ManagerError::internal("naming the image", &e))?;
        let kept = self
            .config
            .data_dir
            .join("images")
            .join(format!("{id}.ext4"));
        let (from, to) = (image.to_owned(), kept.clone());
        tokio::task::spawn_blocking(move || {
            if std::fs::hard_link(&from, &to).is_ok() {
                return Ok(());
            }
            copy_sparse(&from, &to).inspect_err(|_| {
                let _ = std::fs::remove_file(&to);
            })
        })
        .await
        .map_err(|e| ManagerError::internal("copying the image", &e))?
        .map_err(|e| ManagerError::internal(&format!("copying {}", image.display()), &e))?;
        Ok(kept)
    }

    /// A slot and an empty VMM directory for `id`: the start of every VM the agent runs.
    async fn begin(&self, id: &str) -> Result<Starting, ManagerError> {
        let slot = self.slots.acquire().await.map_err(|e| {
            ManagerError::new(
                ErrorCode::ResourceExhausted,
                format!("no network slot for {id:?}: {}", chain(&e)),
            )
        })?;
        let starting = Starting {
            slot: Some(slot),
            vmm: None,
            pages: None,
        };
        let dir = self.vmm_dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            let mut starting = starting;
            starting.abort(&self.slots).await;
            return Err(ManagerError::internal("creating the VMM directory", &e));
        }
        Ok(starting)
    }

    async fn boot_and_snapshot(
        &self,
        request: &BuildRequest,
        work_id: &str,
        image_build: BuildId,
        build: BuildId,
    ) -> Result<Duration, ManagerError> {
        let mut starting = self.begin(work_id).await?;
        let dir = self.vmm_dir(work_id);
        let result = async {
            let slot = starting.slot.as_ref().expect("begin takes a slot");
            let started = Instant::now();
            let vmm = Vmm::spawn(self.vmm_config(work_id, slot)).await.map_err(|e| {
                ManagerError::new(ErrorCode::Internal, format!("starting wrenn-vmm: {}", chain(&e)))
            })?;
            let vmm = starting.vmm.insert(vmm);
            let boot = BootSpec {
                kernel: request.kernel.clone(),
                boot_args: format!(
                    "{KERNEL_ARGS} {} envd.template_id={}",
                    crate::network::guest_kernel_ip_arg(),
                    request.name
                ),
                initrd: None,
                vcpus: u8::try_from(request.vcpus).unwrap_or(u8::MAX),
                mem_mib: u64::from(request.memory_mib),
                track_dirty_pages: true,
                drives: vec![DriveSpec {
                    drive_id: ROOT_DRIVE.to_owned(),
                    is_root_device: true,
                    read_only: false,
                    source: DriveSource::Layered {
                        store: self.store.root().to_owned(),
                        build_id: image_build.to_string(),
                        overlay: dir.join("rootfs.overlay"),
                    },
                }],
                network: Some(NetSpec {
                    iface_id: NET_IFACE.to_owned(),
                    tap: slot.tap_name().to_owned(),
                    guest_mac: Some(crate::network::GUEST_MAC.to_owned()),
                }),
                vsock_cid: Some(GUEST_CID),
                entropy: true,
                console: Some(dir.join(CONSOLE_FILE)),
            };
            vmm.boot(&boot).await.map_err(|e| {
                ManagerError::new(ErrorCode::InvalidArgument, format!("booting the image: {}", chain(&e)))
            })?;
            let envd = EnvdClient::new(slot.envd_address(), None);
            wait_ready(vmm, &envd, BOOT_READY_TIMEOUT).await.map_err(|e| {
                ManagerError::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "the image did not come up (is /usr/bin/envd in it?): {e}; the guest's console ended with:\n{}\nand the VMM's log with:\n{}",
                        tail(&dir.join(CONSOLE_FILE), 30),
                        tail(&dir.join(crate::vmm::LOG_FILE), 10),
                    ),
                )
            })?;
            let boot = started.elapsed();
            vmm.pause().await.map_err(|e| ManagerError::internal("pausing the VM", &e))?;
            vmm.snapshot(&SnapshotSpec {
                kind: SnapshotKind::Full,
                store: self.store.root().to_owned(),
                build_id: build.to_string(),
            })
            .await
            .map_err(|e| ManagerError::internal("taking the template's snapshot", &e))?;
            Ok(boot)
        }
        .await;
        starting.abort(&self.slots).await;
        let _ = std::fs::remove_dir_all(self.vmm_dir(work_id));
        result
    }

    /// Restores a new template once, recording the pages the restore and envd's first answers
    /// touch; they are saved as the build's prefetch set.
    async fn record_prefetch(&self, work_id: &str, build: BuildId) -> Result<usize, ManagerError> {
        let mut starting = self.begin(work_id).await?;
        let dir = self.vmm_dir(work_id);
        let result = async {
            let slot = starting.slot.as_ref().expect("begin takes a slot");
            let uffd_socket = dir.join("uffd.sock");
            starting.pages = Some(
                self.pages
                    .serve(work_id, &uffd_socket, build, true)
                    .map_err(|e| ManagerError::internal("serving the snapshot's memory", &e))?,
            );
            let vmm = Vmm::spawn(self.vmm_config(work_id, slot))
                .await
                .map_err(|e| {
                    ManagerError::new(
                        ErrorCode::Internal,
                        format!("starting wrenn-vmm: {}", chain(&e)),
                    )
                })?;
            let vmm = starting.vmm.insert(vmm);
            vmm.restore(&RestoreSpec {
                store: self.store.root().to_owned(),
                build_id: build.to_string(),
                memory: MemorySource::Uffd(uffd_socket),
                taps: vec![(NET_IFACE.to_owned(), slot.tap_name().to_owned())],
                drives: vec![(ROOT_DRIVE.to_owned(), dir.join("rootfs.overlay"))],
                resume: true,
                track_dirty_pages: true,
                console: Some(dir.join(CONSOLE_FILE)),
            })
            .await
            .map_err(|e| ManagerError::internal("restoring the new template", &e))?;
            let envd = EnvdClient::new(slot.envd_address(), None);
            wait_ready(vmm, &envd, RESTORE_READY_TIMEOUT)
                .await
                .map_err(|e| {
                    ManagerError::new(
                        ErrorCode::Internal,
                        format!("the new template did not come up after a restore: {e}"),
                    )
                })?;
            let spec = ExecSpec {
                cmd: "true".into(),
                ..ExecSpec::default()
            };
            envd.exec(&spec, 1024)
                .await
                .map_err(|e| ManagerError::internal("a first command after the restore", &e))?;
            Ok::<(), ManagerError>(())
        }
        .await;
        // The recording is merged when serving ends with the VMM's exit.
        if let Some(vmm) = starting.vmm.as_mut() {
            let _ = vmm.stop(STOP_GRACE).await;
        }
        if let Some(pages) = starting.pages.take() {
            let _ =
                tokio::task::spawn_blocking(move || pages.wait_timeout(Duration::from_secs(10)))
                    .await;
        }
        starting.abort(&self.slots).await;
        let _ = std::fs::remove_dir_all(self.vmm_dir(work_id));
        result?;
        self.pages
            .save_prefetch(build)
            .map_err(|e| ManagerError::internal("saving the prefetch set", &e))
    }

    // ---- storage ---------------------------------------------------------------------------

    /// A template of this host, or one another host shared through the object store.
    async fn template(&self, name: &str) -> Result<Template, ManagerError> {
        match self.templates.get(name) {
            Ok(template) => Ok(template),
            Err(templates::TemplateError::NotFound(_)) if self.storage.is_remote() => {
                let json = self
                    .storage
                    .get_record(RecordKind::Template, name)
                    .await
                    .map_err(|e| ManagerError::new(ErrorCode::Unavailable, chain(&e)))?
                    .ok_or_else(|| templates::TemplateError::NotFound(name.to_owned()))?;
                let template: Template = serde_json::from_slice(&json).map_err(|e| {
                    ManagerError::new(
                        ErrorCode::Internal,
                        format!("the shared record of template {name:?} is damaged: {e}"),
                    )
                })?;
                // Another request may have taken it meanwhile: either way it is here now.
                let _ = self.templates.insert(template.clone(), false);
                tracing::info!(template = %name, build = %template.build_id, "took a template shared by another host");
                Ok(template)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A sandbox paused on another host, as a local paused entry.
    async fn paused_elsewhere(&self, id: &str) -> Result<Option<Arc<Entry>>, ManagerError> {
        if !self.storage.is_remote() {
            return Ok(None);
        }
        let Some(json) = self
            .storage
            .get_record(RecordKind::Sandbox, id)
            .await
            .map_err(|e| ManagerError::new(ErrorCode::Unavailable, chain(&e)))?
        else {
            return Ok(None);
        };
        let mut record: Record = serde_json::from_slice(&json).map_err(|e| {
            ManagerError::new(
                ErrorCode::Internal,
                format!("the shared record of sandbox {id:?} is damaged: {e}"),
            )
        })?;
        record.state = State::Paused;
        record.slot = None;
        record.host_address = None;
        record.vmm_pid = None;
        let mut sandboxes = self
            .sandboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = sandboxes.get(id) {
            return Ok(Some(entry.clone()));
        }
        std::fs::create_dir_all(self.sandbox_dir(id))
            .map_err(|e| ManagerError::internal("creating the sandbox directory", &e))?;
        self.save(&record);
        let entry = Arc::new(Entry {
            record: Mutex::new(record),
            live: tokio::sync::Mutex::new(None),
        });
        sandboxes.insert(id.to_owned(), entry.clone());
        tracing::info!(sandbox_id = %id, "took a sandbox paused on another host");
        Ok(Some(entry))
    }

    /// Makes a build (and what it reads) present here, from the object store when needed.
    async fn fetch(&self, build: &str) -> Result<(), ManagerError> {
        let build = parse_build(build)?;
        if !self.storage.is_remote() {
            return Ok(());
        }
        self.pend(build);
        let fetched = self.storage.ensure_build(build).await;
        self.unpend(build);
        let report = fetched.map_err(|e| {
            ManagerError::new(
                ErrorCode::Unavailable,
                format!("fetching snapshot build {build}: {}", chain(&e)),
            )
        })?;
        if !report.fetched.is_empty() {
            tracing::info!(%build, builds = report.fetched.len(), bytes = report.bytes(), "fetched snapshot builds from the object store");
        }
        Ok(())
    }

    /// Shares a paused sandbox (its builds, then its record) so another host can resume it.
    /// A failure leaves it paused here, and is logged.
    async fn share_sandbox(&self, record: &Record, build: BuildId) {
        if !self.storage.is_remote() {
            return;
        }
        let id = &record.sandbox_id;
        let shared = async {
            self.storage.upload_build(build).await?;
            let json = serde_json::to_vec(record).unwrap_or_default();
            self.storage
                .put_record(RecordKind::Sandbox, id, &json)
                .await
        }
        .await;
        if let Err(e) = shared {
            tracing::error!(sandbox_id = %id, %build, error = %chain(&e), "the paused sandbox could not be shared; it can resume on this host only");
        }
    }

    /// Shares a template (its builds, prefetch set included, then its record).
    async fn share_template(&self, template: &Template) {
        if !self.storage.is_remote() {
            return;
        }
        let Ok(build) = template.build_id.parse::<BuildId>() else {
            tracing::error!(template = %template.name, build = %template.build_id, "not a build id; the template is not shared");
            return;
        };
        let shared = async {
            self.storage.upload_build(build).await?;
            let json = serde_json::to_vec(template).unwrap_or_default();
            self.storage
                .put_record(RecordKind::Template, &template.name, &json)
                .await
        }
        .await;
        if let Err(e) = shared {
            tracing::error!(template = %template.name, error = %chain(&e), "the template could not be shared; it is usable on this host only");
        }
    }

    fn pend(&self, build: BuildId) {
        self.pending_builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(build);
    }

    fn unpend(&self, build: BuildId) {
        self.pending_builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&build);
    }

    /// Removes every build that no template, sandbox or operation in progress uses, with the
    /// images only they used.
    pub async fn collect_garbage(&self) -> usize {
        let _one = self.collecting.lock().await;
        let mut roots: HashSet<BuildId> = self
            .pending_builds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for template in self.templates.list() {
            roots.extend(parse_build(&template.build_id).ok());
        }
        for record in self.list() {
            roots.extend(parse_build(&record.build_id).ok());
            roots.extend(record.own_builds.iter().filter_map(|b| parse_build(b).ok()));
        }
        let mut live = HashSet::new();
        for build in roots {
            live.insert(build);
            live.extend(referenced_builds(&self.store, build));
        }
        let Ok(dir) = std::fs::read_dir(self.store.root()) else {
            return 0;
        };
        let mut removed = 0;
        for entry in dir.flatten() {
            let Some(build) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<BuildId>().ok())
            else {
                continue;
            };
            if live.contains(&build) {
                continue;
            }
            self.pages.forget(build);
            // An imported image's data file links to the kept image: that goes too.
            if let Ok(dir) = std::fs::read_dir(entry.path()) {
                for file in dir.flatten() {
                    if let Ok(target) = std::fs::read_link(file.path())
                        && target.starts_with(self.config.data_dir.join("images"))
                    {
                        let _ = std::fs::remove_file(target);
                    }
                }
            }
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(%build, "removed a snapshot build nothing uses");
                }
                Err(e) => tracing::warn!(%build, error = %e, "cannot remove an unused build"),
            }
        }
        removed
    }

    // ---- restart ---------------------------------------------------------------------------

    /// Takes back what an earlier agent left: paused sandboxes as they are, running ones whose
    /// VMM still lives (their page server comes back on the same socket, where the VMM
    /// reconnects), and cleans the rest. Every decision is logged.
    async fn recover(&self, records: Vec<Record>, mut slots: HashMap<u32, Slot>) {
        for mut record in records {
            let id = record.sandbox_id.clone();
            match record.state {
                State::Paused => {
                    tracing::info!(sandbox_id = %id, build = %record.build_id, "found a paused sandbox; keeping it");
                }
                State::Running => match self.adopt(&record, &mut slots).await {
                    Ok(running) => {
                        tracing::info!(sandbox_id = %id, pid = running.vmm.pid(), "adopted a running sandbox");
                        self.sandboxes
                            .write()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(
                                id,
                                Arc::new(Entry {
                                    record: Mutex::new(record),
                                    live: tokio::sync::Mutex::new(Some(running)),
                                }),
                            );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox_id = %id, error = %e, "a running sandbox could not be adopted; it is lost and cleaned up");
                        self.clean_leftover(&record).await;
                        let _ = std::fs::remove_dir_all(self.sandbox_dir(&id));
                        continue;
                    }
                },
                other => {
                    // Interrupted in the middle of a change: whatever ran is stopped.
                    self.clean_leftover(&record).await;
                    if other == State::Pausing || other == State::Resuming {
                        // Its last complete state is its build: paused.
                        record.state = State::Paused;
                        record.slot = None;
                        record.vmm_pid = None;
                        tracing::warn!(sandbox_id = %id, was = other.name(), "an operation was interrupted; the sandbox is paused at its last snapshot");
                        self.save(&record);
                    } else {
                        tracing::warn!(sandbox_id = %id, was = other.name(), "an operation was interrupted; removing the sandbox");
                        let _ = std::fs::remove_dir_all(self.sandbox_dir(&id));
                        continue;
                    }
                }
            }
            self.sandboxes
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(
                    id,
                    Arc::new(Entry {
                        record: Mutex::new(record),
                        live: tokio::sync::Mutex::new(None),
                    }),
                );
        }
        // Leftover VMM directories of sandboxes that are gone.
        if let Ok(dir) = std::fs::read_dir(&self.config.run_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let known = self
                    .sandboxes
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&name)
                    .is_some_and(|e| e.record().state == State::Running);
                if !known {
                    tracing::info!(dir = %entry.path().display(), "removing a leftover VMM directory");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.collect_garbage().await;
    }

    async fn adopt(
        &self,
        record: &Record,
        slots: &mut HashMap<u32, Slot>,
    ) -> Result<Running, ManagerError> {
        let id = &record.sandbox_id;
        let (Some(pid), Some(index)) = (record.vmm_pid, record.slot) else {
            return Err(ManagerError::new(
                ErrorCode::Internal,
                "the record names no VMM or slot",
            ));
        };
        let vmm = Vmm::adopt(pid, &self.vmm_dir(id))
            .await
            .map_err(|e| ManagerError::internal("adopting the VMM", &e))?;
        let slot = slots.remove(&index).ok_or_else(|| {
            ManagerError::new(
                ErrorCode::Internal,
                format!("its network slot {index} is gone"),
            )
        })?;
        let build = parse_build(&record.build_id)?;
        // The VMM reconnects to its page server's socket (within its grace period).
        let pages = self
            .pages
            .serve(id, &self.vmm_dir(id).join("uffd.sock"), build, false)
            .map_err(|e| ManagerError::internal("serving memory again", &e))?;
        let envd = EnvdClient::new(slot.envd_address(), Some(record.access_token.clone()));
        Ok(Running {
            vmm,
            slot,
            pages: Some(pages),
            envd,
        })
    }

    /// Stops a VMM a record names, if it is still a wrenn-vmm, and removes its directory.
    async fn clean_leftover(&self, record: &Record) {
        if let Some(pid) = record.vmm_pid
            && let Ok(mut vmm) = Vmm::adopt(pid, &self.vmm_dir(&record.sandbox_id)).await
        {
            tracing::info!(sandbox_id = %record.sandbox_id, pid, "stopping a leftover VMM");
            let _ = vmm.stop(STOP_GRACE).await;
        }
        let _ = std::fs::remove_dir_all(self.vmm_dir(&record.sandbox_id));
    }
}

/// What a start has made so far, undone on failure.
struct Starting {
    slot: Option<Slot>,
    vmm: Option<Vmm>,
    pages: Option<wrenn_pager::VmHandle>,
}

impl Starting {
    async fn abort(&mut self, slots: &SlotPool) {
        if let Some(mut vmm) = self.vmm.take() {
            let _ = vmm.stop(STOP_GRACE).await;
        }
        if let Some(mut pages) = self.pages.take() {
            let _ = tokio::task::spawn_blocking(move || pages.stop()).await;
        }
        if let Some(slot) = self.slot.take() {
            slots.release(slot).await;
        }
    }
}

fn not_running(record: &Record) -> ManagerError {
    let hint = match record.state {
        State::Paused => "; resume it first",
        _ => "",
    };
    ManagerError::new(
        ErrorCode::FailedPrecondition,
        format!(
            "sandbox {:?} is {}, not running{hint}",
            record.sandbox_id,
            record.state.name()
        ),
    )
}

fn envd_error(e: crate::envd::EnvdError) -> ManagerError {
    ManagerError::new(e.code(), chain(&e))
}

fn parse_build(text: &str) -> Result<BuildId, ManagerError> {
    text.parse()
        .map_err(|_| ManagerError::new(ErrorCode::Internal, format!("{text:?} is not a build id")))
}

/// A fresh envd access token: 32 random bytes in hex.
fn new_token() -> Result<String, ManagerError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        ManagerError::new(
            ErrorCode::Internal,
            format!("no randomness for a token: {e}"),
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Bytes of the files a build holds itself.
fn build_bytes(store: &Store, build: BuildId) -> u64 {
    std::fs::read_dir(store.build_dir(build))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Every build the headers of `build` name.
fn referenced_builds(store: &Store, build: BuildId) -> Vec<BuildId> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(store.build_dir(build)) else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".header") {
            continue;
        }
        match wrenn_snapshot::header::Header::read(&entry.path()) {
            Ok(header) => out.extend(header.builds.iter().map(|b| b.id)),
            Err(e) => {
                tracing::warn!(%build, file = %name, error = %e, "cannot read a header while collecting");
            }
        }
    }
    out
}

/// Waits for envd's /health, giving up early when the VMM exits.
async fn wait_ready(vmm: &Vmm, envd: &EnvdClient, timeout: Duration) -> Result<(), String> {
    let health = envd.wait_healthy(timeout);
    tokio::pin!(health);
    loop {
        tokio::select! {
            result = &mut health => return result.map(|_| ()).map_err(|e| chain(&e)),
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if !vmm.is_running() {
                    return Err(format!(
                        "the VMM exited; its log ends with:\n{}",
                        tail(&vmm.log_path(), 5)
                    ));
                }
            }
        }
    }
}

/// Copies `from` to a new file `to`, leaving holes where `from` reads as zeros: a disk image
/// is mostly empty, and a plain copy across filesystems would write every zero.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    const CHUNK: usize = 1 << 20;
    let mut source = std::fs::File::open(from)?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    let mut buffer = vec![0u8; CHUNK];
    let mut length = 0u64;
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            let n = source.read(&mut buffer[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let chunk = &buffer[..filled];
        if chunk.iter().all(|&b| b == 0) {
            target.seek(SeekFrom::Current(i64::try_from(filled).unwrap_or(i64::MAX)))?;
        } else {
            target.write_all(chunk)?;
        }
        length += filled as u64;
    }
    target.set_len(length)?;
    target.sync_all()
}

/// The last `lines` lines of a text file, for errors (empty when unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Every record under `dir`; damaged ones are logged and skipped.
fn load_records(dir: &Path) -> Vec<Record> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match Record::load(&entry.path()) {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %chain(&e), "skipping a sandbox directory without a readable record")
            }
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_copy_sparse_keeps_the_bytes_and_leaves_zeros_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("image");
        // 8 MiB: data at the start, a zero MiB written out, data at the end.
        let mut bytes = vec![0u8; 8 << 20];
        bytes[..4096].fill(0xab);
        let tail = bytes.len() - 10;
        bytes[tail..].fill(0xcd);
        std::fs::write(&from, &bytes).unwrap();
        let to = dir.path().join("copy");
        copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), bytes);
        // Two data MiB allocated at most, not eight.
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(allocated <= 2 << 20, "{allocated} bytes allocated");
        // An existing file is never overwritten.
        assert!(copy_sparse(&from, &to).is_err());
    }
}
