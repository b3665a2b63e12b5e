//! Where commands that need KVM run: directly, or inside the host VM.

use std::fmt;

use wrenn_vmm::probe::KvmVerdict;

use crate::HostVmError;
use crate::spec::IN_HOSTVM_ENV;

/// The variable that overrides the decision: `auto` (default), `always` or `never`.
pub const MODE_ENV: &str = "WRENN_HOSTVM";

/// Where a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On this machine, as a child process.
    Direct,
    /// Inside the software-emulated host VM, which has a real (nested) KVM.
    HostVm,
}

/// The value of `WRENN_HOSTVM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Use the host VM when /dev/kvm cannot run Linux guests.
    Auto,
    Always,
    Never,
}

impl Mode {
    /// Reads `WRENN_HOSTVM`; unset or empty means [`Mode::Auto`].
    pub fn from_env() -> Result<Mode, HostVmError> {
        let value = std::env::var(MODE_ENV).unwrap_or_default();
        match value.trim() {
            "" | "auto" => Ok(Mode::Auto),
            "always" => Ok(Mode::Always),
            "never" => Ok(Mode::Never),
            _ => Err(HostVmError::InvalidMode { value }),
        }
    }
}

/// A placement and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub placement: Placement,
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.placement {
            Placement::Direct => write!(f, "running directly: {}", self.reason),
            Placement::HostVm => write!(f, "running inside the host VM: {}", self.reason),
        }
    }
}

/// Whether this process runs inside the host VM (init sets `WRENN_IN_HOSTVM=1` for the command).
pub fn in_hostvm() -> bool {
    std::env::var_os(IN_HOSTVM_ENV).is_some_and(|v| v == "1")
}

/// Chooses the placement from `WRENN_HOSTVM`, `WRENN_IN_HOSTVM` and, in auto mode, a check of
/// /dev/kvm ([`wrenn_vmm::probe::assess`]). Logs the decision and its reason once.
pub fn decide() -> Result<Decision, HostVmError> {
    let decision = decide_with(Mode::from_env()?, in_hostvm(), wrenn_vmm::probe::assess);
    tracing::info!(placement = ?decision.placement, "{decision}");
    Ok(decision)
}

/// The decision for a given mode; `assess` is only called in auto mode outside the host VM.
pub fn decide_with(mode: Mode, in_hostvm: bool, assess: impl FnOnce() -> KvmVerdict) -> Decision {
    let (placement, reason) = if in_hostvm {
        (
            Placement::Direct,
            format!("already inside the host VM ({IN_HOSTVM_ENV}=1)"),
        )
    } else {
        match mode {
            Mode::Never => (Placement::Direct, format!("{MODE_ENV}=never")),
            Mode::Always => (Placement::HostVm, format!("{MODE_ENV}=always")),
            Mode::Auto => {
                let verdict = assess();
                let placement = if verdict.is_usable() {
                    Placement::Direct
                } else {
                    Placement::HostVm
                };
                (placement, verdict.to_string())
            }
        }
    };
    Decision { placement, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use wrenn_vmm::probe::LongModeTiming;

    fn unusable() -> KvmVerdict {
        KvmVerdict::Unusable {
            pvm: true,
            reason: "guest kernel code is emulated, not run".into(),
        }
    }

    fn usable() -> KvmVerdict {
        KvmVerdict::Usable {
            pvm: false,
            timing: LongModeTiming {
                iterations: 1_000_000,
                elapsed: Duration::from_millis(1),
            },
        }
    }

    #[test]
    fn test_decide_auto_unusable_kvm_uses_hostvm() {
        let d = decide_with(Mode::Auto, false, unusable);
        assert_eq!(d.placement, Placement::HostVm);
        assert!(d.to_string().starts_with("running inside the host VM: /dev/kvm is not usable (kvm_pvm module loaded): guest kernel code is emulated"), "{d}");
    }

    #[test]
    fn test_decide_auto_usable_kvm_runs_directly() {
        let d = decide_with(Mode::Auto, false, usable);
        assert_eq!(d.placement, Placement::Direct);
        assert!(d.reason.contains("/dev/kvm is usable"), "{d}");
    }

    #[test]
    fn test_decide_overrides_skip_the_probe() {
        let never = || -> KvmVerdict { panic!("must not probe") };
        assert_eq!(
            decide_with(Mode::Always, false, never).placement,
            Placement::HostVm
        );
        assert_eq!(
            decide_with(Mode::Never, false, never).placement,
            Placement::Direct
        );
    }

    #[test]
    fn test_decide_inside_hostvm_is_always_direct() {
        for mode in [Mode::Auto, Mode::Always, Mode::Never] {
            let d = decide_with(mode, true, unusable);
            assert_eq!(d.placement, Placement::Direct, "{mode:?}");
            assert!(d.reason.contains("already inside the host VM"), "{d}");
        }
    }
}
