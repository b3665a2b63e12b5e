//! Host VM tests with real QEMU and a real L1 (each boot takes a few seconds under TCG).
//!
//! They need root and QEMU (installed on demand) and are skipped, saying so, inside the host VM
//! itself. VM tests take a lock so that boots do not compete for the machine's two cores.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wrenn_hostvm::{
    CommandSpec, HOST_ADDRESS_FROM_GUEST, HOST_ENV, HostVmError, HostVmNetwork, Placement,
    RunOptions, decide, free_local_address, run,
};
use wrenn_image::cache::Cache;

static VM_LOCK: Mutex<()> = Mutex::new(());

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "wrenn_hostvm=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Why host VM tests cannot run here, if they cannot.
fn skip_reason() -> Option<&'static str> {
    if decide::in_hostvm() {
        return Some("already inside the host VM");
    }
    if !wrenn_image::packages::is_root() {
        return Some("not root");
    }
    None
}

macro_rules! require_hostvm {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// A fresh directory under the target directory (not /tmp: /tmp is per-run inside the VM).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hostvm-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_captured(
    spec: &CommandSpec,
    options: &RunOptions,
) -> (Result<i32, HostVmError>, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = run(spec, options, &Cache::from_env(), &mut out, &mut err);
    (
        result,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// QEMU processes whose command line mentions the run directories of process `pid`.
fn qemus_of(pid: u32) -> Vec<String> {
    let marker = format!("hostvm-runs/{pid}-");
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("qemu-system") && cmdline.contains(&marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

const SCRIPT: &str = r#"
echo "cwd=$(pwd)"
echo "var=$WRENN_TEST_VAR"
echo "in_hostvm=$WRENN_IN_HOSTVM"
[ -c /dev/kvm ] && echo "kvm=yes" || echo "kvm=no"
grep -qw svm /proc/cpuinfo && echo "svm=yes" || echo "svm=no"
echo "from the VM" > written.txt && echo "share=written"
if touch "$RO_PROBE" 2>/dev/null; then echo "root=writable"; else echo "root=readonly"; fi
[ -e /sys/class/net/eth0 ] && echo "eth0=yes" || echo "eth0=no"
echo "host=${WRENN_HOSTVM_HOST-unset}"
echo tmpdata > /tmp/inside && echo "tmp=$(cat /tmp/inside)"
echo "to stderr" >&2
exit 7
"#;

#[test]
fn test_hostvm_command_gets_kvm_cwd_env_shares_and_returns_exit_code() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let share = scratch("share");
    let ro_parent = scratch("ro");
    let ro_probe = ro_parent.join("must-not-exist");
    let spec = CommandSpec::new(["sh", "-c", SCRIPT])
        .cwd(&share)
        .env("WRENN_TEST_VAR", "hello 'quoted' world")
        .env("RO_PROBE", &ro_probe)
        .writable(&share);
    let mut spec = spec;
    // Inherited from the caller, but meaningless without a network: not overridden.
    spec.env.retain(|(k, _)| k != HOST_ENV);
    let started = Instant::now();
    let (result, out, err) = run_captured(&spec, &RunOptions::new(Placement::HostVm));
    eprintln!(
        "took {:?}\nstdout:\n{out}\nstderr:\n{err}",
        started.elapsed()
    );
    let code = result.unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(code, 7);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            format!("cwd={}", share.display()).as_str(),
            "var=hello 'quoted' world",
            "in_hostvm=1",
            "kvm=yes",
            "svm=yes",
            "share=written",
            "root=readonly",
            "eth0=no",
            "host=unset",
            "tmp=tmpdata",
        ]
    );
    assert_eq!(err, "to stderr\n");
    assert_eq!(
        fs::read_to_string(share.join("written.txt")).unwrap(),
        "from the VM\n"
    );
    assert!(!ro_probe.exists(), "the host root was writable");
    let _ = fs::remove_dir_all(&share);
    let _ = fs::remove_dir_all(&ro_parent);
}

#[test]
fn test_hostvm_signal_gives_128_plus_signal_and_no_shell_noise() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // A cwd under the host's /tmp, outside any writable share, stays visible inside (the VM's
    // own /tmp would hide it otherwise).
    let host_tmp = tempfile::Builder::new()
        .prefix("wrenn-hostvm-cwd")
        .tempdir_in("/tmp")
        .unwrap();
    fs::write(host_tmp.path().join("note.txt"), "before\n").unwrap();
    let spec =
        CommandSpec::new(["sh", "-c", "cat note.txt >&2; kill -KILL $$"]).cwd(host_tmp.path());
    let (result, out, err) = run_captured(&spec, &RunOptions::new(Placement::HostVm));
    assert_eq!(result.unwrap_or_else(|e| panic!("{}", chain(&e))), 128 + 9);
    assert_eq!(out, "");
    // Only what the command wrote: no "Killed" from the VM's init shell.
    assert_eq!(err, "before\n");
}

