//! The layered mapping: which build stores each block of a device.
//!
//! A device (guest memory as one flat byte range, or a disk) is tiled by [`Mapping`]s, sorted
//! and contiguous. Each says where its bytes live: in some build's data file, or nowhere
//! (build [`BuildId::ZERO`]: read as zeros, never fetched).
//!
//! ```text
//! device  0          4K         12K        16K                        size
//!         +----------+----------+----------+--------------------------+
//!         | build A  |  ZERO    | build C  | build A                  |
//!         | @0       |          | @0       | @16K                     |
//!         +----------+----------+----------+--------------------------+
//!                    generation 2 (build C) = generation 1's header
//!                    with C's dirty blocks remapped to C's data file
//! ```
//!
//! Generation N's header is N-1's with the blocks dirtied in N remapped to build N
//! ([`Header::apply_diff`]): newer wins, older mappings are split around the new ones, then
//! neighbours that are the same build and contiguous in storage merge again. So any block is
//! one binary search away ([`Header::lookup`]), however deep the chain.
//!
//! On disk a header is a [`container`](crate::container) of kind `Header` whose postcard
//! payload lists the builds once and each run as `(blocks, build index, storage block)`:
//! offsets are implied by the tiling and the 16-byte ids are not repeated per run.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::container::{self, ContainerError, FormatError, Kind};
use crate::id::BuildId;
use crate::store::DISK_BLOCK_SIZE;

/// Version of the header payload; bumped on any change to [`WireHeader`].
pub const HEADER_VERSION: u32 = 1;
/// Cap on a header's payload: about 20 million runs.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;

const MIN_BLOCK_SIZE: u64 = 512;
const MAX_BLOCK_SIZE: u64 = 1 << 30;

/// Errors from building, checking, reading or writing a header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("header version is {found}, expected {HEADER_VERSION}")]
    BadVersion { found: u32 },
    #[error("block_size {block_size} is not a power of two between 512 and 1 GiB")]
    BadBlockSize { block_size: u64 },
    #[error("size {size} is not a multiple of block_size {block_size}")]
    UnalignedSize { size: u64, block_size: u64 },
    #[error("{field} is the reserved zero build id")]
    ZeroId { field: &'static str },
    #[error("generation 0 must be its own base, but build is {build} and base is {base}")]
    BaseNotBuild { build: BuildId, base: BuildId },
    #[error(
        "mapping {index} starts at {offset}, expected {expected}: mappings must tile the device in order"
    )]
    Gap {
        index: usize,
        offset: u64,
        expected: u64,
    },
    #[error("mapping {index} is empty")]
    EmptyMapping { index: usize },
    #[error("mapping {index} is not aligned to block_size {block_size}")]
    Unaligned { index: usize, block_size: u64 },
    #[error("mapping {index} overflows a u64")]
    Overflow { index: usize },
    #[error("mappings cover [0, {end}) but size is {size}")]
    Coverage { end: u64, size: u64 },
    #[error("mapping {index} names build {build}, which is not in the builds table")]
    UnknownBuild { index: usize, build: BuildId },
    #[error("zero mapping {index} has storage_offset {storage_offset}, expected 0")]
    ZeroStorage { index: usize, storage_offset: u64 },
    #[error("mapping {index} reads build {build}'s data up to {end}, its data_len is {data_len}")]
    StorageOutOfRange {
        index: usize,
        build: BuildId,
        end: u64,
        data_len: u64,
    },
    #[error("build {build} is listed twice in the builds table")]
    DuplicateBuild { build: BuildId },
    #[error("build {build} is in the builds table but no mapping uses it")]
    UnreferencedBuild { build: BuildId },
    #[error("run {index} names build number {build_index}, the table has {builds}")]
    BadBuildIndex {
        index: usize,
        build_index: u32,
        builds: usize,
    },
    #[error("too many builds for the header format: {builds}")]
    TooManyBuilds { builds: usize },
    #[error("run {index} is empty")]
    EmptyRun { index: usize },
    #[error("run {index} starts at block {first_block}, before the end of the previous run")]
    RunOrder { index: usize, first_block: u64 },
    #[error("run {index} ends at block {end_block}, the device has {blocks} blocks")]
    RunOutOfRange {
        index: usize,
        end_block: u64,
        blocks: u64,
    },
    #[error("build {build} is already part of this header's chain")]
    BuildReused { build: BuildId },
    #[error("generation overflows")]
    GenerationOverflow,
    #[error("header encoding failed")]
    Encode(#[source] FormatError),
    #[error("header bytes are invalid")]
    Decode(#[source] FormatError),
    #[error(transparent)]
    File(#[from] ContainerError),
    #[error("header file {path} is invalid")]
    InvalidFile {
        path: PathBuf,
        #[source]
        source: Box<HeaderError>,
    },
}

/// Device bytes `[offset, offset + len)` live in `build`'s data file from `storage_offset`
/// on; `build == ZERO` means they are zeros (and `storage_offset` is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub offset: u64,
    pub len: u64,
    pub build: BuildId,
    pub storage_offset: u64,
}

impl Mapping {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// The part of this mapping covering device bytes `[start, end)` (within it).
    fn slice(&self, start: u64, end: u64) -> Mapping {
        let storage_offset = if self.build.is_zero() {
            0
        } else {
            self.storage_offset + (start - self.offset)
        };
        Mapping {
            offset: start,
            len: end - start,
            build: self.build,
            storage_offset,
        }
    }

    /// `next` directly follows `self` and reads on from where `self` stops.
    fn continues_into(&self, next: &Mapping) -> bool {
        self.end() == next.offset
            && self.build == next.build
            && (self.build.is_zero() || self.storage_offset + self.len == next.storage_offset)
    }
}

/// A build referenced by a header, with the length its data file must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub id: BuildId,
    pub data_len: u64,
}

