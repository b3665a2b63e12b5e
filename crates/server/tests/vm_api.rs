//! The control plane end to end, in the host VM: the REST API in-process, over a real host
//! agent (real VMMs, slots, envd) and a real database, SQLite and PostgreSQL (the host's,
//! reached from the host VM through its network, or a private one when none is given).
//!
//! One agent with the `test` template serves every test; each database gets its own server.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wrenn_agent::manager::{AgentConfig, Manager};
use wrenn_agent::rpc::{CacheImages, ImageResolver};
use wrenn_server::{Server, ServerConfig};

const TEMPLATE: &str = "test";
const JOIN_TOKEN: &str = "vm-api-join-token";
/// The upload limit of the test servers (small, to see the 413).
const MAX_UPLOAD: u64 = 8 << 20;
/// Sandbox ports are served at `{port}-{id}.DOMAIN` too.
const DOMAIN: &str = "sandboxes.test";

/// `wrenn-vmm` next to this test's `deps` directory, or `WRENN_VMM`.
fn vmm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WRENN_VMM").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("wrenn-vmm");
    assert!(path.is_file(), "no wrenn-vmm at {}", path.display());
    path
}

/// Everything the tests share: one runtime, one agent, one server per database.
struct World {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    manager: Arc<Manager>,
    agent_url: String,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
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
        let dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(
            dir.path().join("agent"),
            dir.path().join("run"),
            vmm_binary(),
        );
        config.slots.warm = 2;
        config.slots.name = "api".into();
        config.slots.base = std::net::Ipv4Addr::new(10, 16, 0, 0);
        config.reap_interval = Duration::from_millis(200);
        let (manager, agent_url) = rt.block_on(async {
            let manager = Manager::start(config).await.expect("agent start");
            manager.spawn_reaper();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = wrenn_agent::server::app(manager.clone(), Arc::new(CacheImages));
            tokio::spawn(async move {
                let _ = wrenn_agent::server::serve(listener, app, std::future::pending()).await;
            });
            let started = Instant::now();
            manager
                .build_template(wrenn_agent::manager::BuildRequest {
                    name: TEMPLATE.into(),
                    image: CacheImages.image("test").unwrap(),
                    kernel: CacheImages.kernel().unwrap(),
                    vcpus: 1,
                    memory_mib: 256,
                    replace: false,
                })
                .await
                .expect("building the template");
            eprintln!("template built in {:?}", started.elapsed());
            (manager, format!("http://{addr}"))
        });
        World {
            rt,
            _dir: dir,
            manager,
            agent_url,
        }
    })
}

