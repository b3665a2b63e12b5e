//! Guest memory regions: from fault addresses (VMM address space) to offsets in the flat
//! memory range, and back.
//!
//! ```text
//!  VMM address space                         flat memory range (PageSource offsets)
//!  base0 +-----------+ base0+size0           0 +-----------+-----------+ size0+size1
//!        | region 0  | ---------------------->  | region 0  | region 1  |
//!        +-----------+                          +-----------+-----------+
//!  base1 +-----------+                          ^ offset0=0 ^ offset1=size0
//!        | region 1  | ---------------------------------------^
//!        +-----------+
//!  offset(addr) = region.offset + (page_of(addr) - region.base)
//! ```
//!
//! A [`RegionMap`] is only built from regions that passed validation: non-empty, page-aligned,
//! no overflow, inside the source, and overlapping neither in the address space nor in the
//! offset space. Lookups are binary searches.

use std::ops::Range;

/// The only page size served for now (the brief's memory block size).
pub const PAGE_SIZE: u64 = 4096;

/// Most regions a VMM may announce (Firecracker sends one or two on x86).
pub const MAX_REGIONS: usize = 1024;

/// One guest memory region, as announced by the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Start of the mapping in the VMM's address space.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where the region starts in the flat memory range.
    pub offset: u64,
}

/// A page resolved from a fault address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLocation {
    /// Page-aligned address in the VMM's address space.
    pub host_addr: u64,
    /// Page-aligned offset in the flat memory range.
    pub offset: u64,
}

/// The announced regions do not describe a servable memory layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("the region list is empty")]
    Empty,
    #[error("{count} regions announced, at most {MAX_REGIONS} are accepted")]
    TooMany { count: usize },
    #[error("region {index}: page_size {page_size} is not supported (only {PAGE_SIZE})")]
    PageSize { index: usize, page_size: u64 },
    #[error("region {index}: size is zero")]
    ZeroSize { index: usize },
    #[error("region {index}: {field} {value:#x} is not a multiple of the page size {PAGE_SIZE}")]
    Unaligned {
        index: usize,
        field: &'static str,
        value: u64,
    },
    #[error("region {index}: {field} + size overflows")]
    Overflow { index: usize, field: &'static str },
    #[error(
        "region {index}: offset range [{start:#x}, {end:#x}) exceeds the source size {source_size:#x}"
    )]
    BeyondSource {
        index: usize,
        start: u64,
        end: u64,
        source_size: u64,
    },
    #[error("regions {first} and {second} overlap in the {space}")]
    Overlap {
        first: usize,
        second: usize,
        space: &'static str,
    },
}

/// Validated regions, sorted by host address.
#[derive(Debug, Clone)]
pub struct RegionMap {
    by_host: Vec<Region>,
    end_offset: u64,
}

impl RegionMap {
    /// Validates `regions` (each with its announced page size) against a source of
    /// `source_size` bytes.
    pub fn new(regions: &[(Region, u64)], source_size: u64) -> Result<Self, RegionError> {
        if regions.is_empty() {
            return Err(RegionError::Empty);
        }
        if regions.len() > MAX_REGIONS {
            return Err(RegionError::TooMany {
                count: regions.len(),
            });
        }
        let mut indexed = Vec::with_capacity(regions.len());
        for (index, (region, page_size)) in regions.iter().enumerate() {
            if *page_size != PAGE_SIZE {
                return Err(RegionError::PageSize {
                    index,
                    page_size: *page_size,
                });
            }
            if region.size == 0 {
                return Err(RegionError::ZeroSize { index });
            }
            for (field, value) in [
                ("base_host_virt_addr", region.base),
                ("size", region.size),
                ("offset", region.offset),
            ] {
                if value % PAGE_SIZE != 0 {
                    return Err(RegionError::Unaligned {
                        index,
                        field,
                        value,
                    });
                }
            }
            if region.base.checked_add(region.size).is_none() {
                return Err(RegionError::Overflow {
                    index,
                    field: "base_host_virt_addr",
                });
            }
            let end = region
                .offset
                .checked_add(region.size)
                .ok_or(RegionError::Overflow {
                    index,
                    field: "offset",
                })?;
            if end > source_size {
                return Err(RegionError::BeyondSource {
                    index,
                    start: region.offset,
                    end,
                    source_size,
                });
            }
            indexed.push((index, *region));
        }
        check_disjoint(&mut indexed, "offset space", |r| r.offset)?;
        check_disjoint(&mut indexed, "host address space", |r| r.base)?;
        let end_offset = indexed
            .iter()
            .map(|(_, r)| r.offset + r.size)
            .max()
            .unwrap_or(0);
        Ok(Self {
            by_host: indexed.into_iter().map(|(_, region)| region).collect(),
            end_offset,
        })
    }

