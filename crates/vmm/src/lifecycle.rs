//! How a VM ends, and how the threads that notice it tell the VMM thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, mpsc};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::signal::register_signal_handler;

use crate::devices::bus::lock;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (reboot through the keyboard controller or a triple fault).
    Reset,
    /// The guest powered off (KVM system event), or the VMM was asked to stop.
    Shutdown,
    /// The guest kernel panicked; the reason is its panic message.
    GuestPanic(String),
    /// KVM or the VMM failed while running the guest.
    Error(String),
}

impl VmExit {
    /// The VMM's exit status: 0 for a guest that ended normally.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::Shutdown => 0,
            VmExit::GuestPanic(_) => 2,
            VmExit::Error(_) => 1,
        }
    }
}

/// Shared by vCPU threads and devices: report an exit and wake the VMM thread.
#[derive(Debug)]
pub struct ExitNotifier {
    tx: Mutex<mpsc::Sender<VmExit>>,
    event: EventFd,
    /// The last kernel panic message seen on the console; a reset after it is a panic.
    panic_reason: Mutex<Option<String>>,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<(Self, mpsc::Receiver<VmExit>)> {
        let (tx, rx) = mpsc::channel();
        let notifier = Self {
            tx: Mutex::new(tx),
            event: EventFd::new(EFD_NONBLOCK)?,
            panic_reason: Mutex::new(None),
        };
        Ok((notifier, rx))
    }

    /// Readable when an exit was reported.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    pub fn report(&self, exit: VmExit) {
        let exit = match (exit, lock(&self.panic_reason).clone()) {
            (VmExit::Reset | VmExit::Shutdown, Some(reason)) => VmExit::GuestPanic(reason),
            (exit, _) => exit,
        };
        let _ = lock(&self.tx).send(exit);
        let _ = self.event.write(1);
    }

    pub fn note_panic(&self, reason: String) {
        lock(&self.panic_reason).get_or_insert(reason);
    }
}

/// The eventfd that SIGTERM and SIGINT write to (-1 until [`stop_on_signals`]).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd: RawFd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte buffer; the fd is an
        // eventfd that stop_on_signals leaked, so it stays open for the life of the process.
        let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// SIGTERM and SIGINT write `event` (which the VMM thread polls) instead of killing the
/// process, so the VM is stopped cleanly. A handler, not a thread: nothing is left outside
/// the seccomp filters.
pub fn stop_on_signals(event: EventFd) -> Result<(), vmm_sys_util::errno::Error> {
    STOP_FD.store(event.as_raw_fd(), Ordering::Relaxed);
    // The fd must outlive every signal that can arrive.
    std::mem::forget(event);
    register_signal_handler(libc::SIGTERM, on_stop_signal)?;
    register_signal_handler(libc::SIGINT, on_stop_signal)
}

/// Writing to a console FIFO or a socket whose reader left must be an error, not a signal.
pub fn ignore_sigpipe() {
    // SAFETY: setting SIGPIPE's disposition to ignore is always sound.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
