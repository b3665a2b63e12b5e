//! Pages from a build of a layered store: the build's memory header says, for every page,
//! which build's `memfile` holds it (one lookup, whatever the chain's depth) or that it is
//! zero (served with the kernel's zero page, nothing read).

use std::path::Path;

use wrenn_snapshot::header::Header;
use wrenn_snapshot::id::BuildId;
use wrenn_snapshot::layered::LayeredFile;
use wrenn_snapshot::store::{DeviceKind, Store};

use crate::source::{PageKind, PageSource, SourceError};

/// Opening a build's memory failed.
#[derive(Debug, thiserror::Error)]
pub enum LayeredSourceError {
    #[error("build {build}: reading its memory header")]
    Header {
        build: BuildId,
        #[source]
        source: wrenn_snapshot::header::HeaderError,
    },
    #[error("build {build}: opening the memory files its header names")]
    Open {
        build: BuildId,
        #[source]
        source: wrenn_snapshot::layered::LayeredError,
    },
}

/// Guest memory of one build, read through its header.
#[derive(Debug)]
pub struct LayeredSource {
    file: LayeredFile,
}

impl LayeredSource {
    /// Opens build `build` of the store at `root`: its header, then every build's memory
    /// file the header names (a missing or short one is an error here, not at fault time).
    pub fn open(root: &Path, build: BuildId) -> Result<Self, LayeredSourceError> {
        let store = Store::new(root);
        let header = Header::read(&store.mem_header(build))
            .map_err(|source| LayeredSourceError::Header { build, source })?;
        let file = LayeredFile::open(&store, header, &DeviceKind::Mem)
            .map_err(|source| LayeredSourceError::Open { build, source })?;
        Ok(Self { file })
    }

    pub fn header(&self) -> &Header {
        self.file.header()
    }
}

impl PageSource for LayeredSource {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_page(&self, offset: u64, buf: &mut [u8]) -> Result<PageKind, SourceError> {
        let len = buf.len();
        let out_of_range = || SourceError::OutOfRange {
            offset,
            len,
            size: self.file.size(),
        };
        let location = self.file.location(offset).ok_or_else(out_of_range)?;
        if location.is_zero() && location.run_remaining >= len as u64 {
            return Ok(PageKind::Zero);
        }
        self.file
            .read_at(offset, buf)
            .map_err(|e| SourceError::Backend {
                offset,
                what: "reading the layered memory".into(),
                source: Some(Box::new(e)),
            })?;
        Ok(PageKind::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_snapshot::diff::DiffWriter;
    use wrenn_snapshot::header::Run;

    const PAGE: usize = 4096;

    /// A 16-page Full whose page i holds byte i (page 3 zero), then a diff rewriting page 5.
    fn two_generations(root: &Path) -> (BuildId, BuildId) {
        let store = Store::new(root);
        let base = BuildId::random().unwrap();
        store.create_build_dir(base).unwrap();
        let mut data = vec![0u8; 16 * PAGE];
        for page in 0..16 {
            if page != 3 {
                data[page * PAGE..(page + 1) * PAGE].fill(u8::try_from(page).unwrap());
            }
        }
        std::fs::write(store.mem_data(base), &data).unwrap();
        let zero = [Run {
            first_block: 3,
            blocks: 1,
        }];
        let header = Header::full(base, data.len() as u64, PAGE as u64, &zero).unwrap();
        header.write(&store.mem_header(base)).unwrap();

        let top = BuildId::random().unwrap();
        store.create_build_dir(top).unwrap();
        let mut writer = DiffWriter::create(&store.mem_data(top), PAGE as u64).unwrap();
        writer.push(5, &[0xee; PAGE]).unwrap();
        let runs = writer.finish().unwrap().runs;
        let header = header.apply_diff(top, &runs).unwrap();
        header.write(&store.mem_header(top)).unwrap();
        (base, top)
    }

    #[test]
    fn test_layered_source_serves_newest_layer_and_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (_, top) = two_generations(dir.path());
        let source = LayeredSource::open(dir.path(), top).unwrap();
        assert_eq!(source.size(), 16 * PAGE as u64);
        let mut buf = vec![0u8; PAGE];
        assert_eq!(
            source.read_page(3 * PAGE as u64, &mut buf).unwrap(),
            PageKind::Zero
        );
        assert_eq!(
            source.read_page(5 * PAGE as u64, &mut buf).unwrap(),
            PageKind::Data
        );
        assert!(buf.iter().all(|&b| b == 0xee));
        assert_eq!(
            source.read_page(7 * PAGE as u64, &mut buf).unwrap(),
            PageKind::Data
        );
        assert!(buf.iter().all(|&b| b == 7));
        assert!(source.read_page(16 * PAGE as u64, &mut buf).is_err());
    }

    #[test]
    fn test_layered_source_missing_layer_is_an_error_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = two_generations(dir.path());
        std::fs::remove_file(Store::new(dir.path()).mem_data(base)).unwrap();
        let err = LayeredSource::open(dir.path(), top).unwrap_err();
        let chain = format!("{:?}", anyhow_chain(&err));
        assert!(chain.contains(&base.to_string()), "{chain}");
    }

    fn anyhow_chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}
