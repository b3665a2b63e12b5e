//! The host agent end to end, in the host VM: real VMMs, real slots, real envd, driven through
//! `hostagent.v1` over Connect like the control plane drives it.
//!
//! One agent (and one template built from the test image) serves every test but the restart
//! test, which runs an agent of its own and restarts it.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use connectrpc::ErrorCode;
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use wrenn_agent::manager::{AgentConfig, Manager};
use wrenn_agent::rpc::ImageResolver;
use wrenn_image::cache::Cache;
use wrenn_image::rootfs::{IMAGE_FILE, ImageKind};
use wrenn_proto::hostagent::v1::*;

type Client = HostAgentClient<HttpClient>;

const TEMPLATE: &str = "test";
/// Calls that boot or restore VMs are slow in the host VM.
const SLOW: Duration = Duration::from_secs(300);

/// The cache's kernel and test image.
#[derive(Debug)]
struct TestImages;

impl ImageResolver for TestImages {
    fn image(&self, name: &str) -> Result<PathBuf, String> {
        let kind = match name {
            "test" => ImageKind::Test,
            "base" => ImageKind::Base,
            other => return Ok(PathBuf::from(other)),
        };
        wrenn_image::rootfs::find(&Cache::from_env(), kind)
            .map(|e| e.file(IMAGE_FILE))
            .map_err(|e| format!("run `cargo xtask guest`: {e}"))
    }

    fn kernel(&self) -> Result<PathBuf, String> {
        wrenn_image::kernel::find(&Cache::from_env())
            .map(|e| e.file("vmlinux"))
            .map_err(|e| format!("run `cargo xtask guest`: {e}"))
    }
}

/// An agent serving on loopback, on its own runtime.
struct Agent {
    rt: tokio::runtime::Runtime,
    manager: Arc<Manager>,
    client: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// An agent on `data` and `run`; `pool` names its network slots (agents that run at once
    /// need their own, or the second would take the first's slots as leftovers).
    fn start(data: &Path, run: &Path, pool: (&str, [u8; 2])) -> Agent {
        Self::start_with(data, run, pool, wrenn_agent::storage::Remote::None)
    }

