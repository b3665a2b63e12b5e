//! How a VM ends, and how the threads that notice it tell the VMM thread.

use std::sync::{Mutex, mpsc};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

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
