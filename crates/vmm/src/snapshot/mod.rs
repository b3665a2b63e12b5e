//! Snapshots of a paused VM, and restores from them.
//!
//! A snapshot is two things: the **VM state** (one file, written through
//! `wrenn_snapshot::container`: magic, version, CRC, size cap) and the **memory**.
//!
//! ```text
//!  vmstate   = container(Kind::VmState, STATE_VERSION, MicrovmState)
//!  MicrovmState
//!    config   machine (vCPUs, MiB), drives, interfaces, vsock, entropy: no host paths
//!    memory   size, and the layer it belongs to when it is part of a store
//!    vcpus[]  CPUID, MP state, regs, sregs, XSAVE, XCRs, debug regs, LAPIC, MSRs, events
//!    vm       PIT, kvmclock, PIC master/slave, IOAPIC
//!    devices  serial, i8042, one transport + device state per virtio slot
//! ```
//!
//! Memory is written one of two ways. Plain (Firecracker's): `mem_file_path` is the whole
//! guest RAM, the regions end to end (a Full; pages never written are holes), or, for a Diff,
//! a file of the same size holding only the pages dirtied since the last snapshot or restore
//! at their own offsets. Layered (`layers` given): the build's files in a store, see
//! [`layered`].
//!
//! Save order: devices, vCPUs (each on its own thread), VM, memory (Firecracker's order: a
//! device can still raise an interrupt, which then lands in the saved irqchip state). Restore
//! order: memory, VM and devices built as for a boot, vCPU state, VM state, device state.

pub mod layered;
pub mod memory_file;
pub mod uffd;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::api::models::{
    CacheType, Drive, Entropy, HugePages, MachineConfig, NetworkInterface, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, Vsock,
};
use crate::builder::{self, Machine, RestoredState, Subscriber};
use crate::devices::bus::lock;
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleRing, SerialDevice};
use crate::lifecycle::ExitNotifier;
use crate::resources::Resources;
use crate::vcpu::VcpuState;
use crate::virtio::mmio::MmioTransport;
use crate::vm::VmState;

