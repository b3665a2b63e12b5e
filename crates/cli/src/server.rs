//! `wrenn server` (the control plane: REST API, database, reconciler, proxy) and
//! `wrenn keys create` (an API key written straight into the database: how the first key is
//! made).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use wrenn_server::keys::KeyShape;
use wrenn_server::{Server, ServerConfig};

/// Where the control plane keeps its files unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/wrenn/server";

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Where the REST API listens.
    #[arg(long, env = "WRENN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    database: DatabaseArgs,
    /// What agents must present with their heartbeats (default: a random token kept in
    /// DATA_DIR/join-token).
    #[arg(long, env = "WRENN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// How often the reconciler compares the database with the agents.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    reconcile_interval: Duration,
    /// A host without a heartbeat for this long is unreachable, its sandboxes lost.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    host_grace: Duration,
    /// The largest file upload accepted, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    max_upload_bytes: u64,
    /// Serve sandbox ports at `{port}-{sandbox_id}.DOMAIN` (by the Host header).
    #[arg(long, env = "WRENN_DOMAIN")]
    domain: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// `postgres://user:password@host/db`, or `sqlite:///path/wrenn.db` (default: SQLite in
    /// the data directory).
    #[arg(long, env = "WRENN_DATABASE_URL")]
    database_url: Option<String>,
    /// The control plane's files (SQLite database, join token).
    #[arg(long, env = "WRENN_SERVER_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

impl DatabaseArgs {
    /// The database URL; for the default SQLite file, its directory is made.
    fn url(&self) -> Result<String> {
        match &self.database_url {
            Some(url) => Ok(url.clone()),
            None => sqlite_in(&self.data_dir),
        }
    }
}

/// The URL of the SQLite database in `data_dir`, which is created when missing.
pub fn sqlite_in(data_dir: &Path) -> Result<String> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    Ok(format!("sqlite://{}", data_dir.join("wrenn.db").display()))
}

/// The join token kept in `data_dir`, made on first use (readable by root only).
pub fn join_token_in(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("join-token");
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim();
        if !token.is_empty() {
            return Ok(token.to_owned());
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = random_hex(24)?;
    write_private(&path, &token)?;
    Ok(token)
}

/// Writes a secret readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut raw = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .context("reading /dev/urandom")?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The control plane's configuration from the command line.
fn config(args: &ServerArgs) -> Result<ServerConfig> {
    let mut config = ServerConfig::new(args.database.url()?);
    config.listen = args.listen;
    config.reconcile_interval = args.reconcile_interval;
    config.host_grace = args.host_grace;
    config.max_upload_bytes = args.max_upload_bytes;
    config.domain = args.domain.clone();
    config.join_token = match &args.join_token {
        Some(token) => token.clone(),
        None => join_token_in(&args.database.data_dir)?,
    };
    Ok(config)
}

pub fn run_server(args: ServerArgs) -> Result<()> {
    let config = config(&args)?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let server = Server::start(config).await?;
        println!(
            "wrenn server: REST API on http://{} (docs at /docs), database {}",
            listener.local_addr()?,
            server.db().backend_name()
        );
        let router = server.router();
        wrenn_server::serve(listener, router, shutdown_signal()).await?;
        server.stop().await;
        println!("wrenn server: stopped");
        Ok(())
    })
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Make an API key and print it (it is stored hashed: this is the only time it is shown).
    Create {
        /// What the key is for.
        #[arg(long, default_value = "default")]
        name: String,
        /// Shape it `e2b_` + 40 hex, as E2B's SDKs expect (it works on Wrenn's API too).
        #[arg(long)]
        e2b: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

pub fn run_keys(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Create {
            name,
            e2b,
            database,
        } => {
            let url = database.url()?;
            let shape = if e2b { KeyShape::E2b } else { KeyShape::Wrenn };
            let key = runtime()?.block_on(wrenn_server::keys::create_at(&url, &name, shape))?;
            println!("{}", key.key);
            Ok(())
        }
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
