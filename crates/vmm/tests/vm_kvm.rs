//! Checks that this machine's KVM runs guest code natively. Run where a usable KVM exists
//! (`cargo xtask test` runs it inside the host VM on machines without one).

use wrenn_vmm::probe::{self, KvmVerdict, MAX_USABLE_NS_PER_ITER};

#[test]
fn test_real_mode_vcpu_runs_loop_and_halts() {
    if !probe::usable_for_test("test_real_mode_vcpu_runs_loop_and_halts") {
        return;
    }
    probe::check_real_mode().expect("real-mode check");
}

#[test]
fn test_long_mode_vcpu_runs_cpl0_loop_at_native_speed() {
    if !probe::usable_for_test("test_long_mode_vcpu_runs_cpl0_loop_at_native_speed") {
        return;
    }
    let timing = probe::check_long_mode(1_000_000).expect("long-mode check");
    assert_eq!(timing.iterations, 1_000_000);
    assert!(
        timing.ns_per_iter() < MAX_USABLE_NS_PER_ITER,
        "CPL0 loop took {:.1} ns/iteration",
        timing.ns_per_iter()
    );
}

#[test]
fn test_assess_says_usable_with_timing() {
    if !probe::usable_for_test("test_assess_says_usable_with_timing") {
        return;
    }
    match probe::assess() {
        KvmVerdict::Usable { timing, .. } => assert!(timing.elapsed.as_nanos() > 0),
        other => panic!("expected a usable KVM, got: {other}"),
    }
}