/// A run of blocks `[first_block, first_block + blocks)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub first_block: u64,
    pub blocks: u64,
}

impl Run {
    pub fn end_block(&self) -> u64 {
        self.first_block.saturating_add(self.blocks)
    }
}

/// A run of blocks changed in a diff: either stored in the new build's data file
/// (`zero == false`) or now all zeros and not stored (`zero == true`).
///
/// A diff is a list of these in increasing, non-overlapping block order. The data runs'
/// blocks are packed in the data file in that same order: the k-th stored block is at
/// storage offset `k * block_size`. [`crate::diff::DiffWriter`] produces exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRun {
    pub run: Run,
    pub zero: bool,
}

/// Where a device offset lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// `ZERO` for zeros.
    pub build: BuildId,
    /// Offset in the build's data file (0 for zeros).
    pub storage_offset: u64,
    /// Bytes from the looked-up offset to the end of its run: the next `run_remaining`
    /// device bytes continue in the same build, contiguously in storage.
    pub run_remaining: u64,
}

impl Location {
    pub fn is_zero(&self) -> bool {
        self.build.is_zero()
    }
}

/// The mapping of one device at one generation. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub block_size: u64,
    /// Device size in bytes, a multiple of `block_size`.
    pub size: u64,
    /// 0 for a full build, +1 per diff.
    pub generation: u64,
    /// The build this header belongs to (this layer).
    pub build: BuildId,
    /// Generation 0's build, inherited by every diff.
    pub base: BuildId,
    /// Every build a mapping names, with its data file's length.
    pub builds: Vec<BuildInfo>,
    pub mappings: Vec<Mapping>,
}

/// The payload on disk. Offsets follow from the tiling; sizes are in blocks.
#[derive(Serialize, Deserialize)]
struct WireHeader {
    block_size: u64,
    size: u64,
    generation: u64,
    build: BuildId,
    base: BuildId,
    builds: Vec<BuildInfo>,
    runs: Vec<WireRun>,
}

#[derive(Serialize, Deserialize)]
struct WireRun {
    blocks: u64,
    /// 0 = zeros, i = `builds[i - 1]`.
    build_index: u32,
    storage_block: u64,
}

fn check_block_size(block_size: u64) -> Result<(), HeaderError> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(HeaderError::BadBlockSize { block_size })
    }
}

/// Checks runs are non-empty, increasing, non-overlapping and within `device_blocks`.
fn check_runs<'a>(
    runs: impl Iterator<Item = &'a Run>,
    device_blocks: u64,
) -> Result<(), HeaderError> {
    let mut next_free = 0;
    for (index, run) in runs.enumerate() {
        if run.blocks == 0 {
            return Err(HeaderError::EmptyRun { index });
        }
        if run.first_block < next_free {
            return Err(HeaderError::RunOrder {
                index,
                first_block: run.first_block,
            });
        }
        let end_block = run
            .first_block
            .checked_add(run.blocks)
            .filter(|&end| end <= device_blocks)
            .ok_or(HeaderError::RunOutOfRange {
                index,
                end_block: run.end_block(),
                blocks: device_blocks,
            })?;
        next_free = end_block;
    }
    Ok(())
}

/// Merges neighbours that continue into each other.
fn normalize(mappings: Vec<Mapping>) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::with_capacity(mappings.len());
    for mapping in mappings {
        match out.last_mut() {
            Some(last) if last.continues_into(&mapping) => last.len += mapping.len,
            _ => out.push(mapping),
        }
    }
    out
}

fn round_up(value: u64, to: u64) -> Option<u64> {
    value.checked_next_multiple_of(to)
}

impl Header {
    /// The header of a Full build: identity layout (device offset = file offset) except
    /// `zero_runs`, which map to zeros. The data file is `size` bytes (holes where zero).
    pub fn full(
        build: BuildId,
        size: u64,
        block_size: u64,
        zero_runs: &[Run],
    ) -> Result<Header, HeaderError> {
        check_block_size(block_size)?;
        if !size.is_multiple_of(block_size) {
            return Err(HeaderError::UnalignedSize { size, block_size });
        }
        check_runs(zero_runs.iter(), size / block_size)?;
        let mut mappings = Vec::with_capacity(zero_runs.len() * 2 + 1);
        let mut cursor = 0;
        let data = |start: u64, end: u64| Mapping {
            offset: start,
            len: end - start,
            build,
            storage_offset: start,
        };
        for run in zero_runs {
            // check_runs proved these products fit (they are at most `size`).
            let start = run.first_block * block_size;
            let end = run.end_block() * block_size;
            if start > cursor {
                mappings.push(data(cursor, start));
            }
            mappings.push(Mapping {
                offset: start,
                len: end - start,
                build: BuildId::ZERO,
                storage_offset: 0,
            });
            cursor = end;
        }
        if cursor < size {
            mappings.push(data(cursor, size));
        }
        Header::assemble(build, build, 0, block_size, size, mappings, |_| Some(size))
    }