#[test]
fn test_hostvm_timeout_kills_vm_and_leaves_no_qemu() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let spec = CommandSpec::new(["sh", "-c", "echo started; sleep 600"]);
    let options = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(15));
    let started = Instant::now();
    let (result, out, _) = run_captured(&spec, &options);
    let took = started.elapsed();
    let err = result.expect_err("a 600 s sleep must time out");
    assert!(
        matches!(err, HostVmError::Timeout { .. }),
        "{}",
        chain(&err)
    );
    assert!(took < Duration::from_secs(40), "took {took:?}");
    assert_eq!(out, "started\n", "the output before the timeout arrives");
    let left = qemus_of(std::process::id());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

#[test]
fn test_hostvm_whose_heartbeat_stops_is_killed_as_frozen_with_its_state() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // The command keeps talking but stops init's heartbeat loop (the parent of its `sleep 3`),
    // which is what a frozen VM looks like from the host. Scanned again until that worked: a
    // scan slower than 3 s (a busy machine) can reach the `sleep 3` it listed after it exited.
    let script = r#"
        echo tick
        stopped=
        while [ -z "$stopped" ]; do
            for p in /proc/[0-9]*; do
                if [ "$(tr '\0' ' ' <$p/cmdline)" = "sleep 3 " ]; then
                    kill -STOP "$(cut -d' ' -f4 $p/stat)" && stopped=yes
                    break
                fi
            done 2>/dev/null
        done
        while :; do echo tick; sleep 1; done"#;
    let spec = CommandSpec::new(["sh", "-c", script]);
    let mut options = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(120));
    // Long enough for the scan above on a busy machine, short enough for a test.
    options.heartbeat_timeout = Duration::from_secs(15);
    let started = Instant::now();
    let (result, out, _) = run_captured(&spec, &options);
    let took = started.elapsed();
    let err = result.expect_err("a VM without heartbeat must count as stalled");
    match &err {
        HostVmError::Stalled { what, state, .. } => {
            assert!(what.contains("heartbeat"), "{what}");
            assert!(
                !state.contains("RIP=unknown"),
                "QMP did not answer: {state}"
            );
        }
        other => panic!("expected a stall, got: {}", chain(other)),
    }
    assert!(out.contains("tick"), "{out}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    let left = qemus_of(std::process::id());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

#[test]
fn test_hostvm_silent_command_is_killed_as_a_stall() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Output every second for a while, then silence: only the silence counts.
    let spec = CommandSpec::new([
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6; do echo tick; sleep 1; done; sleep 600",
    ]);
    let mut options = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(120));
    options.quiet_timeout = Some(Duration::from_secs(8));
    let started = Instant::now();
    let (result, out, _) = run_captured(&spec, &options);
    let took = started.elapsed();
    let err = result.expect_err("a silent command must count as a stall");
    assert!(
        matches!(err, HostVmError::Stalled { .. }),
        "{}",
        chain(&err)
    );
    assert_eq!(out.matches("tick").count(), 6, "{out}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let left = qemus_of(std::process::id());
    assert!(left.is_empty(), "QEMU still running: {left:?}");
}