    /// The regions, sorted by host address.
    pub fn regions(&self) -> &[Region] {
        &self.by_host
    }

    /// One past the highest offset any region covers.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// Number of pages in `[0, end_offset)`.
    pub fn page_count(&self) -> u64 {
        self.end_offset / PAGE_SIZE
    }

    /// Resolves a fault address to its page, or `None` outside every region.
    pub fn translate(&self, addr: u64) -> Option<PageLocation> {
        let region = self.region_at(addr)?;
        let host_addr = addr - addr % PAGE_SIZE;
        Some(PageLocation {
            host_addr,
            offset: region.offset + (host_addr - region.base),
        })
    }

    /// The host address of the page at flat `offset`, or `None` if no region covers it.
    pub fn host_address(&self, offset: u64) -> Option<u64> {
        let offset = offset - offset % PAGE_SIZE;
        self.by_host
            .iter()
            .find(|r| offset >= r.offset && offset - r.offset < r.size)
            .map(|r| r.base + (offset - r.offset))
    }

    /// The flat offset ranges covered by the host range `[start, end)`, clipped to the
    /// regions and to whole pages inside it (a REMOVE never drops a partial page).
    pub fn offset_ranges(&self, start: u64, end: u64) -> Vec<Range<u64>> {
        let start = start.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
        let end = end - end % PAGE_SIZE;
        self.by_host
            .iter()
            .filter_map(|r| {
                let lo = start.max(r.base);
                let hi = end.min(r.base + r.size);
                (lo < hi).then(|| r.offset + (lo - r.base)..r.offset + (hi - r.base))
            })
            .collect()
    }

    fn region_at(&self, addr: u64) -> Option<&Region> {
        let after = self.by_host.partition_point(|r| r.base <= addr);
        let region = self.by_host.get(after.checked_sub(1)?)?;
        (addr - region.base < region.size).then_some(region)
    }
}