    /// The header of a raw disk image of `image_len` bytes used as generation 0: one identity
    /// run. The device size is rounded up to the disk block size; the bytes past the image's
    /// end (less than a block) read as zeros.
    pub fn from_image(build: BuildId, image_len: u64) -> Result<Header, HeaderError> {
        let block_size = DISK_BLOCK_SIZE;
        let size = round_up(image_len, block_size).ok_or(HeaderError::Overflow { index: 0 })?;
        let mappings = if size == 0 {
            Vec::new()
        } else {
            vec![Mapping {
                offset: 0,
                len: size,
                build,
                storage_offset: 0,
            }]
        };
        Header::assemble(build, build, 0, block_size, size, mappings, |_| {
            Some(image_len)
        })
    }

    /// Normalises `mappings`, builds the builds table from the builds they still use
    /// (`data_len_of` gives each one's length) and validates the result.
    fn assemble(
        build: BuildId,
        base: BuildId,
        generation: u64,
        block_size: u64,
        size: u64,
        mappings: Vec<Mapping>,
        data_len_of: impl Fn(BuildId) -> Option<u64>,
    ) -> Result<Header, HeaderError> {
        let mappings = normalize(mappings);
        let mut seen = HashSet::new();
        let mut builds = Vec::new();
        for (index, mapping) in mappings.iter().enumerate() {
            if !mapping.build.is_zero() && seen.insert(mapping.build) {
                let data_len = data_len_of(mapping.build).ok_or(HeaderError::UnknownBuild {
                    index,
                    build: mapping.build,
                })?;
                builds.push(BuildInfo {
                    id: mapping.build,
                    data_len,
                });
            }
        }
        let header = Header {
            version: HEADER_VERSION,
            block_size,
            size,
            generation,
            build,
            base,
            builds,
            mappings,
        };
        header.validate()?;
        Ok(header)
    }

    /// This header with `dirty` applied as build `new_build`, one generation later.
    /// See [`DirtyRun`] for the layout of `new_build`'s data file.
    pub fn apply_diff(
        &self,
        new_build: BuildId,
        dirty: &[DirtyRun],
    ) -> Result<Header, HeaderError> {
        if new_build.is_zero() {
            return Err(HeaderError::ZeroId { field: "new build" });
        }
        if new_build == self.build
            || new_build == self.base
            || self.builds.iter().any(|b| b.id == new_build)
        {
            return Err(HeaderError::BuildReused { build: new_build });
        }
        let generation = self
            .generation
            .checked_add(1)
            .ok_or(HeaderError::GenerationOverflow)?;
        let block_size = self.block_size;
        check_runs(dirty.iter().map(|d| &d.run), self.size / block_size)?;

        // The diff's own mappings; runs are within the device, so nothing below overflows.
        let mut stored = 0u64;
        let mut newer = Vec::with_capacity(dirty.len());
        for d in dirty {
            let offset = d.run.first_block * block_size;
            let len = d.run.blocks * block_size;
            let (build, storage_offset) = if d.zero {
                (BuildId::ZERO, 0)
            } else {
                stored += len;
                (new_build, stored - len)
            };
            newer.push(Mapping {
                offset,
                len,
                build,
                storage_offset,
            });
        }

        // Older mappings minus what the diff covers, split where needed.
        let mut merged = Vec::with_capacity(self.mappings.len() + 2 * newer.len());
        let mut first_overlap = 0;
        for old in &self.mappings {
            while first_overlap < newer.len() && newer[first_overlap].end() <= old.offset {
                first_overlap += 1;
            }
            let mut cursor = old.offset;
            for new in newer[first_overlap..]
                .iter()
                .take_while(|n| n.offset < old.end())
            {
                if new.offset > cursor {
                    merged.push(old.slice(cursor, new.offset));
                }
                cursor = cursor.max(new.end());
            }
            if cursor < old.end() {
                merged.push(old.slice(cursor, old.end()));
            }
        }
        merged.extend_from_slice(&newer);
        merged.sort_unstable_by_key(|m| m.offset);

        let data_lens: HashMap<BuildId, u64> =
            self.builds.iter().map(|b| (b.id, b.data_len)).collect();
        Header::assemble(
            new_build,
            self.base,
            generation,
            block_size,
            self.size,
            merged,
            |id| {
                if id == new_build {
                    Some(stored)
                } else {
                    data_lens.get(&id).copied()
                }
            },
        )
    }

    /// Where device byte `offset` lives; `None` past the end. O(log runs).
    pub fn lookup(&self, offset: u64) -> Option<Location> {
        let index = self.mappings.partition_point(|m| m.end() <= offset);
        let mapping = self.mappings.get(index)?;
        if mapping.offset > offset {
            return None;
        }
        let into = offset - mapping.offset;
        Some(Location {
            build: mapping.build,
            storage_offset: if mapping.build.is_zero() {
                0
            } else {
                mapping.storage_offset + into
            },
            run_remaining: mapping.len - into,
        })
    }