#[test]
fn test_hostvm_without_svm_reports_missing_kvm_clearly() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut options = RunOptions::new(Placement::HostVm);
    options.cpu = "max,-svm".into();
    options.timeout = Some(Duration::from_secs(120));
    let (result, out, _) = run_captured(&CommandSpec::new(["true"]), &options);
    let err = result.expect_err("kvm_amd cannot load without SVM");
    let msg = chain(&err);
    eprintln!("{msg}");
    assert!(matches!(err, HostVmError::GuestSetup { .. }), "{msg}");
    assert!(msg.contains("kvm_amd"), "{msg}");
    assert!(out.is_empty());
}

/// Output shared with the test while the command still runs.
#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl SharedOutput {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn test_hostvm_forward_reaches_a_listener_inside() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let host = free_local_address().unwrap();
    let guest_port = 7777;
    // Busybox's nc (the host's busybox-static) sends its stdin to the first connection, shuts
    // its side down at the end and exits when the peer closes. "listening" once the socket is
    // (a connection made earlier is closed by slirp, or waits on its SYN retries).
    let script = format!(
        r#"echo "host=${HOST_ENV}"
        echo 'hello from the guest' | busybox nc -l -p {guest_port} &
        until busybox netstat -ltn | grep -q ':{guest_port} '; do sleep 0.1; done
        echo listening
        wait $!
        echo "nc=$?""#
    );
    let options = RunOptions::new(Placement::HostVm)
        .timeout(Duration::from_secs(180))
        .network(HostVmNetwork::new().forward(host, guest_port));
    assert_eq!(options.host_address_of(guest_port), Some(host));
    let out = SharedOutput::default();
    let vm = {
        let mut out = out.clone();
        let spec = CommandSpec::new(["sh", "-c", &script]);
        std::thread::spawn(move || {
            let mut err = Vec::new();
            let result = run(&spec, &options, &Cache::from_env(), &mut out, &mut err);
            (result, String::from_utf8_lossy(&err).into_owned())
        })
    };
    let started = Instant::now();
    while !out.text().contains("listening\n") && !vm.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut received = String::new();
    if !vm.is_finished() {
        let mut conn = TcpStream::connect(host).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        conn.read_to_string(&mut received).unwrap();
    }
    let (result, err) = vm.join().unwrap();
    let out = out.text();
    eprintln!("{:?}\nstdout:\n{out}\nstderr:\n{err}", started.elapsed());
    assert_eq!(result.unwrap_or_else(|e| panic!("{}", chain(&e))), 0);
    assert_eq!(received, "hello from the guest\n");
    assert_eq!(
        out,
        format!("host={HOST_ADDRESS_FROM_GUEST}\nlistening\nnc=0\n")
    );
}

#[test]
fn test_hostvm_reaches_a_listener_on_the_hosts_loopback() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        conn.write_all(format!("pong: {got}").as_bytes()).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        (got, peer)
    });
    let script = format!("echo ping-from-guest | busybox nc \"${HOST_ENV}\" {port}");
    let options = RunOptions::new(Placement::HostVm)
        .timeout(Duration::from_secs(120))
        .network(HostVmNetwork::new());
    let (result, out, err) = run_captured(&CommandSpec::new(["sh", "-c", &script]), &options);
    eprintln!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(result.unwrap_or_else(|e| panic!("{}", chain(&e))), 0);
    assert_eq!(out, "pong: ping-from-guest\n");
    let (got, peer) = server.join().unwrap();
    assert_eq!(got, "ping-from-guest\n");
    // Slirp connects from the host's own loopback: a service on 127.0.0.1 needs nothing more.
    assert!(peer.ip().is_loopback(), "{peer}");
}

