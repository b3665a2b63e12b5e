//! The `wrenn` CLI as a client of the control plane's REST API: `wrenn sandbox ...`,
//! `wrenn files ...`, `wrenn snapshot ...`, `wrenn hosts list`. Readable tables by default,
//! the API's JSON with `--json` for scripts. Errors are the API's `{code, message}`, printed as
//! one line, and a non-zero exit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Where the API is and who we are; shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The control plane's URL.
    #[arg(
        long,
        global = true,
        env = "WRENN_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    api_url: String,
    /// An API key (`wrenn keys create` makes one).
    #[arg(long, global = true, env = "WRENN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox from a template and wait until it is ready.
    Create {
        template: String,
        /// Choose the id (a retry with the same id returns the same sandbox).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Seconds of life before the sandbox is stopped (refreshed by `timeout`).
        #[arg(long)]
        timeout: Option<u32>,
        /// Environment variables for its processes, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = key_value)]
        env: Vec<(String, String)>,
        /// Metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", value_parser = key_value)]
        metadata: Vec<(String, String)>,
    },
    /// List sandboxes (all but stopped ones unless --state says otherwise).
    #[command(alias = "ls")]
    List {
        /// Only these states, comma-separated (running, paused, stopped, ...).
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        template: Option<String>,
        /// Only sandboxes with this metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", value_parser = key_value)]
        metadata: Vec<(String, String)>,
    },
    /// Show one sandbox.
    Get { id: String },
    /// Run a command; its output streams here and its exit code becomes ours.
    Exec {
        id: String,
        /// Working directory in the sandbox.
        #[arg(long)]
        cwd: Option<String>,
        /// The user to run as.
        #[arg(long)]
        user: Option<String>,
        /// KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = key_value)]
        env: Vec<(String, String)>,
        /// Seconds before the command is killed.
        #[arg(long)]
        timeout: Option<u32>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Pause: memory and disk saved, every host resource freed.
    Pause { id: String },
    /// Resume a paused sandbox.
    Resume {
        id: String,
        #[arg(long)]
        timeout: Option<u32>,
    },
    /// Set the seconds of life left.
    Timeout { id: String, seconds: u32 },
    /// Destroy sandboxes.
    #[command(alias = "kill")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum FilesCommand {
    /// Upload a local file (`-` for stdin) to PATH in the sandbox.
    Put {
        id: String,
        local: PathBuf,
        path: String,
        #[arg(long)]
        user: Option<String>,
    },
    /// Download PATH from the sandbox to a local file (stdout when absent or `-`).
    Get {
        id: String,
        path: String,
        local: Option<PathBuf>,
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Freeze a sandbox's state under NAME; new sandboxes can start from it.
    Create { sandbox_id: String, name: String },
    /// List snapshots and templates.
    #[command(alias = "ls")]
    List,
    /// Show one.
    Get { name: String },
    /// Delete snapshots.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum HostsCommand {
    /// The agents the control plane knows, with their capacity and use.
    #[command(alias = "ls")]
    List,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// A connection to the API.
struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    json: bool,
}

impl Api {
    fn new(args: &ApiArgs) -> Result<Api> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: args.api_url.trim_end_matches('/').to_owned(),
            key: args.api_key.clone(),
            json: args.json,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    /// Sends and returns the response when it is a success; the API's error otherwise.
    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = builder
            .send()
            .await
            .with_context(|| format!("cannot reach the Wrenn API at {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        match serde_json::from_str::<Value>(&body) {
            Ok(error) if error.get("message").is_some() => bail!(
                "{} ({}, HTTP {})",
                error["message"].as_str().unwrap_or_default(),
                error["code"].as_str().unwrap_or("error"),
                status.as_u16()
            ),
            _ => bail!("HTTP {status}: {}", body.trim()),
        }
    }

    async fn json(&self, builder: reqwest::RequestBuilder) -> Result<Value> {
        let response = self.send(builder).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        response
            .json()
            .await
            .context("the API answered with something that is not JSON")
    }
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Prints rows under headers, columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn sandbox_rows(sandboxes: &[Value]) -> Vec<Vec<String>> {
    sandboxes
        .iter()
        .map(|s| {
            vec![
                text(&s["id"]),
                text(&s["template"]),
                text(&s["state"]),
                text(&s["vcpus"]),
                text(&s["memory_mib"]),
                text(&s["host_id"]),
                text(&s["created_at"]),
                text(&s["expires_at"]),
            ]
        })
        .collect()
}

const SANDBOX_HEADERS: &[&str] = &[
    "ID",
    "TEMPLATE",
    "STATE",
    "VCPUS",
    "MEMORY_MIB",
    "HOST",
    "CREATED",
    "EXPIRES",
];

fn print_sandbox(api: &Api, sandbox: &Value) {
    if api.json {
        print_json(sandbox);
    } else {
        table(
            SANDBOX_HEADERS,
            &sandbox_rows(std::slice::from_ref(sandbox)),
        );
    }
}

fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn map(pairs: &[(String, String)]) -> BTreeMap<&str, &str> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Runs `future` on a fresh runtime.
fn block_on<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

pub fn run_sandbox(api: &ApiArgs, command: SandboxCommand) -> Result<ExitCode> {
    let api = Api::new(api)?;
    block_on(sandbox(&api, command))
}

async fn sandbox(api: &Api, command: SandboxCommand) -> Result<ExitCode> {
    use reqwest::Method;
    match command {
        SandboxCommand::Create {
            template,
            id,
            vcpus,
            memory_mib,
            timeout,
            env,
            metadata,
        } => {
            let mut body = json!({ "template": template });
            let fields = [
                ("id", id.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory_mib.map(Value::from)),
                ("timeout_seconds", timeout.map(Value::from)),
            ];
            for (name, value) in fields {
                if let Some(value) = value {
                    body[name] = value;
                }
            }
            if !env.is_empty() {
                body["env_vars"] = json!(map(&env));
            }
            if !metadata.is_empty() {
                body["metadata"] = json!(map(&metadata));
            }
            let sandbox = api
                .json(api.request(Method::POST, "/v1/sandboxes").json(&body))
                .await?;
            print_sandbox(api, &sandbox);
        }
        SandboxCommand::List {
            state,
            template,
            metadata,
        } => {
            let mut query: Vec<(String, String)> = Vec::new();
            query.extend(state.map(|s| ("state".to_owned(), s)));
            query.extend(template.map(|t| ("template".to_owned(), t)));
            query.extend(
                metadata
                    .into_iter()
                    .map(|(k, v)| (format!("metadata.{k}"), v)),
            );
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut page = query.clone();
                page.extend(cursor.take().map(|c| ("cursor".to_owned(), c)));
                let listed = api
                    .json(api.request(Method::GET, "/v1/sandboxes").query(&page))
                    .await?;
                all.extend(listed["sandboxes"].as_array().cloned().unwrap_or_default());
                match listed["next_cursor"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => break,
                }
            }
            if api.json {
                print_json(&json!({ "sandboxes": all }));
            } else {
                table(SANDBOX_HEADERS, &sandbox_rows(&all));
            }
        }
        SandboxCommand::Get { id } => {
            let sandbox = api
                .json(api.request(Method::GET, &format!("/v1/sandboxes/{}", segment(&id))))
                .await?;
            print_sandbox(api, &sandbox);
        }
        SandboxCommand::Exec {
            id,
            cwd,
            user,
            env,
            timeout,
            command,
        } => return exec(api, &id, cwd, user, &env, timeout, &command).await,
        SandboxCommand::Pause { id } => {
            let path = format!("/v1/sandboxes/{}/pause", segment(&id));
            let sandbox = api.json(api.request(Method::POST, &path)).await?;
            print_sandbox(api, &sandbox);
        }
        SandboxCommand::Resume { id, timeout } => {
            let path = format!("/v1/sandboxes/{}/resume", segment(&id));
            let mut body = json!({});
            if let Some(t) = timeout {
                body["timeout_seconds"] = t.into();
            }
            let sandbox = api
                .json(api.request(Method::POST, &path).json(&body))
                .await?;
            print_sandbox(api, &sandbox);
        }
        SandboxCommand::Timeout { id, seconds } => {
            let path = format!("/v1/sandboxes/{}/timeout", segment(&id));
            let body = json!({ "timeout_seconds": seconds });
            let sandbox = api
                .json(api.request(Method::POST, &path).json(&body))
                .await?;
            print_sandbox(api, &sandbox);
        }
        SandboxCommand::Rm { ids } => {
            for id in ids {
                let path = format!("/v1/sandboxes/{}", segment(&id));
                api.send(api.request(Method::DELETE, &path)).await?;
                if !api.json {
                    println!("{id}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `wrenn sandbox exec`: the JSON result with `--json`, otherwise the output streamed as it
/// comes (server-sent events) and the command's exit code as ours.
async fn exec(
    api: &Api,
    id: &str,
    cwd: Option<String>,
    user: Option<String>,
    env: &[(String, String)],
    timeout: Option<u32>,
    command: &[String],
) -> Result<ExitCode> {
    let (cmd, args) = command.split_first().context("no command given")?;
    let mut body = json!({ "cmd": cmd, "args": args });
    if let Some(cwd) = cwd {
        body["cwd"] = cwd.into();
    }
    if let Some(user) = user {
        body["user"] = user.into();
    }
    if !env.is_empty() {
        body["env"] = json!(map(env));
    }
    if let Some(t) = timeout {
        body["timeout_seconds"] = t.into();
    }
    let base = format!("/v1/sandboxes/{}/exec", segment(id));
    if api.json {
        let result = api
            .json(api.request(reqwest::Method::POST, &base).json(&body))
            .await?;
        print_json(&result);
        let code = result["exit_code"].as_i64().unwrap_or(1);
        return Ok(crate::exit_code(i32::try_from(code).unwrap_or(1)));
    }
    let response = api
        .send(
            api.request(reqwest::Method::POST, &format!("{base}/stream"))
                .json(&body),
        )
        .await?;
    let mut events = SseReader::default();
    let mut stream = response.bytes_stream();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the output stream broke off")?;
        for (event, data) in events.push(&chunk) {
            let data: Value = serde_json::from_str(&data)
                .with_context(|| format!("a {event} event is not JSON: {data}"))?;
            match event.as_str() {
                "stdout" | "stderr" => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data["data"].as_str().unwrap_or_default())
                        .context("output that is not base64")?;
                    if event == "stdout" {
                        stdout.write_all(&bytes).await?;
                        stdout.flush().await?;
                    } else {
                        stderr.write_all(&bytes).await?;
                        stderr.flush().await?;
                    }
                }
                "exit" => {
                    let code = data["exit_code"].as_i64().unwrap_or(1);
                    return Ok(crate::exit_code(i32::try_from(code).unwrap_or(1)));
                }
                "error" => bail!(
                    "{} ({})",
                    data["message"].as_str().unwrap_or_default(),
                    data["code"].as_str().unwrap_or("error")
                ),
                _ => {}
            }
        }
    }
    Err(anyhow!(
        "the output stream ended without the command's exit"
    ))
}

/// Splits a server-sent event stream into (event, data) pairs.
#[derive(Debug, Default)]
struct SseReader {
    buffer: String,
}

impl SseReader {
    fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buffer.push_str(&String::from_utf8_lossy(bytes));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            let mut event = "message".to_owned();
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    event = name.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                }
            }
            if !data.is_empty() {
                events.push((event, data.join("\n")));
            }
        }
        events
    }
}

