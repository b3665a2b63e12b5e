//! Reseeding the kernel's random generator after a restore, so clones of one snapshot do not
//! share random streams: fresh bytes from the virtio-rng device (`/dev/hwrng`) are mixed into
//! the pool (credited) and the CRNG is forced to reseed at once.
use std::fs::OpenOptions;
use std::io::Read as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;

use crate::state::Settings;

/// The hardware generator (virtio-rng in a Wrenn guest).
const HWRNG: &str = "/dev/hwrng";
/// How many bytes envd mixes in per reseed.
const SEED_BYTES: usize = 64;
/// Extra, uncredited bytes: the clocks, which differ between clones.
const CLOCK_BYTES: usize = 16;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::Ioctl =
    nix::request_code_write!(b'R', 0x03, size_of::<[libc::c_int; 2]>());
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = nix::request_code_none!(b'R', 0x07);

/// The kernel's `struct rand_pool_info` with its buffer inline.
#[repr(C)]
struct PoolInfo {
    /// Bits of entropy credited.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; SEED_BYTES + CLOCK_BYTES],
}

/// Why reseeding failed.
#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    /// Opening `/dev/random` failed.
    #[error("opening /dev/random")]
    Open(#[source] std::io::Error),
    /// Neither the hardware generator nor getrandom gave bytes.
    #[error("no random bytes")]
    NoBytes,
    /// An ioctl on `/dev/random` failed.
    #[error("{0}")]
    Ioctl(&'static str, #[source] nix::Error),
}

/// Seed material: the bytes and how many bits of them are credited (hardware bytes only).
fn gather() -> Result<PoolInfo, EntropyError> {
    let mut info = PoolInfo {
        entropy_count: 0,
        buf_size: 0,
        buf: [0; SEED_BYTES + CLOCK_BYTES],
    };
    let hardware = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(HWRNG)
        .and_then(|mut device| device.read(&mut info.buf[..SEED_BYTES]))
        .unwrap_or(0);
    if hardware < SEED_BYTES {
        // Uncredited: after a restore getrandom replays the snapshot's stream, but mixing it
        // does no harm and keeps the pool fed when there is no hardware generator. Never
        // blocking: before the kernel's generator is ready getrandom would wait (seconds to
        // minutes in a small VM without a hardware source), holding the host's /init.
        let rest = &mut info.buf[hardware..SEED_BYTES];
        // SAFETY: `rest` is writable for `rest.len()` bytes; GRND_NONBLOCK makes the call
        // return EAGAIN instead of waiting.
        let got =
            unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), libc::GRND_NONBLOCK) };
        if got < 0 && hardware == 0 {
            return Err(EntropyError::NoBytes);
        }
    }
    let realtime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| t.tv_nsec())
        .unwrap_or_default();
    let boottime = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_nsec())
        .unwrap_or_default();
    info.buf[SEED_BYTES..SEED_BYTES + 8].copy_from_slice(&realtime.to_ne_bytes());
    info.buf[SEED_BYTES + 8..].copy_from_slice(&boottime.to_ne_bytes());
    info.entropy_count = libc::c_int::try_from(hardware * 8).unwrap_or(0);
    info.buf_size = libc::c_int::try_from(info.buf.len()).unwrap_or(0);
    Ok(info)
}

/// Mixes fresh bytes into the kernel pool and forces a CRNG reseed — only when envd manages
/// the system. Returns whether it did.
pub fn reseed(settings: &Settings) -> Result<bool, EntropyError> {
    if !settings.manage_system {
        return Ok(false);
    }
    let info = gather()?;
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(EntropyError::Open)?;
    // SAFETY: RNDADDENTROPY reads a `rand_pool_info` header and `buf_size` bytes after it;
    // `info` is a live `PoolInfo` whose `buf` holds exactly `buf_size` bytes; the fd is open.
    let added =
        unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, std::ptr::from_ref(&info)) };
    nix::errno::Errno::result(added).map_err(|e| EntropyError::Ioctl("RNDADDENTROPY", e))?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the fd is open.
    let reseeded = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    nix::errno::Errno::result(reseeded).map_err(|e| EntropyError::Ioctl("RNDRESEEDCRNG", e))?;
    tracing::debug!(
        credited_bits = info.entropy_count,
        "random generator reseeded"
    );
    Ok(true)
}

/// Fills `buf` with bytes for names and ids (upload temp files, watcher ids) without ever
/// waiting: the kernel's generator when it is ready, else a SplitMix64 stream seeded from the
/// monotonic clock, the pid and a counter. Before the generator is ready (a VM with no
/// hardware source, early after boot) getrandom would block the request; names need to be
/// unique, not secret.
pub fn fill_unblocking(buf: &mut [u8]) {
    // SAFETY: `buf` is writable for `buf.len()` bytes; GRND_NONBLOCK never waits.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if usize::try_from(got).is_ok_and(|got| got == buf.len()) {
        return;
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec().unsigned_abs() << 30 ^ t.tv_nsec().unsigned_abs())
        .unwrap_or_default();
    let mut state = now
        ^ u64::from(std::process::id()) << 40
        ^ COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .rotate_left(17);
    for chunk in buf.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_request_codes_match_the_kernel_headers() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn test_gather_fills_the_buffer_and_credits_only_hardware_bytes() {
        let first = gather().unwrap();
        let second = gather().unwrap();
        assert_eq!(first.buf_size, 80);
        assert!(first.entropy_count <= 64 * 8);
        assert_ne!(first.buf[..SEED_BYTES], second.buf[..SEED_BYTES]);
    }

    #[test]
    fn test_unblocking_bytes_differ_between_calls() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        fill_unblocking(&mut a);
        fill_unblocking(&mut b);
        assert_ne!(a, b);
        let mut odd = [0u8; 13];
        fill_unblocking(&mut odd);
        assert_ne!(odd, [0u8; 13]);
    }

    #[test]
    fn test_reseed_without_managing_does_nothing() {
        assert!(!reseed(&Settings::default()).unwrap());
    }
}
