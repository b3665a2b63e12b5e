//! Snapshots as builds of a store (`wrenn_snapshot`): the Wrenn way to pause and restore.
//!
//! With `layers: {"store": DIR, "build_id": ID}` on `PUT /snapshot/create`, the VMM writes
//! build ID into `DIR/ID/`: `vmstate`, `memfile` + `memfile.header`, and for each drive that
//! reads through layers `disk-<drive>.data` + `disk-<drive>.header`. A Full is generation 0
//! (identity layout, zero pages are holes mapped to zeros). A Diff writes only the pages
//! dirtied since the last snapshot or restore, packed, and a header that is the parent's with
//! those pages remapped: the parent is the build this VM last wrote or was restored from (its
//! *lineage*). Nothing in these files names a host path: builds are named by id only.
//!
//! With `layers` on `PUT /snapshot/load`, the VMM reads `DIR/ID/vmstate`; memory comes from
//! the header (File backend: each run of the header mapped private from its build's file,
//! zero runs left anonymous) or from a page server (Uffd backend: the page server reads the
//! same header); layered drives read through `disk-<drive>.header` of build ID.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

use wrenn_snapshot::header::Header;
use wrenn_snapshot::id::BuildId;
use wrenn_snapshot::store::Store;

use super::memory_file::{self, flat_size};
use super::{LayerRef, MicrovmState, SnapshotError};
use crate::api::models::{DriveLayers, LayersParams};
use crate::builder::Machine;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::resources::Resources;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layers.build_id {text:?}: {reason}")]
    BuildId { text: String, reason: String },
    #[error("layers.store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("memory header")]
    Header(#[from] wrenn_snapshot::header::HeaderError),
    #[error("memory diff")]
    Diff(#[from] wrenn_snapshot::diff::DiffError),
    #[error("build {build}'s memory file {path}: {reason}")]
    DataFile {
        build: BuildId,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "a Diff snapshot needs a parent build: take a Full snapshot into the store first, or load this VM from one"
    )]
    NoParent,
    #[error("the parent build lives in store {parent}, not in {asked}")]
    OtherStore { parent: String, asked: String },
    #[error("the snapshot's memory is {state} bytes but its header maps {header}")]
    SizeMismatch { state: u64, header: u64 },
    #[error("build {0} exists already in the store")]
    BuildExists(BuildId),
    #[error("{0}")]
    Io(String),
}

/// Zero runs shorter than this (64 KiB) are not worth a mapping of their own in a Full's
/// header.
const MIN_ZERO_RUN_PAGES: u64 = 16;

/// The memory layer this VM's RAM currently equals (after a layered snapshot or restore).
#[derive(Debug, Clone)]
pub struct MemoryLineage {
    pub store: PathBuf,
    pub header: Header,
}

fn parse(params: &LayersParams) -> Result<(Store, BuildId), LayerError> {
    let build = params
        .build_id
        .parse::<BuildId>()
        .map_err(|e| LayerError::BuildId {
            text: params.build_id.clone(),
            reason: e.to_string(),
        })?;
    if build.is_zero() {
        return Err(LayerError::BuildId {
            text: params.build_id.clone(),
            reason: "the all-zero id is reserved".into(),
        });
    }
    if !std::path::Path::new(&params.store).is_dir() {
        return Err(LayerError::Store {
            path: params.store.clone(),
            reason: "not a directory".into(),
        });
    }
    Ok((Store::new(&params.store), build))
}

/// Writes this VM's memory as build `layers.build_id`; returns where the VM state goes and
/// the layer it is.
pub fn write_memory(
    machine: &Machine,
    target: &BuildRef,
    diff: bool,
    dirty: &[bool],
    lineage: &Option<MemoryLineage>,
) -> Result<(PathBuf, LayerRef, MemoryLineage), SnapshotError> {
    let (store, build) = (&target.store, target.build);
    let mem = machine.vm.memory();
    let size = flat_size(mem);
    let data_path = store.mem_data(build);
    let started = std::time::Instant::now();
    let data_ms;
    let header = if diff {
        let parent = lineage.as_ref().ok_or(LayerError::NoParent)?;
        if parent.store != store.root() {
            return Err(LayerError::OtherStore {
                parent: parent.store.display().to_string(),
                asked: store.root().display().to_string(),
            }
            .into());
        }
        let runs = write_packed(mem, &data_path, dirty)?;
        data_ms = started.elapsed().as_millis();
        parent
            .header
            .apply_diff(build, &runs)
            .map_err(LayerError::from)?
    } else {
        let written = memory_file::write_full(mem, &data_path, machine.memory_is_anonymous)?;
        data_ms = started.elapsed().as_millis();
        // Short zero stretches stay identity-mapped (they read as the file's holes): a
        // header of a few long zero runs instead of one per free page keeps every later
        // diff and lookup cheap.
        let zero_runs: Vec<_> = runs_of(&written.data_pages, false)
            .into_iter()
            .filter(|r| r.blocks >= MIN_ZERO_RUN_PAGES)
            .collect();
        Header::full(build, size, PAGE_SIZE as u64, &zero_runs).map_err(LayerError::from)?
    };
    header
        .write(&store.mem_header(build))
        .map_err(LayerError::from)?;
    tracing::info!(
        build = %build,
        generation = header.generation,
        runs = header.mappings.len(),
        data_ms,
        total_ms = started.elapsed().as_millis(),
        "memory layer written"
    );
    let layer = LayerRef {
        build_id: build.to_string(),
        generation: header.generation,
    };
    let lineage = MemoryLineage {
        store: store.root().to_owned(),
        header,
    };
    Ok((store.vmstate(build), layer, lineage))
}

