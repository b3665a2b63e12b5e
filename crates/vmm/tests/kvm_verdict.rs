//! The probe's verdict on the machine the tests run on (host side, no host VM).

use wrenn_vmm::probe;

#[test]
fn test_assess_pvm_host_is_not_usable() {
    // PVM emulates guest kernel code; the probe exists to tell exactly this case apart.
    if !probe::pvm_loaded() {
        eprintln!("SKIPPED: this host's /dev/kvm is not PVM");
        return;
    }
    let verdict = probe::assess();
    assert!(!verdict.is_usable(), "PVM judged usable: {verdict}");
    let text = verdict.to_string();
    assert!(text.contains("kvm_pvm"), "{text}");
}

#[test]
fn test_assess_never_panics_and_explains() {
    let text = probe::assess().to_string();
    assert!(text.starts_with("/dev/kvm is"), "{text}");
}