    /// The data file length `build` must have, if the header references it.
    pub fn data_len(&self, build: BuildId) -> Option<u64> {
        self.builds
            .iter()
            .find(|b| b.id == build)
            .map(|b| b.data_len)
    }

    /// Checks every structural rule: see [`HeaderError`] for the list.
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.version != HEADER_VERSION {
            return Err(HeaderError::BadVersion {
                found: self.version,
            });
        }
        let block_size = self.block_size;
        check_block_size(block_size)?;
        if !self.size.is_multiple_of(block_size) {
            return Err(HeaderError::UnalignedSize {
                size: self.size,
                block_size,
            });
        }
        if self.build.is_zero() {
            return Err(HeaderError::ZeroId { field: "build" });
        }
        if self.base.is_zero() {
            return Err(HeaderError::ZeroId { field: "base" });
        }
        if self.generation == 0 && self.base != self.build {
            return Err(HeaderError::BaseNotBuild {
                build: self.build,
                base: self.base,
            });
        }
        // Each build's data_len, and whether a mapping used it.
        let mut builds: HashMap<BuildId, (u64, bool)> = HashMap::new();
        for info in &self.builds {
            if info.id.is_zero() {
                return Err(HeaderError::ZeroId {
                    field: "builds table entry",
                });
            }
            if builds.insert(info.id, (info.data_len, false)).is_some() {
                return Err(HeaderError::DuplicateBuild { build: info.id });
            }
        }
        let mut expected = 0u64;
        for (index, m) in self.mappings.iter().enumerate() {
            if m.offset != expected {
                return Err(HeaderError::Gap {
                    index,
                    offset: m.offset,
                    expected,
                });
            }
            if m.len == 0 {
                return Err(HeaderError::EmptyMapping { index });
            }
            if !m.len.is_multiple_of(block_size) || !m.storage_offset.is_multiple_of(block_size) {
                return Err(HeaderError::Unaligned { index, block_size });
            }
            expected = m
                .offset
                .checked_add(m.len)
                .ok_or(HeaderError::Overflow { index })?;
            if m.build.is_zero() {
                if m.storage_offset != 0 {
                    return Err(HeaderError::ZeroStorage {
                        index,
                        storage_offset: m.storage_offset,
                    });
                }
                continue;
            }
            let Some((data_len, used)) = builds.get_mut(&m.build) else {
                return Err(HeaderError::UnknownBuild {
                    index,
                    build: m.build,
                });
            };
            *used = true;
            let end = m
                .storage_offset
                .checked_add(m.len)
                .ok_or(HeaderError::Overflow { index })?;
            // A data file may end inside its last block (an image whose size is not a
            // multiple of the block size); the missing tail reads as zeros.
            let limit = round_up(*data_len, block_size).unwrap_or(u64::MAX);
            if end > limit {
                return Err(HeaderError::StorageOutOfRange {
                    index,
                    build: m.build,
                    end,
                    data_len: *data_len,
                });
            }
        }
        if expected != self.size {
            return Err(HeaderError::Coverage {
                end: expected,
                size: self.size,
            });
        }
        if let Some(info) = self.builds.iter().find(|b| !builds[&b.id].1) {
            return Err(HeaderError::UnreferencedBuild { build: info.id });
        }
        Ok(())
    }

    fn to_wire(&self) -> Result<WireHeader, HeaderError> {
        let mut index_of = HashMap::new();
        for (i, info) in self.builds.iter().enumerate() {
            let index = i.checked_add(1).and_then(|n| u32::try_from(n).ok()).ok_or(
                HeaderError::TooManyBuilds {
                    builds: self.builds.len(),
                },
            )?;
            index_of.insert(info.id, index);
        }
        let mut runs = Vec::with_capacity(self.mappings.len());
        for (index, m) in self.mappings.iter().enumerate() {
            let build_index = if m.build.is_zero() {
                0
            } else {
                *index_of.get(&m.build).ok_or(HeaderError::UnknownBuild {
                    index,
                    build: m.build,
                })?
            };
            runs.push(WireRun {
                blocks: m.len / self.block_size,
                build_index,
                storage_block: m.storage_offset / self.block_size,
            });
        }
        Ok(WireHeader {
            block_size: self.block_size,
            size: self.size,
            generation: self.generation,
            build: self.build,
            base: self.base,
            builds: self.builds.clone(),
            runs,
        })
    }

    fn from_wire(wire: WireHeader) -> Result<Header, HeaderError> {
        check_block_size(wire.block_size)?;
        let mut mappings = Vec::with_capacity(wire.runs.len());
        let mut offset = 0u64;
        for (index, run) in wire.runs.iter().enumerate() {
            let build = match usize::try_from(run.build_index) {
                Ok(0) => BuildId::ZERO,
                Ok(i) => {
                    wire.builds
                        .get(i - 1)
                        .ok_or(HeaderError::BadBuildIndex {
                            index,
                            build_index: run.build_index,
                            builds: wire.builds.len(),
                        })?
                        .id
                }
                Err(_) => {
                    return Err(HeaderError::BadBuildIndex {
                        index,
                        build_index: run.build_index,
                        builds: wire.builds.len(),
                    });
                }
            };
            let overflow = HeaderError::Overflow { index };
            let len = run.blocks.checked_mul(wire.block_size).ok_or(overflow)?;
            let storage_offset = run
                .storage_block
                .checked_mul(wire.block_size)
                .ok_or(HeaderError::Overflow { index })?;
            mappings.push(Mapping {
                offset,
                len,
                build,
                storage_offset,
            });
            offset = offset
                .checked_add(len)
                .ok_or(HeaderError::Overflow { index })?;
        }
        let header = Header {
            version: HEADER_VERSION,
            block_size: wire.block_size,
            size: wire.size,
            generation: wire.generation,
            build: wire.build,
            base: wire.base,
            builds: wire.builds,
            mappings,
        };
        header.validate()?;
        Ok(header)
    }

    /// The header as a complete container (validated first).
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        self.validate()?;
        container::encode(Kind::Header, HEADER_VERSION, &self.to_wire()?)
            .map_err(HeaderError::Encode)
    }

    /// Parses and validates a header container held in memory.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let wire: WireHeader =
            container::decode(bytes, Kind::Header, HEADER_VERSION, MAX_HEADER_BYTES)
                .map_err(HeaderError::Decode)?;
        Header::from_wire(wire)
    }

    /// Reads and validates a header file.
    pub fn read(path: &Path) -> Result<Header, HeaderError> {
        let wire: WireHeader =
            container::read(path, Kind::Header, HEADER_VERSION, MAX_HEADER_BYTES)?;
        Header::from_wire(wire).map_err(|source| HeaderError::InvalidFile {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Validates and writes the header atomically.
    pub fn write(&self, path: &Path) -> Result<(), HeaderError> {
        self.validate()?;
        container::write(path, Kind::Header, HEADER_VERSION, &self.to_wire()?)?;
        Ok(())
    }

    /// Totals for `wrenn-snapshot inspect` and logs.
    pub fn summary(&self) -> Summary {
        let mut served: HashMap<BuildId, u64> = HashMap::new();
        let mut zero_bytes = 0;
        for m in &self.mappings {
            if m.build.is_zero() {
                zero_bytes += m.len;
            } else {
                *served.entry(m.build).or_default() += m.len;
            }
        }
        let builds = self
            .builds
            .iter()
            .map(|info| {
                let bytes = served.get(&info.id).copied().unwrap_or(0);
                BuildUsage {
                    id: info.id,
                    blocks: bytes / self.block_size.max(1),
                    bytes,
                    data_len: info.data_len,
                }
            })
            .collect();
        Summary {
            generation: self.generation,
            build: self.build,
            base: self.base,
            size: self.size,
            block_size: self.block_size,
            runs: self.mappings.len(),
            zero_bytes,
            builds,
        }
    }
}

/// Reads and validates a header file (same as [`Header::read`]).
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    Header::read(path)
}

/// Validates and atomically writes a header file (same as [`Header::write`]).
pub fn write_header(path: &Path, header: &Header) -> Result<(), HeaderError> {
    header.write(path)
}

/// What one build contributes to a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildUsage {
    pub id: BuildId,
    /// Blocks of the device it serves.
    pub blocks: u64,
    pub bytes: u64,
    /// Its data file's length.
    pub data_len: u64,
}

