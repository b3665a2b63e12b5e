//! The VM's configuration before it starts: what the pre-boot API calls (or the config file)
//! build up, validated as each piece arrives so that mistakes are reported by the call that
//! made them.

use std::path::Path;

use crate::api::models::{
    BootSource, Drive, Entropy, HugePages, MachineConfig, MachineConfigUpdate, MetricsConfig,
    NetworkInterface, SerialConfig, VmmConfig, Vsock,
};
use crate::layout::{VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST};
use crate::memory::{MAX_MEM_MIB, MIN_MEM_MIB};
use crate::mptable::MAX_VCPUS;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vcpu_count must be between 1 and {MAX_VCPUS}, not {0}")]
    VcpuCount(u8),
    #[error("with smt on, vcpu_count must be 1 or even, not {0}")]
    SmtOddVcpus(u8),
    #[error("mem_size_mib must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}, not {0}")]
    MemSize(u64),
    #[error("huge_pages {0:?} (hugetlbfs) is not supported; use None or Transparent")]
    HugePages(HugePages),
    #[error("cpu_template {0:?} is not supported; Wrenn has one CPUID template (use None)")]
    CpuTemplate(String),
    #[error("The kernel file cannot be opened: {path}: {reason}")]
    Kernel { path: String, reason: String },
    #[error("The initrd file cannot be opened: {path}: {reason}")]
    Initrd { path: String, reason: String },
    #[error("drive {id}: path_on_host is required")]
    DrivePathMissing { id: String },
    #[error("drive {id}: cannot open {path}: {reason}")]
    DriveFile {
        id: String,
        path: String,
        reason: String,
    },
    #[error("drive {id}: a root device is already configured ({existing})")]
    SecondRoot { id: String, existing: String },
    #[error("drive {id}: partuuid is not supported (the root device is /dev/vda)")]
    PartUuid { id: String },
    #[error("drive {id}: io_engine Async is not supported; use Sync")]
    IoEngine { id: String },
    #[error("{what}: rate limiters are not supported")]
    RateLimiter { what: String },
    #[error("network interface {id}: host_dev_name must be a tap name of 1 to 15 characters")]
    TapName { id: String },
    #[error("network interface {id}: tap {tap} is already used by {other}")]
    TapInUse {
        id: String,
        tap: String,
        other: String,
    },
    #[error("guest_cid must be 3 or more, not {0}")]
    GuestCid(u32),
    #[error("vsock uds_path must not be empty")]
    VsockPath,
    #[error("too many devices: at most {0} virtio devices fit the interrupt lines")]
    TooManyDevices(u32),
    #[error("a boot source is required: PUT /boot-source with kernel_image_path")]
    NoBootSource,
}

/// Most virtio devices one VM can have: one interrupt line each.
pub const MAX_VIRTIO_DEVICES: u32 = VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    /// In the order the guest sees them: the root device first.
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<Entropy>,
    pub serial: SerialConfig,
    pub metrics: Option<MetricsConfig>,
}