/// A control plane on one database, registered with the shared agent.
struct Api {
    server: Option<Server>,
    database_url: String,
    base: String,
    key: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Api {
    fn start(database_url: &str) -> Api {
        let world = world();
        world.rt.block_on(async {
            let mut config = ServerConfig::new(database_url);
            config.join_token = JOIN_TOKEN.into();
            config.max_upload_bytes = MAX_UPLOAD;
            config.domain = Some(DOMAIN.into());
            // The tests run the reconciler themselves.
            config.reconcile_interval = Duration::from_secs(3600);
            let server = Server::start(config).await.expect("server start");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(wrenn_server::serve(listener, server.router(), async {
                let _ = stopped.await;
            }));
            let key = wrenn_server::keys::create(server.db(), "vm tests")
                .await
                .unwrap()
                .key;
            // The agent's own heartbeat task registers it, as `wrenn agent --server` does.
            let heartbeat = wrenn_agent::heartbeat::spawn(
                world.manager.clone(),
                wrenn_agent::heartbeat::HeartbeatConfig {
                    server_url: base.clone(),
                    join_token: JOIN_TOKEN.into(),
                    host_id: "vm".into(),
                    advertise_url: world.agent_url.clone(),
                    storage: None,
                    interval: wrenn_agent::heartbeat::DEFAULT_INTERVAL,
                },
            );
            let api = Api {
                server: Some(server),
                database_url: database_url.to_owned(),
                base,
                key,
                http: reqwest::Client::new(),
                stop: Some(stop),
                heartbeat: Some(heartbeat),
            };
            // Registered, and the template learned from the host.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                api.server().reconcile_once().await;
                if api
                    .server()
                    .db()
                    .template(TEMPLATE)
                    .await
                    .unwrap()
                    .is_some()
                {
                    break;
                }
                assert!(Instant::now() < deadline, "the agent never registered");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            api
        })
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// Stops serving and the background tasks; the database stays.
    fn stop(mut self) -> String {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        if let Some(server) = self.server.take() {
            world().rt.block_on(server.stop());
        }
        self.database_url.clone()
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(300));
        if let Some(body) = body {
            request = request.json(&body);
        }
        world().rt.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            assert!(
                response.headers().contains_key("x-request-id"),
                "no request id on {path}"
            );
            let bytes = response.bytes().await.unwrap();
            let value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            };
            (status, value)
        })
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None)
    }

    fn delete(&self, path: &str) -> u16 {
        self.call(reqwest::Method::DELETE, path, None).0
    }

    fn create(&self, body: Value) -> Value {
        let (status, sandbox) = self.post("/v1/sandboxes", body);
        assert_eq!(status, 201, "{sandbox}");
        assert_eq!(sandbox["state"], "running", "{sandbox}");
        sandbox
    }

    fn exec(&self, id: &str, script: &str) -> Value {
        let (status, out) = self.post(
            &format!("/v1/sandboxes/{id}/exec"),
            json!({ "cmd": "/bin/sh", "args": ["-c", script] }),
        );
        assert_eq!(status, 200, "{out}");
        out
    }

    fn upload(&self, id: &str, path: &str, data: Vec<u8>) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("path", path.to_owned())
            .part("file", reqwest::multipart::Part::bytes(data).file_name("f"));
        let request = self
            .http
            .post(format!("{}/v1/sandboxes/{id}/files", self.base))
            .bearer_auth(&self.key)
            .multipart(form);
        world().rt.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        })
    }

    fn read(&self, id: &str, path: &str) -> (u16, Vec<u8>) {
        let request = self
            .http
            .post(format!("{}/v1/sandboxes/{id}/files/read", self.base))
            .bearer_auth(&self.key)
            .json(&json!({ "path": path }));
        world().rt.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.bytes().await.unwrap().to_vec())
        })
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
    }
}

/// A fresh SQLite database file.
fn sqlite_url() -> String {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let n = std::fs::read_dir(dir.path()).unwrap().count();
    format!("sqlite://{}/api-{n}.db", dir.path().display())
}

/// A fresh PostgreSQL database on the server `WRENN_TEST_POSTGRES_URL` names.
fn postgres_url() -> Option<String> {
    let admin = std::env::var("WRENN_TEST_POSTGRES_URL").ok()?;
    let name = format!("wrenn_vm_{}", std::process::id());
    world().rt.block_on(async {
        use sqlx::Executor;
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&admin).await.expect("PostgreSQL");
        let _ = pool
            .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await;
        pool.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
    });
    let (base, _) = admin.rsplit_once('/').unwrap();
    Some(format!("{base}/{name}"))
}

fn usable(test: &str) -> bool {
    wrenn_vmm::probe::usable_for_test(test)
}