/// Accepts connections on `listener` until dropped, keeping what each one sent.
struct Recorder {
    got: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    fn start(listener: TcpListener) -> Recorder {
        listener.set_nonblocking(true).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_secs(30)))
                            .unwrap();
                        let mut text = String::new();
                        let _ = conn.read_to_string(&mut text);
                        g.lock().unwrap().push(text);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Recorder { got, stop }
    }

    fn got(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The host's address on its default route (no packet is sent), if it has one.
fn host_outward_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("198.51.100.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn test_hostvm_forwarded_traffic_cannot_reach_the_hosts_loopback() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = loopback.local_addr().unwrap().port();
    let loopback = Recorder::start(loopback);
    // A control: the same namespace reaches the host's outward address (forwarded and
    // masqueraded like a sandbox's traffic), so the block above is the rule's doing.
    let outward = host_outward_ip().map(|ip| {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, Recorder::start(listener))
    });
    let (outward_ip, outward_port) = outward.as_ref().map_or(("none".to_owned(), 0), |(a, _)| {
        (a.ip().to_string(), a.port())
    });
    // A namespace routed through the host VM, as the agent's slots are.
    let script = format!(
        r#"set -e
        ip netns add wrenn-hostvm-test
        ip link add wht-h type veth peer name wht-n
        ip link set wht-n netns wrenn-hostvm-test
        ip addr add 10.99.0.1/30 dev wht-h
        ip link set wht-h up
        ip netns exec wrenn-hostvm-test ip addr add 10.99.0.2/30 dev wht-n
        ip netns exec wrenn-hostvm-test ip link set wht-n up
        ip netns exec wrenn-hostvm-test ip route add default via 10.99.0.1
        echo 1 >/proc/sys/net/ipv4/ip_forward
        echo 'table ip wht {{ chain post {{ type nat hook postrouting priority srcnat; ip saddr 10.99.0.0/30 masquerade; }}; }}' | nft -f -
        set +e
        echo own | busybox nc "${HOST_ENV}" {port} && echo own=sent
        echo ns | ip netns exec wrenn-hostvm-test busybox nc -w 10 "${HOST_ENV}" {port} 2>/dev/null && echo ns=reached || echo ns=blocked
        # Without init's table the same connection goes through: the table is what blocks it.
        nft delete table ip wrenn_hostvm
        echo unguarded | ip netns exec wrenn-hostvm-test busybox nc -w 10 "${HOST_ENV}" {port} && echo unguarded=reached
        if [ {outward_ip} != none ]; then
            echo ns | ip netns exec wrenn-hostvm-test busybox nc -w 10 {outward_ip} {outward_port} && echo control=reached
        fi
        "#
    );
    let options = RunOptions::new(Placement::HostVm)
        .timeout(Duration::from_secs(180))
        .network(HostVmNetwork::new());
    let (result, out, err) = run_captured(&CommandSpec::new(["sh", "-c", &script]), &options);
    eprintln!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(result.unwrap_or_else(|e| panic!("{}", chain(&e))), 0);
    for line in ["own=sent", "ns=blocked", "unguarded=reached"] {
        assert!(out.lines().any(|l| l == line), "no {line}: {out}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        loopback.got(),
        ["own\n", "unguarded\n"],
        "only the host VM itself (and the namespace once the table was gone) got through"
    );
    match &outward {
        Some((_, control)) => {
            assert!(out.contains("control=reached\n"), "{out}");
            assert_eq!(control.got(), ["ns\n"]);
        }
        None => eprintln!("no outward address on this host: control skipped"),
    }
}

#[test]
fn test_hostvm_forward_on_a_taken_port_fails_clearly() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = taken.local_addr().unwrap();
    let options = RunOptions::new(Placement::HostVm)
        .timeout(Duration::from_secs(120))
        .network(HostVmNetwork::new().forward(host, 80));
    let (result, _, _) = run_captured(&CommandSpec::new(["true"]), &options);
    let err = result.expect_err("QEMU cannot listen on a taken port");
    let msg = chain(&err);
    eprintln!("{msg}");
    assert!(matches!(err, HostVmError::QemuFailed { .. }), "{msg}");
    assert!(msg.contains(&host.port().to_string()), "{msg}");
}