fn readable(path: &str) -> Result<(), String> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Resources {
    /// Builds resources from a whole config file, checking every part.
    pub fn from_config(config: &VmmConfig) -> Result<Self, ConfigError> {
        let mut r = Resources::default();
        if let Some(m) = &config.machine_config {
            r.set_machine(m.clone())?;
        }
        if let Some(b) = &config.boot_source {
            r.set_boot_source(b.clone())?;
        }
        for d in &config.drives {
            r.set_drive(d.clone())?;
        }
        for n in &config.network_interfaces {
            r.set_net(n.clone())?;
        }
        if let Some(v) = &config.vsock {
            r.set_vsock(v.clone())?;
        }
        if let Some(e) = &config.entropy {
            r.set_entropy(e.clone())?;
        }
        if let Some(s) = &config.serial {
            r.serial = s.clone();
        }
        r.metrics = config.metrics.clone();
        Ok(r)
    }

    /// The whole configuration, in the config file's shape (`GET /vm/config`).
    pub fn to_config(&self) -> VmmConfig {
        VmmConfig {
            boot_source: self.boot_source.clone(),
            drives: self.drives.clone(),
            machine_config: Some(self.machine.clone()),
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            serial: Some(self.serial.clone()),
            logger: None,
            metrics: self.metrics.clone(),
        }
    }

    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), ConfigError> {
        readable(&b.kernel_image_path).map_err(|reason| ConfigError::Kernel {
            path: b.kernel_image_path.clone(),
            reason,
        })?;
        if let Some(initrd) = &b.initrd_path {
            readable(initrd).map_err(|reason| ConfigError::Initrd {
                path: initrd.clone(),
                reason,
            })?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    pub fn set_machine(&mut self, m: MachineConfig) -> Result<(), ConfigError> {
        if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(m.vcpu_count));
        }
        if m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 == 1 {
            return Err(ConfigError::SmtOddVcpus(m.vcpu_count));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m.mem_size_mib) {
            return Err(ConfigError::MemSize(m.mem_size_mib));
        }
        if m.huge_pages == HugePages::Size2M {
            return Err(ConfigError::HugePages(m.huge_pages));
        }
        if let Some(t) = m.cpu_template.as_deref().filter(|t| *t != "None") {
            return Err(ConfigError::CpuTemplate(t.to_owned()));
        }
        self.machine = m;
        Ok(())
    }

    pub fn update_machine(&mut self, u: MachineConfigUpdate) -> Result<(), ConfigError> {
        let mut m = self.machine.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        if u.cpu_template.is_some() {
            m.cpu_template = u.cpu_template;
        }
        self.set_machine(m)
    }

    fn device_count(&self) -> usize {
        self.drives.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.entropy.is_some())
    }

    fn room_for_one_more(&self) -> Result<(), ConfigError> {
        if self.device_count() >= MAX_VIRTIO_DEVICES as usize {
            return Err(ConfigError::TooManyDevices(MAX_VIRTIO_DEVICES));
        }
        Ok(())
    }

    /// Adds or replaces (same id) a drive; the root device goes first.
    pub fn set_drive(&mut self, d: Drive) -> Result<(), ConfigError> {
        let id = d.drive_id.clone();
        let Some(path) = &d.path_on_host else {
            return Err(ConfigError::DrivePathMissing { id });
        };
        if let Some(layers) = &d.layers {
            // path_on_host is the overlay, created when the drive opens: what must exist now
            // is the store and the build's disk header.
            crate::virtio::block::check_layered_drive(&d).map_err(|e| ConfigError::DriveFile {
                id: id.clone(),
                path: format!(
                    "the disk header of layers {{store: {}, build_id: {}}}",
                    layers.store, layers.build_id
                ),
                reason: crate::diag::error_chain(&e),
            })?;
        } else {
            let want_write = d.is_read_only != Some(true);
            std::fs::OpenOptions::new()
                .read(true)
                .write(want_write)
                .open(path)
                .map_err(|e| ConfigError::DriveFile {
                    id: id.clone(),
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        }
        if d.partuuid.is_some() {
            return Err(ConfigError::PartUuid { id });
        }
        if d.io_engine == Some(crate::api::models::IoEngine::Async) {
            return Err(ConfigError::IoEngine { id });
        }
        if d.rate_limiter.is_some() {
            return Err(ConfigError::RateLimiter {
                what: format!("drive {id}"),
            });
        }
        if d.is_root_device
            && let Some(other) = self
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != id)
        {
            return Err(ConfigError::SecondRoot {
                id,
                existing: other.drive_id.clone(),
            });
        }
        match self.drives.iter().position(|o| o.drive_id == id) {
            Some(i) => self.drives[i] = d,
            None => {
                self.room_for_one_more()?;
                self.drives.push(d);
            }
        }
        // Stable: the root first, the rest in the order they were added.
        self.drives.sort_by_key(|d| !d.is_root_device);
        Ok(())
    }

    pub fn set_net(&mut self, n: NetworkInterface) -> Result<(), ConfigError> {
        let id = n.iface_id.clone();
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(ConfigError::TapName { id });
        }
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            return Err(ConfigError::RateLimiter {
                what: format!("network interface {id}"),
            });
        }
        if let Some(other) = self
            .nets
            .iter()
            .find(|o| o.host_dev_name == n.host_dev_name && o.iface_id != id)
        {
            return Err(ConfigError::TapInUse {
                id,
                tap: n.host_dev_name.clone(),
                other: other.iface_id.clone(),
            });
        }
        match self.nets.iter().position(|o| o.iface_id == id) {
            Some(i) => self.nets[i] = n,
            None => {
                self.room_for_one_more()?;
                self.nets.push(n);
            }
        }
        Ok(())
    }

    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), ConfigError> {
        if v.guest_cid < 3 {
            return Err(ConfigError::GuestCid(v.guest_cid));
        }
        if v.uds_path.is_empty() {
            return Err(ConfigError::VsockPath);
        }
        if self.vsock.is_none() {
            self.room_for_one_more()?;
        }
        self.vsock = Some(v);
        Ok(())
    }

    pub fn set_entropy(&mut self, e: Entropy) -> Result<(), ConfigError> {
        if e.rate_limiter.is_some() {
            return Err(ConfigError::RateLimiter {
                what: "entropy".into(),
            });
        }
        if self.entropy.is_none() {
            self.room_for_one_more()?;
        }
        self.entropy = Some(e);
        Ok(())
    }

    /// The kernel command line: the user's (or the default), then the root device, then one
    /// `virtio_mmio.device=` per device (added by the builder).
    pub fn base_cmdline(&self) -> Result<String, ConfigError> {
        let boot = self.boot_source.as_ref().ok_or(ConfigError::NoBootSource)?;
        let mut line = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        if let Some(root) = self.drives.first().filter(|d| d.is_root_device) {
            let mode = if root.is_read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            line.push_str(&format!(" root=/dev/vda {mode}"));
        }
        Ok(line)
    }

    pub fn kernel_path(&self) -> Result<&Path, ConfigError> {
        self.boot_source
            .as_ref()
            .map(|b| Path::new(&b.kernel_image_path))
            .ok_or(ConfigError::NoBootSource)
    }
}

