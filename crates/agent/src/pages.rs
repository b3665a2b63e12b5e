//! The page server inside the agent: one `wrenn_pager::Pager` for every sandbox, one opened
//! memory source per build (shared by every sandbox restored from it, so a template's files
//! are opened once and its pages come from one page cache), and prefetch sets kept beside
//! their build (`<store>/<build>/prefetch`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use wrenn_pager::{LayeredSource, PageSource, Pager, PagerConfig, VmHandle, VmOptions};
use wrenn_snapshot::id::BuildId;

/// The file a build's prefetch set is saved in.
pub const PREFETCH_FILE: &str = "prefetch";

#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("opening the memory of build {build}")]
    Source {
        build: BuildId,
        #[source]
        source: wrenn_pager::LayeredSourceError,
    },
    #[error("serving guest memory on {}", path.display())]
    Register {
        path: PathBuf,
        #[source]
        source: wrenn_pager::PagerError,
    },
    #[error("saving the prefetch set of build {build}")]
    Prefetch {
        build: BuildId,
        #[source]
        source: wrenn_pager::PrefetchFileError,
    },
}

/// The agent's page server.
#[derive(Debug)]
pub struct Pages {
    store_root: PathBuf,
    pager: Pager,
    sources: Mutex<HashMap<BuildId, Arc<LayeredSource>>>,
}

impl Pages {
    pub fn new(store_root: &Path) -> Pages {
        Pages {
            store_root: store_root.to_owned(),
            pager: Pager::new(PagerConfig {
                // A VMM on a busy host may take long to reach its load.
                accept_timeout: std::time::Duration::from_secs(60),
                ..PagerConfig::default()
            }),
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// The build's memory, opened once.
    fn source(&self, build: BuildId) -> Result<Arc<LayeredSource>, PagesError> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(source) = sources.get(&build) {
            return Ok(source.clone());
        }
        let source = Arc::new(
            LayeredSource::open(&self.store_root, build)
                .map_err(|source| PagesError::Source { build, source })?,
        );
        sources.insert(build, source.clone());
        self.load_prefetch(build);
        Ok(source)
    }

    /// Loads the build's saved prefetch set, if it has one.
    fn load_prefetch(&self, build: BuildId) {
        let key = build.to_string();
        if self.pager.prefetch_store().get(&key).is_some() {
            return;
        }
        let path = self.prefetch_path(build);
        if path.exists()
            && let Err(e) = self.pager.prefetch_store().load(&key, &path)
        {
            tracing::warn!(%build, error = %e, "ignoring a damaged prefetch set");
        }
    }

    fn prefetch_path(&self, build: BuildId) -> PathBuf {
        self.store_root.join(build.to_string()).join(PREFETCH_FILE)
    }

    /// Serves the memory of `build` to the VMM that connects to `socket`. With `record`, the
    /// pages it touches become the build's prefetch set when it ends (see [`Pages::save_prefetch`]).
    pub fn serve(
        &self,
        sandbox_id: &str,
        socket: &Path,
        build: BuildId,
        record: bool,
    ) -> Result<VmHandle, PagesError> {
        let source: Arc<dyn PageSource> = self.source(build)?;
        let mut options = VmOptions::new(sandbox_id).with_prefetch_key(build.to_string());
        options.record = record;
        let _ = std::fs::remove_file(socket);
        self.pager
            .register(socket, source, options)
            .map_err(|source| PagesError::Register {
                path: socket.to_owned(),
                source,
            })
    }

    /// Writes the prefetch set recorded for `build` beside it; returns its page count.
    pub fn save_prefetch(&self, build: BuildId) -> Result<usize, PagesError> {
        let key = build.to_string();
        let count = self.pager.prefetch_store().get(&key).map_or(0, |p| p.len());
        if count > 0 {
            self.pager
                .prefetch_store()
                .save(&key, &self.prefetch_path(build))
                .map_err(|source| PagesError::Prefetch { build, source })?;
        }
        Ok(count)
    }

    /// Forgets a build's opened files (before its directory is removed).
    pub fn forget(&self, build: BuildId) {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&build);
    }

    /// Faults served and bytes installed since the agent started.
    pub fn totals(&self) -> wrenn_pager::CounterStats {
        self.pager.stats().totals
    }
}
