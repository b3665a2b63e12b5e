//! The 8250 UART at 0x3f8 (the guest's `ttyS0` console) and where its output goes.
//!
//! The register model is vm-superio's; this module adds the sink: every byte goes into a
//! bounded ring (served by `GET /serial`), and complete lines go to the configured output (the
//! VMM's stdout, a file, or a FIFO). Lines are also watched for the kernel's panic message, so
//! that a guest that panics and then resets ends the VMM with the panic as its reason.
//!
//! Snapshots keep the UART's registers and its receive FIFO ([`SerialState`]); the sink (where
//! output goes, the console ring, a partial line) belongs to the process and is not saved.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{BusDevice, lock};
use crate::lifecycle::ExitNotifier;
use crate::virtio::persist::PersistError;

/// Bytes the UART's receive FIFO holds (vm-superio's, which it does not export).
pub const SERIAL_FIFO_SIZE: usize = 64;

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

    /// A sink that drops everything, standing in while the real one is moved.
    fn discarding(exits: Arc<ExitNotifier>) -> Self {
        Self::new(
            Box::new(io::sink()),
            Arc::new(Mutex::new(ConsoleRing::new(0))),
            exits,
        )
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
        match self.0.write(1) {
            // The counter is saturated: an interrupt is pending already, which is all a
            // trigger asks for.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received and not read by the guest yet, at most [`SERIAL_FIFO_SIZE`].
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
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

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Puts saved registers and FIFO back, keeping this device's interrupt line and sink. An
    /// interrupt the saved state has pending (transmitter empty, data ready) is raised again.
    pub fn restore_state(&mut self, state: &SerialState) -> Result<(), PersistError> {
        if state.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(PersistError::invalid(
                "serial",
                "in_buffer",
                format!(
                    "{} bytes; the FIFO holds {SERIAL_FIFO_SIZE}",
                    state.in_buffer.len()
                ),
            ));
        }
        let irq_error = |source| PersistError::Interrupt {
            device: "serial".into(),
            source,
        };
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(irq_error)?;
        let stand_in_irq = self.uart.interrupt_evt().0.try_clone().map_err(irq_error)?;
        // vm-superio builds a UART from a state only by value: the sink moves over, and a
        // stand-in that discards output holds its place meanwhile.
        let stand_in = Serial::new(
            IrqLine(stand_in_irq),
            ConsoleSink::discarding(self.uart.writer().exits.clone()),
        );
        let sink = std::mem::replace(&mut self.uart, stand_in).into_writer();
        // The FIFO fits and the trigger cannot fail (a saturated eventfd is success), so this
        // does not fail in practice; if it did, output would be lost, not the VMM.
        self.uart = Serial::from_state(
            &state.into(),
            IrqLine(irq),
            vm_superio::serial::NoEvents,
            sink,
        )
        .map_err(|e| {
            PersistError::invalid("serial", "state", format!("rebuilding the UART: {e:?}"))
        })?;
        Ok(())
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

    fn serial_device(out: Shared) -> (SerialDevice, EventFd, Arc<Mutex<ConsoleRing>>) {
        let (exits, _rx) = ExitNotifier::new().unwrap();
        let ring = Arc::new(Mutex::new(ConsoleRing::new(1024)));
        let sink = ConsoleSink::new(Box::new(out), ring.clone(), Arc::new(exits));
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(IrqLine(irq.try_clone().unwrap()), sink);
        (dev, irq, ring)
    }

    fn reg(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn test_serial_state_round_trips_registers_and_fifo_keeping_the_sink() {
        let (mut dev, irq, _) = serial_device(Shared::default());
        // Line control 8N1 with DLAB set, divisor 3, then DLAB off; scratch; modem control.
        dev.write(3, &[0x83]);
        dev.write(0, &[3]);
        dev.write(3, &[0x03]);
        dev.write(7, &[0x5a]);
        dev.write(4, &[0x0b]);
        // Data-ready interrupt enabled: one is pending when the snapshot is taken.
        dev.write(1, &[0x01]);
        dev.uart.enqueue_raw_bytes(b"in").unwrap();
        assert!(irq.read().unwrap() >= 1);
        let state = dev.save_state();
        assert_eq!(state.in_buffer, b"in");
        let json = serde_json::to_string(&state).unwrap();
        let state: SerialState = serde_json::from_str(&json).unwrap();

        let out = Shared::default();
        let (mut restored, restored_irq, ring) = serial_device(out.clone());
        restored.restore_state(&state).unwrap();
        assert_eq!(restored.save_state(), state);
        assert!(
            restored_irq.read().unwrap() >= 1,
            "pending interrupt raised again"
        );
        assert_eq!(reg(&mut restored, 7), 0x5a);
        assert_eq!(reg(&mut restored, 4), 0x0b);
        assert_eq!(reg(&mut restored, 0), b'i');
        assert_eq!(reg(&mut restored, 0), b'n');
        // Output still reaches this device's sink.
        for b in b"after restore\n" {
            restored.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"after restore\n");
        assert!(
            ring.lock()
                .unwrap()
                .contents()
                .ends_with(b"after restore\n")
        );
    }

    #[test]
    fn test_serial_restore_overfull_fifo_is_an_error_and_changes_nothing() {
        let out = Shared::default();
        let (mut dev, _, _) = serial_device(out.clone());
        dev.write(7, &[0x11]);
        let mut state = dev.save_state();
        state.scratch = 0x22;
        state.in_buffer = vec![0; SERIAL_FIFO_SIZE + 1];
        let err = dev.restore_state(&state).unwrap_err();
        assert!(err.to_string().contains("in_buffer"), "{err}");
        assert_eq!(reg(&mut dev, 7), 0x11);
        dev.write(0, b"x");
        dev.write(0, b"\n");
        assert_eq!(&*out.0.lock().unwrap(), b"x\n");
    }

    #[test]
    fn test_irq_line_with_saturated_counter_still_triggers() {
        let fd = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        fd.write(u64::MAX - 1).unwrap();
        assert!(IrqLine(fd.try_clone().unwrap()).trigger().is_ok());
        assert_eq!(fd.read().unwrap(), u64::MAX - 1);
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