/// The whole life of sandboxes through the API on one database.
fn lifecycle(api: &Api) {
    // Create, exec, stream.
    let sandbox = api.create(json!({
        "template": TEMPLATE, "timeout_seconds": 600,
        "metadata": { "suite": "vm-api", "db": api.server().db().backend_name() },
    }));
    let id = sandbox["id"].as_str().unwrap().to_owned();
    assert_eq!(sandbox["host_id"], "vm");
    let out = api.exec(&id, "echo hi; echo oops >&2; exit 3");
    assert_eq!(out["stdout"], "hi\n");
    assert_eq!(out["stderr"], "oops\n");
    assert_eq!(out["exit_code"], 3);
    let (status, stream) = api.post(
        &format!("/v1/sandboxes/{id}/exec/stream"),
        json!({ "cmd": "/bin/sh", "args": ["-c", "echo one; echo two >&2; exit 4"] }),
    );
    assert_eq!(status, 200);
    let stream = stream.as_str().unwrap().to_owned();
    assert!(stream.contains("event: start"), "{stream}");
    assert!(
        stream.contains("event: exit\ndata: {\"exit_code\":4}"),
        "{stream}"
    );

    // Files: 3 MiB up and back, a bad path, a missing file, a file over the limit.
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    let (status, written) = api.upload(&id, "/tmp/blob", data.clone());
    assert_eq!(status, 200, "{written}");
    assert_eq!(written["bytes_written"], data.len());
    let (status, back) = api.read(&id, "/tmp/blob");
    assert_eq!(status, 200);
    assert!(back == data, "the file came back different");
    let (status, error) = api.post(
        &format!("/v1/sandboxes/{id}/files/read"),
        json!({ "path": "/tmp/../etc/passwd" }),
    );
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, error) = api.post(
        &format!("/v1/sandboxes/{id}/files/read"),
        json!({ "path": "/no/such/file" }),
    );
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("not_found")),
        "{error}"
    );
    let (status, error) = api.upload(
        &id,
        "/tmp/big",
        vec![1u8; usize::try_from(MAX_UPLOAD + 1).unwrap()],
    );
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // Idempotent create by id; a different request with the same id conflicts.
    let again = api.post(
        "/v1/sandboxes",
        json!({ "template": TEMPLATE, "id": id, "timeout_seconds": 600,
                "metadata": { "suite": "vm-api", "db": api.server().db().backend_name() } }),
    );
    assert_eq!(again.0, 200, "{}", again.1);
    assert_eq!(again.1["id"], id.as_str());
    let other = api.post(
        "/v1/sandboxes",
        json!({ "template": TEMPLATE, "id": id, "metadata": { "other": "x" } }),
    );
    assert_eq!(other.0, 409, "{}", other.1);

    // Pause: exec refused; resume: the file and a background process are there.
    api.exec(
        &id,
        "(while true; do sleep 1; done) >/dev/null 2>&1 & echo $! > /tmp/bg.pid",
    );
    let (status, paused) = api.post(&format!("/v1/sandboxes/{id}/pause"), json!({}));
    assert_eq!(
        (status, paused["state"].as_str()),
        (200, Some("paused")),
        "{paused}"
    );
    let (status, error) = api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        json!({ "cmd": "true" }),
    );
    assert_eq!(
        (status, error["code"].as_str()),
        (409, Some("conflict")),
        "{error}"
    );
    let (status, resumed) = api.post(&format!("/v1/sandboxes/{id}/resume"), json!({}));
    assert_eq!(
        (status, resumed["state"].as_str()),
        (200, Some("running")),
        "{resumed}"
    );
    let out = api.exec(&id, "kill -0 $(cat /tmp/bg.pid) && md5sum < /tmp/blob");
    assert_eq!(out["exit_code"], 0, "{out}");
    let (_, back) = api.read(&id, "/tmp/blob");
    assert!(back == data);

    // Timeout, list with filters, get.
    let (status, set) = api.post(
        &format!("/v1/sandboxes/{id}/timeout"),
        json!({ "timeout_seconds": 900 }),
    );
    assert_eq!(status, 200, "{set}");
    assert_eq!(set["timeout_seconds"], 900);
    let (status, listed) = api.get("/v1/sandboxes?metadata.suite=vm-api&state=running");
    assert_eq!(status, 200);
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(ids.contains(&id.as_str()), "{listed}");

    // A snapshot of it, a sandbox from the snapshot with its file.
    let name = format!("snap-{}", api.server().db().backend_name());
    let (status, snapshot) = api.post("/v1/snapshots", json!({ "sandbox_id": id, "name": name }));
    assert_eq!(status, 201, "{snapshot}");
    assert_eq!(snapshot["name"], name.as_str());
    let (status, _) = api.get(&format!("/v1/snapshots/{name}"));
    assert_eq!(status, 200);
    let child = api.create(json!({ "template": name }));
    let child_id = child["id"].as_str().unwrap().to_owned();
    let (_, back) = api.read(&child_id, "/tmp/blob");
    assert!(back == data, "the snapshot's sandbox lacks the file");

    // Delete: stopped, and gone from its host.
    for sid in [&child_id, &id] {
        assert_eq!(api.delete(&format!("/v1/sandboxes/{sid}")), 204);
        let (status, gone) = api.get(&format!("/v1/sandboxes/{sid}"));
        assert_eq!(
            (status, gone["state"].as_str()),
            (200, Some("stopped")),
            "{gone}"
        );
        assert!(
            world().manager.get(sid).is_err(),
            "{sid} is still on the agent"
        );
    }
    assert_eq!(api.delete(&format!("/v1/snapshots/{name}")), 204);
    assert_eq!(api.get(&format!("/v1/snapshots/{name}")).0, 404);
}

