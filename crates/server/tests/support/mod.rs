//! Test support: real databases (a temp SQLite file; a fresh PostgreSQL database on the
//! cluster `WRENN_TEST_POSTGRES_URL` names, or on a private cluster started once per test
//! binary from Debian's binaries), a real server on a real socket, and a small HTTP client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use wrenn_server::{Server, ServerConfig};

pub const JOIN_TOKEN: &str = "join-secret-for-tests";

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A database made for one test, removed when dropped.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDb {
    pub fn new(kind: Kind) -> TestDb {
        match kind {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("wrenn.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    postgres: None,
                }
            }
            Kind::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("wrenn_t_{}", wrenn_server::ids::random_hex(6).unwrap());
                admin_sql(&admin, &format!("CREATE DATABASE {name}"));
                let url = replace_database(&admin, &name);
                TestDb {
                    url,
                    _dir: None,
                    postgres: Some((admin, name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = &self.postgres {
            admin_sql(
                admin,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            );
        }
    }
}

/// Runs one statement on the admin database, on a runtime of its own (callers may be inside
/// another runtime or in a destructor).
fn admin_sql(admin: &str, sql: &str) {
    let admin = admin.to_owned();
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
            sqlx::query(&sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let _ = conn.close().await;
        });
    })
    .join()
    .unwrap();
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let root = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// The admin URL of the PostgreSQL cluster tests use.
pub fn postgres_admin_url() -> String {
    if let Ok(url) = std::env::var("WRENN_TEST_POSTGRES_URL")
        && !url.is_empty()
    {
        return url;
    }
    static CLUSTER: OnceLock<String> = OnceLock::new();
    CLUSTER.get_or_init(start_private_cluster).clone()
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL tests need WRENN_TEST_POSTGRES_URL (an admin URL) or Debian's PostgreSQL \
             binaries (/usr/lib/postgresql/*/bin/initdb and postgres): apt-get install -y postgresql"
        )
    })
}

/// Starts a throwaway cluster as the `postgres` user, on 127.0.0.1 and a free port; a
/// watchdog stops it and removes its data when this test process ends.
fn start_private_cluster() -> String {
    let bin = postgres_bin();
    let dir = std::env::temp_dir().join(format!(
        "wrenn-pg-{}-{}",
        std::process::id(),
        wrenn_server::ids::random_hex(4).unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let status = Command::new("chown")
        .arg("postgres:postgres")
        .arg(&dir)
        .status()
        .expect("running chown (the tests run as root)");
    assert!(status.success(), "chown postgres {}", dir.display());
    let data = dir.join("data");
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .args([
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .output()
        .expect("running initdb through runuser");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        "{postgres} -D {data} -p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={dir} \
         -c fsync=off -c max_connections=200 >{dir}/log 2>&1 & pg=$!; \
         while [ -d /proc/{parent} ] && kill -0 $pg 2>/dev/null; do sleep 1; done; \
         kill -INT $pg 2>/dev/null; wait $pg; rm -rf {dir}",
        postgres = bin.join("postgres").display(),
        data = data.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    let mut watchdog = Command::new("runuser")
        .args(["-u", "postgres", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres through runuser");
    // Reaped when it ends (after this process, usually).
    std::thread::spawn(move || watchdog.wait());
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the private PostgreSQL cluster did not start; its log: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Accepting TCP is not accepting queries yet.
    loop {
        let ok = std::thread::spawn({
            let url = url.clone();
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    sqlx::PgConnection::connect(&url).await.is_ok()
                })
            }
        })
        .join()
        .unwrap();
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the private PostgreSQL cluster refuses connections"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    url
}

/// A server on a real socket over a fresh database.
pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
    pub key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub db: TestDb,
}

impl TestServer {
    pub async fn start(kind: Kind) -> TestServer {
        TestServer::start_with(kind, |_| {}).await
    }

    pub async fn start_with(kind: Kind, tune: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let db = TestDb::new(kind);
        let mut config = ServerConfig::new(db.url.clone());
        config.join_token = JOIN_TOKEN.into();
        config.reconcile_interval = Duration::from_secs(3600);
        tune(&mut config);
        let server = Server::start(config).await.expect("starting the server");
        let key = wrenn_server::keys::create(server.db(), "tests")
            .await
            .expect("making a key")
            .key;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = server.router();
        tokio::spawn(wrenn_server::serve(listener, router, async {
            let _ = stopped.await;
        }));
        TestServer {
            server,
            addr,
            key,
            stop: Some(stop),
            db,
        }
    }

    /// A request with the test's API key.
    pub async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        let mut headers = vec![("Authorization".to_owned(), format!("Bearer {}", self.key))];
        if body.is_some() {
            headers.push(("Content-Type".into(), "application/json".into()));
        }
        self.raw(method, path, &headers, body.unwrap_or("").as_bytes())
            .await
    }

    /// A request with exactly these headers.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> Reply {
        let addr = self.addr;
        let method = method.to_owned();
        let path = path.to_owned();
        let headers = headers.to_vec();
        let body = body.to_vec();
        tokio::task::spawn_blocking(move || http(addr, &method, &path, &headers, &body))
            .await
            .unwrap()
    }

    pub async fn heartbeat(&self, id: &str, vcpus: u32, memory_mib: u64) -> Reply {
        let body = serde_json::json!({
            "id": id, "address": "http://127.0.0.1:9", "version": "test",
            "vcpus_total": vcpus, "memory_mib_total": memory_mib, "vcpus_used": 0,
            "memory_mib_used": 0, "sandboxes_running": 0, "storage": null
        })
        .to_string();
        let headers = vec![
            ("Authorization".to_owned(), format!("Bearer {JOIN_TOKEN}")),
            ("Content-Type".to_owned(), "application/json".to_owned()),
        ];
        self.raw("POST", "/v1/hosts/heartbeat", &headers, body.as_bytes())
            .await
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let TestServer { server, db, .. } = self;
        server.stop().await;
        drop(db);
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an error answer of the contract's shape and returns its message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text());
        let json = self.json();
        assert_eq!(json["code"], code, "body: {json}");
        let request_id = self.header("x-request-id").expect("X-Request-Id on errors");
        assert_eq!(json["request_id"], request_id);
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{json}"
        );
        json["message"].as_str().unwrap_or_default().to_owned()
    }
}

/// A minimal HTTP/1.1 exchange (Connection: close; chunked bodies decoded).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    // The server may answer (413) before reading everything; a failed write is fine then.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// Declares `$name` as two tests, on SQLite and on PostgreSQL, each running `$body(Kind)`.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::support::Kind::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body($crate::support::Kind::Postgres).await;
            }
        }
    };
}