/// Bumped on every change to [`MicrovmState`]; there is no cross-version compatibility.
pub const STATE_VERSION: u32 = 1;
/// A state file larger than this is refused before it is read (a few vCPUs take ~50 KiB).
pub const STATE_MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshots can only be taken of a paused VM")]
    NotPaused,
    #[error("{0}")]
    Request(String),
    #[error("state file")]
    StateFile(#[from] wrenn_snapshot::container::ContainerError),
    #[error("memory file {path}: {source}")]
    MemoryFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "a Diff snapshot needs dirty page tracking (machine-config track_dirty_pages, or track_dirty_pages on load)"
    )]
    NoDirtyTracking,
    #[error(transparent)]
    Vcpu(#[from] crate::vcpu::VcpuError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error("device state")]
    Devices(#[from] crate::virtio::persist::PersistError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Build(#[from] builder::StartError),
    #[error(transparent)]
    Uffd(#[from] uffd::UffdError),
    #[error(transparent)]
    Layers(#[from] layered::LayerError),
    #[error("the snapshot's configuration")]
    Config(#[from] crate::resources::ConfigError),
}

/// The configuration a snapshot keeps: what the guest saw, never a host path (drives, taps and
/// the vsock socket are named again by the restore request).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u64,
    pub smt: bool,
    pub transparent_huge_pages: bool,
    pub drives: Vec<SavedDrive>,
    pub nets: Vec<SavedNet>,
    /// The guest CID.
    pub vsock: Option<u32>,
    pub entropy: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedDrive {
    pub drive_id: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    pub writeback: bool,
    /// Whether the drive reads through a store's layers (then a restore reads it from the
    /// snapshot's own build).
    pub layered: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedNet {
    pub iface_id: String,
    pub guest_mac: Option<String>,
    pub mtu: Option<u16>,
}

/// Which layer of a store the memory (and layered drives) of a snapshot belong to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerRef {
    /// The build's id, as 32 hex digits.
    pub build_id: String,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MemoryInfo {
    pub size: u64,
    pub layer: Option<LayerRef>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    pub serial: crate::virtio::persist::SerialState,
    pub i8042: crate::virtio::persist::I8042State,
    pub virtio: Vec<crate::virtio::persist::MmioTransportState>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MicrovmState {
    pub config: SavedConfig,
    pub memory: MemoryInfo,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DevicesState,
}

impl SavedConfig {
    fn of(resources: &Resources) -> Self {
        let machine = &resources.machine;
        Self {
            vcpu_count: machine.vcpu_count,
            mem_size_mib: machine.mem_size_mib,
            smt: machine.smt,
            transparent_huge_pages: machine.huge_pages == HugePages::Transparent,
            drives: resources
                .drives
                .iter()
                .map(|d| SavedDrive {
                    drive_id: d.drive_id.clone(),
                    is_root_device: d.is_root_device,
                    is_read_only: d.is_read_only == Some(true),
                    writeback: d.cache_type == CacheType::Writeback,
                    layered: d.layers.is_some(),
                })
                .collect(),
            nets: resources
                .nets
                .iter()
                .map(|n| SavedNet {
                    iface_id: n.iface_id.clone(),
                    guest_mac: n.guest_mac.clone(),
                    mtu: n.mtu,
                })
                .collect(),
            vsock: resources.vsock.as_ref().map(|v| v.guest_cid),
            entropy: resources.entropy.is_some(),
        }
    }

    /// The resources to rebuild the machine with: this configuration plus the host paths the
    /// load request names, plus what the VMM was told before the load (serial, metrics).
    fn to_resources(
        &self,
        params: &SnapshotLoadParams,
        before: &Resources,
        layers: Option<&layered::BuildRef>,
        track_dirty_pages: bool,
    ) -> Result<Resources, SnapshotError> {
        let mut r = Resources {
            serial: before.serial.clone(),
            metrics: before.metrics.clone(),
            ..Resources::default()
        };
        r.set_machine(MachineConfig {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            smt: self.smt,
            track_dirty_pages,
            huge_pages: if self.transparent_huge_pages {
                HugePages::Transparent
            } else {
                HugePages::None
            },
            cpu_template: None,
        })?;
        for d in &self.drives {
            let over = params
                .drive_overrides
                .iter()
                .find(|o| o.drive_id == d.drive_id)
                .ok_or_else(|| {
                    SnapshotError::Request(format!(
                        "drive {} needs a path: add {{\"drive_id\": \"{}\", \"path_on_host\": ...}} to drive_overrides",
                        d.drive_id, d.drive_id
                    ))
                })?;
            let drive_layers = if d.layered {
                let l = layers.ok_or_else(|| {
                    SnapshotError::Request(format!(
                        "drive {} reads through a store's layers: the load request needs `layers`",
                        d.drive_id
                    ))
                })?;
                Some(l.drive_layers())
            } else {
                None
            };
            r.set_drive(Drive {
                drive_id: d.drive_id.clone(),
                path_on_host: Some(over.path_on_host.clone()),
                is_root_device: d.is_root_device,
                is_read_only: Some(d.is_read_only),
                partuuid: None,
                cache_type: if d.writeback {
                    CacheType::Writeback
                } else {
                    CacheType::Unsafe
                },
                io_engine: None,
                rate_limiter: None,
                layers: drive_layers,
            })?;
        }
        for n in &self.nets {
            let over = params
                .network_overrides
                .iter()
                .find(|o| o.iface_id == n.iface_id)
                .ok_or_else(|| {
                    SnapshotError::Request(format!(
                        "network interface {} needs a tap: add {{\"iface_id\": \"{}\", \"host_dev_name\": ...}} to network_overrides",
                        n.iface_id, n.iface_id
                    ))
                })?;
            r.set_net(NetworkInterface {
                iface_id: n.iface_id.clone(),
                host_dev_name: over.host_dev_name.clone(),
                guest_mac: n.guest_mac.clone(),
                mtu: n.mtu,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })?;
        }
        if let Some(guest_cid) = self.vsock {
            let over = params.vsock_override.as_ref().ok_or_else(|| {
                SnapshotError::Request(
                    "the snapshot has a vsock device: the load request needs vsock_override {\"uds_path\": ...}".into(),
                )
            })?;
            r.set_vsock(Vsock {
                guest_cid,
                uds_path: over.uds_path.clone(),
                vsock_id: None,
            })?;
        }
        if self.entropy {
            r.set_entropy(Entropy::default())?;
        }
        Ok(r)
    }
}

/// Reads the state of every device (the VMM thread; vCPUs paused).
pub fn save_devices(machine: &Machine) -> DevicesState {
    DevicesState {
        serial: lock(&machine.serial).save_state(),
        i8042: lock(&machine.i8042).save_state(),
        virtio: machine
            .transports
            .iter()
            .map(|t| lock(t).save_state())
            .collect(),
    }
}

/// Puts device state back into freshly built devices, slot by slot.
pub fn restore_devices(
    state: &DevicesState,
    serial: &Arc<Mutex<SerialDevice>>,
    i8042: &Arc<Mutex<I8042>>,
    transports: &[Arc<Mutex<MmioTransport>>],
) -> Result<(), crate::virtio::persist::PersistError> {
    if state.virtio.len() != transports.len() {
        return Err(crate::virtio::persist::PersistError::SlotCount {
            saved: state.virtio.len(),
            built: transports.len(),
        });
    }
    lock(serial).restore_state(&state.serial)?;
    lock(i8042).restore_state(&state.i8042)?;
    for (saved, transport) in state.virtio.iter().zip(transports) {
        lock(transport).restore_state(saved)?;
    }
    Ok(())
}

/// What a snapshot leaves the VMM knowing about its memory's lineage (for the next Diff).
pub type Lineage = Option<layered::MemoryLineage>;

/// `PUT /snapshot/create` on a paused VM.
pub fn create(
    machine: &Machine,
    resources: &Resources,
    params: &SnapshotCreateParams,
    lineage: &mut Lineage,
) -> Result<(), SnapshotError> {
    let started = std::time::Instant::now();
    let diff = params.snapshot_type == SnapshotType::Diff;
    if diff && !machine.vm.tracks_dirty_pages() {
        return Err(SnapshotError::NoDirtyTracking);
    }
    let target = params
        .layers
        .as_ref()
        .map(layered::BuildRef::open)
        .transpose()?;
    let devices = save_devices(machine);
    let vcpus = machine
        .vcpus
        .iter()
        .map(|v| v.save_state(std::time::Duration::from_secs(5)))
        .collect::<Result<Vec<_>, _>>()?;
    let vm = machine.vm.save_state()?;
    let mem = machine.vm.memory();
    let size = memory_file::flat_size(mem);
    let state_ms = started.elapsed().as_millis();
    // From here on the dirty log is consumed: should anything fail, it is given back, so that
    // the next Diff still holds every page written since the last snapshot that succeeded.
    let dirty = memory_file::take_dirty(machine)?;
    let build_dir = match &target {
        Some(target) => match layered::new_build_dir(target) {
            Ok(dir) => Some(dir),
            Err(e) => {
                memory_file::give_back_dirty(mem, &dirty);
                return Err(e);
            }
        },
        None => None,
    };
    let written = write_all(machine, resources, params, target.as_ref(), &dirty, lineage).and_then(
        |(state_path, layer, new_lineage)| {
            let state = MicrovmState {
                config: SavedConfig::of(resources),
                memory: MemoryInfo { size, layer },
                vcpus,
                vm,
                devices,
            };
            wrenn_snapshot::container::write(
                &state_path,
                wrenn_snapshot::container::Kind::VmState,
                STATE_VERSION,
                &state,
            )?;
            Ok((state_path, new_lineage))
        },
    );
    match written {
        Ok((state_path, new_lineage)) => {
            if new_lineage.is_some() {
                *lineage = new_lineage;
            }
            tracing::info!(
                kind = ?params.snapshot_type,
                elapsed_ms = started.elapsed().as_millis(),
                vm_and_devices_ms = state_ms,
                state = %state_path.display(),
                "snapshot taken"
            );
            Ok(())
        }
        Err(e) => {
            memory_file::give_back_dirty(mem, &dirty);
            if let Some(dir) = build_dir {
                // Half a build is worse than none: its id stays free for a retry.
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e)
        }
    }
}

/// Writes memory (and layered disks); returns where the state goes, the layer and the new
/// lineage (layered only).
fn write_all(
    machine: &Machine,
    resources: &Resources,
    params: &SnapshotCreateParams,
    target: Option<&layered::BuildRef>,
    dirty: &[bool],
    lineage: &Lineage,
) -> Result<(PathBuf, Option<LayerRef>, Lineage), SnapshotError> {
    let diff = params.snapshot_type == SnapshotType::Diff;
    let mem = machine.vm.memory();
    match target {
        None => {
            let state_path = required(&params.snapshot_path, "snapshot_path")?;
            let mem_path = required(&params.mem_file_path, "mem_file_path")?;
            let written = if diff {
                memory_file::write_sparse_diff(mem, &mem_path, dirty)?
            } else {
                memory_file::write_full(mem, &mem_path, machine.memory_is_anonymous)?.bytes
            };
            tracing::info!(
                kind = ?params.snapshot_type,
                bytes = written,
                path = %mem_path.display(),
                "memory written"
            );
            Ok((state_path, None, None))
        }
        Some(target) => {
            let (state_path, layer, new_lineage) =
                layered::write_memory(machine, target, diff, dirty, lineage)?;
            let state_path = params
                .snapshot_path
                .as_ref()
                .map_or(state_path, PathBuf::from);
            layered::write_disks(machine, resources, target)?;
            Ok((state_path, Some(layer), Some(new_lineage)))
        }
    }
}

fn required(field: &Option<String>, name: &str) -> Result<PathBuf, SnapshotError> {
    field
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| SnapshotError::Request(format!("{name} is required")))
}

/// A restored machine, ready for the event loop.
pub struct Restored {
    pub machine: Machine,
    pub subscribers: Vec<Subscriber>,
    pub resources: Resources,
    pub uffd: Option<uffd::UffdBackend>,
    pub lineage: Lineage,
}

impl std::fmt::Debug for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restored")
            .field("machine", &self.machine)
            .field("uffd", &self.uffd)
            .finish_non_exhaustive()
    }
}

/// `PUT /snapshot/load` on a VMM that has not started a VM.
pub fn load(
    params: &SnapshotLoadParams,
    before: &Resources,
    exits: &Arc<ExitNotifier>,
    ring: &Arc<Mutex<ConsoleRing>>,
) -> Result<Restored, SnapshotError> {
    let started = std::time::Instant::now();
    let layers = params
        .layers
        .as_ref()
        .map(layered::BuildRef::open)
        .transpose()?;
    let state_path = match (&params.snapshot_path, &layers) {
        (Some(p), _) if !p.is_empty() => PathBuf::from(p),
        (_, Some(l)) => l.vmstate_path(),
        _ => return Err(SnapshotError::Request("snapshot_path is required".into())),
    };
    let state: MicrovmState = wrenn_snapshot::container::read(
        &state_path,
        wrenn_snapshot::container::Kind::VmState,
        STATE_VERSION,
        STATE_MAX_BYTES,
    )?;
    let track = params.track_dirty_pages.or(params.enable_diff_snapshots) == Some(true);
    let resources = state
        .config
        .to_resources(params, before, layers.as_ref(), track)?;
    let expected = resources.machine.mem_size_mib << 20;
    if state.memory.size != expected {
        return Err(SnapshotError::Request(format!(
            "the state file says {} bytes of memory for a {} MiB machine",
            state.memory.size, resources.machine.mem_size_mib
        )));
    }

    let backend = params.backend()?;
    let mib = resources.machine.mem_size_mib;
    let mut uffd_backend = None;
    let mut lineage = None;
    let (mem, anonymous) = match (&backend, &layers) {
        (MemBackendChoice::File(path), None) => {
            let file = std::fs::File::open(path).map_err(|source| SnapshotError::MemoryFile {
                path: path.clone(),
                source,
            })?;
            memory_file::check_len(&file, path, state.memory.size)?;
            (
                crate::memory::map_files(mib, &[(0, state.memory.size, &file, 0)])?,
                false,
            )
        }
        (MemBackendChoice::File(_), Some(l)) => {
            let (mem, lin) = l.map_memory(mib, &state)?;
            lineage = Some(lin);
            (mem, false)
        }
        (MemBackendChoice::Uffd(socket), _) => {
            let mem = crate::memory::create(mib, false)?;
            uffd_backend = Some(uffd::connect(&mem, socket)?);
            if let Some(l) = &layers {
                lineage = Some(l.lineage(&state)?);
            }
            (mem, false)
        }
    };
    let resume = params.resume_vm == Some(true);
    let (mut machine, subscribers) = builder::restore(
        &resources,
        mem,
        RestoredState {
            vcpus: &state.vcpus,
            vm: &state.vm,
            devices: &state.devices,
        },
        !resume,
        exits,
        ring,
    )?;
    machine.memory_is_anonymous = anonymous;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis(),
        state = %state_path.display(),
        backend = ?backend,
        resume,
        "snapshot loaded"
    );
    Ok(Restored {
        machine,
        subscribers,
        resources,
        uffd: uffd_backend,
        lineage,
    })
}

/// Where a restore's memory comes from.
#[derive(Debug)]
pub enum MemBackendChoice {
    File(PathBuf),
    Uffd(PathBuf),
}

impl SnapshotLoadParams {
    fn backend(&self) -> Result<MemBackendChoice, SnapshotError> {
        use crate::api::models::MemBackendType;
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(SnapshotError::Request(
                "give mem_backend or the deprecated mem_file_path, not both".into(),
            )),
            (Some(b), None) => {
                let path = PathBuf::from(&b.backend_path);
                Ok(match b.backend_type {
                    MemBackendType::File => MemBackendChoice::File(path),
                    MemBackendType::Uffd => MemBackendChoice::Uffd(path),
                })
            }
            (None, Some(p)) => Ok(MemBackendChoice::File(PathBuf::from(p))),
            (None, None) if self.layers.is_some() => Ok(MemBackendChoice::File(PathBuf::new())),
            (None, None) => Err(SnapshotError::Request(
                "mem_backend {\"backend_type\": \"File\"|\"Uffd\", \"backend_path\": ...} is required".into(),
            )),
        }
    }
}