/// Totals of a header, printed by `wrenn-snapshot inspect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub generation: u64,
    pub build: BuildId,
    pub base: BuildId,
    pub size: u64,
    pub block_size: u64,
    /// Number of mapping runs.
    pub runs: usize,
    pub zero_bytes: u64,
    pub builds: Vec<BuildUsage>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let block_size = self.block_size.max(1);
        writeln!(f, "generation  {}", self.generation)?;
        writeln!(f, "build       {}", self.build)?;
        writeln!(f, "base        {}", self.base)?;
        writeln!(
            f,
            "size        {} bytes ({} blocks of {})",
            self.size,
            self.size / block_size,
            self.block_size
        )?;
        writeln!(f, "runs        {}", self.runs)?;
        writeln!(
            f,
            "zero        {} bytes ({} blocks)",
            self.zero_bytes,
            self.zero_bytes / block_size
        )?;
        writeln!(f, "builds      {}", self.builds.len())?;
        for usage in &self.builds {
            let mut role = String::new();
            if usage.id == self.base {
                role.push_str(" (base)");
            }
            if usage.id == self.build {
                role.push_str(" (this build)");
            }
            writeln!(
                f,
                "  {}  serves {} blocks ({} bytes), data file {} bytes{}",
                usage.id, usage.blocks, usage.bytes, usage.data_len, role
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.summary().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: u64 = 4096;

    fn id(n: u8) -> BuildId {
        BuildId::from_bytes([n; 16])
    }

    fn data(first_block: u64, blocks: u64) -> DirtyRun {
        DirtyRun {
            run: Run {
                first_block,
                blocks,
            },
            zero: false,
        }
    }

    fn zero(first_block: u64, blocks: u64) -> DirtyRun {
        DirtyRun {
            zero: true,
            ..data(first_block, blocks)
        }
    }

    fn full(blocks: u64) -> Header {
        Header::full(id(1), blocks * BS, BS, &[]).unwrap()
    }

    #[test]
    fn test_header_full_with_zero_runs_maps_identity_and_zero() {
        let runs = [Run {
            first_block: 2,
            blocks: 3,
        }];
        let h = Header::full(id(1), 10 * BS, BS, &runs).unwrap();
        assert_eq!(h.mappings.len(), 3);
        assert_eq!(h.lookup(BS + 5).unwrap().storage_offset, BS + 5);
        assert!(h.lookup(2 * BS).unwrap().is_zero());
        assert_eq!(h.lookup(2 * BS).unwrap().run_remaining, 3 * BS);
        assert_eq!(h.lookup(7 * BS).unwrap().storage_offset, 7 * BS);
        assert_eq!(
            h.builds,
            vec![BuildInfo {
                id: id(1),
                data_len: 10 * BS
            }]
        );
    }

    #[test]
    fn test_header_full_all_zero_references_no_build() {
        let runs = [Run {
            first_block: 0,
            blocks: 4,
        }];
        let h = Header::full(id(1), 4 * BS, BS, &runs).unwrap();
        assert!(h.builds.is_empty());
        assert_eq!(h.mappings.len(), 1);
    }

    #[test]
    fn test_header_full_unaligned_size_rejected() {
        assert!(matches!(
            Header::full(id(1), BS + 1, BS, &[]),
            Err(HeaderError::UnalignedSize { .. })
        ));
    }

    #[test]
    fn test_header_from_image_rounds_up_size() {
        let h = Header::from_image(id(1), 3 * BS + 10).unwrap();
        assert_eq!(h.size, 4 * BS);
        assert_eq!(h.builds[0].data_len, 3 * BS + 10);
        assert_eq!(h.lookup(4 * BS - 1).unwrap().storage_offset, 4 * BS - 1);
        assert_eq!(h.lookup(4 * BS), None);
    }

    #[test]
    fn test_header_apply_diff_splits_older_mapping() {
        let h = full(10).apply_diff(id(2), &[data(3, 2)]).unwrap();
        assert_eq!(h.generation, 1);
        assert_eq!((h.build, h.base), (id(2), id(1)));
        assert_eq!(h.mappings.len(), 3);
        // Left part, new run, right part shifted by the cut.
        assert_eq!(h.mappings[0].len, 3 * BS);
        assert_eq!(
            h.lookup(3 * BS).unwrap(),
            Location {
                build: id(2),
                storage_offset: 0,
                run_remaining: 2 * BS
            }
        );
        let right = h.lookup(5 * BS).unwrap();
        assert_eq!((right.build, right.storage_offset), (id(1), 5 * BS));
        assert_eq!(h.data_len(id(2)), Some(2 * BS));
    }

    #[test]
    fn test_header_apply_diff_packs_data_runs_in_order() {
        let h = full(10)
            .apply_diff(id(2), &[data(1, 1), zero(2, 1), data(6, 2)])
            .unwrap();
        assert_eq!(h.lookup(BS).unwrap().storage_offset, 0);
        assert!(h.lookup(2 * BS).unwrap().is_zero());
        assert_eq!(h.lookup(6 * BS).unwrap().storage_offset, BS);
        assert_eq!(h.lookup(7 * BS).unwrap().storage_offset, 2 * BS);
        assert_eq!(h.data_len(id(2)), Some(3 * BS));
    }

    #[test]
    fn test_header_apply_diff_covering_everything_drops_old_build() {
        let h = full(4).apply_diff(id(2), &[data(0, 4)]).unwrap();
        assert_eq!(
            h.builds,
            vec![BuildInfo {
                id: id(2),
                data_len: 4 * BS
            }]
        );
        assert_eq!(h.base, id(1));
    }

    #[test]
    fn test_header_apply_diff_adjacent_same_storage_merges() {
        // Blocks 3 and 4 dirtied by the same diff in two runs: storage-contiguous, merge.
        let h = full(10)
            .apply_diff(id(2), &[data(3, 1), data(4, 1)])
            .unwrap();
        assert_eq!(h.mappings.len(), 3);
        // Rewriting a hole back to zero merges the zero runs.
        let h = full(10)
            .apply_diff(id(2), &[zero(2, 2)])
            .unwrap()
            .apply_diff(id(3), &[zero(4, 1)])
            .unwrap();
        assert_eq!(h.mappings.len(), 3);
        assert_eq!(h.lookup(2 * BS).unwrap().run_remaining, 3 * BS);
    }

    #[test]
    fn test_header_apply_diff_unordered_runs_rejected() {
        let err = full(10).apply_diff(id(2), &[data(5, 1), data(3, 1)]);
        assert!(matches!(err, Err(HeaderError::RunOrder { index: 1, .. })));
        let err = full(10).apply_diff(id(2), &[data(3, 2), data(4, 1)]);
        assert!(matches!(err, Err(HeaderError::RunOrder { .. })));
    }

    #[test]
    fn test_header_apply_diff_out_of_range_run_rejected() {
        let err = full(10).apply_diff(id(2), &[data(9, 2)]);
        assert!(matches!(err, Err(HeaderError::RunOutOfRange { .. })));
        let err = full(10).apply_diff(id(2), &[data(u64::MAX, 2)]);
        assert!(matches!(err, Err(HeaderError::RunOutOfRange { .. })));
        let err = full(10).apply_diff(id(2), &[data(1, 0)]);
        assert!(matches!(err, Err(HeaderError::EmptyRun { .. })));
    }

    #[test]
    fn test_header_apply_diff_reused_build_rejected() {
        let h = full(10).apply_diff(id(2), &[data(1, 1)]).unwrap();
        for reused in [id(1), id(2)] {
            assert!(matches!(
                h.apply_diff(reused, &[]),
                Err(HeaderError::BuildReused { .. })
            ));
        }
        assert!(matches!(
            h.apply_diff(BuildId::ZERO, &[]),
            Err(HeaderError::ZeroId { .. })
        ));
    }

    #[test]
    fn test_header_validate_gap_rejected() {
        let mut h = full(10).apply_diff(id(2), &[data(3, 2)]).unwrap();
        h.mappings[1].offset += BS;
        assert!(matches!(
            h.validate(),
            Err(HeaderError::Gap { index: 1, .. })
        ));
    }

    #[test]
    fn test_header_validate_short_coverage_rejected() {
        let mut h = full(10);
        h.size += BS;
        assert!(matches!(h.validate(), Err(HeaderError::Coverage { .. })));
    }

    #[test]
    fn test_header_validate_unknown_build_rejected() {
        let mut h = full(10);
        h.mappings[0].build = id(9);
        assert!(matches!(
            h.validate(),
            Err(HeaderError::UnknownBuild { .. })
        ));
    }

    #[test]
    fn test_header_validate_storage_past_data_len_rejected() {
        let mut h = full(10);
        h.builds[0].data_len = 9 * BS;
        assert!(matches!(
            h.validate(),
            Err(HeaderError::StorageOutOfRange { .. })
        ));
    }

    #[test]
    fn test_header_validate_unaligned_mapping_rejected() {
        let mut h = full(10).apply_diff(id(2), &[data(3, 2)]).unwrap();
        h.mappings[2].storage_offset += 1;
        assert!(matches!(h.validate(), Err(HeaderError::Unaligned { .. })));
    }

    #[test]
    fn test_header_validate_generation_zero_base_mismatch_rejected() {
        let mut h = full(10);
        h.base = id(7);
        assert!(matches!(
            h.validate(),
            Err(HeaderError::BaseNotBuild { .. })
        ));
    }

    #[test]
    fn test_header_validate_unreferenced_and_duplicate_builds_rejected() {
        let mut h = full(10);
        h.builds.push(BuildInfo {
            id: id(5),
            data_len: 0,
        });
        assert!(matches!(
            h.validate(),
            Err(HeaderError::UnreferencedBuild { .. })
        ));
        h.builds[1].id = id(1);
        assert!(matches!(
            h.validate(),
            Err(HeaderError::DuplicateBuild { .. })
        ));
    }

    #[test]
    fn test_header_write_read_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("memfile.header");
        let h = full(10)
            .apply_diff(id(2), &[data(3, 2), zero(7, 1)])
            .unwrap();
        write_header(&path, &h).unwrap();
        assert_eq!(read_header(&path).unwrap(), h);
    }

    #[test]
    fn test_header_read_invalid_payload_names_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("memfile.header");
        let mut wire = full(10).to_wire().unwrap();
        wire.size = 3 * BS;
        container::write(&path, Kind::Header, HEADER_VERSION, &wire).unwrap();
        let err = Header::read(&path).unwrap_err();
        assert!(matches!(err, HeaderError::InvalidFile { .. }));
        assert!(err.to_string().contains("memfile.header"));
    }

    #[test]
    fn test_header_decode_bad_build_index_rejected() {
        let mut wire = full(10).to_wire().unwrap();
        wire.runs[0].build_index = 2;
        let bytes = container::encode(Kind::Header, HEADER_VERSION, &wire).unwrap();
        assert!(matches!(
            Header::decode(&bytes),
            Err(HeaderError::BadBuildIndex { .. })
        ));
    }

    #[test]
    fn test_header_summary_counts_per_build() {
        let h = full(10)
            .apply_diff(id(2), &[data(3, 2), zero(7, 1)])
            .unwrap();
        let s = h.summary();
        assert_eq!(s.runs, 5);
        assert_eq!(s.zero_bytes, BS);
        let by_id: HashMap<_, _> = s.builds.iter().map(|u| (u.id, u.blocks)).collect();
        assert_eq!(by_id[&id(1)], 7);
        assert_eq!(by_id[&id(2)], 2);
        let text = h.to_string();
        assert!(text.contains("generation  1"), "{text}");
        assert!(text.contains(&id(2).to_string()), "{text}");
    }

    /// The naive model: one (build, storage offset) per block.
    type Model = Vec<(BuildId, u64)>;

    /// Turns a per-block choice (None = clean, Some(zero)) into dirty runs, and applies it
    /// to the model.
    fn diff_from_choices(
        choices: &[Option<bool>],
        build: BuildId,
        model: &mut Model,
    ) -> Vec<DirtyRun> {
        let mut runs: Vec<DirtyRun> = Vec::new();
        let mut stored = 0;
        for (block, choice) in choices.iter().enumerate() {
            let Some(is_zero) = *choice else { continue };
            let block = u64::try_from(block).unwrap();
            model[usize::try_from(block).unwrap()] = if is_zero {
                (BuildId::ZERO, 0)
            } else {
                stored += 1;
                (build, (stored - 1) * BS)
            };
            match runs.last_mut() {
                Some(last) if last.run.end_block() == block && last.zero == is_zero => {
                    last.run.blocks += 1;
                }
                _ => runs.push(DirtyRun {
                    run: Run {
                        first_block: block,
                        blocks: 1,
                    },
                    zero: is_zero,
                }),
            }
        }
        runs
    }

    fn choices(blocks: usize) -> impl Strategy<Value = Vec<Option<bool>>> {
        proptest::collection::vec(
            prop_oneof![3 => Just(None), 2 => Just(Some(false)), 1 => Just(Some(true))],
            blocks,
        )
    }

    fn chain() -> impl Strategy<Value = (usize, Vec<Vec<Option<bool>>>)> {
        (1usize..48).prop_flat_map(|blocks| {
            (
                Just(blocks),
                proptest::collection::vec(choices(blocks), 1..8),
            )
        })
    }

    proptest! {
        #[test]
        fn test_header_diff_chain_matches_model((blocks, layers) in chain(), probe in 0u64..BS) {
            let size = u64::try_from(blocks).unwrap() * BS;
            // Generation 0: a Full whose zero blocks come from the first layer's choices.
            let zero_runs: Vec<Run> = {
                let mut scratch = vec![(id(1), 0); blocks];
                diff_from_choices(&layers[0], id(1), &mut scratch)
                    .into_iter().filter(|d| d.zero).map(|d| d.run).collect()
            };
            let mut header = Header::full(id(1), size, BS, &zero_runs).unwrap();
            let mut model: Model = (0..size / BS).map(|b| (id(1), b * BS)).collect();
            for run in &zero_runs {
                for b in run.first_block..run.end_block() {
                    model[usize::try_from(b).unwrap()] = (BuildId::ZERO, 0);
                }
            }
            for (n, layer) in layers.iter().enumerate().skip(1) {
                let build = id(u8::try_from(n + 1).unwrap());
                let runs = diff_from_choices(layer, build, &mut model);
                header = header.apply_diff(build, &runs).unwrap();
                prop_assert_eq!(header.generation, u64::try_from(n).unwrap());
            }
            header.validate().unwrap();
            for (block, &(build, storage)) in model.iter().enumerate() {
                let offset = u64::try_from(block).unwrap() * BS + probe;
                let loc = header.lookup(offset).unwrap();
                prop_assert_eq!(loc.build, build);
                let expected = if build.is_zero() { 0 } else { storage + probe };
                prop_assert_eq!(loc.storage_offset, expected);
                // The run really continues: the last byte it claims agrees with the model.
                let last = offset + loc.run_remaining - 1;
                let (last_build, last_storage) = model[usize::try_from(last / BS).unwrap()];
                prop_assert_eq!(last_build, build);
                if !build.is_zero() {
                    prop_assert_eq!(last_storage + last % BS, loc.storage_offset + loc.run_remaining - 1);
                }
            }
            prop_assert_eq!(header.lookup(size), None);
            // Normalised: no two neighbours could merge.
            for pair in header.mappings.windows(2) {
                prop_assert!(!pair[0].continues_into(&pair[1]));
            }
            let bytes = header.encode().unwrap();
            prop_assert_eq!(Header::decode(&bytes).unwrap(), header);
        }

        #[test]
        fn test_header_decode_random_payload_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            // Wrap the bytes in a valid envelope so the postcard decoder and validation run.
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&container::MAGIC);
            bytes.extend_from_slice(&HEADER_VERSION.to_le_bytes());
            bytes.extend_from_slice(&(Kind::Header as u32).to_le_bytes());
            bytes.extend_from_slice(&u64::try_from(payload.len()).unwrap().to_le_bytes());
            bytes.extend_from_slice(&payload);
            let crc = crc32fast::hash(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
            if let Ok(header) = Header::decode(&bytes) {
                prop_assert!(header.validate().is_ok());
            }
        }

        #[test]
        fn test_header_decode_mutated_payload_never_panics(index in any::<usize>(), value in any::<u8>()) {
            let header = full(10).apply_diff(id(2), &[data(3, 2), zero(7, 1)]).unwrap();
            let mut bytes = header.encode().unwrap();
            let payload_end = bytes.len() - 4;
            let index = container::PREFIX_LEN + index % (payload_end - container::PREFIX_LEN);
            bytes[index] = value;
            let crc = crc32fast::hash(&bytes[..payload_end]);
            bytes[payload_end..].copy_from_slice(&crc.to_le_bytes());
            if let Ok(decoded) = Header::decode(&bytes) {
                prop_assert!(decoded.validate().is_ok());
            }
        }
    }
}