/// Used when `boot_args` is not given: a serial console, reset through the keyboard
/// controller, reboot one second after a panic, and no probing for hardware that is not there.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, path: &Path, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: Some(path.display().to_string()),
            is_root_device: root,
            is_read_only: None,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: None,
            rate_limiter: None,
            layers: None,
        }
    }

    #[test]
    fn test_machine_config_limits() {
        let mut r = Resources::default();
        let m = |v, mem| MachineConfig {
            vcpu_count: v,
            mem_size_mib: mem,
            ..Default::default()
        };
        assert_eq!(r.set_machine(m(0, 128)), Err(ConfigError::VcpuCount(0)));
        assert_eq!(r.set_machine(m(33, 128)), Err(ConfigError::VcpuCount(33)));
        assert_eq!(r.set_machine(m(2, 1)), Err(ConfigError::MemSize(1)));
        r.set_machine(m(32, 256)).unwrap();
        r.update_machine(MachineConfigUpdate {
            vcpu_count: Some(4),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.machine.vcpu_count, r.machine.mem_size_mib), (4, 256));
    }

    #[test]
    fn test_drives_root_first_one_root_and_files_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, [0u8; 512]).unwrap();
        std::fs::write(&b, [0u8; 512]).unwrap();
        let mut r = Resources::default();
        r.set_drive(drive("data", &a, false)).unwrap();
        r.set_drive(drive("root", &b, true)).unwrap();
        assert_eq!(r.drives[0].drive_id, "root");
        let err = r.set_drive(drive("root2", &a, true)).unwrap_err();
        assert!(matches!(err, ConfigError::SecondRoot { .. }));
        let err = r
            .set_drive(drive("x", &dir.path().join("missing"), false))
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        assert_eq!(r.drives.len(), 2);
        // Replacing by id keeps one entry.
        r.set_drive(drive("data", &b, false)).unwrap();
        assert_eq!(r.drives.len(), 2);
        let mut ro = drive("root", &b, true);
        ro.is_read_only = Some(true);
        r.set_drive(ro).unwrap();
        r.boot_source = Some(BootSource {
            kernel_image_path: "k".into(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: None,
        });
        assert_eq!(r.base_cmdline().unwrap(), "console=ttyS0 root=/dev/vda ro");
    }

    #[test]
    fn test_vsock_cid_and_missing_kernel() {
        let mut r = Resources::default();
        let v = Vsock {
            guest_cid: 2,
            uds_path: "/tmp/x".into(),
            vsock_id: None,
        };
        assert_eq!(r.set_vsock(v), Err(ConfigError::GuestCid(2)));
        let err = r
            .set_boot_source(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                boot_args: None,
                initrd_path: None,
            })
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        assert_eq!(r.base_cmdline(), Err(ConfigError::NoBootSource));
    }
}