/// Not run by default (it boots 12 host VMs): the boot cost of the network, as the time to run
/// a command in a fresh host VM with and without one, on the host's clock (QEMU's launch to
/// its exit) and on the guest's (the kernel's start to the command's, from /proc/uptime: less
/// disturbed by QEMU's own start). `--ignored --nocapture` shows the figures.
#[test]
#[ignore = "a measurement, not a check: boots 12 host VMs"]
fn test_hostvm_boot_time_with_and_without_network() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let spec = CommandSpec::new(["cat", "/proc/uptime"]);
    let plain = RunOptions::new(Placement::HostVm).timeout(Duration::from_secs(120));
    let net = plain
        .clone()
        .network(HostVmNetwork::new().forward(free_local_address().unwrap(), 5008));
    // Warm the artifact cache first.
    assert_eq!(run_captured(&spec, &plain).0.unwrap(), 0);
    let mut times: [(Vec<u128>, Vec<u128>); 2] = Default::default();
    for _ in 0..6 {
        for (options, (wall, guest)) in [&plain, &net].into_iter().zip(times.iter_mut()) {
            let started = Instant::now();
            let (result, out, _) = run_captured(&spec, options);
            assert_eq!(result.unwrap(), 0);
            wall.push(started.elapsed().as_millis());
            let uptime: f64 = out.split_whitespace().next().unwrap().parse().unwrap();
            guest.push(Duration::from_secs_f64(uptime).as_millis());
        }
    }
    for (name, (wall, guest)) in ["without network", "with network"].iter().zip(&mut times) {
        wall.sort_unstable();
        guest.sort_unstable();
        eprintln!(
            "{name}: run in {wall:?} ms (median {}), command started at guest uptime {guest:?} ms (median {})",
            wall[3], guest[3]
        );
    }
}

const CHILD_ENV: &str = "WRENN_HOSTVM_TEST_CHILD";

/// Not a test by itself: the body of the process that
/// `test_hostvm_killed_caller_takes_qemu_along` starts and kills.
#[test]
fn test_hostvm_child_helper() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let spec = CommandSpec::new(["sleep", "600"]);
    let _ = run_captured(&spec, &RunOptions::new(Placement::HostVm));
}

#[test]
fn test_hostvm_killed_caller_takes_qemu_along_and_next_run_cleans_up() {
    require_hostvm!();
    init_logs();
    let _vm = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "test_hostvm_child_helper", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // The first run may build the artifacts first.
    let waited = Instant::now();
    while qemus_of(pid).is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(300),
            "no QEMU appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while !qemus_of(pid).is_empty() {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "QEMU outlived its caller: {:?}",
            qemus_of(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let runs = Cache::from_env().root().join("work/hostvm-runs");
    let stale: Vec<PathBuf> = fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
        })
        .collect();
    assert_eq!(stale.len(), 1, "the killed run's directory: {stale:?}");

    // A run whose boots cannot finish in time: killed and retried, then a clear error. Its
    // start removes the killed run's directory.
    let mut options = RunOptions::new(Placement::HostVm);
    options.boot_timeout = Duration::from_millis(300);
    options.boot_attempts = 2;
    let (result, _, _) = run_captured(&CommandSpec::new(["true"]), &options);
    let err = result.expect_err("no boot finishes in 300 ms");
    let msg = chain(&err);
    eprintln!("{msg}");
    assert!(
        matches!(err, HostVmError::Boot { attempts: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains("not ready within 300ms"), "{msg}");
    assert!(
        !stale[0].exists(),
        "stale run directory left: {}",
        stale[0].display()
    );
    assert!(qemus_of(std::process::id()).is_empty());
}

#[test]
fn test_hostvm_invalid_writable_dir_is_error_before_boot() {
    let spec = CommandSpec::new(["true"]).writable("/wrenn/no/such/dir");
    let (result, _, _) = run_captured(&spec, &RunOptions::new(Placement::HostVm));
    assert!(
        matches!(result, Err(HostVmError::InvalidSpec { .. })),
        "{result:?}"
    );
}

#[test]
fn test_decide_on_pvm_machine_chooses_hostvm() {
    init_logs();
    if std::env::var_os("WRENN_HOSTVM").is_some() || decide::in_hostvm() {
        eprintln!("skipped: WRENN_HOSTVM or WRENN_IN_HOSTVM is set");
        return;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: not a PVM machine");
        return;
    }
    let decision = decide().unwrap();
    assert_eq!(decision.placement, Placement::HostVm, "{decision}");
    assert!(decision.reason.contains("kvm_pvm"), "{decision}");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
