//! Setting the guest's clock from the host's time (sent with `/init` after a restore: a
//! snapshot's clock stands still while it is stored).
use std::time::{Duration, SystemTime};

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_settime};

use crate::state::Settings;

/// How far the clock may be off before envd steps it.
pub const MAX_SKEW: Duration = Duration::from_millis(50);

/// Why the clock could not be set.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// The time is before 1970 or too far ahead for the kernel.
    #[error("time out of range")]
    OutOfRange,
    /// `clock_settime` failed.
    #[error("clock_settime")]
    Set(#[source] nix::Error),
}

/// Whether `host` and `guest` differ by more than [`MAX_SKEW`] (either way).
pub fn is_skewed(guest: SystemTime, host: SystemTime) -> bool {
    let difference = guest
        .duration_since(host)
        .or_else(|_| host.duration_since(guest))
        .unwrap_or_default();
    difference > MAX_SKEW
}

/// Sets CLOCK_REALTIME to `now` when it is off by more than [`MAX_SKEW`] — only when envd
/// manages the system (never on a host running envd for tests). Returns whether it did.
pub fn set_if_skewed(settings: &Settings, now: SystemTime) -> Result<bool, ClockError> {
    if !settings.manage_system || !is_skewed(SystemTime::now(), now) {
        return Ok(false);
    }
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| ClockError::OutOfRange)?;
    let seconds =
        libc::time_t::try_from(since_epoch.as_secs()).map_err(|_| ClockError::OutOfRange)?;
    let nanos = libc::c_long::from(since_epoch.subsec_nanos());
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(seconds, nanos))
        .map_err(ClockError::Set)?;
    tracing::info!(?now, "clock set from the host's time");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_is_skewed_both_directions() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(!is_skewed(base, base));
        assert!(!is_skewed(base, base + Duration::from_millis(50)));
        assert!(is_skewed(base, base + Duration::from_millis(51)));
        assert!(is_skewed(base + Duration::from_secs(3600), base));
    }

    #[test]
    fn test_set_if_skewed_without_managing_leaves_clock() {
        let settings = Settings::default();
        let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert!(!set_if_skewed(&settings, past).unwrap());
        assert!(SystemTime::now() > past + Duration::from_secs(365 * 24 * 3600));
    }
}
