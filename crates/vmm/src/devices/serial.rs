//! The 8250 UART at 0x3f8 (the guest's `ttyS0` console) and where its output goes.
//!
//! The register model is vm-superio's; this module adds the sink: every byte goes into a
//! bounded ring (served by `GET /serial`), and complete lines go to the configured output (the
//! VMM's stdout, a file, or a FIFO). Lines are also watched for the kernel's panic message, so
//! that a guest that panics and then resets ends the VMM with the panic as its reason.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{BusDevice, lock};
use crate::lifecycle::ExitNotifier;

/// Default size of the console ring.
pub const DEFAULT_RING_BYTES: usize = 64 * 1024;
/// A line longer than this is written out in pieces.
const MAX_LINE: usize = 4096;
const PANIC_MARKER: &str = "Kernel panic - not syncing: ";
/// What Linux prints as its last words on `poweroff` and `halt`. Without ACPI there is no
/// power-off device: the kernel then halts its CPUs inside KVM, so the console is how the VMM
/// learns the guest is done. (A guest printing this itself only ends its own VM.)
const POWER_OFF_MARKERS: [&str; 2] = ["reboot: Power down", "reboot: System halted"];

/// The last bytes the guest wrote to its console.
#[derive(Debug, Default)]
pub struct ConsoleRing {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl ConsoleRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity.min(DEFAULT_RING_BYTES)),
            capacity,
        }
    }

    fn push(&mut self, data: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.bytes.extend(data);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }
}

/// Where console output goes, line by line.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    ring: Arc<Mutex<ConsoleRing>>,
    exits: Arc<ExitNotifier>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink").finish_non_exhaustive()
    }
}

impl ConsoleSink {
    pub fn new(
        out: Box<dyn Write + Send>,
        ring: Arc<Mutex<ConsoleRing>>,
        exits: Arc<ExitNotifier>,
    ) -> Self {
        Self {
            out,
            line: Vec::with_capacity(256),
            ring,
            exits,
        }
    }

    fn emit_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        if let Some(at) = text.find(PANIC_MARKER) {
            let reason = text[at + PANIC_MARKER.len()..].trim_end().to_owned();
            self.exits
                .note_panic(format!("guest kernel panic: {reason}"));
        } else if POWER_OFF_MARKERS.iter().any(|m| text.contains(m)) {
            self.exits.report(crate::lifecycle::VmExit::Shutdown);
        }
        // A closed FIFO or full disk must not stop the guest: drop the line.
        let _ = self.out.write_all(&self.line);
        let _ = self.out.flush();
        self.line.clear();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.ring).push(buf);
        for &b in buf {
            if b == b'\r' {
                continue;
            }
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit_line();
            }
        }
        Ok(buf.len())
    }

    // The UART flushes after every byte; output is written per line instead.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.line.push(b'\n');
            self.emit_line();
        }
    }
}

/// An interrupt line driven through an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART on the port bus.
pub struct SerialDevice {
    uart: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    pub fn new(irq: IrqLine, sink: ConsoleSink) -> Self {
        Self {
            uart: Serial::new(irq, sink),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data)
            && let Err(e) = self.uart.write(offset, *byte)
        {
            tracing::debug!(error = ?e, "serial write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_ring_keeps_only_the_newest_bytes() {
        let mut ring = ConsoleRing::new(4);
        ring.push(b"ab");
        ring.push(b"cdef");
        assert_eq!(ring.contents(), b"cdef");
        ring.push(b"0123456789");
        assert_eq!(ring.contents(), b"6789");
        let mut off = ConsoleRing::new(0);
        off.push(b"x");
        assert!(off.contents().is_empty());
    }

    #[test]
    fn test_uart_output_reaches_sink_by_line_and_panics_are_noticed() {
        let (exits, rx) = ExitNotifier::new().unwrap();
        let exits = Arc::new(exits);
        let out = Shared::default();
        let ring = Arc::new(Mutex::new(ConsoleRing::new(1024)));
        let sink = ConsoleSink::new(Box::new(out.clone()), ring.clone(), exits.clone());
        let mut dev = SerialDevice::new(IrqLine(EventFd::new(0).unwrap()), sink);
        for b in b"hello\r\nKernel panic - not syncing: VFS: no root\npartial" {
            dev.write(0, &[*b]);
        }
        assert_eq!(
            &*out.0.lock().unwrap(),
            b"hello\nKernel panic - not syncing: VFS: no root\n"
        );
        assert!(ring.lock().unwrap().contents().ends_with(b"partial"));
        exits.report(crate::lifecycle::VmExit::Reset);
        assert_eq!(
            rx.recv().unwrap(),
            crate::lifecycle::VmExit::GuestPanic("guest kernel panic: VFS: no root".into())
        );
        // A power-off after a panic is still the panic.
        for b in b"reboot: Power down\n" {
            dev.write(0, &[*b]);
        }
        assert!(matches!(
            rx.try_recv(),
            Ok(crate::lifecycle::VmExit::GuestPanic(_))
        ));
        // Line status register: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
