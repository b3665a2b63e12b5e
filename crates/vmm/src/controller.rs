//! The VMM thread's brain: answers API requests, starts, pauses, resumes and stops the VM.
//!
//! It is an event-loop subscriber for three fds: the API thread's wake-up eventfd, the exit
//! eventfd (a vCPU or device saw the guest end), and the stop eventfd (SIGTERM/SIGINT). Device
//! subscribers are created when the VM starts; the loop in [`run`] registers them.

use std::io::Write;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde_json::json;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::api::models::{ActionType, InstanceInfo, MachineConfig, VmState, VmmConfig};
use crate::api::{ApiMessage, ApiRequest, ApiResponse};
use crate::builder::{self, Machine, Subscriber};
use crate::devices::bus::lock;
use crate::devices::serial::{ConsoleRing, DEFAULT_RING_BYTES};
use crate::lifecycle::{ExitNotifier, VmExit};
use crate::resources::Resources;

pub const APP_NAME: &str = "Wrenn";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The default for [`Controller::set_page_server_grace`].
pub const DEFAULT_PAGE_SERVER_GRACE: Duration = Duration::from_secs(30);

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

/// How the VMM confines itself once the VM is built (see CONFINEMENT.md).
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// Seccomp filters per thread kind, with this action for a denied call; `None` is off.
    pub seccomp: Option<crate::seccomp::DenyAction>,
    /// A private mount namespace whose root holds only the kept paths.
    pub new_root: bool,
    /// Paths reachable by name afterwards besides those the VM's config implies (the vsock
    /// socket's directory, the metrics file): e.g. the API socket's directory.
    pub keep: Vec<crate::jail::KeptPath>,
    pub drop_to: Option<crate::jail::Credentials>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Counters {
    api_requests: u64,
    api_faults: u64,
    pauses: u64,
    resumes: u64,
    snapshots: u64,
    last_snapshot_ms: u64,
    restores: u64,
    last_restore_ms: u64,
}

pub struct Controller {
    id: String,
    resources: Resources,
    machine: Option<Machine>,
    /// The store layer guest memory equals, after a layered snapshot or restore.
    lineage: crate::snapshot::Lineage,
    /// The page server serving guest memory, after a Uffd restore, until its watching thread
    /// starts with the vCPUs.
    pager: Option<crate::snapshot::uffd::UffdBackend>,
    /// The userfaultfd, held once the watching thread has the backend, until [`shutdown`]
    /// has stopped the vCPUs: a page server gone for good must hang faults, never turn them
    /// into zeros that a running guest could see.
    ///
    /// [`shutdown`]: Controller::shutdown
    uffd: Option<Arc<std::os::fd::OwnedFd>>,
    /// How long a page server that hung up has to come back before the VM stops.
    page_server_grace: Duration,
    paused: bool,
    exits: Arc<ExitNotifier>,
    exit_rx: mpsc::Receiver<VmExit>,
    ring: Arc<Mutex<ConsoleRing>>,
    api: Option<(mpsc::Receiver<ApiMessage>, EventFd)>,
    stop: EventFd,
    pending_subscribers: Vec<Subscriber>,
    exit: Option<VmExit>,
    counters: Counters,
    confinement: Confinement,
    created: Instant,
    boot_started: Option<Instant>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("id", &self.id)
            .field("state", &self.state())
            .finish()
    }
}

impl Controller {
    pub fn new(
        id: String,
        api: Option<(mpsc::Receiver<ApiMessage>, EventFd)>,
        confinement: Confinement,
    ) -> std::io::Result<Self> {
        let (exits, exit_rx) = ExitNotifier::new()?;
        Ok(Self {
            id,
            resources: Resources::default(),
            machine: None,
            lineage: None,
            pager: None,
            uffd: None,
            page_server_grace: DEFAULT_PAGE_SERVER_GRACE,
            paused: false,
            exits: Arc::new(exits),
            exit_rx,
            ring: Arc::new(Mutex::new(ConsoleRing::new(DEFAULT_RING_BYTES))),
            api,
            stop: EventFd::new(EFD_NONBLOCK)?,
            pending_subscribers: Vec::new(),
            exit: None,
            counters: Counters::default(),
            confinement,
            created: Instant::now(),
            boot_started: None,
        })
    }

