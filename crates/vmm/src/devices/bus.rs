//! Address buses: which device answers a vCPU's port I/O or MMIO access.
//!
//! A vCPU exit names an address; the bus finds the device whose range holds it and calls it with
//! the offset into that range. Devices sit behind a mutex because every vCPU thread may reach
//! them, and the device event loop too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range; `data` is the
/// access (1, 2, 4 or 8 bytes). Accesses the device does not implement read as zero and write
/// nothing: a guest must not be able to stop the VMM by poking at registers.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap { base: u64, len: u64 },
}

type Slot = (u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    /// base -> (length, device)
    devices: BTreeMap<u64, Slot>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, (l, _))| (*b, *l)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let before = self.devices.range(..end).next_back();
        if let Some((b, (l, _))) = before
            && b + l > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, device)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, device))
    }

    /// Dispatches a read; returns false when no device owns `addr` (the data stays zeroed).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another thread panicked while holding it: the device's state is
/// still the best we have, and a poisoned lock must not turn into a VMM-wide panic.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xff));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn test_bus_routes_by_range_and_refuses_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x108, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 0x10).is_err());
        assert!(bus.insert(dev.clone(), 0x110, 0).is_err());
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x103, &mut b));
        assert_eq!(b[0], 3);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b[0], 0);
        assert!(bus.write(0x11f, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xf, 7)]);
    }
}