    fn start_with(
        data: &Path,
        run: &Path,
        pool: (&str, [u8; 2]),
        remote: wrenn_agent::storage::Remote,
    ) -> Agent {
        // The agent's logs when asked for (WRENN_LOG=info), to see where time goes.
        if let Ok(filter) = std::env::var("WRENN_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = AgentConfig::new(data.to_owned(), run.to_owned(), support::vmm_binary());
        config.slots.warm = 2;
        config.slots.name = pool.0.to_owned();
        config.slots.base = std::net::Ipv4Addr::new(10, pool.1[0], pool.1[1], 0);
        config.reap_interval = Duration::from_millis(200);
        config.remote = remote;
        let (manager, addr, stop, server) = rt.block_on(async {
            let manager = Manager::start(config).await.expect("agent start");
            manager.spawn_reaper();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = wrenn_agent::server::app(manager.clone(), Arc::new(TestImages));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let _ = wrenn_agent::server::serve(listener, app, async {
                    let _ = stopped.await;
                })
                .await;
            });
            (manager, addr, stop, server)
        });
        let client = Client::new(
            HttpClient::plaintext(),
            ClientConfig::new(format!("http://{addr}").parse().unwrap()),
        );
        Agent {
            rt,
            manager,
            client,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops serving and drops the manager without touching the sandboxes (a crash, as far as
    /// they can tell).
    fn abandon(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = self.rt.block_on(server);
        }
        let Agent { rt, manager, .. } = self;
        drop(manager);
        rt.shutdown_timeout(Duration::from_secs(5));
    }

    fn build_template(&self, name: &str) -> BuildTemplateResponse {
        self.rt
            .block_on(self.client.build_template_with_options(
                BuildTemplateRequest {
                    name: name.into(),
                    image: "test".into(),
                    vcpus: 1,
                    memory_mib: 256,
                    ..Default::default()
                },
                slow(),
            ))
            .unwrap_or_else(|e| panic!("building template {name}: {e}"))
            .into_owned()
    }

    fn create(&self, id: &str, template: &str) -> Sandbox {
        self.try_create(CreateSandboxRequest {
            sandbox_id: id.into(),
            template: template.into(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("creating {id}: {e}"))
    }

    fn try_create(
        &self,
        request: CreateSandboxRequest,
    ) -> Result<Sandbox, connectrpc::ConnectError> {
        let response = self
            .rt
            .block_on(self.client.create_sandbox_with_options(request, slow()))?;
        Ok(response
            .into_owned()
            .sandbox
            .as_option()
            .cloned()
            .expect("a sandbox"))
    }

    fn exec(&self, id: &str, script: &str) -> ExecResponse {
        self.try_exec(id, script)
            .unwrap_or_else(|e| panic!("exec in {id}: {e}"))
    }

    fn try_exec(&self, id: &str, script: &str) -> Result<ExecResponse, connectrpc::ConnectError> {
        let request = ExecRequest {
            sandbox_id: id.into(),
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        };
        Ok(self
            .rt
            .block_on(self.client.exec_with_options(request, slow()))?
            .into_owned())
    }

    fn stdout(&self, id: &str, script: &str) -> String {
        let out = self.exec(id, script);
        assert_eq!(
            out.exit_code,
            0,
            "{script}: stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn pause(&self, id: &str) -> PauseSandboxResponse {
        self.rt
            .block_on(self.client.pause_sandbox_with_options(
                PauseSandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                },
                slow(),
            ))
            .unwrap_or_else(|e| panic!("pausing {id}: {e}"))
            .into_owned()
    }

    fn resume(&self, id: &str) -> Result<Sandbox, connectrpc::ConnectError> {
        let response = self.rt.block_on(self.client.resume_sandbox_with_options(
            ResumeSandboxRequest {
                sandbox_id: id.into(),
                ..Default::default()
            },
            slow(),
        ))?;
        Ok(response.into_owned().sandbox.as_option().cloned().unwrap())
    }

    fn destroy(&self, id: &str) {
        self.rt
            .block_on(self.client.destroy_sandbox_with_options(
                DestroySandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                },
                slow(),
            ))
            .unwrap_or_else(|e| panic!("destroying {id}: {e}"));
    }

    fn get(&self, id: &str) -> Result<Sandbox, connectrpc::ConnectError> {
        let response = self
            .rt
            .block_on(self.client.get_sandbox(GetSandboxRequest {
                sandbox_id: id.into(),
                ..Default::default()
            }))?;
        Ok(response.into_owned().sandbox.as_option().cloned().unwrap())
    }

    fn write_file(&self, id: &str, path: &str, data: &[u8]) -> u64 {
        let chunks: Vec<WriteFileRequest> = data
            .chunks(1 << 20)
            .enumerate()
            .map(|(n, chunk)| WriteFileRequest {
                sandbox_id: if n == 0 { id.into() } else { String::new() },
                path: if n == 0 { path.into() } else { String::new() },
                data: chunk.to_vec(),
                ..Default::default()
            })
            .collect();
        self.rt
            .block_on(
                self.client
                    .write_file_with_options(futures::stream::iter(chunks), slow()),
            )
            .unwrap_or_else(|e| panic!("writing {path} in {id}: {e}"))
            .into_owned()
            .bytes_written
    }

    fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, connectrpc::ConnectError> {
        self.rt.block_on(async {
            let mut stream = self
                .client
                .read_file_with_options(
                    ReadFileRequest {
                        sandbox_id: id.into(),
                        path: path.into(),
                        ..Default::default()
                    },
                    slow(),
                )
                .await?;
            let mut data = Vec::new();
            while let Some(message) = stream.message().await? {
                data.extend_from_slice(message.view().data);
            }
            Ok(data)
        })
    }
}

fn slow() -> CallOptions {
    CallOptions::default().with_timeout(SLOW)
}

/// The agent every test but the restart test shares, with the template built.
fn shared() -> &'static Agent {
    static AGENT: OnceLock<(tempfile::TempDir, Agent)> = OnceLock::new();
    &AGENT
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let agent = Agent::start(
                &dir.path().join("data"),
                &dir.path().join("run"),
                ("wrenn", [11, 0]),
            );
            let built = agent.build_template(TEMPLATE);
            eprintln!(
                "template built: boot {} ms, {} prefetch pages",
                built.boot_ms, built.prefetch_pages
            );
            (dir, agent)
        })
        .1
}

fn usable(test: &str) -> bool {
    wrenn_vmm::probe::usable_for_test(test)
}

