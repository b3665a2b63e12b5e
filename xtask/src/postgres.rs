//! PostgreSQL for the control plane's tests and bench: Debian's server, installed when missing,
//! its cluster started, and a role the tests log in as (they create and drop their own
//! databases). The tests find it through `WRENN_TEST_POSTGRES_URL`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The environment variable the control plane's tests read.
pub const URL_ENV: &str = "WRENN_TEST_POSTGRES_URL";

const PACKAGES: &[&str] = &["postgresql"];
const ROLE: &str = "wrenn_test";
const PASSWORD: &str = "wrenn_test";

/// A running cluster.
#[derive(Debug, Clone, Copy)]
pub struct Postgres {
    pub port: u16,
}

impl Postgres {
    /// The admin URL the tests use, with `host` as seen from where they run (127.0.0.1 here,
    /// the host's address inside the host VM).
    pub fn url(&self, host: &str) -> String {
        format!("postgres://{ROLE}:{PASSWORD}@{host}:{}/postgres", self.port)
    }
}

/// One line of `pg_lsclusters --no-header`.
#[derive(Debug, PartialEq)]
struct Cluster {
    version: String,
    name: String,
    port: u16,
    online: bool,
}

fn parse_clusters(text: &str) -> Vec<Cluster> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [version, name, port, status, ..] = fields[..] else {
                return None;
            };
            Some(Cluster {
                version: version.to_owned(),
                name: name.to_owned(),
                port: port.parse().ok()?,
                online: status.starts_with("online"),
            })
        })
        .collect()
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs PostgreSQL if needed, starts its first cluster (creating one when there is none),
/// and makes sure the test role exists.
pub fn ensure() -> Result<Postgres> {
    wrenn_image::packages::ensure(PACKAGES)?;
    let mut clusters = parse_clusters(&run("pg_lsclusters", &["--no-header"])?);
    if clusters.is_empty() {
        let version = std::fs::read_dir("/usr/lib/postgresql")
            .context("reading /usr/lib/postgresql")?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .max()
            .context("postgresql is installed but /usr/lib/postgresql holds no version")?;
        run("pg_createcluster", &[&version, "main"])?;
        clusters = parse_clusters(&run("pg_lsclusters", &["--no-header"])?);
    }
    let cluster = clusters
        .into_iter()
        .next()
        .context("pg_lsclusters lists no cluster")?;
    if !cluster.online {
        eprintln!(
            "==> starting PostgreSQL {} cluster {} on port {}",
            cluster.version, cluster.name, cluster.port
        );
        run("pg_ctlcluster", &[&cluster.version, &cluster.name, "start"])?;
    }
    let port = cluster.port.to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while run("pg_isready", &["-q", "-h", "127.0.0.1", "-p", &port]).is_err() {
        if Instant::now() > deadline {
            bail!("PostgreSQL on 127.0.0.1:{port} is not ready after 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let create_role = format!(
        "DO $$ BEGIN \
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN \
             CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{PASSWORD}'; \
           END IF; \
         END $$;"
    );
    run(
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            "psql",
            "-q",
            "-p",
            &port,
            "-c",
            &create_role,
        ],
    )?;
    Ok(Postgres { port: cluster.port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_clusters_reads_pg_lsclusters() {
        let text = "15  main    5432 down   postgres /var/lib/postgresql/15/main /var/log/x.log\n\
                    16  other   5433 online postgres /var/lib/postgresql/16/other /var/log/y.log\n";
        let clusters = parse_clusters(text);
        assert_eq!(clusters.len(), 2);
        assert_eq!(clusters[0].port, 5432);
        assert!(!clusters[0].online);
        assert_eq!(clusters[1].version, "16");
        assert!(clusters[1].online);
    }
}
