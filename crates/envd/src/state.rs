//! What envd knows about its sandbox: set at start (command line, kernel command line) and by
//! the host's `/init` calls.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use crate::users::UserDb;

/// State shared by every request.
#[derive(Debug)]
pub struct Shared {
    inner: RwLock<Settings>,
    /// Where users and groups are looked up.
    pub users: UserDb,
}

/// The settings `/init` may change.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Once set, every request but the exempt ones needs `X-Access-Token` equal to it.
    pub access_token: Option<String>,
    /// The user a request runs as when it names none.
    pub default_user: String,
    /// Where relative paths and commands without `cwd` start; the user's home when unset.
    pub default_workdir: Option<PathBuf>,
    /// Environment every started process gets (after the user's own, before the request's).
    pub env_vars: BTreeMap<String, String>,
    /// The sandbox's id, when the host said it.
    pub sandbox_id: Option<String>,
    /// The template the sandbox was made from, when the host said it.
    pub template_id: Option<String>,
    /// envd may change the machine: set the clock, reseed the kernel's random generator,
    /// write `/run/e2b`, forward ports. True as PID 1 or with `--manage-system`; false when
    /// envd runs on a host (tests), which it must leave alone.
    pub manage_system: bool,
    /// envd owns the cgroup tree below [`crate::system::cgroups::ROOT`] and may put the
    /// processes it starts there. True as PID 1 or with `--manage-cgroups`.
    pub manage_cgroups: bool,
}

impl Shared {
    /// State with `settings` as the starting point.
    pub fn new(settings: Settings, users: UserDb) -> Arc<Self> {
        Arc::new(Self {
            inner: RwLock::new(settings),
            users,
        })
    }

    /// A copy of the current settings (cheap: a few strings).
    pub fn settings(&self) -> Settings {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads one thing from the settings under the lock, without copying the rest (the
    /// per-request checks: token, default user, workdir).
    pub fn read<T>(&self, pick: impl FnOnce(&Settings) -> T) -> T {
        pick(
            &self
                .inner
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Changes the settings under the lock.
    pub fn update(&self, change: impl FnOnce(&mut Settings)) {
        let mut guard = self
            .inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        change(&mut guard);
    }

    /// The environment a started process gets from envd: the sandbox variables E2B's envd
    /// exports, then the `/init` variables.
    pub fn global_env(&self) -> BTreeMap<String, String> {
        let settings = self.settings();
        let mut env = BTreeMap::new();
        env.insert("E2B_SANDBOX".to_owned(), "true".to_owned());
        if let Some(id) = &settings.sandbox_id {
            env.insert("E2B_SANDBOX_ID".to_owned(), id.clone());
        }
        if let Some(id) = &settings.template_id {
            env.insert("E2B_TEMPLATE_ID".to_owned(), id.clone());
        }
        env.extend(settings.env_vars);
        env
    }
}