fn code_of(result: Result<impl std::fmt::Debug, connectrpc::ConnectError>) -> ErrorCode {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => {
            assert!(
                !e.message.as_deref().unwrap_or_default().is_empty(),
                "an error without a message: {e:?}"
            );
            e.code
        }
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn test_template_create_exec_echo_hi() {
    if !usable("test_template_create_exec_echo_hi") {
        return;
    }
    let agent = shared();
    let started = Instant::now();
    let sandbox = agent.create("echo-hi", TEMPLATE);
    eprintln!("created in {:?}", started.elapsed());
    assert_eq!(
        sandbox.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_RUNNING)
    );
    assert!(!sandbox.envd_access_token.is_empty());
    let out = agent.exec("echo-hi", "echo hi");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(out.exit_code, 0);
    let out = agent.exec("echo-hi", "echo oops >&2; exit 3");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.exit_code, 3);
    // envd answers on the slot's address, with the sandbox's token.
    assert!(
        sandbox.envd_address.ends_with(":49983"),
        "{}",
        sandbox.envd_address
    );
    agent.destroy("echo-hi");
}

#[test]
fn test_pause_resume_keeps_files_background_process_and_memory() {
    if !usable("test_pause_resume_keeps_files_background_process_and_memory") {
        return;
    }
    let agent = shared();
    let id = "pause-resume";
    agent.create(id, TEMPLATE);
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(
        agent.write_file(id, "/root/data.bin", &data),
        data.len() as u64
    );
    // A counter whose value lives only in the shell's memory, written out as it goes.
    agent.stdout(
        id,
        "sh -c 'i=0; while :; do i=$((i+1)); echo $i >/root/count; sleep 0.1; done' \
         </dev/null >/dev/null 2>&1 & echo $! >/root/counter.pid",
    );
    let wait_count = |at_least: u64| -> u64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = agent.stdout(id, "cat /root/count 2>/dev/null || echo 0");
            let n: u64 = text.trim().parse().unwrap_or(0);
            if n >= at_least {
                return n;
            }
            assert!(Instant::now() < deadline, "the counter stays at {n}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before = wait_count(3);
    let pid = agent.stdout(id, "cat /root/counter.pid");
    let paused = agent.pause(id);
    let sandbox = paused.sandbox.as_option().unwrap();
    assert_eq!(
        sandbox.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_PAUSED)
    );
    assert!(paused.bytes_written > 0);
    assert_eq!(
        code_of(agent.try_exec(id, "true")),
        ErrorCode::FailedPrecondition,
        "exec in a paused sandbox"
    );
    let resumed = agent.resume(id).expect("resume");
    assert_eq!(
        resumed.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_RUNNING)
    );
    assert_eq!(agent.read_file(id, "/root/data.bin").unwrap(), data);
    // The same process, still counting from where it was (its memory came back).
    assert_eq!(
        agent.exec(id, &format!("kill -0 {}", pid.trim())).exit_code,
        0
    );
    let after = wait_count(before + 1);
    assert!(after > before, "{after} after {before}");
    assert_eq!(
        code_of(agent.resume(id)),
        ErrorCode::FailedPrecondition,
        "resume of a running sandbox"
    );
    agent.destroy(id);
}

#[test]
fn test_three_sandboxes_from_a_template_of_a_paused_sandbox() {
    if !usable("test_three_sandboxes_from_a_template_of_a_paused_sandbox") {
        return;
    }
    let agent = shared();
    agent.create("origin", TEMPLATE);
    agent.stdout("origin", "echo made-before-the-snapshot >/root/marker");
    agent.pause("origin");
    let snapshot = agent
        .rt
        .block_on(agent.client.create_snapshot_with_options(
            CreateSnapshotRequest {
                sandbox_id: "origin".into(),
                name: "from-paused".into(),
                ..Default::default()
            },
            slow(),
        ))
        .expect("snapshot")
        .into_owned();
    assert_eq!(snapshot.snapshot.as_option().unwrap().name, "from-paused");
    let ids = ["child-1", "child-2", "child-3"];
    for id in ids {
        agent.create(id, "from-paused");
    }
    for id in ids {
        assert_eq!(
            agent.stdout(id, "cat /root/marker"),
            "made-before-the-snapshot\n"
        );
        agent.stdout(id, &format!("echo {id} >/root/own"));
    }
    for id in ids {
        assert_eq!(
            agent.stdout(id, "cat /root/own"),
            format!("{id}\n"),
            "sandboxes share a disk"
        );
    }
    // The origin goes; the template and its children keep what they need.
    agent.destroy("origin");
    assert_eq!(
        agent.stdout("child-2", "cat /root/marker"),
        "made-before-the-snapshot\n"
    );
    for id in ids {
        agent.destroy(id);
    }
    agent
        .rt
        .block_on(agent.client.delete_snapshot(DeleteSnapshotRequest {
            name: "from-paused".into(),
            ..Default::default()
        }))
        .expect("delete snapshot");
}