    /// How long a page server (after a Uffd restore) that hung up may take to come back on
    /// the same socket before the VM stops; zero stops at once.
    pub fn set_page_server_grace(&mut self, grace: Duration) {
        self.page_server_grace = grace;
    }

    /// An fd that, written, stops the VM (for the SIGTERM handler).
    pub fn stop_event(&self) -> std::io::Result<EventFd> {
        self.stop.try_clone()
    }

    pub fn state(&self) -> &'static str {
        match (&self.machine, self.paused) {
            (None, _) => "Not started",
            (Some(_), false) => "Running",
            (Some(_), true) => "Paused",
        }
    }

    /// Applies a whole config file and starts the VM.
    pub fn start_from_config(&mut self, config: &VmmConfig) -> Result<(), String> {
        self.resources = Resources::from_config(config).map_err(|e| e.to_string())?;
        self.apply_ring_size();
        self.start()
    }

    fn apply_ring_size(&mut self) {
        let bytes = self
            .resources
            .serial
            .ring_buffer_bytes
            .unwrap_or(DEFAULT_RING_BYTES);
        *lock(&self.ring) = ConsoleRing::new(bytes);
    }

    fn start(&mut self) -> Result<(), String> {
        if self.machine.is_some() {
            return Err(NOT_AFTER_START.into());
        }
        self.boot_started = Some(Instant::now());
        let (machine, subscribers) = builder::build(&self.resources, &self.exits, &self.ring)
            .map_err(|e| crate::diag::error_chain(&e))?;
        tracing::info!(
            since_start_ms = self.created.elapsed().as_millis(),
            vcpus = self.resources.machine.vcpu_count,
            mem_mib = self.resources.machine.mem_size_mib,
            cmdline = %machine.cmdline,
            "VM built"
        );
        self.machine = Some(machine);
        self.pending_subscribers = subscribers;
        Ok(())
    }

    /// After the loop registered the new device subscribers: confine the process, run the
    /// vCPUs (born confined), then filter this thread. Once, at the first call with a VM.
    fn start_vcpus(&mut self) {
        let needs_start = self
            .machine
            .as_ref()
            .is_some_and(|m| m.vcpus.is_empty() && !m.vcpu_fds.is_empty());
        if !needs_start {
            return;
        }
        if let Err(e) = self.confine_and_start() {
            self.exit = Some(VmExit::Error(e));
        }
    }

    fn confine_and_start(&mut self) -> Result<(), String> {
        // Limits, no_new_privs and non-dumpable always; the new root only when asked.
        let plan = self.jail_plan()?;
        crate::jail::confine(&plan).map_err(|e| crate::diag::error_chain(&e))?;
        let seccomp = self.confinement.seccomp;
        // Born inside the jail, and before the VMM filter (which forbids new threads).
        if let Some(backend) = self.pager.take() {
            self.uffd = Some(backend.uffd.clone());
            let exits = self.exits.clone();
            backend
                .watch(self.page_server_grace, seccomp, move |reason| {
                    exits.report(VmExit::Error(reason));
                })
                .map_err(|e| format!("starting the page server thread: {e}"))?;
        }
        if let Some(machine) = &mut self.machine {
            machine
                .start_vcpus(&self.exits, seccomp)
                .map_err(|e| e.to_string())?;
        }
        if let Some(action) = seccomp {
            crate::seccomp::apply_with(crate::seccomp::ThreadKind::Vmm, action)
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(
            since_start_ms = self.created.elapsed().as_millis(),
            seccomp = ?seccomp,
            jail = self.confinement.new_root,
            "vCPUs running"
        );
        Ok(())
    }

    /// The jail for this VM: what it still opens by name, and a file-size limit that covers
    /// its largest drive.
    fn jail_plan(&self) -> Result<crate::jail::JailPlan, String> {
        use crate::jail::{Access, JailPlan, ResourceLimits, file_size_limit};
        let mut plan = JailPlan {
            new_root: self.confinement.new_root,
            keep: self.confinement.keep.clone(),
            drop_to: self.confinement.drop_to,
            limits: ResourceLimits {
                file_size: Some(file_size_limit(self.resources.drives.iter().filter_map(
                    |d| {
                        let path = d.path_on_host.as_deref()?;
                        std::fs::metadata(path).ok().map(|m| m.len())
                    },
                ))),
                ..ResourceLimits::default()
            },
            ..JailPlan::default()
        };
        // Guest-initiated vsock connections dial `<uds_path>_<port>` by name.
        if let Some(dir) = self.resources.vsock.as_ref().and_then(|v| {
            std::path::Path::new(&v.uds_path)
                .parent()
                .map(ToOwned::to_owned)
        }) {
            plan = plan.keep(dir, Access::ReadWrite);
        }
        // A page server that hung up is reconnected to by path: keep its socket's directory
        // (not the socket itself: a new server binds a new socket file there).
        if let Some(dir) = self
            .pager
            .as_ref()
            .and_then(|p| p.socket.parent().filter(|d| !d.as_os_str().is_empty()))
            .filter(|_| !self.page_server_grace.is_zero())
        {
            plan = plan.keep(dir, Access::ReadWrite);
        }
        // FlushMetrics appends to this file: it must exist to be kept.
        if let Some(metrics) = &self.resources.metrics {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics.metrics_path)
                .map_err(|e| format!("metrics file {}: {e}", metrics.metrics_path))?;
            plan = plan.keep(&metrics.metrics_path, Access::ReadWrite);
        }
        Ok(plan)
    }

    fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        self.counters.api_requests += 1;
        let response = self.dispatch(request);
        if let ApiResponse::Fault(message) = &response {
            self.counters.api_faults += 1;
            tracing::info!(%message, "API request refused");
        }
        response
    }

    fn dispatch(&mut self, request: ApiRequest) -> ApiResponse {
        let started = self.machine.is_some();
        let pre_boot = |this: &mut Self, f: &dyn Fn(&mut Resources) -> Result<(), String>| {
            if started {
                return ApiResponse::Fault(NOT_AFTER_START.into());
            }
            match f(&mut this.resources) {
                Ok(()) => ApiResponse::NoContent,
                Err(e) => ApiResponse::Fault(e),
            }
        };
        match request {
            ApiRequest::GetInstanceInfo => json_of(&InstanceInfo {
                id: self.id.clone(),
                state: self.state().into(),
                vmm_version: VERSION.into(),
                app_name: APP_NAME.into(),
            }),
            ApiRequest::GetVersion => ApiResponse::Json(
                json!({ "firecracker_version": VERSION, "wrenn_vmm_version": VERSION }),
            ),
            ApiRequest::GetMachineConfig => json_of::<MachineConfig>(&self.resources.machine),
            ApiRequest::GetVmConfig => json_of(&self.resources.to_config()),
            ApiRequest::GetMetrics => ApiResponse::Json(self.metrics()),
            ApiRequest::GetSerial => ApiResponse::Bytes(lock(&self.ring).contents()),
            ApiRequest::PutBootSource(b) => pre_boot(self, &|r| {
                r.set_boot_source(b.clone()).map_err(|e| e.to_string())
            }),
            ApiRequest::PutMachineConfig(m) => pre_boot(self, &|r| {
                r.set_machine(m.clone()).map_err(|e| e.to_string())
            }),
            ApiRequest::PatchMachineConfig(u) => pre_boot(self, &|r| {
                r.update_machine(u.clone()).map_err(|e| e.to_string())
            }),
            ApiRequest::PutDrive(d) => {
                pre_boot(self, &|r| r.set_drive(d.clone()).map_err(|e| e.to_string()))
            }
            ApiRequest::PutNetworkInterface(n) => {
                pre_boot(self, &|r| r.set_net(n.clone()).map_err(|e| e.to_string()))
            }
            ApiRequest::PutVsock(v) => {
                pre_boot(self, &|r| r.set_vsock(v.clone()).map_err(|e| e.to_string()))
            }
            ApiRequest::PutEntropy(e) => pre_boot(self, &|r| {
                r.set_entropy(e.clone()).map_err(|e| e.to_string())
            }),
            ApiRequest::PutSerial(s) => {
                let response = pre_boot(self, &|r| {
                    r.serial = s.clone();
                    Ok(())
                });
                if response == ApiResponse::NoContent {
                    self.apply_ring_size();
                }
                response
            }
            ApiRequest::PutLogger(_) => ApiResponse::NoContent,
            ApiRequest::PutMetrics(m) => {
                self.resources.metrics = Some(m);
                ApiResponse::NoContent
            }
            ApiRequest::Action(ActionType::InstanceStart) => match self.start() {
                Ok(()) => ApiResponse::NoContent,
                Err(e) => ApiResponse::Fault(e),
            },
            ApiRequest::Action(ActionType::SendCtrlAltDel) => match &self.machine {
                None => ApiResponse::Fault(NOT_BEFORE_START.into()),
                Some(m) => match lock(&m.i8042).send_ctrl_alt_del() {
                    Ok(()) => ApiResponse::NoContent,
                    Err(e) => ApiResponse::Fault(format!("SendCtrlAltDel: {e}")),
                },
            },
            ApiRequest::Action(ActionType::FlushMetrics) => self.flush_metrics(),
            ApiRequest::PatchVm(state) => self.set_vm_state(state),
            ApiRequest::CreateSnapshot(params) => self.create_snapshot(&params),
            ApiRequest::LoadSnapshot(params) => self.load_snapshot(&params),
        }
    }

    fn create_snapshot(
        &mut self,
        params: &crate::api::models::SnapshotCreateParams,
    ) -> ApiResponse {
        let Some(machine) = &self.machine else {
            return ApiResponse::Fault(NOT_BEFORE_START.into());
        };
        if !self.paused {
            return ApiResponse::Fault(crate::snapshot::SnapshotError::NotPaused.to_string());
        }
        let started = Instant::now();
        match crate::snapshot::create(machine, &self.resources, params, &mut self.lineage) {
            Ok(()) => {
                // Layered drives now read through the new build.
                if let Some(layers) = &params.layers {
                    for drive in &mut self.resources.drives {
                        if let Some(l) = &mut drive.layers {
                            l.store.clone_from(&layers.store);
                            l.build_id.clone_from(&layers.build_id);
                        }
                    }
                }
                self.counters.snapshots += 1;
                self.counters.last_snapshot_ms = millis(started);
                ApiResponse::NoContent
            }
            Err(e) => ApiResponse::Fault(format!("snapshot: {}", crate::diag::error_chain(&e))),
        }
    }

    fn load_snapshot(&mut self, params: &crate::api::models::SnapshotLoadParams) -> ApiResponse {
        if self.machine.is_some() {
            return ApiResponse::Fault(NOT_AFTER_START.into());
        }
        let started = Instant::now();
        self.boot_started = Some(started);
        let restored = match crate::snapshot::load(params, &self.resources, &self.exits, &self.ring)
        {
            Ok(r) => r,
            Err(e) => {
                return ApiResponse::Fault(format!(
                    "snapshot load: {}",
                    crate::diag::error_chain(&e)
                ));
            }
        };
        self.resources = restored.resources;
        self.apply_ring_size();
        self.paused = restored.machine.start_paused;
        self.machine = Some(restored.machine);
        self.pending_subscribers = restored.subscribers;
        self.pager = restored.uffd;
        self.lineage = restored.lineage;
        self.counters.restores += 1;
        self.counters.last_restore_ms = millis(started);
        tracing::info!(
            since_start_ms = self.created.elapsed().as_millis(),
            state = self.state(),
            "VM restored"
        );
        ApiResponse::NoContent
    }

    fn set_vm_state(&mut self, state: VmState) -> ApiResponse {
        let Some(machine) = &self.machine else {
            return ApiResponse::Fault(NOT_BEFORE_START.into());
        };
        let result = match (state, self.paused) {
            (VmState::Paused, true) | (VmState::Resumed, false) => Ok(()),
            (VmState::Paused, false) => machine.pause().map(|()| {
                self.paused = true;
                self.counters.pauses += 1;
            }),
            (VmState::Resumed, true) => machine.resume().map(|()| {
                self.paused = false;
                self.counters.resumes += 1;
            }),
        };
        match result {
            Ok(()) => {
                tracing::info!(state = self.state(), "VM state changed");
                ApiResponse::NoContent
            }
            Err(e) => ApiResponse::Fault(e.to_string()),
        }
    }

    fn metrics(&self) -> serde_json::Value {
        json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            "vmm": {
                "uptime_ms": self.created.elapsed().as_millis(),
                "state": self.state(),
                "vcpu_count": self.resources.machine.vcpu_count,
                "mem_size_mib": self.resources.machine.mem_size_mib,
                "virtio_devices": self.machine.as_ref().map_or(0, |m| m.virtio.len()),
            },
            "api": &self.counters,
            "devices": self.machine.as_ref().map_or_else(Vec::new, |m| {
                m.virtio
                    .iter()
                    .map(|d| {
                        let d = lock(d);
                        json!({
                            "type": crate::virtio::type_name(d.device_type()),
                            "activated": d.is_activated(),
                            "counters": d.metrics(),
                        })
                    })
                    .collect()
            }),
        })
    }

    fn flush_metrics(&self) -> ApiResponse {
        let Some(config) = &self.resources.metrics else {
            return ApiResponse::Fault(
                "FlushMetrics: no metrics_path configured (PUT /metrics)".into(),
            );
        };
        let line = format!("{}\n", self.metrics());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.metrics_path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        match written {
            Ok(()) => ApiResponse::NoContent,
            Err(e) => ApiResponse::Fault(format!("FlushMetrics: {}: {e}", config.metrics_path)),
        }
    }

    fn serve_api(&mut self) {
        let Some((rx, wake)) = &self.api else { return };
        let _ = wake.read();
        let messages: Vec<ApiMessage> = rx.try_iter().collect();
        for message in messages {
            let response = self.handle(message.request);
            let _ = message.reply.send(response);
        }
    }

    /// Why the VM ended, once it has.
    pub fn exit(&self) -> Option<&VmExit> {
        self.exit.as_ref()
    }

    /// Stops the vCPUs, then lets go of the userfaultfd, then releases the VM, in that order.
    ///
    /// The order matters after a lazy restore whose page server is gone: a guest with KVM
    /// async page faults hands a missing page to a kernel worker, which sleeps in the
    /// userfaultfd where no signal reaches it; destroying the VM waits for that worker, so
    /// with the userfaultfd still open the VMM would sleep in `D` state forever. Closing our
    /// last copy of the userfaultfd (the `wrenn-uffd` thread has dropped its own once it gave
    /// up) wakes every waiter, and the page then fills as plain anonymous memory. That is
    /// harmless only because no vCPU runs any more, hence after `stop`.
    pub fn shutdown(&mut self) {
        let machine = self.machine.take().map(|mut machine| {
            machine.stop();
            machine
        });
        self.pager = None;
        self.uffd = None;
        drop(machine);
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn json_of<T: serde::Serialize>(value: &T) -> ApiResponse {
    match serde_json::to_value(value) {
        Ok(v) => ApiResponse::Json(v),
        Err(e) => ApiResponse::Fault(e.to_string()),
    }
}

const TOKEN_API: u32 = 1;
const TOKEN_EXIT: u32 = 2;
const TOKEN_STOP: u32 = 3;

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &EventFd, token| {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                tracing::error!(error = ?e, "registering a VMM event");
            }
        };
        if let Some((_, wake)) = &self.api {
            add(wake, TOKEN_API);
        }
        add(self.exits.event(), TOKEN_EXIT);
        add(&self.stop, TOKEN_STOP);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_API => self.serve_api(),
            TOKEN_EXIT => {
                let _ = self.exits.event().read();
                if let Ok(exit) = self.exit_rx.try_recv() {
                    tracing::info!(?exit, "guest ended");
                    self.exit.get_or_insert(exit);
                }
            }
            TOKEN_STOP => {
                let _ = self.stop.read();
                tracing::info!("asked to stop");
                self.exit.get_or_insert(VmExit::Shutdown);
            }
            _ => {}
        }
    }
}

/// Runs the VMM thread's loop until the VM ends; returns why.
pub fn run(controller: Arc<Mutex<Controller>>) -> Result<VmExit, std::io::Error> {
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(|e| std::io::Error::other(format!("epoll: {e:?}")))?;
    events.add_subscriber(controller.clone());
    loop {
        {
            let mut c = lock(&controller);
            for s in std::mem::take(&mut c.pending_subscribers) {
                events.add_subscriber(s);
            }
            // Only once every device listens for its doorbells.
            c.start_vcpus();
            if let Some(exit) = c.exit.clone() {
                c.shutdown();
                return Ok(exit);
            }
        }
        if let Err(e) = events.run() {
            tracing::error!(error = ?e, "event loop");
        }
    }
}