/// A VMM killed behind everyone's back: the agent notices, the reconciler's pass says stopped.
fn reconciler_sees_a_killed_vmm(api: &Api) {
    let sandbox = api.create(json!({ "template": TEMPLATE }));
    let id = sandbox["id"].as_str().unwrap();
    let pid = world().manager.get(id).unwrap().vmm_pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        world().rt.block_on(api.server().reconcile_once());
        let (_, now) = api.get(&format!("/v1/sandboxes/{id}"));
        if now["state"] == "stopped" {
            // The agent's reason comes through; the agent forgets the dead sandbox.
            let error = now["error"].as_str().unwrap_or_default();
            assert!(error.contains("VMM exited"), "{now}");
            assert!(
                world().manager.get(id).is_err(),
                "{id} is still on the agent"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {now} after its VMM was killed"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A sandbox stopped in the database while its host still runs it (deleted while the host was
/// unreachable): the next pass destroys it there.
fn reconciler_removes_an_orphan(api: &Api) {
    let sandbox = api.create(json!({ "template": TEMPLATE }));
    let id = sandbox["id"].as_str().unwrap();
    let stopped = world().rt.block_on(api.server().db().transition_sandbox(
        id,
        &["running"],
        "stopped",
        Some("deleted while its host was unreachable"),
    ));
    assert!(stopped.unwrap());
    let report = world().rt.block_on(api.server().reconcile_once());
    assert_eq!(report.orphans_destroyed, [id.to_owned()], "{report:?}");
    assert!(
        world().manager.get(id).is_err(),
        "{id} is still on the agent"
    );
}

/// The database is the state: a new server on it sees the running sandbox and can use it.
fn restart_loses_nothing(api: Api) {
    let sandbox = api.create(json!({ "template": TEMPLATE, "metadata": { "restart": "yes" } }));
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let url = api.stop();
    let api = Api::start(&url);
    let (status, again) = api.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(
        (status, again["state"].as_str()),
        (200, Some("running")),
        "{again}"
    );
    assert_eq!(again["metadata"]["restart"], "yes");
    let out = api.exec(&id, "echo still here");
    assert_eq!(out["stdout"], "still here\n");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")), 204);
}

/// A port inside the sandbox through the API's proxy.
fn proxy_reaches_a_port(api: &Api) {
    let sandbox = api.create(json!({ "template": TEMPLATE }));
    let id = sandbox["id"].as_str().unwrap();
    api.exec(
        id,
        "mkdir -p /tmp/www && echo served-from-the-sandbox > /tmp/www/index.html && busybox httpd -p 8000 -h /tmp/www",
    );
    let (status, body) = api.get(&format!("/v1/sandboxes/{id}/ports/8000/index.html"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_str(), Some("served-from-the-sandbox\n"));
    // By Host, without a key, like a browser on a sandbox URL; the sandbox's own 404 passes
    // through as it is.
    let by_host = |path: &str| {
        let request = api
            .http
            .get(format!("{}{path}", api.base))
            .header("host", format!("8000-{id}.{DOMAIN}"));
        world().rt.block_on(async {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        })
    };
    assert_eq!(
        by_host("/index.html"),
        (200, "served-from-the-sandbox\n".to_owned())
    );
    let (status, body) = by_host("/missing.html");
    assert_eq!(status, 404);
    assert!(
        !body.contains("not_found"),
        "our error instead of the sandbox's: {body}"
    );
    let (status, error) = api.get(&format!("/v1/sandboxes/{id}/ports/8001/"));
    assert_eq!(status, 502, "nothing listens on 8001: {error}");
    assert_eq!(api.delete(&format!("/v1/sandboxes/{id}")), 204);
}

fn bad_requests(api: &Api) {
    let (status, error) = api.post("/v1/sandboxes", json!({ "template": "no-such-template" }));
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("not_found")),
        "{error}"
    );
    let _ = std::io::stderr().flush();
}

fn suite(database_url: &str) {
    let api = Api::start(database_url);
    lifecycle(&api);
    bad_requests(&api);
    reconciler_sees_a_killed_vmm(&api);
    reconciler_removes_an_orphan(&api);
    proxy_reaches_a_port(&api);
    restart_loses_nothing(api);
}

#[test]
fn test_api_end_to_end_on_sqlite() {
    if !usable("test_api_end_to_end_on_sqlite") {
        return;
    }
    suite(&sqlite_url());
}

#[test]
fn test_api_end_to_end_on_postgres() {
    if !usable("test_api_end_to_end_on_postgres") {
        return;
    }
    let url = postgres_url()
        .expect("WRENN_TEST_POSTGRES_URL names the PostgreSQL server (cargo xtask test sets it)");
    suite(&url);
}
