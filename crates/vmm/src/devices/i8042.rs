//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
//!
//! Two jobs: reset (the guest writes 0xfe to the command port, which is how `reboot=k` ends the
//! VM) and Ctrl+Alt+Del (the VMM types the key combination so that the guest's init can shut
//! down cleanly). Enough of the controller and keyboard protocol is modelled for Linux's
//! i8042 and atkbd drivers to probe a keyboard; the aux (mouse) port does not exist.
//!
//! Snapshots keep the controller's registers, a half-written command and the bytes waiting
//! for the guest ([`I8042State`]).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::devices::serial::IrqLine;
use crate::lifecycle::{ExitNotifier, VmExit};
use crate::virtio::persist::PersistError;
use vm_superio::Trigger;

const DATA_PORT: u64 = 0;
const COMMAND_PORT: u64 = 4;

/// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

/// Controller command byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;

/// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Scan code set 2: Ctrl, Alt, Del pressed, then released in reverse order.
const CTRL_ALT_DEL: [u8; 12] = [
    0x14, 0x11, 0xe0, 0x71, // make: Ctrl, Alt, Del (extended)
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, 0x00,
];
const CTRL_ALT_DEL_LEN: usize = 11;

/// Bounded so that a guest that never reads cannot make it grow.
const BUFFER_LIMIT: usize = 64;

/// The controller as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub output_port: u8,
    /// A controller command waiting for its data byte.
    pub pending_command: Option<u8>,
    /// A keyboard command waiting for its argument.
    pub kbd_expects_arg: bool,
    /// Bytes the guest has not read yet, oldest first; at most [`I8042_BUFFER_LIMIT`].
    pub buffer: Vec<u8>,
}

/// Most bytes the output buffer holds.
pub const I8042_BUFFER_LIMIT: usize = BUFFER_LIMIT;

pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    /// Command waiting for its data byte on port 0x60.
    pending_command: Option<u8>,
    /// A keyboard command waiting for its argument (LEDs, typematic rate, scan code set).
    kbd_expects_arg: bool,
    buffer: VecDeque<u8>,
    irq: IrqLine,
    exits: Arc<ExitNotifier>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("status", &self.status)
            .field("control", &self.control)
            .field("buffered", &self.buffer.len())
            .finish()
    }
}

impl I8042 {
    pub fn new(irq: IrqLine, exits: Arc<ExitNotifier>) -> Self {
        Self {
            status: SB_SYSTEM_FLAG | SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            output_port: 0x01,
            pending_command: None,
            kbd_expects_arg: false,
            buffer: VecDeque::new(),
            irq,
            exits,
        }
    }

    pub fn save_state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending_command: self.pending_command,
            kbd_expects_arg: self.kbd_expects_arg,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Puts a saved controller back; if bytes were waiting, the guest is interrupted again
    /// (when it enabled the interrupt), as it was for them before the snapshot.
    pub fn restore_state(&mut self, state: &I8042State) -> Result<(), PersistError> {
        if state.buffer.len() > BUFFER_LIMIT {
            return Err(PersistError::invalid(
                "i8042",
                "buffer",
                format!(
                    "{} bytes; the controller holds {BUFFER_LIMIT}",
                    state.buffer.len()
                ),
            ));
        }
        self.status = state.status;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending_command = state.pending_command;
        self.kbd_expects_arg = state.kbd_expects_arg;
        self.buffer = state.buffer.iter().copied().collect();
        // OUT_FULL follows the buffer, and a waiting byte gets its interrupt again.
        self.update_output();
        Ok(())
    }

