//! Emulated devices that are not virtio: the bus they sit on, the serial port, the i8042.

pub mod bus;
pub mod i8042;
pub mod serial;