#[test]
fn test_timeout_reaps_the_sandbox() {
    if !usable("test_timeout_reaps_the_sandbox") {
        return;
    }
    let agent = shared();
    agent
        .try_create(CreateSandboxRequest {
            sandbox_id: "short-lived".into(),
            template: TEMPLATE.into(),
            timeout_seconds: 2,
            ..Default::default()
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.get("short-lived").is_ok() {
        assert!(Instant::now() < deadline, "not reaped");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(code_of(agent.get("short-lived")), ErrorCode::NotFound);
    assert!(processes_mentioning("short-lived").is_empty());
}

#[test]
fn test_vmm_killed_behind_the_agents_back_shows_as_stopped() {
    if !usable("test_vmm_killed_behind_the_agents_back_shows_as_stopped") {
        return;
    }
    let agent = shared();
    let id = "killed-vmm";
    agent.create(id, TEMPLATE);
    let pid = agent
        .manager
        .get(id)
        .unwrap()
        .vmm_pid
        .expect("a running sandbox's VMM pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The reaper's pass (every 200 ms here) finds it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sandbox = loop {
        let sandbox = agent.get(id).unwrap();
        if sandbox.state.as_known() != Some(SandboxState::SANDBOX_STATE_RUNNING) {
            break sandbox;
        }
        assert!(
            Instant::now() < deadline,
            "still running after its VMM was killed"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        sandbox.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_STOPPED)
    );
    assert!(sandbox.error.contains("VMM exited"), "{}", sandbox.error);
    assert_eq!(
        code_of(agent.try_exec(id, "true")),
        ErrorCode::FailedPrecondition
    );
    // Its slot and files are back; destroying the record finishes it.
    assert!(!agent.manager.config().run_dir.join(id).exists());
    agent.destroy(id);
    assert_eq!(code_of(agent.get(id)), ErrorCode::NotFound);
}

#[test]
fn test_destroy_leaves_no_process_socket_file_or_mount() {
    if !usable("test_destroy_leaves_no_process_socket_file_or_mount") {
        return;
    }
    let agent = shared();
    let id = "leaves-nothing";
    agent.create(id, TEMPLATE);
    let config = agent.manager.config().clone();
    assert!(
        !processes_mentioning(id).is_empty(),
        "no VMM while it runs?"
    );
    agent.pause(id);
    agent.resume(id).unwrap();
    agent.destroy(id);
    assert!(
        processes_mentioning(id).is_empty(),
        "{:?}",
        processes_mentioning(id)
    );
    assert!(!config.run_dir.join(id).exists());
    assert!(!config.data_dir.join("sandboxes").join(id).exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(id), "{mounts}");
    // Only builds that templates use are left in the store.
    let templates: Vec<String> = agent
        .manager
        .templates()
        .into_iter()
        .map(|t| t.build_id)
        .collect();
    let left: Vec<String> = std::fs::read_dir(config.data_dir.join("store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for build in &templates {
        assert!(left.contains(build));
    }
    // The template's build plus the image it came from, per template.
    assert!(
        left.len() <= templates.len() * 2,
        "{left:?} for templates {templates:?}"
    );
}

#[test]
fn test_bad_requests_get_clear_connect_errors() {
    if !usable("test_bad_requests_get_clear_connect_errors") {
        return;
    }
    let agent = shared();
    let request = |id: &str, template: &str| CreateSandboxRequest {
        sandbox_id: id.into(),
        template: template.into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(agent.try_create(request("x1", "no-such-template"))),
        ErrorCode::NotFound
    );
    assert_eq!(
        code_of(agent.try_create(request("Bad/Id", TEMPLATE))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code_of(agent.try_create(request("", TEMPLATE))),
        ErrorCode::InvalidArgument
    );
    let mut more = request("x2", TEMPLATE);
    more.vcpus = 4;
    assert_eq!(code_of(agent.try_create(more)), ErrorCode::InvalidArgument);
    let huge = agent
        .rt
        .block_on(agent.client.build_template(BuildTemplateRequest {
            name: "huge".into(),
            image: "test".into(),
            vcpus: 10_000,
            memory_mib: 256,
            ..Default::default()
        }));
    assert_eq!(
        code_of(huge.map(|r| r.into_owned())),
        ErrorCode::ResourceExhausted
    );
    let egress = CreateSandboxRequest {
        egress: EgressPolicy {
            deny: vec!["not-an-address".into()],
            ..Default::default()
        }
        .into(),
        ..request("x3", TEMPLATE)
    };
    assert_eq!(
        code_of(agent.try_create(egress)),
        ErrorCode::InvalidArgument
    );

    agent.create("dup", TEMPLATE);
    assert_eq!(
        code_of(agent.try_create(request("dup", TEMPLATE))),
        ErrorCode::AlreadyExists
    );
    assert_eq!(code_of(agent.resume("dup")), ErrorCode::FailedPrecondition);
    agent.destroy("dup");
    assert_eq!(code_of(agent.get("dup")), ErrorCode::NotFound);
    assert_eq!(code_of(agent.try_exec("dup", "true")), ErrorCode::NotFound);
    // Nothing was left behind by the refused creates.
    let ids: HashMap<&str, ()> = [("x1", ()), ("x2", ()), ("x3", ())].into();
    for id in ids.keys() {
        assert_eq!(code_of(agent.get(id)), ErrorCode::NotFound);
    }
}

#[test]
fn test_restarted_agent_adopts_running_and_paused_sandboxes() {
    if !usable("test_restarted_agent_adopts_running_and_paused_sandboxes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    let pool = ("restart", [13, 0]);
    let agent = Agent::start(&data, &run, pool);
    agent.build_template("restart");
    agent.create("keeps-running", "restart");
    agent.stdout("keeps-running", "echo before >/root/state");
    agent.create("stays-paused", "restart");
    agent.stdout("stays-paused", "echo paused-state >/root/state");
    agent.pause("stays-paused");
    agent.abandon();

    let agent = Agent::start(&data, &run, pool);
    let running = agent.get("keeps-running").expect("adopted");
    assert_eq!(
        running.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_RUNNING)
    );
    // Its memory is still served (a new command touches pages it never touched before).
    assert_eq!(
        agent.stdout(
            "keeps-running",
            "cat /root/state; ls /bin | wc -l >/dev/null"
        ),
        "before\n"
    );
    let paused = agent.get("stays-paused").expect("kept");
    assert_eq!(
        paused.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_PAUSED)
    );
    agent.resume("stays-paused").unwrap();
    assert_eq!(
        agent.stdout("stays-paused", "cat /root/state"),
        "paused-state\n"
    );
    agent.destroy("keeps-running");
    agent.destroy("stays-paused");
    assert!(processes_mentioning("keeps-running").is_empty());
    agent.rt.block_on(agent.manager.shutdown(true));
}

#[test]
fn test_sandbox_paused_on_one_agent_resumes_on_another_through_the_object_store() {
    if !usable("test_sandbox_paused_on_one_agent_resumes_on_another_through_the_object_store") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let remote = dir.path().join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    let url = || wrenn_agent::storage::Remote::Url(format!("file://{}", remote.display()));
    let host = |name: &str, range: u8| {
        Agent::start_with(
            &dir.path().join(name).join("data"),
            &dir.path().join(name).join("run"),
            (name, [range, 0]),
            url(),
        )
    };
    let a = host("hosta", 14);
    a.build_template("shared");
    a.create("traveller", "shared");
    a.stdout("traveller", "echo packed-on-a >/root/luggage");
    a.pause("traveller");
    let b = host("hostb", 15);
    // Never seen on b: resumed from what a shared.
    let resumed = b.resume("traveller").expect("resume on the other host");
    assert_eq!(
        resumed.state.as_known(),
        Some(SandboxState::SANDBOX_STATE_RUNNING)
    );
    assert_eq!(b.stdout("traveller", "cat /root/luggage"), "packed-on-a\n");
    // The template too.
    b.create("local-to-b", "shared");
    assert_eq!(b.stdout("local-to-b", "echo hi"), "hi\n");
    b.destroy("traveller");
    b.destroy("local-to-b");
    b.rt.block_on(b.manager.shutdown(true));
    a.rt.block_on(a.manager.shutdown(true));
}