    /// Types Ctrl+Alt+Del. Fails when the guest has not drained earlier keys (or has no
    /// keyboard driver), so the caller can report it instead of silently queueing forever.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), &'static str> {
        if self.buffer.len() + CTRL_ALT_DEL_LEN > BUFFER_LIMIT {
            return Err("the guest is not reading its keyboard");
        }
        for &b in &CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN] {
            self.push(b);
        }
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER_LIMIT {
            self.buffer.push_back(byte);
        }
        self.update_output();
    }

    /// Moves the next buffered byte into view and raises IRQ 1 if the guest wants it.
    fn update_output(&mut self) {
        if self.buffer.is_empty() {
            self.status &= !SB_OUT_FULL;
            return;
        }
        self.status |= SB_OUT_FULL;
        if self.control & CB_KBD_INT != 0
            && self.control & CB_KBD_DISABLED == 0
            && let Err(e) = self.irq.trigger()
        {
            tracing::warn!(error = %e, "i8042 interrupt");
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.buffer.pop_front().unwrap_or(0);
        self.update_output();
        byte
    }

    fn write_command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending_command = Some(cmd),
            CMD_READ_OUTP => self.push(self.output_port),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            // No aux port: its test reports a clock line stuck low.
            CMD_AUX_TEST => self.push(0x01),
            CMD_KBD_DISABLE => self.control |= CB_KBD_DISABLED,
            CMD_KBD_ENABLE => self.control &= !CB_KBD_DISABLED,
            CMD_AUX_DISABLE | CMD_AUX_ENABLE => {}
            CMD_RESET_CPU => self.exits.report(VmExit::Reset),
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTP) => {
                self.output_port = byte;
                // Bit 0 low pulses the CPU reset line.
                if byte & 1 == 0 {
                    self.exits.report(VmExit::Reset);
                }
            }
            Some(CMD_WRITE_KBD_OUT) => self.push(byte),
            // Aux writes go nowhere: there is no mouse.
            Some(_) => {}
            None => self.keyboard_command(byte),
        }
    }

    /// Bytes written to port 0x60 go to the keyboard itself.
    fn keyboard_command(&mut self, byte: u8) {
        if self.kbd_expects_arg {
            self.kbd_expects_arg = false;
            self.push(KBD_ACK);
            return;
        }
        match byte {
            // Reset: ACK, then self-test passed.
            0xff => {
                self.push(KBD_ACK);
                self.push(KBD_SELF_TEST_OK);
            }
            // Identify: ACK and the MF2 keyboard id.
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            // Set LEDs, set typematic rate, select scan code set: an argument follows.
            0xed | 0xf3 | 0xf0 => {
                self.kbd_expects_arg = true;
                self.push(KBD_ACK);
            }
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_PORT => self.read_data(),
            COMMAND_PORT => self.status,
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_PORT => self.write_data(byte),
            COMMAND_PORT => self.write_command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (I8042, std::sync::mpsc::Receiver<VmExit>, EventFd) {
        let (exits, rx) = ExitNotifier::new().unwrap();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(IrqLine(irq.try_clone().unwrap()), Arc::new(exits));
        (dev, rx, irq)
    }

    fn read(dev: &mut I8042, port: u64) -> u8 {
        let mut b = [0u8];
        dev.read(port, &mut b);
        b[0]
    }

    #[test]
    fn test_reset_command_reports_a_reset() {
        let (mut dev, rx, _) = device();
        dev.write(COMMAND_PORT, &[CMD_RESET_CPU]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::Reset);
    }

    #[test]
    fn test_ctrl_alt_del_is_typed_with_an_interrupt() {
        let (mut dev, _rx, irq) = device();
        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() > 0);
        let mut typed = Vec::new();
        while read(&mut dev, COMMAND_PORT) & SB_OUT_FULL != 0 {
            typed.push(read(&mut dev, DATA_PORT));
        }
        assert_eq!(typed, CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
    }

    #[test]
    fn test_controller_self_test_and_command_byte_round_trip() {
        let (mut dev, _rx, _) = device();
        dev.write(COMMAND_PORT, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_PORT), 0x55);
        dev.write(COMMAND_PORT, &[CMD_WRITE_CTR]);
        dev.write(DATA_PORT, &[0x45]);
        dev.write(COMMAND_PORT, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_PORT), 0x45);
        dev.write(DATA_PORT, &[0xff]);
        assert_eq!(read(&mut dev, DATA_PORT), KBD_ACK);
        assert_eq!(read(&mut dev, DATA_PORT), KBD_SELF_TEST_OK);
    }

    #[test]
    fn test_i8042_state_round_trip_keeps_command_and_waiting_bytes() {
        let (mut dev, _rx, _) = device();
        dev.write(COMMAND_PORT, &[CMD_WRITE_CTR]);
        dev.write(DATA_PORT, &[CB_KBD_INT | CB_POST_OK]);
        dev.write(DATA_PORT, &[0xf2]); // identify: ACK, 0xab, 0x83 wait
        assert_eq!(read(&mut dev, DATA_PORT), KBD_ACK);
        dev.write(COMMAND_PORT, &[CMD_WRITE_OUTP]); // its data byte comes after the restore
        let state = dev.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let state: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(state.buffer, vec![0xab, 0x83]);
        assert_eq!(state.pending_command, Some(CMD_WRITE_OUTP));

        let (mut restored, rx, irq) = device();
        restored.restore_state(&state).unwrap();
        assert_eq!(restored.save_state(), state);
        assert!(irq.read().unwrap() >= 1, "waiting bytes interrupt again");
        assert_ne!(read(&mut restored, COMMAND_PORT) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut restored, DATA_PORT), 0xab);
        assert_eq!(read(&mut restored, DATA_PORT), 0x83);
        assert_eq!(read(&mut restored, COMMAND_PORT) & SB_OUT_FULL, 0);
        // The half-written command completes: bit 0 low resets the machine.
        restored.write(DATA_PORT, &[0x00]);
        assert_eq!(rx.try_recv().unwrap(), VmExit::Reset);
    }

    #[test]
    fn test_i8042_restore_overfull_buffer_is_an_error_and_changes_nothing() {
        let (mut dev, _rx, _) = device();
        let mut state = dev.save_state();
        state.control = 0;
        state.buffer = vec![0; BUFFER_LIMIT + 1];
        let err = dev.restore_state(&state).unwrap_err();
        assert!(err.to_string().contains("i8042"), "{err}");
        assert!(err.to_string().contains("buffer"), "{err}");
        assert_eq!(dev.save_state().control, CB_POST_OK | CB_KBD_INT);
    }

    #[test]
    fn test_a_guest_that_never_reads_cannot_grow_the_buffer() {
        let (mut dev, _rx, _) = device();
        for _ in 0..1000 {
            dev.write(DATA_PORT, &[0xee]);
        }
        assert!(dev.buffer.len() <= BUFFER_LIMIT);
        assert!(dev.send_ctrl_alt_del().is_err());
    }
}
