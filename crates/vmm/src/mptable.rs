//! The Intel MultiProcessor table: how a guest without ACPI learns its vCPUs and its I/O APIC.
//!
//! Our guests boot without ACPI, so this table is the only description of the other vCPUs and
//! of the interrupt routing; without it Linux boots on one CPU with the legacy PIC. Linux looks
//! for the floating pointer in the last KiB of base memory, which is where it goes:
//!
//! ```text
//! 0x9fc00  floating pointer "_MP_" (16 bytes) -> config table
//! 0x9fc10  config table header "PCMP" (44 bytes)
//!          processor entry x vCPUs (20 bytes each; vCPU 0 is the bootstrap processor)
//!          bus entry: ISA (8 bytes)
//!          I/O APIC entry (8 bytes)
//!          I/O interrupt entries: ISA IRQ n -> I/O APIC pin n, n in 0..IOAPIC_PINS (8 bytes each)
//!          local interrupt entries: ExtINT -> LINT0, NMI -> LINT1 (8 bytes each)
//! ```
//!
//! Every structure carries a checksum byte that makes its bytes sum to zero (mod 256).

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Where the table starts: the last KiB of the first 640 KiB.
pub const MPTABLE_START: u64 = 0x9fc00;
/// The most vCPUs the table describes: the VMM's own limit, and the most whose table still fits
/// in the KiB between [`MPTABLE_START`] and the legacy video hole at 640 KiB (924 bytes at 32).
pub const MAX_VCPUS: u8 = 32;
/// Pins of the I/O APIC that KVM's in-kernel irqchip emulates.
pub const IOAPIC_PINS: u8 = 24;
/// Where the guest finds its local APIC and the I/O APIC.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SHORT_ENTRY_LEN: usize = 8;
const SPEC_REV_1_4: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ID_ISA: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs cannot be described: the MP table takes 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("the MP table does not fit in guest memory at {MPTABLE_START:#x}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The table's bytes for `vcpus` vCPUs (APIC IDs 0..vcpus), to be placed at [`MPTABLE_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    // The I/O APIC takes the first ID after the vCPUs'.
    let ioapic_id = vcpus;
    let short_entries = 1 + 1 + usize::from(IOAPIC_PINS) + 2;
    let mut entries =
        Vec::with_capacity(usize::from(vcpus) * PROCESSOR_LEN + short_entries * SHORT_ENTRY_LEN);
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): informational for Linux.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ID_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // Flags 0: the bus's default polarity and trigger mode.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, BUS_ID_ISA, pin]);
        entries.extend_from_slice(&[ioapic_id, pin]);
    }
    // 0xff: every local APIC.
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ID_ISA,
        0,
        0xff,
        1,
    ]);
    let entry_count = u16::from(vcpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let table_len = HEADER_LEN + entries.len();
    let table_len = u16::try_from(table_len).map_err(|_| MpTableError::VcpuCount(vcpus))?;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.extend_from_slice(&[SPEC_REV_1_4, 0]); // checksum filled in below
    header.extend_from_slice(b"WRENN   "); // OEM ID, 8 bytes
    header.extend_from_slice(b"MICROVM     "); // product ID, 12 bytes
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    header.extend_from_slice(&[0, 0]);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = MPTABLE_START + FLOATING_LEN as u64;
    let table_addr = u32::try_from(table_addr).map_err(|_| MpTableError::VcpuCount(vcpus))?;
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, revision, checksum, then feature bytes: all zero means
    // "a configuration table is present".
    floating.extend_from_slice(&[1, SPEC_REV_1_4, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut out = floating;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the table for `vcpus` vCPUs into guest memory at [`MPTABLE_START`].
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MpTableError::Write)
}

/// The byte that makes `bytes` (with it in place of a zero) sum to zero mod 256.
fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([bytes[at], bytes[at + 1]])
    }

    #[test]
    fn test_build_checksums_sum_to_zero() {
        for vcpus in [1, 2, 32, MAX_VCPUS] {
            let bytes = build(vcpus).unwrap();
            assert_eq!(
                sum(&bytes[..FLOATING_LEN]),
                0,
                "floating pointer, {vcpus} vCPUs"
            );
            assert_eq!(
                sum(&bytes[FLOATING_LEN..]),
                0,
                "config table, {vcpus} vCPUs"
            );
        }
    }

    #[test]
    fn test_build_header_lengths_and_counts_match_entries() {
        let bytes = build(4).unwrap();
        assert_eq!(&bytes[..4], b"_MP_");
        let table = &bytes[FLOATING_LEN..];
        assert_eq!(&table[..4], b"PCMP");
        assert_eq!(usize::from(u16_at(table, 4)), table.len());
        let count = usize::from(u16_at(table, 34));
        assert_eq!(count, 4 + 1 + 1 + usize::from(IOAPIC_PINS) + 2);
        assert_eq!(
            table.len(),
            HEADER_LEN + 4 * PROCESSOR_LEN + (count - 4) * SHORT_ENTRY_LEN
        );
        // The floating pointer names the table right after it.
        let pointer = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        assert_eq!(u64::from(pointer), MPTABLE_START + FLOATING_LEN as u64);
    }

    #[test]
    fn test_build_only_vcpu0_is_bootstrap() {
        let bytes = build(3).unwrap();
        let first = FLOATING_LEN + HEADER_LEN;
        for id in 0..3usize {
            let entry = &bytes[first + id * PROCESSOR_LEN..][..PROCESSOR_LEN];
            assert_eq!(entry[0], ENTRY_PROCESSOR);
            assert_eq!(usize::from(entry[1]), id);
            let bootstrap = entry[3] & CPU_BOOTSTRAP != 0;
            assert_eq!(bootstrap, id == 0, "vCPU {id}");
            assert_ne!(entry[3] & CPU_ENABLED, 0);
        }
    }

    #[test]
    fn test_build_bad_vcpu_count_is_error() {
        assert!(matches!(build(0), Err(MpTableError::VcpuCount(0))));
        assert!(matches!(
            build(MAX_VCPUS + 1),
            Err(MpTableError::VcpuCount(33))
        ));
    }

    #[test]
    fn test_write_fits_below_640k() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, MAX_VCPUS).unwrap();
        let end = MPTABLE_START + build(MAX_VCPUS).unwrap().len() as u64;
        assert!(
            end <= 0xa0000,
            "table ends at {end:#x}, inside the legacy video hole"
        );
    }
}
