//! The CPUID a guest sees: Wrenn's one CPUID template.
//!
//! Start from what KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`, which already hides
//! what KVM cannot virtualize and adds KVM's paravirtual leaves 0x4000_00xx with kvmclock), then:
//!
//! | leaf | change | why |
//! |---|---|---|
//! | 0x1 EBX | APIC id = vCPU index, logical count = vCPUs, CLFLUSH line 64 B | each vCPU knows who it is |
//! | 0x1 ECX | set HYPERVISOR (31) and TSC_DEADLINE (24); clear MONITOR (3) | the in-kernel LAPIC has a deadline timer; MWAIT would exit |
//! | 0x1 EDX | HTT (28) set when there is more than one vCPU | |
//! | 0x6 | all zero | no thermal or power management to offer |
//! | 0xa | all zero | no PMU: perf counters would trap on every access |
//! | 0xb, 0x1f | one thread per core, vCPUs cores in one package; x2APIC id = index | topology matches the MP table |
//! | 0x8000_0001 ECX | CmpLegacy (1) when more than one vCPU | AMD's multi-core flag |
//! | 0x8000_0008 ECX | NC = vCPUs - 1 | AMD's core count |
//!
//! Everything else passes through unchanged, so a guest on a newer host sees newer features:
//! snapshots restore only on hosts with the same CPU model (checked by the snapshot issue).

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_POWER: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_SIZES: u32 = 0x8000_0008;

const ECX_MONITOR: u32 = 1 << 3;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Topology level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Applies the template for vCPU `index` of `count`.
pub fn apply_template(cpuid: &mut CpuId, index: u8, count: u8) {
    let (index, count) = (u32::from(index), u32::from(count));
    // Bits needed to number `count` cores: x2APIC ids are index, so the core level shift must
    // cover them.
    let core_shift = 32 - count.saturating_sub(1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (index << 24) | (count.min(255) << 16) | (8 << 8) | (entry.ebx & 0xff);
                entry.ecx = (entry.ecx | ECX_HYPERVISOR | ECX_TSC_DEADLINE) & !ECX_MONITOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_POWER | LEAF_PMU => zero(entry),
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_shift;
                        entry.ebx = count;
                        entry.ecx = (LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
                entry.edx = index;
            }
            LEAF_EXT_FEATURES => {
                if count > 1 {
                    entry.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_SIZES => {
                entry.ecx = (entry.ecx & !0xff) | (count - 1);
            }
            _ => {}
        }
    }
}

fn zero(entry: &mut kvm_cpuid_entry2) {
    entry.eax = 0;
    entry.ebx = 0;
    entry.ecx = 0;
    entry.edx = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn test_template_sets_apic_ids_and_topology() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_PMU, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_EXT_SIZES, 0),
        ])
        .unwrap();
        cpuid.as_mut_slice()[1].eax = 0x0803_0004;
        apply_template(&mut cpuid, 3, 6);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 6);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].eax, 0, "no PMU");
        assert_eq!((e[3].eax, e[3].ebx, e[3].edx), (3, 6, 3));
        assert_eq!(e[4].ecx & 0xff, 5);
    }
}
