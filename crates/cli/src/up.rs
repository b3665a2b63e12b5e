//! `wrenn up`: everything Wrenn needs on this machine, started and checked.
//!
//! Today that is the guest (envd, kernel and images, built or reused) and a usable KVM: directly, or
//! inside the host VM, where the rest of Wrenn (the host agent, then the control plane) will run
//! as it lands. Once up, it stays up until Ctrl-C.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use wrenn_hostvm::Placement;
use wrenn_image::cache::Cache;
use wrenn_image::guest;
use wrenn_image::qemu::{Accel, Boot};
use wrenn_image::rootfs::{IMAGE_FILE, READY_MARKER};
use wrenn_vmm::probe;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Check and exit instead of staying up.
    #[arg(long)]
    check: bool,
    /// Internal: the part of `up` that runs where the KVM is.
    #[arg(long, hide = true)]
    inside: bool,
}

pub fn run(cache: &Cache, args: Args) -> Result<ExitCode> {
    if args.inside {
        return inside(cache, args.check);
    }
    // envd goes into the images: `WRENN_ENVD`, or the workspace's envd built static. The part
    // that runs where the KVM is finds the same binary the same way.
    let envd = wrenn_image::envd::ensure().context("building the static envd")?;
    let built = guest::build_with(cache, &[], false, Some(&envd)).context("building the guest")?;
    wrenn_image::packages::ensure(wrenn_image::qemu::PACKAGES)?;
    print!("{}", built.summary());
    let decision = wrenn_hostvm::decide()?;
    match decision.placement {
        Placement::Direct => inside(cache, args.check),
        Placement::HostVm => {
            let mut argv = vec![
                std::env::current_exe()?.into_os_string(),
                "up".into(),
                "--inside".into(),
            ];
            if args.check {
                argv.push("--check".into());
            }
            let options = wrenn_hostvm::RunOptions::new(decision.placement);
            let code = crate::run_where_kvm_is(cache, &argv, &options)?;
            Ok(crate::exit_code(code))
        }
    }
}

/// Where the KVM is: check it, boot the test guest once, then stay up.
fn inside(cache: &Cache, check_only: bool) -> Result<ExitCode> {
    let verdict = probe::assess();
    if !verdict.is_usable() {
        bail!("{verdict}");
    }
    println!("{verdict}");
    let found = guest::find(cache, &[guest::Part::Kernel, guest::Part::Test])?;
    let (Some(kernel), Some(test)) = (found.kernel, found.test) else {
        bail!("the guest kernel or test image is missing");
    };
    let outcome = Boot::new(&kernel.file("vmlinux"), &test.file(IMAGE_FILE), Accel::Kvm).run()?;
    let ready = outcome.ready_after.with_context(|| {
        format!(
            "the test guest did not reach {READY_MARKER}:\n{}",
            outcome.console
        )
    })?;
    println!(
        "test guest booted on this KVM to its ready marker in {} ms",
        ready.as_millis()
    );
    if check_only {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Wrenn is up (Ctrl-C to stop). The host agent and control plane arrive with the next releases."
    );
    loop {
        std::thread::park();
    }
}