/// Makes the build's directory, which must be new: a build is written once. Returns it, for
/// removal should the snapshot fail half way.
pub fn new_build_dir(target: &BuildRef) -> Result<PathBuf, SnapshotError> {
    let build = target.build;
    let dir = target.store.build_dir(build);
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(LayerError::BuildExists(build).into())
        }
        Err(e) => Err(LayerError::Io(format!("{}: {e}", dir.display())).into()),
    }
}

/// The dirty pages, packed, written straight from guest memory (one write per run, no copy
/// through this process and no scan for zeros: a page the guest zeroed is stored like any
/// other, which costs 4 KiB and saves reading every dirtied byte once more).
fn write_packed(
    mem: &GuestMemory,
    path: &std::path::Path,
    dirty: &[bool],
) -> Result<Vec<wrenn_snapshot::header::DirtyRun>, SnapshotError> {
    let io = |source| SnapshotError::MemoryFile {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    memory_file::write_pages(mem, &mut file, dirty, memory_file::Placement::Packed).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(runs_of(dirty, true)
        .into_iter()
        .map(|run| wrenn_snapshot::header::DirtyRun { run, zero: false })
        .collect())
}

/// Runs of consecutive pages whose flag equals `want`.
fn runs_of(flags: &[bool], want: bool) -> Vec<wrenn_snapshot::header::Run> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < flags.len() {
        if flags[i] != want {
            i += 1;
            continue;
        }
        let start = i;
        while i < flags.len() && flags[i] == want {
            i += 1;
        }
        runs.push(wrenn_snapshot::header::Run {
            first_block: u64::try_from(start).expect("x86_64"),
            blocks: u64::try_from(i - start).expect("x86_64"),
        });
    }
    runs
}

/// Layered drives' snapshots: each drive that reads through layers writes its overlay's
/// dirty blocks as this build's disk diff.
pub fn write_disks(
    machine: &Machine,
    resources: &Resources,
    target: &BuildRef,
) -> Result<(), SnapshotError> {
    let (store, build) = (&target.store, target.build);
    for (drive, device) in resources.drives.iter().zip(&machine.virtio) {
        if drive.layers.is_none() {
            continue;
        }
        crate::devices::bus::lock(device)
            .snapshot_disk(store, build)
            .map_err(LayerError::Io)?;
        tracing::info!(drive = %drive.drive_id, build = %build, "disk layer written");
    }
    Ok(())
}

/// A request's `layers` (create or load), checked once: the store and the build in it.
#[derive(Debug)]
pub struct BuildRef {
    store: Store,
    build: BuildId,
}

impl BuildRef {
    pub fn open(params: &LayersParams) -> Result<Self, SnapshotError> {
        let (store, build) = parse(params)?;
        Ok(Self { store, build })
    }

    pub fn vmstate_path(&self) -> PathBuf {
        self.store.vmstate(self.build)
    }

    /// How a layered drive of the restored VM reads: through this build's disk header.
    pub fn drive_layers(&self) -> DriveLayers {
        DriveLayers {
            store: self.store.root().display().to_string(),
            build_id: self.build.to_string(),
        }
    }

    fn header(&self, state: &MicrovmState) -> Result<Header, SnapshotError> {
        let header = Header::read(&self.store.mem_header(self.build)).map_err(LayerError::from)?;
        if header.size != state.memory.size {
            return Err(LayerError::SizeMismatch {
                state: state.memory.size,
                header: header.size,
            }
            .into());
        }
        Ok(header)
    }

    /// The lineage of a VM restored from this build (its next Diff builds on it).
    pub fn lineage(&self, state: &MicrovmState) -> Result<MemoryLineage, SnapshotError> {
        Ok(MemoryLineage {
            store: self.store.root().to_owned(),
            header: self.header(state)?,
        })
    }

    /// Guest RAM mapped from the builds' memory files as the header says.
    pub fn map_memory(
        &self,
        mib: u64,
        state: &MicrovmState,
    ) -> Result<(GuestMemory, MemoryLineage), SnapshotError> {
        let header = self.header(state)?;
        let mut files: HashMap<BuildId, File> = HashMap::new();
        for info in &header.builds {
            let path = self.store.mem_data(info.id);
            let bad = |reason: String| LayerError::DataFile {
                build: info.id,
                path: path.clone(),
                reason,
            };
            let file = File::open(&path).map_err(|e| bad(e.to_string()))?;
            let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
            if len < info.data_len {
                return Err(bad(format!("{len} bytes, the header needs {}", info.data_len)).into());
            }
            files.insert(info.id, file);
        }
        let pieces: Vec<(u64, u64, &File, u64)> = header
            .mappings
            .iter()
            .filter(|m| !m.build.is_zero())
            .map(|m| (m.offset, m.len, &files[&m.build], m.storage_offset))
            .collect();
        let mem = crate::memory::map_files(mib, &pieces)?;
        Ok((
            mem,
            MemoryLineage {
                store: self.store.root().to_owned(),
                header,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_runs_of_groups_consecutive_flags() {
        let flags = [true, true, false, true, false, false, true];
        let runs = runs_of(&flags, false);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].first_block, runs[0].blocks), (2, 1));
        assert_eq!((runs[1].first_block, runs[1].blocks), (4, 2));
    }
}