pub fn run_files(api: &ApiArgs, command: FilesCommand) -> Result<ExitCode> {
    let api = Api::new(api)?;
    block_on(files(&api, command))
}

async fn files(api: &Api, command: FilesCommand) -> Result<ExitCode> {
    match command {
        FilesCommand::Put {
            id,
            local,
            path,
            user,
        } => {
            let part = if local.as_os_str() == "-" {
                let mut data = Vec::new();
                tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut data).await?;
                reqwest::multipart::Part::bytes(data)
            } else {
                let file = tokio::fs::File::open(&local)
                    .await
                    .with_context(|| format!("opening {}", local.display()))?;
                let len = file.metadata().await?.len();
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                reqwest::multipart::Part::stream_with_length(body, len)
            };
            let mut form = reqwest::multipart::Form::new().text("path", path.clone());
            if let Some(user) = user {
                form = form.text("user", user);
            }
            form = form.part("file", part.file_name("upload"));
            let url = format!("/v1/sandboxes/{}/files", segment(&id));
            let result = api
                .json(api.request(reqwest::Method::POST, &url).multipart(form))
                .await?;
            if api.json {
                print_json(&result);
            } else {
                println!(
                    "{} bytes written to {}",
                    text(&result["bytes_written"]),
                    path
                );
            }
        }
        FilesCommand::Get {
            id,
            path,
            local,
            user,
        } => {
            let mut body = json!({ "path": path });
            if let Some(user) = user {
                body["user"] = user.into();
            }
            let url = format!("/v1/sandboxes/{}/files/read", segment(&id));
            let response = api
                .send(api.request(reqwest::Method::POST, &url).json(&body))
                .await?;
            let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = match &local {
                Some(p) if p.as_os_str() != "-" => Box::new(
                    tokio::fs::File::create(p)
                        .await
                        .with_context(|| format!("creating {}", p.display()))?,
                ),
                _ => Box::new(tokio::io::stdout()),
            };
            let mut stream = response.bytes_stream();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.context("the download broke off")?)
                    .await?;
            }
            out.flush().await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_snapshot(api: &ApiArgs, command: SnapshotCommand) -> Result<ExitCode> {
    let api = Api::new(api)?;
    block_on(snapshot(&api, command))
}