/// Sorts `regions` by `key` and fails if two of them overlap on that axis.
fn check_disjoint(
    regions: &mut [(usize, Region)],
    space: &'static str,
    key: impl Fn(&Region) -> u64,
) -> Result<(), RegionError> {
    regions.sort_by_key(|(_, r)| key(r));
    for pair in regions.windows(2) {
        let [(first, a), (second, b)] = pair else {
            continue;
        };
        // Both ends were checked for overflow by the caller.
        if key(a) + a.size > key(b) {
            return Err(RegionError::Overlap {
                first: *first.min(second),
                second: *first.max(second),
                space,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region(base: u64, size: u64, offset: u64) -> (Region, u64) {
        (Region { base, size, offset }, PAGE_SIZE)
    }

    #[test]
    fn test_translate_two_regions_maps_each_to_its_offset() {
        let map = RegionMap::new(
            &[region(0x10_0000, 0x2000, 0), region(0x5000, 0x1000, 0x2000)],
            0x3000,
        )
        .expect("valid");
        let page = map.translate(0x10_1234).expect("inside region 0");
        assert_eq!(
            page,
            PageLocation {
                host_addr: 0x10_1000,
                offset: 0x1000
            }
        );
        assert_eq!(map.translate(0x5fff).expect("region 1").offset, 0x2000);
        assert_eq!(map.translate(0x6000), None);
        assert_eq!(map.translate(0x4fff), None);
        assert_eq!(map.translate(0x10_2000), None);
        assert_eq!(map.end_offset(), 0x3000);
    }

    #[test]
    fn test_new_empty_list_is_rejected() {
        assert_eq!(
            RegionMap::new(&[], 4096).expect_err("empty"),
            RegionError::Empty
        );
    }

    #[test]
    fn test_new_unaligned_size_names_the_field() {
        let err = RegionMap::new(&[region(0x1000, 0x1800, 0)], 0x2000).expect_err("unaligned");
        assert!(
            matches!(err, RegionError::Unaligned { field: "size", .. }),
            "{err}"
        );
    }

    #[test]
    fn test_new_huge_page_size_is_rejected() {
        let err = RegionMap::new(
            &[(
                Region {
                    base: 0,
                    size: 1 << 21,
                    offset: 0,
                },
                1 << 21,
            )],
            1 << 21,
        )
        .expect_err("2M pages");
        assert!(
            matches!(
                err,
                RegionError::PageSize {
                    page_size: 2_097_152,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn test_new_beyond_source_is_rejected() {
        let err = RegionMap::new(&[region(0x1000, 0x2000, 0x1000)], 0x2000).expect_err("beyond");
        assert!(
            matches!(err, RegionError::BeyondSource { end: 0x3000, .. }),
            "{err}"
        );
    }

    #[test]
    fn test_new_overlapping_offsets_are_rejected() {
        let err = RegionMap::new(
            &[region(0x1000, 0x2000, 0), region(0x8000, 0x1000, 0x1000)],
            0x4000,
        )
        .expect_err("overlap");
        assert!(
            matches!(
                err,
                RegionError::Overlap {
                    space: "offset space",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn test_new_overlapping_host_ranges_are_rejected() {
        let err = RegionMap::new(
            &[region(0x1000, 0x2000, 0), region(0x2000, 0x1000, 0x2000)],
            0x4000,
        )
        .expect_err("overlap");
        assert!(
            matches!(
                err,
                RegionError::Overlap {
                    space: "host address space",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn test_new_overflowing_base_is_rejected() {
        let err = RegionMap::new(&[region(u64::MAX - 0xfff, 0x2000, 0)], 0x4000).expect_err("wrap");
        assert!(matches!(err, RegionError::Overflow { .. }), "{err}");
    }

    #[test]
    fn test_offset_ranges_clip_to_regions_and_whole_pages() {
        let map = RegionMap::new(
            &[region(0x10000, 0x4000, 0), region(0x20000, 0x2000, 0x4000)],
            0x6000,
        )
        .expect("valid");
        assert_eq!(
            map.offset_ranges(0x0, 0x30000),
            vec![0..0x4000, 0x4000..0x6000]
        );
        assert_eq!(map.offset_ranges(0x11001, 0x13000), vec![0x2000..0x3000]);
        assert_eq!(
            map.offset_ranges(0x11001, 0x11fff),
            Vec::<Range<u64>>::new()
        );
    }

    /// Random valid layouts: regions laid out in offset order, shuffled in host space.
    fn layout() -> impl Strategy<Value = Vec<(Region, u64)>> {
        proptest::collection::vec((1u64..8, 0u64..4), 1..6).prop_map(|sizes| {
            let mut offset = 0;
            let mut base = 0x7f00_0000_0000u64;
            let mut regions = Vec::new();
            for (pages, gap) in sizes.iter().rev() {
                let size = pages * PAGE_SIZE;
                regions.push(region(base, size, offset));
                offset += size;
                base += size + gap * PAGE_SIZE;
            }
            regions.reverse();
            regions
        })
    }

    proptest! {
        #[test]
        fn test_translate_and_host_address_are_inverse(regions in layout(), probe in 0u64..(64 * PAGE_SIZE)) {
            let total: u64 = regions.iter().map(|(r, _)| r.size).sum();
            let map = RegionMap::new(&regions, total).expect("valid layout");
            let offset = probe % total;
            let host = map.host_address(offset).expect("every offset is covered");
            let page = map.translate(host + offset % PAGE_SIZE).expect("host is inside");
            prop_assert_eq!(page.offset, offset - offset % PAGE_SIZE);
            prop_assert_eq!(page.host_addr, host);
        }

        #[test]
        fn test_translate_matches_linear_scan(regions in layout(), probe in 0u64..(64 * PAGE_SIZE)) {
            let total: u64 = regions.iter().map(|(r, _)| r.size).sum();
            let map = RegionMap::new(&regions, total).expect("valid layout");
            let addr = 0x7f00_0000_0000u64 + probe;
            let expected = regions.iter().find(|(r, _)| addr >= r.base && addr < r.base + r.size)
                .map(|(r, _)| r.offset + (addr - addr % PAGE_SIZE - r.base));
            prop_assert_eq!(map.translate(addr).map(|p| p.offset), expected);
        }

        #[test]
        fn test_new_random_regions_never_panics(
            raw in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()), 0..6),
            source_size in any::<u64>(),
        ) {
            let regions: Vec<_> = raw.iter()
                .map(|(base, size, offset, page)| (Region { base: *base, size: *size, offset: *offset }, *page))
                .collect();
            if let Ok(map) = RegionMap::new(&regions, source_size) {
                prop_assert!(map.end_offset() <= source_size);
                for r in map.regions() {
                    prop_assert_eq!(map.translate(r.base).map(|p| p.offset), Some(r.offset));
                }
            }
        }
    }
}