const SNAPSHOT_HEADERS: &[&str] = &[
    "NAME",
    "KIND",
    "VCPUS",
    "MEMORY_MIB",
    "SIZE",
    "SOURCE",
    "CREATED",
    "HOSTS",
];

fn snapshot_rows(snapshots: &[Value]) -> Vec<Vec<String>> {
    snapshots
        .iter()
        .map(|s| {
            let hosts = s["hosts"]
                .as_array()
                .map(|h| h.iter().map(text).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            let size = s["size_bytes"]
                .as_u64()
                .map_or_else(|| "-".into(), |b| format!("{:.1}MiB", b as f64 / 1048576.0));
            vec![
                text(&s["name"]),
                text(&s["kind"]),
                text(&s["vcpus"]),
                text(&s["memory_mib"]),
                size,
                text(&s["source_sandbox_id"]),
                text(&s["created_at"]),
                hosts,
            ]
        })
        .collect()
}

async fn snapshot(api: &Api, command: SnapshotCommand) -> Result<ExitCode> {
    use reqwest::Method;
    let show = |value: &Value| {
        if api.json {
            print_json(value);
        } else {
            table(
                SNAPSHOT_HEADERS,
                &snapshot_rows(std::slice::from_ref(value)),
            );
        }
    };
    match command {
        SnapshotCommand::Create { sandbox_id, name } => {
            let body = json!({ "sandbox_id": sandbox_id, "name": name });
            let snapshot = api
                .json(api.request(Method::POST, "/v1/snapshots").json(&body))
                .await?;
            show(&snapshot);
        }
        SnapshotCommand::List => {
            let listed = api.json(api.request(Method::GET, "/v1/snapshots")).await?;
            if api.json {
                print_json(&listed);
            } else {
                let all = listed["snapshots"].as_array().cloned().unwrap_or_default();
                table(SNAPSHOT_HEADERS, &snapshot_rows(&all));
            }
        }
        SnapshotCommand::Get { name } => {
            let path = format!("/v1/snapshots/{}", segment(&name));
            show(&api.json(api.request(Method::GET, &path)).await?);
        }
        SnapshotCommand::Rm { names } => {
            for name in names {
                let path = format!("/v1/snapshots/{}", segment(&name));
                api.send(api.request(Method::DELETE, &path)).await?;
                if !api.json {
                    println!("{name}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_hosts(api: &ApiArgs, command: HostsCommand) -> Result<ExitCode> {
    let api = Api::new(api)?;
    block_on(async {
        match command {
            HostsCommand::List => {
                let listed = api
                    .json(api.request(reqwest::Method::GET, "/v1/hosts"))
                    .await?;
                if api.json {
                    print_json(&listed);
                    return Ok(ExitCode::SUCCESS);
                }
                let rows: Vec<Vec<String>> = listed["hosts"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(|h| {
                        vec![
                            text(&h["id"]),
                            text(&h["state"]),
                            text(&h["address"]),
                            format!("{}/{}", text(&h["vcpus_used"]), text(&h["vcpus_total"])),
                            format!(
                                "{}/{}",
                                text(&h["memory_mib_used"]),
                                text(&h["memory_mib_total"])
                            ),
                            text(&h["sandboxes_running"]),
                            text(&h["last_heartbeat_at"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "STATE",
                        "ADDRESS",
                        "VCPUS",
                        "MEMORY_MIB",
                        "RUNNING",
                        "HEARTBEAT",
                    ],
                    &rows,
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sse_reader_splits_events_across_chunks() {
        let mut reader = SseReader::default();
        assert!(reader.push(b"event: stdout\ndata: {\"data\":").is_empty());
        let events = reader.push(b"\"aGk=\"}\n\nevent: exit\ndata: {\"exit_code\": 3}\n\n");
        assert_eq!(
            events,
            [
                ("stdout".to_owned(), "{\"data\":\"aGk=\"}".to_owned()),
                ("exit".to_owned(), "{\"exit_code\": 3}".to_owned()),
            ]
        );
    }

    #[test]
    fn test_key_value_needs_an_equals_sign_and_a_key() {
        assert_eq!(key_value("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(key_value("novalue").is_err());
        assert!(key_value("=x").is_err());
    }
}
